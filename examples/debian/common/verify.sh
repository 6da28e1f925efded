# common/verify.sh: verify step of every Debian SKU. Boots the image the image step
# made under qemu (software emulation, no network, the image itself left unchanged
# with -snapshot), waits for the login prompt on the serial console, checks that it
# names the SKU, and stops the VM. Fails if no such prompt comes within
# VERIFY_TIMEOUT seconds (default 900), and shows the end of the console.
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"
: "${KILN_OUTPUT:?is not set: run this step under kiln}"
need qemu-system-x86_64 "qemu-system-x86 qemu-utils"
image="$KILN_OUTPUT/$SKU.qcow2"
format=qcow2
if [ ! -f "$image" ]; then
    image="$KILN_OUTPUT/$SKU.raw"
    format=raw
fi
[ -f "$image" ] || die "no image of $SKU in $KILN_OUTPUT: did the image step run?"
timeout_secs=${VERIFY_TIMEOUT:-900}
console="$KILN_WORKSPACE/console.log"
: >"$console"

say "kiln debian: booting $(basename "$image") (up to $timeout_secs s)"
progress verify boot 0
started=$(now)
qemu-system-x86_64 -machine pc -m 1024 -smp 1 -nic none -display none -monitor none \
    -serial "file:$console" -no-reboot -snapshot \
    -drive "file=$image,format=$format" &
vm=$!
stop_vm() { kill "$vm" 2>/dev/null || true; wait "$vm" 2>/dev/null || true; }
trap stop_vm EXIT

# The console as text: no carriage returns, no terminal escape sequences (agetty and
# systemd colour and clear the screen).
console_text() {
    tr -d '\r' <"$console" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1b[()][A-Za-z0-9]//g; s/\x1b[=>c78]//g'
}

shown=0
result=timeout
while :; do
    # Pass the console's new complete lines to the job's log.
    lines=$(wc -l <"$console")
    if [ "$lines" -gt "$shown" ]; then
        console_text | sed -n "$((shown + 1)),${lines}p" | sed 's/^/console: /'
        shown=$lines
    fi
    if console_text | grep -aqE "(^|[^[:alnum:]._-])$SKU login: *\$"; then
        result=prompt
        break
    fi
    if console_text | grep -aqE ' login: *$'; then
        result=wrong
        break
    fi
    kill -0 "$vm" 2>/dev/null || { result=exited; break; }
    elapsed=$(($(now) - started))
    [ "$elapsed" -lt "$timeout_secs" ] || break
    progress verify boot $((elapsed * 100 / timeout_secs))
    sleep 2
done
elapsed=$(($(now) - started))
prompt=$(console_text | grep -a ' login:' | tail -n 1 || true)
# The prompt is the console's last line, with no newline after it.
console_text | sed -n "$((shown + 1)),\$p" | sed 's/^/console: /'
echo
stop_vm
trap - EXIT
case $result in
prompt)
    progress verify done 100
    say "kiln debian: $SKU booted to its login prompt in $elapsed s: \"$prompt\""
    ;;
wrong) die "the login prompt does not name $SKU: \"$prompt\" ($(printf '%s' "$prompt" | od -An -c | tr -s ' '))" ;;
exited) die "the VM stopped after $elapsed s before a login prompt (end of console above)" ;;
*) die "no login prompt naming $SKU within $timeout_secs s (end of console above)" ;;
esac
