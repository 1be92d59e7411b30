#!/bin/bash
# The Debian package, end to end, as an operator meets it. As root, on
# Debian 12 (run by .ci/run after scripts/test.sh):
#
#   1. build tcp-intercept_*.deb with dpkg-buildpackage from a copy of the
#      checkout's tracked files (the checkout itself stays clean), and the
#      same tree as version N+1 (VERSION+test1), to upgrade to;
#   2. apt-get install it, so that its dependencies come from Debian, with
#      bind-listen preseeded through debconf;
#   3. check the binaries (Debian's python3), the man page, the unit file,
#      and that reconfiguring keeps the settings file's other lines;
#   4. in a router namespace between a client and a server namespace, run
#      /etc/init.d/tcp-intercept with BIND_OUTGOING=client, WORKERS=2 and
#      CONTROL_NETWORK=1 CONTROL_IPTABLES=1: start (tproxy.sh installs the
#      rules), a connection relayed with the client's address, the master
#      and its workers as user tcp-intercept with CAP_NET_ADMIN alone,
#      show info, the packaged example policy (show policy, its bypass set;
#      reload re-reads it and updates the set), status, reload and
#      logrotate (SIGHUP, same pid); the
#      seamless upgrade: apt-get install N+1 while a transfer is held open
#      (the postinst runs the init script's upgrade: same master, version
#      N+1, the transfer intact, the old workers gone once it ended, new
#      ones serving; traffic.sh); dpkg-reconfigure in the router (the same
#      answers: the daemon goes on; a new listening port: it restarts on
#      that port, the rules follow, it relays); kill -9 of the master (the
#      rules stay, FAIL=open: a connection begun at once reaches its server
#      within 2 s; start: intercepted again; fail_open.sh); METRICS, MAX_*,
#      the timeouts and DAEMON_ARGS applied by force-reload; a policy file
#      the daemon refuses (tproxy.sh alone would take its new bypass
#      prefix): reload exits 1 with the daemon's reason, the bypass set stays
#      the old policy's (also the check without a control socket); stop (rules gone, status
#      3), a start that fails with the daemon's own status; then what
#      tcp-intercept.service runs (systemd-helper), as systemd is not there;
#   5. apt-get purge, and check that nothing is left;
#   6. the upgrade from 2.0 (built from the history, as released): 2.0 installed and
#      started in the router, then this package installed over it there:
#      2.0's daemon (no master) stopped, the new one started once, 2.0's
#      log moved into /var/log/tcp-intercept/ and given to the user, the
#      settings pointing at it; purge again.
#
# Everything it creates is removed on exit, failed or not. About 25 s once
# the build dependencies are installed.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin # Debian's python3, not a pyenv one
export DEBIAN_FRONTEND=noninteractive
# On a machine run by systemd, /lib/lsb/init-functions would hand the init
# script over to systemctl, that is to the host's namespaces. (Debian 12's
# hook reads SYSTEMCTL_SKIP_REDIRECT, not _SYSTEMCTL_SKIP_REDIRECT.)
export SYSTEMCTL_SKIP_REDIRECT=1

REPO=$(cd "$(dirname "$0")/.." && pwd)
ID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
NS_C=tds$ID-c NS_R=tds$ID-r NS_S=tds$ID-s
WORK=$(mktemp -d /tmp/tds-smoke.XXXXXX)
PIDFILE=/run/tcp-intercept/tcp-intercept.pid
LOG=/var/log/tcp-intercept/tcp-intercept.log
DEFAULTS=/etc/default/tcp-intercept
TPROXY=/usr/lib/tcp-intercept/tproxy.sh
PORT=5077 # preseeded: the TPROXY port must follow BIND_LISTEN
CLIENT=10.77.1.2 ROUTER_C=10.77.1.1 ROUTER_S=10.77.2.1 SERVER=10.77.2.2
SERVER_PORT=8080
SERVER_PID='' OUR_POLICY_RC_D='' INSTALLED='' STARTED='' OLD_STAGE=''
OLD_LOG=/var/log/tcp-intercept.log OLD_PIDFILE=/run/tcp-intercept.pid # 2.0's
T0=$(date +%s)

