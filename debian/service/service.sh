# Sourced by /etc/init.d/tcp-intercept and by tcp-intercept.service (through
# /usr/lib/tcp-intercept/systemd-helper): the settings of
# /etc/default/tcp-intercept with their defaults, the daemon's command line,
# and the interception rules they ask for. Written once, so that the init
# script and the systemd unit cannot drift apart.

DAEMON=/usr/sbin/tcp-interceptd
CTL=/usr/sbin/tcp-intercept-ctl
# The daemon's own directory (systemd: RuntimeDirectory=): its user may
# create and remove the pid file and the control socket there.
RUNDIR=/run/tcp-intercept
PIDFILE=$RUNDIR/tcp-intercept.pid
TPROXY=/usr/lib/tcp-intercept/tproxy.sh

BIND_LISTEN='[0.0.0.0]:[5000]'
BIND_OUTGOING='[0.0.0.0]:[0]'
LOGFILE=/var/log/tcp-intercept/tcp-intercept.log
DAEMON_USER=tcp-intercept
CONTROL_SOCKET=$RUNDIR/tcp-intercept.sock
METRICS=
WORKERS=1
MAX_CONNECTIONS=
MAX_PER_CLIENT=
WHEN_FULL=
CONNECT_TIMEOUT=
IDLE_TIMEOUT=
DRAIN_TIMEOUT=
POLICY=
DAEMON_ARGS=
DAEMON_OPTS=
CONTROL_NETWORK=0
CONTROL_IPTABLES=0
IP_ROUTE_TABLE_NUMBER=5
FWMARK=0x1/0x1
LISTEN_PORT=
TPROXY_BACKEND=
TPROXY_FAMILY=
FAIL=open
TPROXY_PASS_MARK=

if [ -r /etc/default/tcp-intercept ]; then
    . /etc/default/tcp-intercept
fi

# -u for the daemon: started as root, it switches to DAEMON_USER once it
# listens; already someone else (systemd's User=), it is that user.
_tcp_intercept_user() {
    if [ "$(id -u)" = 0 ] && [ -n "$DAEMON_USER" ] && [ "$DAEMON_USER" != root ]; then
        echo "$DAEMON_USER"
    fi
}

# The directory of the pid file and the control socket, for DAEMON_USER.
tcp_intercept_rundir() {
    user=$(_tcp_intercept_user)
    install -d -m 0755 ${user:+-o "$user"} "$RUNDIR"
}

# Runs "$@" followed by the daemon's options: the command is start-stop-daemon
# in the init script, exec of the daemon in the foreground under systemd.
# DAEMON_ARGS and DAEMON_OPTS are both honoured (the original's postinst
# wrote one and its init script read the other) and split into words on
# purpose; globbing is off, or "[::1]:[80]" could match a file name.
tcp_intercept_run() {
    user=$(_tcp_intercept_user)
    set -f
    # shellcheck disable=SC2086
    "$@" -p "$PIDFILE" -b "$BIND_LISTEN" -B "$BIND_OUTGOING" \
        ${LOGFILE:+-l "$LOGFILE"} ${user:+-u "$user"} \
        ${CONTROL_SOCKET:+--control "$CONTROL_SOCKET"} ${METRICS:+--metrics "$METRICS"} \
        ${WORKERS:+-w "$WORKERS"} ${MAX_CONNECTIONS:+--max-connections "$MAX_CONNECTIONS"} \
        ${MAX_PER_CLIENT:+--max-per-client "$MAX_PER_CLIENT"} \
        ${WHEN_FULL:+--when-full "$WHEN_FULL"} \
        ${CONNECT_TIMEOUT:+--connect-timeout "$CONNECT_TIMEOUT"} \
        ${IDLE_TIMEOUT:+--idle-timeout "$IDLE_TIMEOUT"} \
        ${DRAIN_TIMEOUT:+--drain-timeout "$DRAIN_TIMEOUT"} \
        ${POLICY:+--policy "$POLICY"} \
        $DAEMON_ARGS $DAEMON_OPTS
    set -- $?
    set +f
    return "$1"
}

# The version the running daemon reports (its control socket), or nothing.
tcp_intercept_running_version() {
    [ -n "$CONTROL_SOCKET" ] || return 0
    "$CTL" -s "$CONTROL_SOCKET" show info 2>/dev/null | sed -n 's/^Version: //p'
}

# The TPROXY port: LISTEN_PORT, else the port of BIND_LISTEN, else 5000.
tcp_intercept_listen_port() {
    if [ -n "$LISTEN_PORT" ]; then
        echo "$LISTEN_PORT"
        return
    fi
    port=${BIND_LISTEN##*:}
    port=${port#\[}
    port=${port%\]}
    case $port in
        '' | *[!0-9]*)  # a service name, as the daemon resolves it
            # shellcheck disable=SC2046
            set -- $(getent services "$port/tcp" 2>/dev/null)
            port=${2%/tcp}
            ;;
    esac
    echo "${port:-5000}"
}

_tcp_intercept_yes() {
    case $1 in
        1 | [Yy][Ee][Ss] | [Tt][Rr][Uu][Ee]) return 0 ;;
        *) return 1 ;;
    esac
}

# Whether /etc/default asks us to install and remove the rules.
tcp_intercept_controls_firewall() {
    _tcp_intercept_yes "$CONTROL_NETWORK" || _tcp_intercept_yes "$CONTROL_IPTABLES"
}

# tproxy.sh up | down | status | bypass, with the settings' port, mark,
# table, FAIL (open or closed) and policy (its bypass rules).
tcp_intercept_firewall() {
    # shellcheck disable=SC2086
    "$TPROXY" ${TPROXY_BACKEND:+--backend "$TPROXY_BACKEND"} \
        ${TPROXY_FAMILY:+--family "$TPROXY_FAMILY"} ${FAIL:+--fail "$FAIL"} \
        ${POLICY:+--policy "$POLICY"} \
        ${TPROXY_PASS_MARK:+--pass-mark "$TPROXY_PASS_MARK"} \
        --port "$(tcp_intercept_listen_port)" --mark "$FWMARK" \
        --table "$IP_ROUTE_TABLE_NUMBER" "$1"
}

# After a reload's SIGHUP: whether the daemon took the policy file (POLICY;
# true without one). A daemon that refuses a file keeps the policy it had
# and logs why: this is then false, with the daemon's reason on stderr,
# and the caller must leave the firewall's bypass sets as they are (those
# of the policy still in force). The daemon's own word is its control
# socket's answer to "reload" (the file read again, as SIGHUP just had it
# read: same file, same verdict; the answer comes once every worker has
# it). Without CONTROL_SOCKET, the daemon's loader and start-up checks run
# on the file with the daemon's options, as an upgrade's check runs them
# (TCP_INTERCEPT_UPGRADE_CHECK: nothing bound, nothing started); the
# running daemon can still refuse what they pass (a reload cannot add the
# first max_per_client, see tcp-interceptd(8)).
tcp_intercept_policy_taken() {
    [ -n "$POLICY" ] || return 0
    if [ -n "$CONTROL_SOCKET" ]; then
        answer=$("$CTL" -s "$CONTROL_SOCKET" reload 2>&1) && return 0
        echo "$answer" >&2
        return 1
    fi
    tcp_intercept_run env TCP_INTERCEPT_UPGRADE_CHECK=1 "$DAEMON" > /dev/null
}

# After a reload the daemon took: the bypass sets follow the policy file
# (in place).
tcp_intercept_firewall_bypass() {
    if tcp_intercept_controls_firewall && [ -n "$POLICY" ]; then
        tcp_intercept_firewall bypass
    fi
}
