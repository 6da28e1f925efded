# common/configure.sh: configure step of every demo job. Applies the job's
# configuration (KILN_CONFIG_TYPE: BASE, DEV or KIOSK) to the installed rootfs.
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"

[ -f "$ROOTFS/etc/kiln-demo/product" ] || die "no installed rootfs in $ROOTFS: did the install step run?"
product=$(cat "$ROOTFS/etc/kiln-demo/product")
config=$(printf '%s' "$KILN_CONFIG_TYPE" | tr 'A-Z' 'a-z')
case $config in
base) variant="Base" ;;
dev) variant="Developer" ;;
kiosk) variant="Kiosk" ;;
*) die "unknown configuration type '$KILN_CONFIG_TYPE' (expected BASE, DEV or KIOSK)" ;;
esac
say "kiln demo: configuring $product as $variant"

progress configure identity 0
host="$product-$config"
printf '%s\n' "$host" >"$ROOTFS/etc/hostname"
printf '127.0.1.1 %s\n' "$host" >>"$ROOTFS/etc/hosts"
cat >>"$ROOTFS/etc/os-release" <<EOF
VARIANT="$variant"
VARIANT_ID=$config
EOF
cat >"$ROOTFS/etc/kiln-demo/image.conf" <<EOF
build=$KILN_BUILD
job=$KILN_JOB_ID
product=$product
config=$config
EOF
progress configure identity 20

case $config in
base)
    progress configure services 40
    printf 'multi-user.target\n' >"$ROOTFS/etc/kiln-demo/default-target"
    ;;

dev)
    # A "toolchain": compiler driver, runtime library and headers under /opt.
    progress configure toolchain 30
    tc="$ROOTFS/opt/toolchain"
    mkdir -p "$tc/bin" "$tc/lib" "$tc/include"
    gen_file "toolchain-13.2/cc1" 393216 "$tc/bin/cc1"
    gen_file "toolchain-13.2/libcc" 131072 "$tc/lib/libcc.a"
    printf '#!/bin/sh\nexec /opt/toolchain/bin/cc1 "$@"\n' >"$tc/bin/cc"
    chmod 0755 "$tc/bin/cc" "$tc/bin/cc1"
    printf '/* kiln demo toolchain */\nint demo(void);\n' >"$tc/include/demo.h"
    progress configure toolchain 70
    printf 'export PATH="/opt/toolchain/bin:$PATH"\n' >"$ROOTFS/etc/profile.d/toolchain.sh"
    printf 'graphical.target\n' >"$ROOTFS/etc/kiln-demo/default-target"
    printf 'developer:x:1000:1000:Developer:/home/developer:/bin/bash\n' >>"$ROOTFS/etc/passwd"
    printf 'developer:x:1000:\n' >>"$ROOTFS/etc/group"
    printf 'developer:*:19675:0:99999:7:::\n' >>"$ROOTFS/etc/shadow"
    mkdir -p "$ROOTFS/home/developer"
    set_attr home/developer 0750 1000 1000
    ;;

kiosk)
    # One locked-down user, one full-screen app, no consoles, no shell escape.
    progress configure lockdown 30
    install_pkg kiosk-shell 1.0 128
    mkdir -p "$ROOTFS/etc/kiosk" "$ROOTFS/home/kiosk"
    cat >"$ROOTFS/etc/kiosk/profile.conf" <<'EOF'
[kiosk]
user=kiosk
app=/usr/bin/kiosk-shell
allow_shell=false
allow_usb_storage=false
allow_vt_switch=false
idle_reset_seconds=300
EOF
    printf 'readonly PATH=/usr/bin\nreadonly TMOUT=300\n' >"$ROOTFS/etc/profile.d/kiosk.sh"
    printf 'kiosk:x:1001:1001:Kiosk:/home/kiosk:/usr/bin/kiosk-shell\n' >>"$ROOTFS/etc/passwd"
    printf 'kiosk:x:1001:\n' >>"$ROOTFS/etc/group"
    printf 'kiosk:!:19675:0:99999:7:::\n' >>"$ROOTFS/etc/shadow"
    set_attr home/kiosk 0700 1001 1001
    progress configure lockdown 60
    # Mask the text consoles and the debug shell.
    for unit in getty@tty2.service getty@tty3.service debug-shell.service; do
        ln -s /dev/null "$ROOTFS/etc/systemd/system/$unit"
    done
    printf 'kiosk.target\n' >"$ROOTFS/etc/kiln-demo/default-target"
    ;;
esac

progress configure done 100
say "kiln demo: $product-$config configured"