say() { echo "deb_smoke [$(($(date +%s) - T0))s]: $*"; }
fail() {
	echo "deb_smoke: FAILED: $*" >&2
	exit 1
}
in_ns() { # namespace command...
	local ns=$1
	shift
	ip netns exec "$ns" "$@"
}
init_script() { timeout 60 ip netns exec "$NS_R" /etc/init.d/tcp-intercept "$@"; }
on_router() { "$@"; } # for traffic.sh: the daemon's files and /proc are the host's
# exit_status COMMAND...: print the command's exit status (its stdout discarded).
exit_status() { if "$@" >/dev/null; then echo 0; else echo $?; fi; }
# no_rules WHAT: fail unless tproxy.sh in the router says no rules are in (3).
no_rules() {
	local status
	status=$(exit_status in_ns "$NS_R" "$TPROXY" status)
	[ "$status" = 3 ] || fail "$1 (tproxy.sh status $status, not 3)"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
	local seconds=$1 what=$2 deadline
	deadline=$(($(date +%s) + seconds))
	shift 2
	until "$@" >/dev/null 2>&1; do
		[ "$(date +%s)" -lt "$deadline" ] || fail "no $what within ${seconds}s"
		sleep 0.1
	done
}

# stop_all_in NS: TERM, then KILL, every process still in namespace NS.
stop_all_in() {
	local pids
	pids=$(ip netns pids "$1" 2>/dev/null) || return 0
	[ -n "$pids" ] || return 0
	# shellcheck disable=SC2086 # one pid a word
	kill -TERM $pids 2>/dev/null
	for _ in $(seq 50); do
		[ -n "$(ip netns pids "$1" 2>/dev/null)" ] || return 0
		sleep 0.1
	done
	# shellcheck disable=SC2046
	kill -KILL $(ip netns pids "$1" 2>/dev/null) 2>/dev/null
}

# The package's scripts run where apt runs: in the host's namespaces. Before
# the purge, the settings keep its init script off the host's firewall...
hands_off_the_firewall() {
	[ ! -f "$DEFAULTS" ] || sed -i 's/^CONTROL_\(NETWORK\|IPTABLES\)=.*/CONTROL_\1=0/' "$DEFAULTS"
}
# ... and the purge runs with a policy-rc.d that forbids every action, bound
# over the host's in a mount namespace of its own (the host's file is never
# changed), whatever the host's own policy-rc.d allows.
purge() {
	# shellcheck disable=SC2016 # for sh -c
	unshare --mount --propagation private sh -c \
		'printf "#!/bin/sh\nexit 101\n" >"$0" && chmod 755 "$0" &&
		 mount --bind "$0" /usr/sbin/policy-rc.d && exec "$@"' \
		"$WORK/forbid-all" timeout 300 apt-get purge -y -qq -o DPkg::Lock::Timeout=300 tcp-intercept
}

# The daemon's pid, if the pid file names a live process in our router.
our_daemon() {
	local pid
	pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
	[ -n "$pid" ] && [ "$(ip netns identify "$pid" 2>/dev/null)" = "$NS_R" ] || return 1
	echo "$pid"
}

