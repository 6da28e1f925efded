# common/cache-out.sh ROOTFS: mmdebstrap customize hook. Adds the packages apt
# downloaded, and the current package lists, to the job cache; says how much was
# downloaded. Each file lands by a rename, so that a job running beside this one never
# sees half of it.
set -eu
root=$1
: "${APT_CACHE:?is not set}"
n_new=0
new_bytes=0
n_all=0
for deb in "$root"/var/cache/apt/archives/*.deb; do
    [ -f "$deb" ] || continue
    n_all=$((n_all + 1))
    name=${deb##*/}
    if ! grep -qxF "$name" "$KILN_WORKSPACE/apt-cached.list"; then
        n_new=$((n_new + 1))
        new_bytes=$((new_bytes + $(wc -c <"$deb")))
    fi
    if [ ! -e "$APT_CACHE/archives/$name" ]; then
        cp "$deb" "$APT_CACHE/archives/.$name.tmp"
        mv "$APT_CACHE/archives/.$name.tmp" "$APT_CACHE/archives/$name"
    fi
done
for list in "$root"/var/lib/apt/lists/*; do
    [ -f "$list" ] || continue
    name=${list##*/}
    [ "$name" = lock ] && continue
    cp -p "$list" "$APT_CACHE/lists/.$name.tmp"
    mv "$APT_CACHE/lists/.$name.tmp" "$APT_CACHE/lists/$name"
done
echo "kiln debian: apt cache: $n_all packages installed, $n_new downloaded ($new_bytes bytes), $((n_all - n_new)) from the cache"
