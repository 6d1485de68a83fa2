#!/bin/sh
# Installs what tests/tests/postfix.rs needs on Debian 12, as root: Postfix
# 3.7 (postscreen) from Debian, swaks, and Perl's IPv6 sockets for swaks.
#
# Postfix is installed as the machine's ordinary MTA package (Debian's MTAs
# conflict with each other; Exim and Sendmail are unpacked privately by their
# own scripts), but left unconfigured and stopped: the tests run their own
# instances, each with a private config directory inside a lab namespace, and
# never touch /etc/postfix or the host's port 25. Safe to run again.
set -eu

if [ "$(id -u)" -ne 0 ]; then
    echo "install-postfix.sh: run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
PACKAGES="postfix swaks libio-socket-inet6-perl"

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=""
for p in $PACKAGES; do
    installed "$p" || missing="$missing $p"
done

if [ -n "$missing" ]; then
    # "No configuration": the package writes no main.cf, so there is no
    # system Postfix to configure or start.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

    # Keep invoke-rc.d from starting services while the packages install,
    # unless the machine already has a policy (Docker images ship one).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        trap 'rm -f "$policy"' EXIT
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi

    apt-get update
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y --no-install-recommends $missing
fi

# No Postfix may be left running on the host: stop one that an earlier setup
# (or a package script) started. Its master's pid file names it; a stale file
# whose pid now belongs to something else is left alone.
pidfile=/var/spool/postfix/pid/master.pid
if [ -r "$pidfile" ]; then
    pid=$(tr -d ' \n' <"$pidfile")
    if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/lib/postfix/sbin/master ]; then
        echo "install-postfix.sh: stopping the host's Postfix (master pid $pid)"
        postfix stop || kill "$pid"
        # PID 1 may reap late; an exited process has no exe link any more.
        i=0
        while readlink "/proc/$pid/exe" >/dev/null 2>&1 && [ "$i" -lt 100 ]; do
            sleep 0.1
            i=$((i + 1))
        done
    fi
fi

postconf_version=$(postconf -d -h mail_version 2>/dev/null || true)
echo "install-postfix.sh: Postfix ${postconf_version:-?}, $(swaks --version 2>/dev/null | head -n 1 || echo swaks ?) ready"