cleanup() {
	local status=$? pid
	set +e
	trap - EXIT INT TERM
	if [ "$status" != 0 ] && [ -f "$LOG" ] && [ -n "$STARTED" ]; then
		echo "--- $LOG (last 30 lines)" >&2
		tail -n 30 "$LOG" >&2
	fi
	if pid=$(our_daemon); then
		kill -TERM "$pid"
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null
	fi
	for pid in "${HELD_PIDS[@]}" "$SERVER_PID"; do
		[ -n "$pid" ] || continue
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	for ns in "$NS_C" "$NS_R" "$NS_S"; do
		stop_all_in "$ns"
		ip netns del "$ns" 2>/dev/null # its rules and routes go with it
	done
	# Whatever failed, the purge must not run the init script in the host's
	# namespace (its stop would take the host's firewall rules down): the
	# settings say hands off the firewall, and starts and stops stay
	# forbidden until the package is gone.
	if [ -n "$INSTALLED" ] && dpkg-query -W tcp-intercept >/dev/null 2>&1; then
		hands_off_the_firewall
		purge >/dev/null 2>&1
	fi
	[ -z "$OUR_POLICY_RC_D" ] || rm -f /usr/sbin/policy-rc.d
	echo PURGE | debconf-communicate tcp-intercept >/dev/null 2>&1
	if [ -n "$STARTED" ]; then
		rm -f "$PIDFILE" "$LOG" "$LOG".*
	fi
	[ -z "$OLD_STAGE" ] || rm -f "$OLD_PIDFILE" "$OLD_LOG"
	rm -rf "$WORK"
	if [ "$status" = 0 ]; then
		say "passed"
	else
		echo "deb_smoke: failed (status $status)" >&2
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "run as root (apt, namespaces, TPROXY)"
if dpkg-query -W -f='${Status}' tcp-intercept 2>/dev/null | grep -q installed; then
	fail "tcp-intercept is installed already; this test installs and purges it"
fi
[ ! -s "$PIDFILE" ] || fail "$PIDFILE exists: a tcp-intercept runs here already"

# -- 1. build ---------------------------------------------------------------

say "installing the build dependencies"
# shellcheck source=tests/build_deb.sh
. "$REPO/tests/build_deb.sh"
# shellcheck source=tests/traffic.sh
. "$REPO/tests/traffic.sh"
# shellcheck source=tests/fail_open.sh
. "$REPO/tests/fail_open.sh"
apt_install "$WORK/apt.log" "${DEB_BUILD_DEPS[@]}" iproute2 iptables nftables logrotate man-db ||
	fail "installing the build dependencies"

say "building the package, and the same tree as version N+1"
DEB=$(build_deb "$REPO" "$WORK") || fail "building the package"
NEXT_VERSION=$(dpkg-deb -f "$DEB" Version)+test1
NEXT_DEB=$(build_deb "$REPO" "$WORK/next" "$NEXT_VERSION") || fail "building version $NEXT_VERSION"

# -- 2. install ---------------------------------------------------------------

say "installing $(basename "$DEB") with apt"
# The postinst (install, dpkg-reconfigure) would start the daemon in the
# host's namespace: not here. Removed on exit.
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	OUR_POLICY_RC_D=1
fi
echo "tcp-intercept tcp-intercept/bind-listen string [0.0.0.0]:[$PORT]" | debconf-set-selections
chmod 755 "$WORK" # apt's download user reads the .deb
INSTALLED=1
if ! apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$DEB" >"$WORK/install.log" 2>&1; then
	cat "$WORK/install.log" >&2
	fail "apt-get install $DEB"
fi
host_service_stopped() { # in case the host's systemd ignored policy-rc.d
	if [ -d /run/systemd/system ]; then
		systemctl stop tcp-intercept.service 2>/dev/null || true
	fi
}
host_service_stopped

# -- 3. what was installed ----------------------------------------------------

say "checking the binaries, the man page, the unit, the settings file"
for bin in tcp-interceptd tcp-intercept; do
	[ "$(head -n 1 /usr/sbin/$bin)" = "#!/usr/bin/python3" ] || fail "/usr/sbin/$bin: not #!/usr/bin/python3"
	out=$(cd / && /usr/sbin/$bin -V) || fail "$bin -V: exit status $?"
	python=$(/usr/bin/python3 -c 'import platform; print(platform.python_version())')
	case $out in
		"tcp-intercept version "*" Python $python,"*) ;;
		*) fail "$bin -V: $out" ;;
	esac
done
version=$(dpkg-deb -f "$DEB" Version)
case $(/usr/sbin/tcp-interceptd -V) in
	"tcp-intercept version $version"$'\n'*) ;;
	*) fail "tcp-interceptd -V is not the package's version $version" ;;
esac
module=$(cd / && /usr/bin/python3 -c 'import tcp_intercept; print(tcp_intercept.__file__)')
[ "$module" = /usr/lib/python3/dist-packages/tcp_intercept/__init__.py ] || fail "tcp_intercept from $module"
for page in tcp-interceptd tcp-intercept tcp-intercept-ctl; do
	warnings=$(MANWIDTH=80 man --warnings -l /usr/share/man/man8/$page.8.gz 2>&1 >/dev/null) ||
		fail "man $page: exit status $?"
	[ -z "$warnings" ] || fail "man $page: $warnings"
done
if command -v systemd-analyze >/dev/null; then
	out=$(systemd-analyze verify /lib/systemd/system/tcp-intercept.service 2>&1 |
		grep -v "man tcp-interceptd(8)" || true) # no man-db index in a fresh container
	[ -z "$out" ] || fail "systemd-analyze verify: $out"
fi
grep -qx "BIND_LISTEN=\"\[0.0.0.0\]:\[$PORT\]\"" "$DEFAULTS" || fail "debconf's bind-listen is not in $DEFAULTS"
grep -qx 'BIND_OUTGOING="\[0.0.0.0\]:\[0\]"' "$DEFAULTS" || fail "no default BIND_OUTGOING in $DEFAULTS"

# An operator edits the file; reconfiguring must keep every line of it.
sed -i -e 's/^BIND_OUTGOING=.*/BIND_OUTGOING=client/' -e 's/^CONTROL_NETWORK=.*/CONTROL_NETWORK=1/' \
	-e 's/^CONTROL_IPTABLES=.*/CONTROL_IPTABLES=1/' -e 's/^WORKERS=.*/WORKERS=2/' "$DEFAULTS"
echo '# a line of our own' >>"$DEFAULTS"
dpkg-reconfigure -f noninteractive tcp-intercept >/dev/null 2>&1 || fail "dpkg-reconfigure"
host_service_stopped
grep -qx 'BIND_OUTGOING="client"' "$DEFAULTS" || fail "dpkg-reconfigure lost BIND_OUTGOING=client"
for line in CONTROL_NETWORK=1 WORKERS=2 '# a line of our own'; do
	grep -qxF "$line" "$DEFAULTS" || fail "dpkg-reconfigure changed other lines of $DEFAULTS ($line)"
