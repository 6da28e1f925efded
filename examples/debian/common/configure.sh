# common/configure.sh: configure step of every Debian SKU. Gives the installed tree
# its identity (hostname = the SKU, so that the login prompt names it), its users and
# services, and the settings of its configuration (KILN_CONFIG_TYPE: BASE or
# HARDENED). Runs offline: chroot for the tools that edit the system's databases.
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"
need_root
[ -x "$ROOTFS/usr/bin/systemctl" ] || die "no installed system in $ROOTFS: did the install step run?"
in_root() { chroot "$ROOTFS" "$@"; }

config=$(printf '%s' "$KILN_CONFIG_TYPE" | tr 'A-Z' 'a-z')
case $config in
base | hardened) ;;
*) die "unknown configuration type '$KILN_CONFIG_TYPE' (expected BASE or HARDENED)" ;;
esac
product=server
[ -x "$ROOTFS/usr/bin/xinit" ] && product=desktop-lite
say "kiln debian: configuring $SKU ($product, $config)"

# Identity.
progress configure identity 10
printf '%s\n' "$SKU" >"$ROOTFS/etc/hostname"
cat >"$ROOTFS/etc/hosts" <<HOSTS
127.0.0.1 localhost
127.0.1.1 $SKU
::1 localhost ip6-localhost ip6-loopback
HOSTS
printf 'Debian GNU/Linux 12, kiln SKU %s (build %s) \\n \\l\n\n' "$SKU" "$KILN_BUILD" >"$ROOTFS/etc/issue"
mkdir -p "$ROOTFS/etc/kiln"
cat >"$ROOTFS/etc/kiln/sku" <<SKUFILE
sku=$SKU
product=$product
config=$config
build=$KILN_BUILD
SKUFILE
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$ROOT_UUID" >"$ROOTFS/etc/fstab"
# Each machine makes its own id at first boot.
: >"$ROOTFS/etc/machine-id"
# The kernel command line, read by the image step.
printf 'console=tty0 console=ttyS0,115200n8\n' >"$ROOTFS/etc/kiln/cmdline"

# Users: an administrator with sudo, without a password until one is set (log in
# with a key, or set one on first use); root cannot log in with a password.
progress configure users 30
in_root useradd --create-home --shell /bin/bash --groups sudo --comment "Administrator" admin
in_root passwd --lock admin >/dev/null
in_root passwd --lock root >/dev/null

# Services.
progress configure services 50
mkdir -p "$ROOTFS/etc/systemd/network"
cat >"$ROOTFS/etc/systemd/network/80-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
in_root systemctl enable systemd-networkd.service >/dev/null 2>&1
case $product in
server)
    in_root systemctl enable ssh.service >/dev/null 2>&1
    in_root systemctl set-default multi-user.target >/dev/null 2>&1
    ;;
desktop-lite)
    printf 'exec openbox-session\n' >"$ROOTFS/home/admin/.xinitrc"
    in_root chown admin:admin /home/admin/.xinitrc
    in_root systemctl set-default multi-user.target >/dev/null 2>&1
    ;;
esac

# The configuration's settings.
progress configure "$config" 70
case $config in
base)
    printf 'kernel.printk = 4 4 1 7\n' >"$ROOTFS/etc/sysctl.d/60-kiln-base.conf"
    ;;
hardened)
    cat >"$ROOTFS/etc/sysctl.d/60-kiln-hardened.conf" <<'SYSCTL'
kernel.kptr_restrict = 2
kernel.dmesg_restrict = 1
kernel.unprivileged_bpf_disabled = 1
kernel.yama.ptrace_scope = 2
net.core.bpf_jit_harden = 2
net.ipv4.conf.all.rp_filter = 1
net.ipv4.conf.all.accept_redirects = 0
net.ipv4.conf.all.send_redirects = 0
net.ipv6.conf.all.accept_redirects = 0
fs.protected_fifos = 2
fs.protected_regular = 2
SYSCTL
    # No debug shell, no reboot from the keyboard, a stricter umask.
    in_root systemctl mask debug-shell.service ctrl-alt-del.target >/dev/null 2>&1
    sed -i 's/^UMASK[[:space:]].*/UMASK\t\t027/' "$ROOTFS/etc/login.defs"
    if [ -d "$ROOTFS/etc/ssh/sshd_config.d" ]; then
        cat >"$ROOTFS/etc/ssh/sshd_config.d/60-kiln-hardened.conf" <<'SSHD'
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
X11Forwarding no
MaxAuthTries 3
SSHD
    fi
    printf ' slab_nomerge init_on_alloc=1 page_alloc.shuffle=1 vsyscall=none\n' >>"$ROOTFS/etc/kiln/cmdline"
    ;;
esac
tr -d '\n' <"$ROOTFS/etc/kiln/cmdline" >"$ROOTFS/etc/kiln/cmdline.tmp"
mv "$ROOTFS/etc/kiln/cmdline.tmp" "$ROOTFS/etc/kiln/cmdline"

progress configure done 100
say "kiln debian: $SKU configured: hostname $SKU, user admin, kernel command line: $(cat "$ROOTFS/etc/kiln/cmdline")"
