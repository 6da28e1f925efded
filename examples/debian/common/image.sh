# common/image.sh: image step of every Debian SKU. Turns $ROOTFS into a bootable
# whole-disk image, $KILN_OUTPUT/SKU.raw (an MBR partition table, one ext4 partition,
# GRUB for BIOS), and a qcow2 copy of it, $KILN_OUTPUT/SKU.qcow2. Either boots with
#
#   qemu-system-x86_64 -nographic -drive file=SKU.qcow2,format=qcow2
#
# No mount and no loop device: sfdisk writes the partition table into the image file,
# mkfs.ext4 -d fills the partition from the tree at its offset in that file
# (-E offset=), grub-mkimage makes GRUB's core image, and dd puts GRUB's boot sector
# (its first 440 bytes, before the partition table) and the core image (in the gap
# before the first partition, sector 1 on, where the boot sector looks for it) in
# place. GRUB's modules and grub.cfg are files in the ext4 partition, under /boot/grub.
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"
: "${KILN_OUTPUT:?is not set: run this step under kiln}"
need sfdisk fdisk
need mkfs.ext4 e2fsprogs
need grub-mkimage grub-common
need qemu-img qemu-utils
GRUB_LIB=/usr/lib/grub/i386-pc
[ -f "$GRUB_LIB/boot.img" ] || die "$GRUB_LIB/boot.img not found: install it on this client with: apt-get install grub-pc-bin"
[ -d "$ROOTFS/boot" ] || die "no installed system in $ROOTFS: did the install step run?"

raw="$KILN_OUTPUT/$SKU.raw"
qcow="$KILN_OUTPUT/$SKU.qcow2"
rm -f "$raw" "$qcow"
kver=$(kernel_version)
cmdline=$(cat "$ROOTFS/etc/kiln/cmdline" 2>/dev/null || printf 'console=ttyS0,115200n8')

# 1. GRUB's files inside the tree: the modules it loads at boot, and its menu.
progress image grub 5
mkdir -p "$ROOTFS/boot/grub/i386-pc"
cp "$GRUB_LIB"/*.mod "$GRUB_LIB"/*.lst "$ROOTFS/boot/grub/i386-pc/"
cat >"$ROOTFS/boot/grub/grub.cfg" <<GRUBCFG
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set default=0
menuentry "Debian GNU/Linux 12, $SKU" {
    linux /boot/vmlinuz-$kver root=UUID=$ROOT_UUID ro $cmdline
    initrd /boot/initrd.img-$kver
}
GRUBCFG

# 2. Sizes: the tree plus a third for the file system's own needs and growth, plus
#    64 MiB, in whole MiB; the partition starts at 1 MiB.
tree_mib=$(du -sm --apparent-size "$ROOTFS" | cut -f 1)
part_mib=$((tree_mib + tree_mib / 3 + 64))
disk_bytes=$(((part_mib + 1) * 1048576))
say "kiln debian: tree $tree_mib MiB; partition $part_mib MiB; disk $((disk_bytes / 1048576)) MiB"

# 3. The disk: a sparse file with an MBR partition table.
progress image partition 10
truncate -s "$disk_bytes" "$raw"
printf 'label: dos\nlabel-id: 0x%s\nstart=2048, type=83, bootable\n' \
    "$(printf '%s' "$ROOT_UUID" | cut -c 1-8)" | sfdisk --quiet "$raw"

# 4. The file system, filled from the tree, written at the partition's offset.
progress image mkfs 20
mkfs.ext4 -q -F -t ext4 -U "$ROOT_UUID" -L "$(printf '%s' "$SKU" | cut -c 1-16)" \
    -E "offset=1048576,nodiscard,root_owner=0:0" -d "$ROOTFS" "$raw" "${part_mib}M" ||
    die "mkfs.ext4 failed"
# The tree is in the image now; free its room before the copies.
rm -rf "$ROOTFS"

# 5. GRUB's core image: finds the file system by its UUID, then reads the rest of
#    GRUB from /boot/grub there.
progress image bootloader 70
cat >"$KILN_WORKSPACE/grub-early.cfg" <<EARLY
search.fs_uuid $ROOT_UUID root
set prefix=(\$root)/boot/grub
EARLY
grub-mkimage -O i386-pc -o "$KILN_WORKSPACE/core.img" -c "$KILN_WORKSPACE/grub-early.cfg" \
    -p /boot/grub biosdisk part_msdos ext2 search_fs_uuid normal ||
    die "grub-mkimage failed"
core_bytes=$(bytes_of "$KILN_WORKSPACE/core.img")
[ "$core_bytes" -le $((2047 * 512)) ] || die "GRUB's core image ($core_bytes bytes) does not fit before the partition"
dd if="$GRUB_LIB/boot.img" of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$KILN_WORKSPACE/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none

# 6. The qcow2 copy.
progress image qcow2 80
qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$raw" "$qcow" || die "qemu-img convert failed"

progress image done 100
for f in "$raw" "$qcow"; do
    say "kiln debian: $(basename "$f") $(bytes_of "$f") bytes ($(du -k "$f" | cut -f 1) KiB on disk)"
done
