# common/install.sh: the install step's work, sourced by PRODUCT/install.sh after it
# sets PRODUCT and PACKAGES (comma-separated, on top of the base every SKU has).
#
# mmdebstrap installs Debian bookworm (variant minbase) into $ROOTFS. Downloaded
# packages and the package lists are kept in the client's job cache, in the entry
# $KILN_CACHE/apt-bookworm-amd64, so that the next SKU on this client downloads only
# what it lacks (see cache-in.sh and cache-out.sh).
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"
: "${PRODUCT:?is not set: source this from a product's install.sh}"
: "${PACKAGES:?is not set}"

need_root
need mmdebstrap mmdebstrap
: "${KILN_CACHE:?is not set: run this step under a kiln client that gives a job cache}"

# Every SKU boots: a kernel, an init, udev, and the bootloader's files.
BASE_PACKAGES="linux-image-amd64,systemd-sysv,udev,grub-pc-bin"
APT_CACHE="$KILN_CACHE/apt-$SUITE-amd64"
export APT_CACHE
mkdir -p "$APT_CACHE/archives" "$APT_CACHE/lists"
# Mark the entry used even if nothing new lands in it (the cache evicts the least
# recently used entries).
touch "$APT_CACHE"

say "kiln debian: installing $PRODUCT ($SUITE, minbase + $PACKAGES) for $SKU"
progress install mmdebstrap 5
rm -rf "$ROOTFS"
started=$(now)
# Documentation, manual pages and translations are left out: the images are for
# machines, and they are smaller and faster to build without them.
mmdebstrap --variant=minbase --mode=root --format=directory \
    --include="$BASE_PACKAGES,$PACKAGES" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='force-unsafe-io' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='sh "$KILN_WORKSPACE/common/cache-in.sh" "$1"' \
    --essential-hook='sh "$KILN_WORKSPACE/common/initramfs.sh" "$1"' \
    --customize-hook='sh "$KILN_WORKSPACE/common/cache-out.sh" "$1"' \
    "$SUITE" "$ROOTFS" "$MIRROR" 2>&1
progress install done 100
say "kiln debian: $PRODUCT installed in $(($(now) - started)) s: $(du -sm "$ROOTFS" | cut -f 1) MiB"
