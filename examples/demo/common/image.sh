# common/image.sh: image step of every demo job. Turns $KILN_WORKSPACE/rootfs
# into an ext4 file system image, $KILN_OUTPUT/JOB_ID.raw, and, when qemu-img is
# on PATH, a copy of it as $KILN_OUTPUT/JOB_ID.qcow2.
#
# Two runs of one job give byte-identical images, on any client: the UUID and
# directory hash seed derive from build and job id, every timestamp is $EPOCH
# (E2FSPROGS_FAKE_TIME for the file system's own, debugfs for each inode's,
# since mkfs.ext4 -d copies the source's ctime and owner), modes and owners are
# fixed, and mke2fs reads our mke2fs.conf, not the client's.
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"
: "${KILN_OUTPUT:?is not set: run this step under kiln}"

need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
[ -d "$ROOTFS" ] || die "no rootfs in $ROOTFS: did the install step run?"

raw="$KILN_OUTPUT/$KILN_JOB_ID.raw"
qcow="$KILN_OUTPUT/$KILN_JOB_ID.qcow2"
fixes="$KILN_WORKSPACE/debugfs-fixes.cmd"
fixlog="$KILN_WORKSPACE/debugfs-fixes.log"
rm -f "$raw" "$qcow"
: >"$raw" # so that mkfs.ext4 does not announce "Creating regular file"

# 1. Normalise the tree: modes, then the exceptions install and configure
#    recorded, then timestamps.
progress image normalise 0
find "$ROOTFS" -type d -exec chmod a-st,u=rwx,go=rx {} +
find "$ROOTFS" -type f -exec chmod a-st,u=rwX,go=rX {} +
while read -r path mode uid gid; do
    chmod "$mode" "$ROOTFS/$path"
done <"$ATTRS"
find "$ROOTFS" -exec touch -h -d "@$EPOCH" {} +
progress image normalise 10

# 2. Size: twice the content (apparent sizes in 4 KiB blocks, plus one block
#    per entry), at least 32 MiB, in whole MiB. Apparent sizes, not du, so the
#    size does not depend on the file system the workspace is on.
entries=$(cd "$ROOTFS" && find . | wc -l)
content=$(cd "$ROOTFS" && find . -type f -exec wc -c {} + |
    awk '$2 ~ /^\.\// { n += int(($1 + 4095) / 4096) * 4096 } END { printf "%d\n", n }')
content=$((content + entries * 4096))
size_mib=$(((2 * content + 1048575) / 1048576))
[ "$size_mib" -ge 32 ] || size_mib=32
say "kiln demo: $entries entries, $((content / 1024)) KiB of content: ${size_mib} MiB image"

# 3. Identity: UUID (version 8, "custom") and hash seed from build and job id.
uuid=$(printf 'kiln-demo\n%s\n%s\n' "$KILN_BUILD" "$KILN_JOB_ID" | sha256sum |
    awk '{ h = $1; print substr(h, 1, 8) "-" substr(h, 9, 4) "-8" substr(h, 14, 3) "-8" substr(h, 18, 3) "-" substr(h, 21, 12) }')
label=$(printf 'kiln-%s' "$KILN_JOB_ID" | cut -c 1-16)
say "kiln demo: file system UUID $uuid, label $label"

# 4. mkfs.ext4 -d: the file system, filled from the rootfs.
progress image mkfs 20
xopts="hash_seed=$uuid,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"
# no_copy_xattrs (e2fsprogs >= 1.46) keeps the host's labels (SELinux, ACLs) out.
if grep -q no_copy_xattrs "$(command -v mkfs.ext4)" 2>/dev/null; then
    xopts="$xopts,no_copy_xattrs"
else
    say "note: this mkfs.ext4 cannot skip extended attributes; files with host xattrs (SELinux labels) make images differ between clients"
fi
MKE2FS_CONFIG="$KILN_WORKSPACE/common/mke2fs.conf" E2FSPROGS_FAKE_TIME=$EPOCH \
    mkfs.ext4 -F -q -t ext4 -b 4096 -I 256 -i 16384 -m 5 -o Linux \
    -U "$uuid" -L "$label" -E "$xopts" -d "$ROOTFS" "$raw" "${size_mib}M" ||
    die "mkfs.ext4 failed"
progress image mkfs 60

# 5. Every inode: owner root (or the recorded one) and every time $EPOCH.
#    mkfs.ext4 -d copies the source's ctime and owner, which no tool can set.
progress image fixup 65
(cd "$ROOTFS" && find . | sort) | awk -v t="@$EPOCH" '
    { p = ($0 == ".") ? "/" : substr($0, 2)
      print "sif " p " uid 0"
      print "sif " p " gid 0"
      n = split("atime mtime ctime crtime", f, " ")
      for (i = 1; i <= n; i++) {
          print "sif " p " " f[i] " " t
          print "sif " p " " f[i] "_extra 0"
      } }' >"$fixes"
while read -r path mode uid gid; do
    printf 'sif /%s uid %s\nsif /%s gid %s\n' "$path" "$uid" "$path" "$gid" >>"$fixes"
done <"$ATTRS"
E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$fixes" "$raw" >"$fixlog" 2>&1 ||
    die "debugfs failed: $(tail -n 5 "$fixlog")"
if grep -v -e '^debugfs' "$fixlog" | grep -q .; then
    die "debugfs could not fix every inode: $(grep -v -e '^debugfs' "$fixlog" | head -n 5)"
fi
progress image fixup 75

# 6. Check it.
if command -v e2fsck >/dev/null 2>&1; then
    progress image check 80
    e2fsck -fn "$raw" >"$KILN_WORKSPACE/e2fsck.log" 2>&1 ||
        die "e2fsck found errors in the image: $(tail -n 5 "$KILN_WORKSPACE/e2fsck.log")"
fi

# 7. qcow2, when qemu-img is here.
if command -v qemu-img >/dev/null 2>&1; then
    progress image qcow2 85
    qemu-img convert -f raw -O qcow2 -o compat=1.1,cluster_size=65536 "$raw" "$qcow" ||
        die "qemu-img convert failed"
else
    say "note: qemu-img not found on PATH: keeping only $KILN_JOB_ID.raw (install qemu-utils for the qcow2 copy)"
fi

progress image done 100
for f in "$raw" "$qcow"; do
    [ -f "$f" ] || continue
    say "kiln demo: $(basename "$f") $(wc -c <"$f") bytes, sha256 $(sha256sum <"$f" | cut -d ' ' -f 1)"
done
