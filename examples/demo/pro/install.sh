# pro/install.sh: install step of the Professional product.
# kiln runs it with cwd = the workspace and /bin/sh; see ../README.md.
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"

# NAME:VERSION:KIB of the packages only Professional ships.
PRO_PACKAGES="dirsvc:4.2:320 rdesktop:2.1:256 diskcrypt:1.8:128"

install_product pro "Professional" "$PRO_PACKAGES"
