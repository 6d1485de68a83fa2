#!/usr/bin/env bash
# Unpacks Debian's Sendmail (sendmail-bin, sendmail-cf) privately under
# ${SPAMDELAY_MTA_DIR:-/opt/spamdelay-test}/sendmail for the end-to-end tests.
# Not `apt-get install`: Debian's MTAs conflict with each other (Postfix is
# installed normally, see install-postfix.sh), so the binaries and the m4
# config kit are unpacked, and their shared libraries and m4 (which builds
# the .cf) are installed as ordinary packages. Idempotent; run as root. The
# tests build their own .cf, so nothing is written to /etc/mail.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

name=sendmail
dest="${SPAMDELAY_MTA_DIR:-/opt/spamdelay-test}/sendmail"
bins=("$dest/usr/libexec/sendmail/sendmail" "$dest/usr/libexec/sendmail/makemap")
pkgs=(sendmail-bin sendmail-cf)
# sendmail-bin's library dependencies (apt-cache depends), and m4 for cf.m4.
libs=(libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0 m4)

# shellcheck source=tests/mta/unpack.sh
source "$(dirname "$0")/unpack.sh"
unpack_privately
