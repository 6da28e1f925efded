# common/cache-in.sh ROOTFS: mmdebstrap setup hook. Puts the job cache's packages and
# package lists where apt in ROOTFS looks for them, before anything is downloaded:
# apt then downloads only the packages the cache lacks, and asks for the lists only
# if they changed. Hard links where the cache and the workspace share a file system.
set -eu
root=$1
: "${APT_CACHE:?is not set}"
mkdir -p "$root/var/cache/apt/archives/partial" "$root/var/lib/apt/lists/partial"
n=0
for deb in "$APT_CACHE"/archives/*.deb; do
    [ -f "$deb" ] || continue
    ln "$deb" "$root/var/cache/apt/archives/" 2>/dev/null || cp "$deb" "$root/var/cache/apt/archives/"
    n=$((n + 1))
done
for list in "$APT_CACHE"/lists/*; do
    [ -f "$list" ] || continue
    cp -p "$list" "$root/var/lib/apt/lists/"
done
# What came from the cache, for cache-out.sh to tell what was downloaded.
(cd "$root/var/cache/apt/archives" && ls *.deb 2>/dev/null || true) >"$KILN_WORKSPACE/apt-cached.list"
echo "kiln debian: apt cache: $n packages in $APT_CACHE"
