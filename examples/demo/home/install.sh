# home/install.sh: install step of the Home product.
# kiln runs it with cwd = the workspace and /bin/sh; see ../README.md.
set -eu
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/lib.sh"

# NAME:VERSION:KIB of the packages only Home ships.
HOME_PACKAGES="mediacenter:7.0:448 parental:1.3:128 photos:2.4:192"

install_product home "Home" "$HOME_PACKAGES"