done
case $(debconf-show tcp-intercept) in *"bind-outgoing: client"*) ;; *) false ;; esac || fail "debconf did not learn BIND_OUTGOING"

# A policy: a copy of the packaged example (its bypass rules go to the
# firewall at start; reload re-reads it and updates them in place).
POLICY_FILE=$WORK/policy.toml
chmod 0755 "$WORK" # the daemon's user reads the policy again on reload
install -m 0644 /usr/share/tcp-intercept/policy.example.toml "$POLICY_FILE"
echo "POLICY=$POLICY_FILE" >>"$DEFAULTS"
bypassed() { # PREFIX: in our nft set or ipset in the router
	local found # whole, then grep: grep -q in a pipe may end nft with SIGPIPE (pipefail)
	found=$(in_ns "$NS_R" nft list ruleset 2>/dev/null; in_ns "$NS_R" ipset list 2>/dev/null || true)
	grep -q "$1" <<<"$found"
}

# -- 4. the init script in a router -----------------------------------------

say "client $NS_C -- router $NS_R -- server $NS_S"
for ns in "$NS_C" "$NS_R" "$NS_S"; do
	ip netns add "$ns"
	in_ns "$ns" ip link set lo up
done
ip link add c0 netns "$NS_C" type veth peer name rc netns "$NS_R"
ip link add s0 netns "$NS_S" type veth peer name rs netns "$NS_R"
in_ns "$NS_C" ip addr add "$CLIENT/24" dev c0
in_ns "$NS_C" ip link set c0 up
in_ns "$NS_C" ip route add default via "$ROUTER_C"
in_ns "$NS_S" ip addr add "$SERVER/24" dev s0
in_ns "$NS_S" ip link set s0 up
in_ns "$NS_S" ip route add default via "$ROUTER_S"
in_ns "$NS_R" ip addr add "$ROUTER_C/24" dev rc
in_ns "$NS_R" ip addr add "$ROUTER_S/24" dev rs
in_ns "$NS_R" ip link set rc up
in_ns "$NS_R" ip link set rs up
in_ns "$NS_R" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0

# The server answers each connection with the address it saw and the
# sha256 of what it received (traffic.sh).
timeout 300 ip netns exec "$NS_S" /usr/bin/python3 -c "$TRANSFER_SERVER" "$SERVER" "$SERVER_PORT" &
SERVER_PID=$!
wait_for 10 "server listening" sh -c \
	"ip netns exec $NS_S ss -Hltn 'sport = :$SERVER_PORT' | grep -q LISTEN"

say "init script: start"
STARTED=1
init_script start || fail "start: exit status $?"
pid=$(our_daemon) || fail "start: no daemon in $NS_R after start returned"
[ "$(cat /proc/"$pid"/comm)" = tcp-interceptd ] || fail "the daemon's process name is $(cat /proc/"$pid"/comm)"
in_ns "$NS_R" "$TPROXY" status >/dev/null || fail "start: the interception rules are not installed"
in_ns "$NS_R" ss -Hltn "sport = :$PORT" | grep -q LISTEN || fail "start: nothing listens on $PORT"
rules=$(in_ns "$NS_R" iptables-save 2>/dev/null; in_ns "$NS_R" nft list ruleset 2>/dev/null || true)
case $rules in
	*"--on-port $PORT "* | *"tproxy to :$PORT "*) ;;
	*) fail "start: no TPROXY rule to port $PORT" ;;
esac

say "a connection through the router"
transfer

say "the master and its workers: user tcp-intercept, CAP_NET_ADMIN alone; show info"
check_processes "after start" "$pid"
[ "${#WORKER_PIDS[@]}" = 2 ] || fail "WORKERS=2, but the master has workers ${WORKER_PIDS[*]}"
if [ "$(info Pid)" != "$pid" ] || [ "$(info Version)" != "$version" ] || [ "$(info Workers)" != 2 ]; then
	fail "show info does not say Pid: $pid, Version: $version, Workers: 2:
$(tcp-intercept-ctl -s "$CTL_SOCKET" show info 2>&1)"
fi

say "the policy: show policy, its bypass prefixes in the firewall"
shown=$(tcp-intercept-ctl -s "$CTL_SOCKET" show policy) || fail "show policy: exit status $?"
case $shown in
	*"Rule: 1 vpn-peer destination=203.0.113.7/32 bypass"*"Rule: 6 satellite matched="*) ;;
	*) fail "show policy: $shown" ;;
esac
bypassed 203.0.113.7 || fail "start: the policy's bypass prefix is not in the firewall"
printf '\n[[rule]]\nname = "smoke"\nbypass = true\ndestination = "192.0.2.99/32"\n' >>"$POLICY_FILE"

