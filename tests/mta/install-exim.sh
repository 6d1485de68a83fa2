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

dest="${SPAMDELAY_MTA_DIR:-/opt/spamdelay-test}/exim"
bin="$dest/usr/sbin/exim4"
pkgs=(exim4-daemon-light)
# exim4-daemon-light's library dependencies (apt-cache depends), minus those
# every Debian system already has. libidn12 and libgnutls-dane0 are the ones
# usually missing.
libs=(libdb5.3 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libnsl2 libpcre2-8-0 libcrypt1)

if [ "$(id -u)" -ne 0 ]; then
    echo "install-exim.sh: run as root" >&2
    exit 1
fi

# apt-get update only when the package is unknown (a fresh machine).
apt-cache show "${pkgs[0]}" >/dev/null 2>&1 || apt-get update -qq
apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${libs[@]}" >/dev/null

# The stamp names the version unpacked, so an upgrade re-unpacks.
candidates() {
    for p in "${pkgs[@]}"; do
        apt-cache policy "$p" | awk '/Candidate:/ { print $2 }'
    done | paste -sd ' '
}
version=$(candidates)
stamp="$dest/.unpacked"
if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    echo "exim $version already unpacked in $dest"
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
    echo "exim $version unpacked in $dest"
fi

# Fail here, not in a test, when a library is still missing.
if ldd "$bin" | grep 'not found'; then
    echo "install-exim.sh: $bin misses the libraries above" >&2
    exit 1
fi
