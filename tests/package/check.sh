#!/usr/bin/env bash
# The Debian package as an admin meets it, as root on a machine where it is
# not installed: build it (cargo xtask deb), lintian, dpkg -i, the installed
# commands, man page, config and unit, then dpkg -r (only the conffile stays)
# and dpkg --purge (nothing stays). Each failed check prints one `FAIL:` line;
# the script exits non-zero if any failed. It purges what it installed, even
# when it fails half-way.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive

PKG=spamdelay
CONFFILE=/etc/spamdelay/spamdelay.toml
UNIT=/usr/lib/systemd/system/spamdelay.service
failed=0

fail() {
    echo "FAIL: $*" >&2
    failed=1
}

# Stops here: what follows cannot run.
die() {
    echo "FAIL: $*" >&2
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    die "run as root: the check installs and purges the package"
fi
if dpkg -s "$PKG" >/dev/null 2>&1; then
    die "$PKG is installed already: this check installs and purges it; run dpkg --purge $PKG first"
fi

installed=0
cleanup() {
    if [ "$installed" = 1 ] && dpkg -s "$PKG" >/dev/null 2>&1; then
        echo "== purging $PKG after a failed check"
        dpkg --purge "$PKG" >/dev/null || echo "FAIL: dpkg --purge $PKG (cleanup) failed" >&2
    fi
}
trap cleanup EXIT

echo "== apt packages for the package check"
need=()
for p in lintian man-db systemd dpkg-dev nftables; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== cargo xtask deb"
cargo xtask deb
debs=(target/debian/"$PKG"_*_amd64.deb)
if [ "${#debs[@]}" -ne 1 ] || [ ! -f "${debs[0]}" ]; then
    die "expected one target/debian/${PKG}_*_amd64.deb, found: ${debs[*]}"
fi
deb=${debs[0]}

echo "== lintian $deb"
# Warnings are shown; errors fail.
lintian --fail-on error "$deb" || fail "lintian reports errors in $deb"

echo "== dpkg -i $deb"
installed=1
# Container images often exclude man pages from dpkg: include ours.
dpkg --path-include="/usr/share/man/man8/$PKG*" -i "$deb" || die "dpkg -i $deb failed"

echo "== installed commands, man page, config, unit"
spamdelay --version || fail "spamdelay --version failed"
[ "$(command -v spamdelay)" = /usr/sbin/spamdelay ] ||
    fail "spamdelay is not /usr/sbin/spamdelay but $(command -v spamdelay || echo nothing)"
man -w spamdelay >/dev/null || fail "man -w spamdelay finds no man page"
man -w spamdelay-run >/dev/null || fail "man -w spamdelay-run finds no man page"
for f in /usr/share/bash-completion/completions/spamdelay \
    /usr/share/zsh/vendor-completions/_spamdelay \
    /usr/share/fish/vendor_completions.d/spamdelay.fish \
    /etc/logrotate.d/spamdelay "$UNIT" "$CONFFILE"; do
    [ -s "$f" ] || fail "$f is missing or empty"
done
dpkg-query --showformat='${Conffiles}\n' --show "$PKG" | grep -q " $CONFFILE " ||
    fail "$CONFFILE is not a conffile"

# With iface unset it explains and exits 0 (spamdelay >= check-config).
if spamdelay check-config --help >/dev/null 2>&1; then
    spamdelay check-config || fail "spamdelay check-config rejects the default $CONFFILE"
else
    fail "spamdelay has no check-config subcommand to validate $CONFFILE"
fi

# The default config shows every setting of `run --help`, and only those.
flags=$(spamdelay run --help | sed -n 's/^ *--\([a-z0-9-]*\).*/\1/p' | grep -vx -e config -e help)
for flag in $flags; do
    grep -Eq "^(# )?$flag = " "$CONFFILE" || fail "$CONFFILE does not show the setting '$flag'"
done
for key in $(sed -En 's/^(# )?([a-z0-9-]+) = .*/\2/p' "$CONFFILE"); do
    grep -qx -e "$key" <<<"$flags" || fail "$CONFFILE shows '$key', which spamdelay run does not know"
done

# Runs without systemd as PID 1 (CI containers).
systemd-analyze verify "$UNIT" || fail "systemd-analyze verify $UNIT"
[ -L /etc/systemd/system/multi-user.target.wants/spamdelay.service ] ||
    fail "the unit is not enabled (no multi-user.target.wants link)"

echo "== dpkg -i again (an upgrade keeps the admin's edits)"
echo "# edited by tests/package/check.sh" >>"$CONFFILE"
dpkg -i "$deb" </dev/null || fail "reinstalling $deb over an edited $CONFFILE failed"
grep -q '^# edited by tests/package/check.sh$' "$CONFFILE" ||
    fail "reinstalling $deb overwrote the admin's edit of $CONFFILE"

echo "== dpkg -r $PKG"
# The package's own files (not directories), as dpkg knows them before removal.
files=$(dpkg -L "$PKG" | while read -r f; do if [ -f "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done)
dpkg -r "$PKG" || die "dpkg -r $PKG failed"
for f in $files; do
    if [ "$f" = "$CONFFILE" ] || [ "$f" = /etc/logrotate.d/spamdelay ]; then
        [ -e "$f" ] || fail "the conffile $f is gone after dpkg -r (only purge removes it)"
    elif [ -e "$f" ] || [ -L "$f" ]; then
        fail "$f is left after dpkg -r"
    fi
done
if [ -d /sys/fs/bpf/spamdelay ] && [ -n "$(ls -A /sys/fs/bpf/spamdelay)" ]; then
    fail "programs are still pinned in /sys/fs/bpf/spamdelay after dpkg -r"
fi

echo "== dpkg --purge $PKG"
dpkg --purge "$PKG" || die "dpkg --purge $PKG failed"
installed=0
for f in "$CONFFILE" /etc/logrotate.d/spamdelay /etc/spamdelay /var/lib/spamdelay /var/log/spamdelay \
    /etc/systemd/system/multi-user.target.wants/spamdelay.service /etc/systemd/system/spamdelay.service; do
    if [ -e "$f" ] || [ -L "$f" ]; then
        fail "$f is left after dpkg --purge"
    fi
done
if dpkg -s "$PKG" >/dev/null 2>&1; then
    fail "dpkg -s $PKG still finds it after purge"
fi

if [ "$failed" = 0 ]; then
    echo "package check: all passed"
fi
exit "$failed"
