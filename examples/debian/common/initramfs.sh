# common/initramfs.sh ROOTFS: mmdebstrap essential hook, run before the kernel and
# initramfs-tools are installed. Makes the initramfs hold only the drivers a disk and
# its file system need (IDE, SATA, SCSI, NVMe, virtio; ext4), not most of the kernel's
# modules: it is then small enough to unpack in qemu's default 128 MiB, so the image
# boots with a plain `qemu-system-x86_64 -nographic -drive file=IMAGE,format=FMT`.
set -eu
root=$1
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\n' >"$root/etc/initramfs-tools/conf.d/kiln.conf"
cat >"$root/usr/share/initramfs-tools/modules.d/kiln" <<'MODULES'
ata_piix
ata_generic
pata_acpi
ahci
sd_mod
sr_mod
virtio_pci
virtio_blk
virtio_scsi
nvme
ext4
crc32c_generic
crc32c_intel
MODULES
