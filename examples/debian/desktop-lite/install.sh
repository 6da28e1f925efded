# desktop-lite/install.sh: install step of the desktop-lite product: an X server with
# a small window manager and a terminal, started from the console.
set -eu
PRODUCT=desktop-lite
PACKAGES="xserver-xorg-core,xserver-xorg-input-libinput,xinit,openbox,xterm,sudo"
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/install.sh"
