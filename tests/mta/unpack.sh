# Sourced by install-exim.sh and install-sendmail.sh: unpacks Debian packages
# privately (dpkg -x) instead of installing them, because Debian's MTAs
# conflict with each other. Usage, after setting:
#   name=exim  dest=DIR  pkgs=(PACKAGES...)  libs=(PACKAGES...)  bins=(FILES...)
#   unpack_privately
# Idempotent: a stamp names the versions unpacked, so an upgrade re-unpacks.

unpack_privately() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-$name.sh: run as root" >&2
        exit 1
    fi
    # apt-get update only when the package is unknown (a fresh machine).
    apt-cache show "${pkgs[0]}" >/dev/null 2>&1 || apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${libs[@]}" >/dev/null

    local version stamp="$dest/.unpacked"
    version=$(candidates)
    if [ -x "${bins[0]}" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
        echo "$name $version already unpacked in $dest"
    else
        local work
        work=$(mktemp -d)
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
        rm -rf "$work"
        # After a refresh the candidates may have moved on.
        version=$(candidates)
        echo "$version" >"$stamp"
        echo "$name $version unpacked in $dest"
    fi

    # Fail here, not in a test, when a library is still missing.
    local b
    for b in "${bins[@]}"; do
        if ldd "$b" | grep 'not found'; then
            echo "install-$name.sh: $b misses the libraries above" >&2
            exit 1
        fi
    done
}

candidates() {
    local p
    for p in "${pkgs[@]}"; do
        apt-cache policy "$p" | awk '/Candidate:/ { print $2 }'
    done | paste -sd ' '
}
