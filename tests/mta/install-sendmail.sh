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

dest="${SPAMDELAY_MTA_DIR:-/opt/spamdelay-test}/sendmail"
bins=("$dest/usr/libexec/sendmail/sendmail" "$dest/usr/libexec/sendmail/makemap")
pkgs=(sendmail-bin sendmail-cf)
# sendmail-bin's library dependencies (apt-cache depends), and m4 for cf.m4.
libs=(libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0 m4)

if [ "$(id -u)" -ne 0 ]; then
    echo "install-sendmail.sh: run as root" >&2
    exit 1
fi

apt-cache show "${pkgs[0]}" >/dev/null 2>&1 || apt-get update -qq
apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${libs[@]}" >/dev/null

# The stamp names the versions unpacked, so an upgrade re-unpacks.
candidates() {
    for p in "${pkgs[@]}"; do
        apt-cache policy "$p" | awk '/Candidate:/ { print $2 }'
    done | paste -sd ' '
}
version=$(candidates)
stamp="$dest/.unpacked"
if [ -x "${bins[0]}" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    echo "sendmail $version already unpacked in $dest"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # apt downloads as the _apt user, which must be able to write here.
    chmod 755 "$work"
    chown _apt "$work" 2>/dev/null || true
    # Stale package lists name versions the mirror no longer has: refresh once.
    (cd "$work" && apt-get download -qq "${pkgs[@]}") ||
        (apt-get update -qq && cd "$work" && apt-get download -qq "${pkgs[@]}")
    rm -rf "$dest"
    mkdir -p "$dest"
    for deb in "$work"/*.deb; do
        dpkg -x "$deb" "$dest"
    done
    # After a refresh the candidates may have moved on.
    version=$(candidates)
    echo "$version" >"$stamp"
    echo "sendmail $version unpacked in $dest"
fi

# Fail here, not in a test, when a library is still missing.
for b in "${bins[@]}"; do
    if ldd "$b" | grep 'not found'; then
        echo "install-sendmail.sh: $b misses the libraries above" >&2
        exit 1
    fi
done