say "init script: status, reload (the policy too), logrotate"
init_script status >/dev/null || fail "status: exit status $? while running"
init_script reload >/dev/null || fail "reload: exit status $?"
wait_for 10 "SIGHUP reopen line" grep -q "Received SIGHUP, (re)opening this logfile" "$LOG"
wait_for 10 "the policy reloaded" grep -q "Policy reloaded from $POLICY_FILE: 7 rule(s)" "$LOG"
bypassed 192.0.2.99 || fail "reload: the new bypass prefix is not in the firewall"
logrotate -s "$WORK/logrotate.state" -f /etc/logrotate.d/tcp-intercept || fail "logrotate"
[ -f "$LOG.1" ] || fail "logrotate: no $LOG.1"
wait_for 10 "reopened log after logrotate" grep -q "Received SIGHUP, (re)opening this logfile" "$LOG"
[ "$(our_daemon)" = "$pid" ] || fail "the daemon did not survive SIGHUP as pid $pid"
transfer # and it still relays, into the new log

say "init script: start again (already running)"
init_script start >/dev/null || fail "start while running: exit status $?"
[ "$(our_daemon)" = "$pid" ] || fail "start while running replaced the daemon"

say "upgrade in place under a held transfer: apt-get install $(basename "$NEXT_DEB")"
# The postinst's invoke-rc.d asks policy-rc.d: ours lets the upgrade and
# restart actions through (the upgrade signals the daemon of the pid file:
# ours; the restart runs where dpkg-reconfigure runs: in the router) and
# nothing else. It is bound over the host's in a mount namespace of apt's
# own: the host's file is never changed.
cat >"$WORK/policy-rc.d" <<'EOF'
#!/bin/sh
# policy-rc.d [--quiet] SCRIPT ACTION [RUNLEVEL]: 0 allows, 101 forbids.
while [ "${1#--}" != "$1" ]; do shift; done
# "(restart)": a restart where invoke-rc.d finds no runlevel (no init here).
[ "$1" = tcp-intercept ] && case $2 in upgrade | restart | "(restart)") exit 0 ;; esac
exit 101
EOF
chmod 755 "$WORK/policy-rc.d"
with_our_policy() {
	# shellcheck disable=SC2016 # for sh -c
	unshare --mount --propagation private sh -c 'mount --bind "$0" /usr/sbin/policy-rc.d && exec "$@"' \
		"$WORK/policy-rc.d" "$@"
}
upgrade_started=$(date +%s%N)
upgrade_under_transfer "$pid" "$NEXT_VERSION" \
	with_our_policy timeout 300 apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$NEXT_DEB"
say "upgraded and drained in $((($(date +%s%N) - upgrade_started) / 1000000)) ms"
[ "$(dpkg-query -W -f='${Version}' tcp-intercept)" = "$NEXT_VERSION" ] || fail "dpkg does not say $NEXT_VERSION is installed"
[ "$(our_daemon)" = "$pid" ] || fail "the pid file no longer names $pid in $NS_R"

say "dpkg-reconfigure, answers unchanged: the daemon goes on"
# reconfigure EDITOR: dpkg-reconfigure in the router, the questions answered
# by EDITOR through debconf's editor frontend (which wants a terminal:
# script(1) gives it one).
reconfigure() {
	with_our_policy ip netns exec "$NS_R" env -u DEBIAN_FRONTEND EDITOR="$1" timeout 120 \
		script -qec "dpkg-reconfigure -f editor -p medium tcp-intercept" /dev/null \
		</dev/null >"$WORK/reconfigure.log" 2>&1 || { cat "$WORK/reconfigure.log" >&2; return 1; }
}
printf '#!/bin/sh\n' >"$WORK/keep-answers"
NEW_PORT=$((PORT + 1))
cat >"$WORK/new-port" <<EOF
#!/bin/sh
# The editor frontend's file holds the answers as lines QUESTION="VALUE".
sed -i 's|^tcp-intercept/bind-listen=.*|tcp-intercept/bind-listen="[0.0.0.0]:[$NEW_PORT]"|' "\$1"
EOF
chmod 755 "$WORK/keep-answers" "$WORK/new-port"
reconfigure "$WORK/keep-answers" || fail "dpkg-reconfigure (answers unchanged)"
[ "$(our_daemon)" = "$pid" ] || fail "dpkg-reconfigure with the same answers replaced the daemon"

