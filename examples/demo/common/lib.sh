# common/lib.sh: shared by the demo's install, configure and image steps.
#
# Sourced, never run:   . "$KILN_WORKSPACE/common/lib.sh"
#
# Everything here must give the same bytes on every client, whatever its
# workspace path, client id, user, umask, locale, time zone or clock: kiln
# expects two runs of one job to produce byte-identical images.

: "${KILN_WORKSPACE:?is not set: run this step under kiln (or set the KILN_* variables by hand)}"
: "${KILN_BUILD:?is not set}"
: "${KILN_JOB_ID:?is not set}"
: "${KILN_CONFIG_TYPE:?is not set}"

export LC_ALL=C TZ=UTC
umask 022
# mkfs.ext4, debugfs and e2fsck live in /sbin or /usr/sbin, often not on a user's PATH.
PATH="$PATH:/usr/sbin:/sbin"
export PATH

ROOTFS="$KILN_WORKSPACE/rootfs"
# Modes and owners that differ from the defaults (dirs 0755, files 0644 or 0755,
# owner root): "PATH MODE UID GID" lines, PATH relative to the rootfs.
ATTRS="$KILN_WORKSPACE/attrs.list"
# Every timestamp in the image (2023-11-14 22:13:20 UTC).
EPOCH=1700000000

progress() { # MAJOR MINOR PERCENT
    printf '##kiln[progress major=%s minor=%s percent=%s]\n' "$1" "$2" "$3"
}

say() { printf '%s\n' "$*"; }

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

need() { # TOOL PACKAGE
    command -v "$1" >/dev/null 2>&1 ||
        die "$1 not found (searched PATH, /usr/sbin and /sbin): install $2 on this client"
}

# seed_of STRING: a 32-bit number derived from STRING (POSIX cksum CRC).
seed_of() {
    printf '%s' "$1" | cksum | cut -d ' ' -f 1
}

# gen_file SEEDSTRING BYTES DEST: DEST gets BYTES of pseudo-random data that
# depend only on SEEDSTRING. Plain awk (mawk, gawk and busybox awk agree: all
# arithmetic stays exact in a double) and coreutils' base64; about 15 MiB/s.
gen_file() {
    awk -v seed="$(seed_of "$1")" -v bytes="$2" '
    BEGIN {
        A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        x = seed % 2147483646 + 1            # Park-Miller: x in [1, 2^31-2]
        for (i = 0; i < 4096; i++) {         # 4096 random 3-byte groups
            s = ""
            for (j = 0; j < 4; j++) {
                x = (x * 16807) % 2147483647
                s = s substr(A, x % 64 + 1, 1)
            }
            T[i] = s
        }
        steps = int((bytes + 5) / 6)         # each step: two groups, 6 bytes
        line = ""; k = 0
        for (i = 0; i < steps; i++) {
            x = (x * 16807) % 2147483647
            line = line T[x % 4096] T[int(x / 4096) % 4096]
            if (++k == 16) { print line; line = ""; k = 0 }
        }
        if (line != "") print line
    }' | base64 -d | head -c "$2" >"$3"
    [ "$(wc -c <"$3")" -eq "$2" ] || die "could not generate $3"
}

# set_attr PATH MODE [UID GID]: give PATH (relative to the rootfs) a mode and an
# owner other than the defaults; image.sh applies them after normalising the tree.
set_attr() {
    chmod "$2" "$ROOTFS/$1"
    printf '%s %s %s %s\n' "$1" "$2" "${3:-0}" "${4:-0}" >>"$ATTRS"
}

# make_fhs: an empty merged-/usr FHS tree.
make_fhs() {
    rm -rf "$ROOTFS" "$ATTRS"
    mkdir -p "$ROOTFS"
    : >"$ATTRS"
    for d in boot dev etc etc/default etc/profile.d etc/skel etc/systemd/system \
        home media mnt opt proc root run srv sys tmp \
        usr/bin usr/sbin usr/lib usr/libexec usr/share/doc usr/local/bin \
        var/cache var/lib var/lib/kiln-pkg/info var/log var/spool var/tmp; do
        mkdir -p "$ROOTFS/$d"
    done
    ln -s usr/bin "$ROOTFS/bin"
    ln -s usr/sbin "$ROOTFS/sbin"
    ln -s usr/lib "$ROOTFS/lib"
    ln -s ../run "$ROOTFS/var/run"
    set_attr root 0700
    set_attr tmp 1777
    set_attr var/tmp 1777
}

