#!/usr/bin/env bash
# Unpacks Debian's Exim (exim4-daemon-light) privately under
# ${SPAMDELAY_MTA_DIR:-/opt/spamdelay-test}/exim for the end-to-end tests.
# Not `apt-get install`: Debian's MTAs conflict with each other (Postfix is
# installed normally, see install-postfix.sh), so only the binary is unpacked
# and its shared libraries are installed as ordinary packages. Idempotent;
# run as root. The tests give Exim its own config (-C) and passwd entries, so
# nothing is written to /etc.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

name=exim
dest="${SPAMDELAY_MTA_DIR:-/opt/spamdelay-test}/exim"
bins=("$dest/usr/sbin/exim4")
pkgs=(exim4-daemon-light)
# exim4-daemon-light's library dependencies (apt-cache depends), minus those
# every Debian system already has. libidn12 and libgnutls-dane0 are the ones
# usually missing.
libs=(libdb5.3 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libnsl2 libpcre2-8-0 libcrypt1)

# shellcheck source=tests/mta/unpack.sh
source "$(dirname "$0")/unpack.sh"
unpack_privately