say "dpkg-reconfigure, a new listening port: the daemon restarts on it, rules follow"
reconfigure "$WORK/new-port" || fail "dpkg-reconfigure (port $NEW_PORT)"
grep -qx "BIND_LISTEN=\"\[0.0.0.0\]:\[$NEW_PORT\]\"" "$DEFAULTS" || fail "dpkg-reconfigure did not write port $NEW_PORT"
new_pid=$(our_daemon) || fail "no daemon after dpkg-reconfigure changed the port"
[ "$new_pid" != "$pid" ] || fail "a new listening port, but the daemon was not restarted"
! kill -0 "$pid" 2>/dev/null || fail "the daemon before the restart ($pid) still runs"
pid=$new_pid
in_ns "$NS_R" ss -Hltn "sport = :$NEW_PORT" | grep -q LISTEN || fail "nothing listens on $NEW_PORT after the restart"
! in_ns "$NS_R" ss -Hltn "sport = :$PORT" | grep -q LISTEN || fail "port $PORT still listens after the restart"
rules=$(in_ns "$NS_R" iptables-save 2>/dev/null; in_ns "$NS_R" nft list ruleset 2>/dev/null || true)
case $rules in
	*"--on-port $NEW_PORT "* | *"tproxy to :$NEW_PORT "*) ;;
	*) fail "after the restart, no TPROXY rule to port $NEW_PORT" ;;
esac
case $rules in
	*"--on-port $PORT "* | *"tproxy to :$PORT "*) fail "after the restart, a TPROXY rule to the old port $PORT is left" ;;
esac
transfer
check_processes "after the restart" "$pid"

# -- fail open: kill -9 under the init script (fail_open.sh) ---------------

say "kill -9 of the master: connections pass within ${FAIL_OPEN_WITHIN} s; start intercepts again"
check_processes "before kill -9" "$pid"
kill_and_pass "$pid"
say "the first connection after kill -9 reached its server in $PASSED_MS ms"
for worker in "${WORKER_PIDS[@]}"; do
	wait_for 5 "the exit of worker $worker after its master's" sh -c "! kill -0 $worker"
done
in_ns "$NS_R" "$TPROXY" status >/dev/null || fail "kill -9: the rules are gone (nothing should have run)"
init_script start || fail "start after kill -9: exit status $?"
pid=$(our_daemon) || fail "start after kill -9: no daemon"
transfer # intercepted again

say "settings: METRICS, MAX_*, timeouts, DAEMON_ARGS; force-reload restarts with them"
cp "$DEFAULTS" "$WORK/defaults.before"
cat >>"$DEFAULTS" <<'EOF'
METRICS="[127.0.0.1]:[9105]"
MAX_CONNECTIONS=100
MAX_PER_CLIENT=10
CONNECT_TIMEOUT=7
IDLE_TIMEOUT=600
DRAIN_TIMEOUT=30
DAEMON_ARGS="-k"
EOF
init_script force-reload >/dev/null || fail "force-reload: exit status $?"
new_pid=$(our_daemon) || fail "no daemon after force-reload"
[ "$new_pid" != "$pid" ] || fail "force-reload did not restart the daemon (settings are read at start)"
pid=$new_pid
cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline")
for option in "--metrics [127.0.0.1]:[9105]" "--max-connections 100" "--max-per-client 10" \
	"--connect-timeout 7" "--idle-timeout 600" "--drain-timeout 30" " -k"; do
	case $cmdline in *"$option"*) ;; *) fail "force-reload: no '$option' in: $cmdline" ;; esac
done
options=$(info Options)
case $options in *"--max-connections 100"*"--max-per-client 10"*) ;; *) fail "show info's Options: $options" ;; esac
# shellcheck disable=SC2016 # for python
metrics=$(in_ns "$NS_R" /usr/bin/python3 -c '
import urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open("http://127.0.0.1:9105/metrics", timeout=10).read().decode())') ||
	fail "METRICS: nothing answers on 127.0.0.1:9105 in the router"
case $metrics in *"tcp_intercept_connections "*) ;; *) fail "METRICS: no tcp_intercept_connections in: $metrics" ;; esac
transfer
cat "$WORK/defaults.before" >"$DEFAULTS"

say "init script: reload of a policy the daemon refuses fails, the bypass set stays"
cp "$POLICY_FILE" "$WORK/policy.good"
# A new bypass prefix, and a congestion control this kernel lacks: the
# daemon refuses the file (it asks the kernel); tproxy.sh's reading of the
# bypass rules (no kernel probe) would take it.
printf '\n[[rule]]\nname = "refused"\nbypass = true\ndestination = "192.0.2.95/32"\n' >>"$POLICY_FILE"
printf '\n[[rule]]\nname = "nosuchcc"\n[rule.server_leg]\ncongestion = "nosuchcc"\n' >>"$POLICY_FILE"
bypass=$(cd / && /usr/bin/python3 -m tcp_intercept.policy_file "$POLICY_FILE") && grep -q 192.0.2.95 <<<"$bypass" ||
	fail "tproxy.sh's reading of the policy does not take the test's file: the test proves nothing"