# install_pkg NAME VERSION KIB: a "package" of about KIB KiB: a library and a
# data file of pseudo-random bytes that depend only on NAME and VERSION (so
# every product that installs it carries the same bytes), a launcher, a
# copyright file, and its entry in the package database.
install_pkg() {
    _name=$1 _ver=$2 _kib=$3
    mkdir -p "$ROOTFS/usr/lib/$_name" "$ROOTFS/usr/share/$_name" "$ROOTFS/usr/share/doc/$_name"
    gen_file "$_name-$_ver/lib" $((_kib * 768)) "$ROOTFS/usr/lib/$_name/lib$_name.so.$_ver"
    gen_file "$_name-$_ver/data" $((_kib * 256)) "$ROOTFS/usr/share/$_name/$_name.dat"
    printf '#!/bin/sh\necho "%s %s (kiln demo package)"\n' "$_name" "$_ver" >"$ROOTFS/usr/bin/$_name"
    chmod 0755 "$ROOTFS/usr/bin/$_name"
    printf '%s %s\nDemo content generated for the kiln example build. Not software.\n' \
        "$_name" "$_ver" >"$ROOTFS/usr/share/doc/$_name/copyright"
    (cd "$ROOTFS" && sha256sum "usr/bin/$_name" "usr/lib/$_name/lib$_name.so.$_ver" \
        "usr/share/$_name/$_name.dat" "usr/share/doc/$_name/copyright") \
        >"$ROOTFS/var/lib/kiln-pkg/info/$_name.sha256"
    printf 'Package: %s\nVersion: %s\nInstalled-Size: %s\nStatus: install ok installed\n\n' \
        "$_name" "$_ver" "$_kib" >>"$ROOTFS/var/lib/kiln-pkg/status"
}

# install_pkgs MINOR FROM TO "NAME:VERSION:KIB ...": install_pkg each, with
# progress from FROM to TO percent.
install_pkgs() {
    _minor=$1 _from=$2 _to=$3
    set -- $4
    _n=$# _i=0
    for _p in "$@"; do
        _i=$((_i + 1))
        IFS=: read -r _pn _pv _pk <<EOF
$_p
EOF
        say "installing $_pn $_pv ($_pk KiB)"
        install_pkg "$_pn" "$_pv" "$_pk"
        progress install "$_minor" $((_from + (_to - _from) * _i / _n))
    done
}

# Packages every product ships: most of each image's bytes.
BASE_PACKAGES="libc:2.36:640 coreutils:9.1:384 bash:5.2:256 systemd:252:768 openssl:3.0:320 python3:3.11:896"

# install_product ID NAME "PACKAGES": the whole install step of one product.
install_product() {
    _id=$1 _pname=$2 _ppkgs=$3
    say "kiln demo: installing $_pname, build $KILN_BUILD, job $KILN_JOB_ID"
    progress install format 0
    make_fhs
    progress install rootfs 5

    cat >"$ROOTFS/etc/os-release" <<EOF
NAME="Kiln Demo $_pname"
ID=kiln-demo
VERSION="$KILN_BUILD"
VERSION_ID=$KILN_BUILD
BUILD_ID=$KILN_BUILD
PRETTY_NAME="Kiln Demo $_pname (build $KILN_BUILD)"
HOME_URL="https://example.invalid/kiln-demo"
EOF
    mkdir -p "$ROOTFS/etc/kiln-demo"
    printf '%s\n' "$_id" >"$ROOTFS/etc/kiln-demo/product"
    printf '%s\n' "$KILN_BUILD" >"$ROOTFS/etc/kiln-demo/build"
    cat >"$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
    cat >"$ROOTFS/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
shadow:x:42:
users:x:100:
nogroup:x:65534:
EOF
    cat >"$ROOTFS/etc/shadow" <<'EOF'
root:*:19675:0:99999:7:::
daemon:*:19675:0:99999:7:::
nobody:*:19675:0:99999:7:::
EOF
    set_attr etc/shadow 0640 0 42
    printf 'LABEL=kiln-root / ext4 defaults 0 1\n' >"$ROOTFS/etc/fstab"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$ROOTFS/etc/hosts"
    printf 'export PATH=/usr/local/bin:/usr/bin:/usr/sbin\n' >"$ROOTFS/etc/profile"
    printf 'Kiln Demo %s, build %s\n' "$_pname" "$KILN_BUILD" >"$ROOTFS/etc/motd"
    : >"$ROOTFS/var/lib/kiln-pkg/status"
    progress install rootfs 10

    install_pkgs packages 10 75 "$BASE_PACKAGES"
    install_pkgs "$_id" 75 100 "$_ppkgs"
    say "kiln demo: $_pname installed: $(du -sk "$ROOTFS" | cut -f 1) KiB in $(find "$ROOTFS" | wc -l) entries"
}
