# common/lib.sh: shared by the Debian example's install, configure, image and
# verify steps.
#
# Sourced, never run:   . "$KILN_WORKSPACE/common/lib.sh"
#
# The steps run as root on the client (mmdebstrap's root mode, chroot for the
# configure step); none of them mounts anything or needs a loop device.

: "${KILN_WORKSPACE:?is not set: run this step under kiln (or set the KILN_* variables by hand)}"
: "${KILN_BUILD:?is not set}"
: "${KILN_JOB_ID:?is not set}"
: "${KILN_CONFIG_TYPE:?is not set}"

export LC_ALL=C TZ=UTC
umask 022
# sfdisk, mkfs.ext4 and friends live in /sbin or /usr/sbin, often not on a user's PATH.
PATH="$PATH:/usr/sbin:/sbin"
export PATH

# The installed tree, between the steps.
ROOTFS="$KILN_WORKSPACE/rootfs"
# The SKU is the job: its id names the machine (hostname, login prompt).
SKU="$KILN_JOB_ID"
# The Debian release and mirror (a client may point DEBIAN_MIRROR at a local one).
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The file system's UUID: derived from build and job, so that a job's fstab, GRUB
# configuration and image agree, and two runs of one job agree.
ROOT_UUID=$(printf 'kiln-debian\n%s\n%s\n' "$KILN_BUILD" "$KILN_JOB_ID" | sha256sum |
    awk '{ h = $1; print substr(h, 1, 8) "-" substr(h, 9, 4) "-4" substr(h, 14, 3) "-8" substr(h, 18, 3) "-" substr(h, 21, 12) }')

progress() { # MAJOR MINOR PERCENT
    printf '##kiln[progress major=%s minor=%s percent=%s]\n' "$1" "$2" "$3"
}

say() { printf '%s\n' "$*"; }

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# need TOOL PACKAGE: fail with the apt-get line that installs TOOL.
need() {
    command -v "$1" >/dev/null 2>&1 ||
        die "$1 not found (searched PATH, /usr/sbin and /sbin): install it on this client with: apt-get install $2"
}

need_root() {
    [ "$(id -u)" -eq 0 ] ||
        die "the Debian example's steps run as root (mmdebstrap's root mode, chroot): run the kiln client as root"
}

# The kernel version installed in the rootfs.
kernel_version() {
    _k=$(cd "$ROOTFS/boot" && ls vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$_k" ] || die "no kernel in $ROOTFS/boot: did the install step run?"
    printf '%s\n' "${_k#vmlinuz-}"
}

# bytes_of FILE: its size in bytes.
bytes_of() { wc -c <"$1" | tr -d ' '; }

# seconds since the epoch
now() { date +%s; }