status=$(exit_status init_script reload 2>"$WORK/reload.err")
[ "$status" = 1 ] || fail "reload of a refused policy: exit status $status, not 1"
grep -q "policy not reloaded.*nosuchcc" "$WORK/reload.err" ||
	fail "reload of a refused policy does not give the daemon's reason: $(cat "$WORK/reload.err")"
wait_for 10 "'policy not reloaded' in $LOG" grep -q "policy not reloaded" "$LOG"
bypassed 192.0.2.95 && fail "reload: the refused policy's bypass prefix went to the firewall"
bypassed 192.0.2.99 || fail "reload: the bypass prefix of the policy in force left the firewall"
[ "$(our_daemon)" = "$pid" ] || fail "a refused reload: the daemon is no longer $pid"
# Without a control socket: the daemon's own checks on the file.
taken() { in_ns "$NS_R" sh -c '. /usr/lib/tcp-intercept/service.sh && CONTROL_SOCKET= && tcp_intercept_policy_taken'; }
taken 2>"$WORK/taken.err" && fail "without CONTROL_SOCKET, the refused policy passes the daemon's checks"
grep -q nosuchcc "$WORK/taken.err" || fail "without CONTROL_SOCKET, no reason: $(cat "$WORK/taken.err")"
cat "$WORK/policy.good" >"$POLICY_FILE"
taken || fail "without CONTROL_SOCKET, the good policy fails the daemon's checks"
transfer # the old policy serves on

say "init script: stop"
init_script stop >/dev/null || fail "stop: exit status $?"
! kill -0 "$pid" 2>/dev/null || fail "stop: pid $pid still runs"
[ ! -e "$PIDFILE" ] || fail "stop: $PIDFILE left behind"
status=$(exit_status init_script status)
[ "$status" = 3 ] || fail "status after stop: $status, not 3"
no_rules "stop left rules"

say "init script: a start the daemon refuses reports the daemon's status"
echo 'DAEMON_OPTS="--no-such-option"' >>"$DEFAULTS"
status=$(exit_status init_script start 2>/dev/null)
[ "$status" = 64 ] || fail "start with a bad option: exit status $status, not 64"
no_rules "rules installed for a daemon that did not start"

say "the unit's commands (systemd-helper): firewall-up, daemon, firewall-bypass, firewall-down"
sed -i '/^DAEMON_OPTS="--no-such-option"$/d' "$DEFAULTS"
HELPER=/usr/lib/tcp-intercept/systemd-helper
in_ns "$NS_R" "$HELPER" firewall-up || fail "systemd-helper firewall-up: exit status $?"
in_ns "$NS_R" "$TPROXY" status >/dev/null || fail "systemd-helper firewall-up installed no rules"
ip netns exec "$NS_R" "$HELPER" daemon 2>"$WORK/unit.err" & # ip and sh exec: $! is the daemon
unit=$!
wait_for 10 "foreground daemon's pid file" our_daemon
[ "$(our_daemon)" = "$unit" ] || fail "systemd-helper daemon: the pid file is not its own pid (no exec?)"
transfer
printf '\n[[rule]]\nname = "unit"\nbypass = true\ndestination = "192.0.2.98/32"\n' >>"$POLICY_FILE"
in_ns "$NS_R" "$HELPER" firewall-bypass || fail "systemd-helper firewall-bypass: exit status $?"
bypassed 192.0.2.98 || fail "systemd-helper firewall-bypass: the new bypass prefix is not in the firewall"
kill -TERM "$unit"
exited() { case $(ps -o stat= -p "$1") in "" | Z*) return 0 ;; *) return 1 ;; esac; }
wait_for 10 "exit of the foreground daemon on SIGTERM" exited "$unit"
status=0
wait "$unit" || status=$?
[ "$status" = 0 ] || fail "the foreground daemon exited $status on SIGTERM: $(cat "$WORK/unit.err")"
in_ns "$NS_R" "$HELPER" firewall-down || fail "systemd-helper firewall-down: exit status $?"
no_rules "systemd-helper firewall-down left rules"

# -- 5. purge -----------------------------------------------------------------

# purged WHAT: apt-get purge, and nothing of the package is left.
purged() {
	say "apt-get purge ($1)"
	hands_off_the_firewall
	purge >"$WORK/purge.log" 2>&1 || { cat "$WORK/purge.log" >&2; fail "apt-get purge ($1)"; }
	INSTALLED=
	for f in "$DEFAULTS" /usr/sbin/tcp-interceptd /usr/sbin/tcp-intercept /etc/init.d/tcp-intercept \
		"$TPROXY" /etc/logrotate.d/tcp-intercept "$LOG" "$LOG.1" "$OLD_LOG" "$OLD_PIDFILE"; do
		[ ! -e "$f" ] || fail "purge ($1) left $f"
	done
	[ -z "$(debconf-show tcp-intercept 2>/dev/null)" ] || fail "purge ($1) left the debconf answers"
}
purged "$version"

