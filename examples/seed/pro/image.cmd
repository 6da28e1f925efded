# pro/image.cmd: image step of the seed's example job. Makes an ext4 image of
# $KILN_WORKSPACE/rootfs as $KILN_OUTPUT/disk.raw, byte-identical on every run:
# fixed UUID, hash seed and label, every timestamp 1700000000, owner root.
set -eu
: "${KILN_WORKSPACE:?is not set: run this step under kiln}"
: "${KILN_OUTPUT:?is not set: run this step under kiln}"
: "${KILN_BUILD:?is not set}"
: "${KILN_JOB_ID:?is not set}"
export LC_ALL=C TZ=UTC
PATH="$PATH:/usr/sbin:/sbin"
umask 022

progress() { printf '##kiln[progress major=%s minor=%s percent=%s]\n' "$1" "$2" "$3"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
for tool in mkfs.ext4 debugfs; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool not found (searched PATH, /usr/sbin and /sbin): install e2fsprogs on this client"
done

root="$KILN_WORKSPACE/rootfs"
raw="$KILN_OUTPUT/disk.raw"
epoch=1700000000
[ -d "$root" ] || die "no rootfs in $root: did the install step run?"

progress image prepare 0
find "$root" -type d -exec chmod a-st,u=rwx,go=rx {} +
find "$root" -type f -exec chmod a-st,u=rwX,go=rX {} +
chmod 0700 "$root/root"
chmod 1777 "$root/tmp"
find "$root" -exec touch -h -d "@$epoch" {} +
uuid=$(printf 'kiln-seed\n%s\n%s\n' "$KILN_BUILD" "$KILN_JOB_ID" | sha256sum |
    awk '{ h = $1; print substr(h, 1, 8) "-" substr(h, 9, 4) "-8" substr(h, 14, 3) "-8" substr(h, 18, 3) "-" substr(h, 21, 12) }')

progress image format 20
rm -f "$raw"
: >"$raw"
xopts="hash_seed=$uuid,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"
grep -q no_copy_xattrs "$(command -v mkfs.ext4)" 2>/dev/null && xopts="$xopts,no_copy_xattrs"
# Our own mke2fs.conf, so that the client's cannot change the image.
cat >"$KILN_WORKSPACE/mke2fs.conf" <<'EOF2'
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
	small = {
		blocksize = 4096
	}
EOF2
MKE2FS_CONFIG="$KILN_WORKSPACE/mke2fs.conf" E2FSPROGS_FAKE_TIME=$epoch \
    mkfs.ext4 -F -q -t ext4 -b 4096 -I 256 -i 16384 -m 5 -o Linux \
    -U "$uuid" -L seed-pro -E "$xopts" -d "$root" "$raw" 16M ||
    die "mkfs.ext4 failed"

# mkfs.ext4 -d copies each file's ctime and owner from the workspace: reset them.
progress image fixup 70
fixes="$KILN_WORKSPACE/fixes.cmd"
(cd "$root" && find . | sort) | awk -v t="@$epoch" '{
    p = ($0 == ".") ? "/" : substr($0, 2)
    print "sif " p " uid 0"; print "sif " p " gid 0"
    print "sif " p " atime " t; print "sif " p " mtime " t
    print "sif " p " ctime " t; print "sif " p " crtime " t }' >"$fixes"
E2FSPROGS_FAKE_TIME=$epoch debugfs -w -f "$fixes" "$raw" >"$KILN_WORKSPACE/fixes.log" 2>&1 ||
    die "debugfs failed: $(tail -n 5 "$KILN_WORKSPACE/fixes.log")"
if grep -v '^debugfs' "$KILN_WORKSPACE/fixes.log" | grep -q .; then
    die "debugfs: $(grep -v '^debugfs' "$KILN_WORKSPACE/fixes.log" | head -n 5)"
fi

progress image done 100
echo "disk.raw: $(wc -c <"$raw") bytes, sha256 $(sha256sum <"$raw" | cut -d ' ' -f 1)"
