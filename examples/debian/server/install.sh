# server/install.sh: install step of the server product: a headless machine reached
# over SSH.
set -eu
PRODUCT=server
PACKAGES="openssh-server,iproute2,sudo"
. "${KILN_WORKSPACE:?is not set: run this step under kiln}/common/install.sh"