# -- 6. the upgrade from 2.0 ----------------------------------------------------

say "the upgrade from 2.0 (no master): building 2.0 from the history"
# 2.0 as released (the tree the README's Speed section compares against):
# no master, run as root, pid file and log straight in /run and /var/log.
V20=845c514
git -C "$REPO" rev-parse -q --verify "$V20^{commit}" >/dev/null ||
	fail "2.0 ($V20) is not in $REPO's history (a shallow clone? git fetch --unshallow)"
git clone -q --no-checkout "$REPO" "$WORK/v2.0" && git -C "$WORK/v2.0" checkout -q "$V20" ||
	fail "checking out 2.0 ($V20)"
OLD_DEB=$(build_deb "$WORK/v2.0" "$WORK/old") || fail "building 2.0"
echo "tcp-intercept tcp-intercept/bind-listen string [0.0.0.0]:[$PORT]" | debconf-set-selections
echo "tcp-intercept tcp-intercept/bind-outgoing string client" | debconf-set-selections
INSTALLED=1 OLD_STAGE=1
apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$OLD_DEB" >"$WORK/install-2.0.log" 2>&1 ||
	{ cat "$WORK/install-2.0.log" >&2; fail "apt-get install 2.0"; }
host_service_stopped
[ "$(dpkg-query -W -f='${Version}' tcp-intercept)" = 2.0.0 ] || fail "dpkg does not say 2.0.0 is installed"
sed -i -e 's/^CONTROL_NETWORK=.*/CONTROL_NETWORK=1/' -e 's/^CONTROL_IPTABLES=.*/CONTROL_IPTABLES=1/' "$DEFAULTS"
grep -qx "LOGFILE=$OLD_LOG" "$DEFAULTS" || fail "2.0's settings do not log to $OLD_LOG"
init_script start >/dev/null || fail "2.0: start: exit status $?"
old_pid=$(cat "$OLD_PIDFILE") && [ "$(ip netns identify "$old_pid")" = "$NS_R" ] ||
	fail "2.0: no daemon of $OLD_PIDFILE in $NS_R"
LOG=$OLD_LOG transfer
old_port=$TRANSFER_PORT

say "apt-get install $(basename "$DEB") over 2.0, in the router: restarted once, log moved"
cat >"$WORK/policy-rc.d" <<'EOF'
#!/bin/sh
# policy-rc.d [--quiet] SCRIPT ACTION [RUNLEVEL]: 0 allows, 101 forbids.
while [ "${1#--}" != "$1" ]; do shift; done
# "(start)": a start where invoke-rc.d finds no runlevel (no init here).
[ "$1" = tcp-intercept ] && case $2 in start | "(start)" | restart | "(restart)") exit 0 ;; esac
exit 101
EOF
with_our_policy ip netns exec "$NS_R" timeout 300 apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
	"$DEB" >"$WORK/upgrade-2.0.log" 2>&1 || { cat "$WORK/upgrade-2.0.log" >&2; fail "apt-get install over 2.0"; }
wait_for 20 "the 2.1 daemon's pid file" our_daemon
pid=$(our_daemon)
! kill -0 "$old_pid" 2>/dev/null || fail "2.0's daemon ($old_pid) still runs"
[ ! -e "$OLD_PIDFILE" ] || fail "2.0's pid file $OLD_PIDFILE is left"
[ "$(info Version)" = "$version" ] || fail "show info does not say version $version"
grep -qxE "LOGFILE=\"?$LOG\"?" "$DEFAULTS" || fail "the settings still log to $(grep '^LOGFILE=' "$DEFAULTS")"
[ ! -e "$OLD_LOG" ] || fail "2.0's log $OLD_LOG was not moved"
[ "$(stat -c %U "$LOG")" = tcp-intercept ] || fail "$LOG belongs to $(stat -c %U "$LOG"), not tcp-intercept"
grep -qF "[$CLIENT]:$old_port-->[$SERVER]:$SERVER_PORT: Connection intercepted" "$LOG" ||
	fail "2.0's lines are not in $LOG"
starts=$(grep -c "starting up" "$LOG")
[ "$starts" = 2 ] || fail "$starts start-ups in $LOG, not 2 (2.0's, then 2.1's once)"
check_processes "after the upgrade from 2.0" "$pid"
transfer
init_script stop >/dev/null || fail "stop after the upgrade from 2.0: exit status $?"
no_rules "stop after the upgrade from 2.0 left rules"
purged "after the upgrade from 2.0"
