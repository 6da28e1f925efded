# pro/install.cmd: install step of the seed's example job (build 3700, job 1,
# CONFIGTYPE PRO). The .cmd name comes from the seed; kiln runs it with /bin/sh,
# cwd = the workspace. It "installs" a tiny system into $KILN_WORKSPACE/rootfs.
set -eu
: "${KILN_WORKSPACE:?is not set: run this step under kiln}"
: "${KILN_BUILD:?is not set}"
export LC_ALL=C TZ=UTC
umask 022

progress() { printf '##kiln[progress major=%s minor=%s percent=%s]\n' "$1" "$2" "$3"; }

root="$KILN_WORKSPACE/rootfs"
progress install format 0
rm -rf "$root"
for d in etc usr/bin usr/lib usr/share/doc var/log root tmp; do
    mkdir -p "$root/$d"
done
ln -s usr/bin "$root/bin"
chmod 0700 "$root/root"
chmod 1777 "$root/tmp"
progress install format 30

progress install files 40
cat >"$root/etc/os-release" <<EOF2
NAME="Professional"
ID=seed-pro
VERSION_ID=$KILN_BUILD
BUILD_ID=$KILN_BUILD
PRETTY_NAME="Professional (Main Build $KILN_BUILD)"
EOF2
printf 'pro\n' >"$root/etc/hostname"
printf '#!/bin/sh\necho "Professional, build %s"\n' "$KILN_BUILD" >"$root/usr/bin/about"
chmod 0755 "$root/usr/bin/about"
progress install files 70
# About 256 KiB of deterministic text standing in for the installed programs.
awk 'BEGIN { x = 3700; for (i = 0; i < 2340; i++) { l = ""; for (j = 0; j < 56; j++) {
    x = (x * 16807) % 2147483647; l = l sprintf("%02x", x % 256) } print l } }' \
    >"$root/usr/lib/pro.dat"
printf 'Example content for the seed build. Not software.\n' >"$root/usr/share/doc/README"
progress install done 100
echo "installed $(find "$root" | wc -l) entries into rootfs"
