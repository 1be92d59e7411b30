#!/bin/bash
# tcp-intercept.service under a live systemd: Debian 12's, booted with
# systemd-nspawn (tests/nspawn.sh) in the router of a client / router /
# server world. As root, on Debian 12 (run by .ci/run after deb_smoke.sh):
#
#   1. apt-get install the build dependencies, systemd-container and
#      debootstrap; debootstrap the container's root unless a previous run
#      left it in /var/cache/tcp-intercept-tests (about a minute); build the
#      .deb, and the same tree as version N+1 (VERSION+test1; build_deb.sh);
#   2. namespaces tsd<hex>-c, -r and -s joined by veth, the router
#      forwarding; boot the container in the router's network namespace,
#      its systemd logging every system call its filters deny
#      (SYSTEMD_LOG_SECCOMP=1: the kernel's audit lines);
#   3. apt-get install the .deb inside: its postinst enables and starts the
#      unit (deb-systemd-helper and a real systemctl);
#   4. with BIND_OUTGOING=client, WORKERS=2 and CONTROL_NETWORK=1:
#      systemctl start (the unit installs the TPROXY rules), a connection
#      relayed with the client's own address and its bytes intact, MainPID
#      and its workers as user tcp-intercept with CAP_NET_ADMIN alone;
#      systemctl reload (a log file moved away is reopened); the seamless
#      upgrade: apt-get install N+1 while a transfer is held open (the
#      postinst runs the init script's upgrade; traffic.sh checks the
#      daemon; here: the same MainPID, the unit active or reloading
#      throughout, never restarted); systemctl stop (rules gone, no daemon
#      left, no failed unit);
#   5. systemd-analyze security's overall exposure of the unit: at most 2.5;
#   6. no system call denied to the unit's processes (the kernel's log), no
#      SIGSYS, EPERM or traceback in the unit's journal, no ERROR or
#      traceback in the daemon's log;
#   7. fail open (fail_open.sh): kill -9 of MainPID, a connection begun at
#      once reaches its server within 2 s, systemd restarts the unit and it
#      intercepts again; SIGSTOP of MainPID: its workers serve on, the
#      watchdog (WatchdogSec=) kills it and systemd restarts the unit;
#   8. with restarts off (a drop-in): FAIL=closed, kill -9 of MainPID leaves
#      the rules (ExecStop/ExecStopPost see SERVICE_RESULT=signal) and a
#      client's connection is dropped, systemctl stop removes them;
#      FAIL=open, kill -9: the unit removes them, connections pass;
#   9. a policy file the daemon refuses (tproxy.sh alone would take its new
#      bypass prefix): systemctl reload fails, the firewall's bypass set is
#      the old policy's, the daemon serves on under the same MainPID.
#
# Everything it starts is stopped by pid, the container powered off and the
# namespaces deleted on exit, failed or not. Prints the time of each phase.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin # Debian's python3, not a pyenv one
export DEBIAN_FRONTEND=noninteractive

REPO=$(cd "$(dirname "$0")/.." && pwd)
ID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
NS_C=tsd$ID-c NS_R=tsd$ID-r NS_S=tsd$ID-s
CT=$NS_R # the container: the router
WORK=$(mktemp -d /tmp/tsd-smoke.XXXXXX)
export NSPAWN_LOGS=$WORK
# Topology's addresses (lab/topology.py), in namespaces of our own.
CLIENT=10.91.1.2 ROUTER_C=10.91.1.1 ROUTER_S=10.91.2.1 SERVER=10.91.2.2
SERVER_PORT=7070
LOG=/var/log/tcp-intercept/tcp-intercept.log # in the container
DEFAULTS=/etc/default/tcp-intercept
TPROXY=/usr/lib/tcp-intercept/tproxy.sh
SERVER_PID='' SAMPLER_PID='' NAMESPACES=()
PHASE='' PHASE_START=0 PHASE_TIMES=()
T0=$SECONDS

# shellcheck source=tests/build_deb.sh
. "$REPO/tests/build_deb.sh"
# shellcheck source=tests/nspawn.sh
. "$REPO/tests/nspawn.sh"
# shellcheck source=tests/traffic.sh
. "$REPO/tests/traffic.sh"
# shellcheck source=tests/fail_open.sh
. "$REPO/tests/fail_open.sh"

say() { echo "systemd_smoke [$((SECONDS - T0))s]: $*"; }
fail() {
	echo "systemd_smoke: FAILED: $*" >&2
	exit 1
}

# phase NAME: the phase under way ends (its time is kept), NAME begins.
phase() {
	local now ms
	now=$(date +%s%N)
	if [ -n "$PHASE" ]; then
		ms=$(((now - PHASE_START) / 1000000))
		PHASE_TIMES+=("$(printf '%4d.%d s  %s' $((ms / 1000)) $((ms % 1000 / 100)) "$PHASE")")
	fi
	PHASE=${1:-} PHASE_START=$now
	[ -z "$PHASE" ] || say "$PHASE"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
	local seconds=$1 what=$2 deadline
	deadline=$((SECONDS + seconds))
	shift 2
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || fail "no $what within ${seconds}s"
		sleep 0.1
	done
}

in_ct() { nspawn_exec "$CT" timeout 60 "$@"; }
# apt-get in the container, through the host's network.
ct_apt() { nspawn_exec_online "$CT" timeout 300 env DEBIAN_FRONTEND=noninteractive apt-get -q "$@"; }
ct_systemctl() { in_ct systemctl --no-pager "$@"; }
on_router() { in_ct "$@"; } # for traffic.sh
exit_status() { if "$@" >/dev/null 2>&1; then echo 0; else echo $?; fi; }

cleanup() {
	local status=$? pid
	set +e
	trap - EXIT INT TERM
	phase teardown
	if [ "$status" != 0 ] && [ -n "${NSPAWN_INIT[$CT]:-}" ]; then
		echo "--- systemctl status tcp-intercept; its journal; $LOG" >&2
		ct_systemctl status -n 0 tcp-intercept >&2
		in_ct journalctl --no-pager -n 40 -u tcp-intercept >&2
		in_ct tail -n 30 "$LOG" >&2
	fi
	for pid in "${HELD_PIDS[@]}" "$SERVER_PID" "$SAMPLER_PID"; do
		[ -n "$pid" ] || continue
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	nspawn_stop_all || { [ "$status" != 0 ] || status=1; }
	for ns in "${NAMESPACES[@]}"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do # ours: a client still waiting
			kill -KILL "$pid" 2>/dev/null
		done
		ip netns del "$ns" || status=1
	done
	rm -rf "$WORK"
	phase
	echo "systemd_smoke: time per phase"
	printf '  %s\n' "${PHASE_TIMES[@]}"
	if [ "$status" = 0 ]; then
		say "passed"
	else
		echo "systemd_smoke: failed (status $status)" >&2
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "run as root (apt, namespaces, systemd-nspawn)"

# -- 1. the tools, the container's root, the package --------------------------

phase "installing the build dependencies, systemd-nspawn and debootstrap"
apt_install "$WORK/apt.log" "${DEB_BUILD_DEPS[@]}" "${NSPAWN_HOST_PACKAGES[@]}" iproute2 python3 ||
	fail "installing the tools"

phase "the container's root ($NSPAWN_ROOT)"
nspawn_root || fail "no root for the container"

phase "building the package, and the same tree as version N+1"
DEB=$(build_deb "$REPO" "$WORK") || fail "building the package"
NEXT_VERSION=$(dpkg-deb -f "$DEB" Version)+test1
NEXT_DEB=$(build_deb "$REPO" "$WORK/next" "$NEXT_VERSION") || fail "building version $NEXT_VERSION"
CT_DEB=/srv/$(basename "$DEB") CT_NEXT_DEB=/srv/$(basename "$NEXT_DEB") # bound into the container

# -- 2. the world, the container --------------------------------------------

phase "client $NS_C -- router $NS_R -- server $NS_S"
for ns in "$NS_C" "$NS_R" "$NS_S"; do
	ip netns add "$ns"
	NAMESPACES+=("$ns")
	ip -n "$ns" link set lo up
done
# Before the veths: they copy the "default" values when created.
ip netns exec "$NS_R" sysctl -qw net.ipv4.ip_forward=1 \
	net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
ip -n "$NS_C" link add c0 type veth peer name rc netns "$NS_R"
ip -n "$NS_S" link add s0 type veth peer name rs netns "$NS_R"
for end in "$NS_C c0 $CLIENT" "$NS_R rc $ROUTER_C" "$NS_R rs $ROUTER_S" "$NS_S s0 $SERVER"; do
	read -r ns dev address <<<"$end"
	ip -n "$ns" addr add "$address/24" dev "$dev"
	ip -n "$ns" link set "$dev" up
done
ip -n "$NS_C" route add default via "$ROUTER_C"
ip -n "$NS_S" route add default via "$ROUTER_S"

phase "booting the container $CT in $NS_R"
# --network-namespace-path alone would drop CAP_NET_ADMIN, which TPROXY
# needs: --private-network keeps it. (ip netns exec NS systemd-nspawn fails:
# it remounts /sys.)
# The kernel's clock when the test began, for its log (dmesg) of denied calls.
UPTIME0=$(cut -d' ' -f1 /proc/uptime)
nspawn_boot "$CT" --network-namespace-path="/run/netns/$NS_R" --private-network \
	--bind-ro="$DEB:$CT_DEB" --bind-ro="$NEXT_DEB:$CT_NEXT_DEB" \
	--setenv=SYSTEMD_LOG_SECCOMP=1 || fail "booting the container"
[ "$(ct_systemctl is-system-running)" = running ] || fail "the container's boot is degraded"

# -- 3. the package, installed by apt ----------------------------------------

phase "apt-get install $(basename "$DEB") in the container"
if ! ct_apt install -y "$CT_DEB" >"$WORK/install.log" 2>&1; then
	# A root debootstrapped long ago has package lists the mirror has moved past.
	{ ct_apt update && ct_apt install -y "$CT_DEB"; } >>"$WORK/install.log" 2>&1 ||
		{ cat "$WORK/install.log" >&2; fail "apt-get install in the container"; }
fi
[ "$(ct_systemctl is-enabled tcp-intercept)" = enabled ] || fail "the postinst did not enable tcp-intercept.service"
wait_for 10 "tcp-intercept.service active after the postinst" ct_systemctl is-active tcp-intercept
ct_systemctl stop tcp-intercept || fail "systemctl stop after the postinst: exit status $?"

# -- 4. start, a connection, reload, stop ------------------------------------

phase "systemctl start with BIND_OUTGOING=client WORKERS=2 CONTROL_NETWORK=1"
in_ct sed -i -e 's/^BIND_OUTGOING=.*/BIND_OUTGOING=client/' \
	-e 's/^CONTROL_NETWORK=.*/CONTROL_NETWORK=1/' -e 's/^WORKERS=.*/WORKERS=2/' "$DEFAULTS"
[ "$(in_ct grep -cxE 'BIND_OUTGOING=client|CONTROL_NETWORK=1|WORKERS=2' "$DEFAULTS")" = 3 ] ||
	fail "could not set BIND_OUTGOING, CONTROL_NETWORK and WORKERS in $DEFAULTS"
# A policy: the packaged example (its bypass rules go to the firewall).
POLICY_FILE=/etc/tcp-intercept/policy.toml
in_ct install -D -m 0644 /usr/share/tcp-intercept/policy.example.toml "$POLICY_FILE"
in_ct sh -c "echo POLICY=$POLICY_FILE >>$DEFAULTS"
ct_systemctl start tcp-intercept || fail "systemctl start: exit status $?"
wait_for 10 "active tcp-intercept.service" ct_systemctl is-active tcp-intercept
PORT=$(in_ct sh -c '. /usr/lib/tcp-intercept/service.sh && tcp_intercept_listen_port')
wait_for 10 "daemon listening on $PORT" sh -c "ip netns exec '$NS_R' ss -Hltn 'sport = :$PORT' | grep -q LISTEN"
[ "$(exit_status in_ct "$TPROXY" status)" = 0 ] || fail "start: the unit installed no interception rules"
MAINPID=$(ct_systemctl show -p MainPID --value tcp-intercept)
[ "$(in_ct cat /proc/"$MAINPID"/comm)" = tcp-interceptd ] || fail "the unit's MainPID $MAINPID is not tcp-interceptd"

phase "a connection from the client, intercepted; the daemon's user and capabilities"
# The server answers each connection with the address it saw and the sha256
# of what it received (traffic.sh).
ip netns exec "$NS_S" python3 -c "$TRANSFER_SERVER" "$SERVER" "$SERVER_PORT" &
SERVER_PID=$! # ip netns exec execs python3
wait_for 10 "server listening on $SERVER_PORT" sh -c \
	"ip netns exec '$NS_S' ss -Hltn 'sport = :$SERVER_PORT' | grep -q LISTEN"
transfer
check_processes "after start" "$MAINPID"
[ "${#WORKER_PIDS[@]}" = 2 ] || fail "WORKERS=2, but MainPID $MAINPID has workers ${WORKER_PIDS[*]}"
VERSION=$(dpkg-deb -f "$DEB" Version)
if [ "$(info Pid)" != "$MAINPID" ] || [ "$(info Version)" != "$VERSION" ] || [ "$(info Workers)" != 2 ]; then
	fail "show info does not say Pid: $MAINPID, Version: $VERSION, Workers: 2:
$(in_ct tcp-intercept-ctl -s "$CTL_SOCKET" show info 2>&1)"
fi

phase "systemctl reload: the log file reopened, the policy re-read, its bypass set updated"
# (The ruleset whole, then grep: grep -q in a pipe may end nft with SIGPIPE.)
rules=$(in_ct nft list ruleset)
grep -q 203.0.113.7 <<<"$rules" || fail "start: the policy's bypass prefix is not in the firewall"
in_ct sh -c "printf '\\n[[rule]]\\nname = \"ct\"\\nbypass = true\\ndestination = \"192.0.2.97/32\"\\n' >>$POLICY_FILE"
in_ct mv "$LOG" "$LOG.1"
ct_systemctl reload tcp-intercept || fail "systemctl reload: exit status $?"
wait_for 10 "new $LOG with 'Received SIGHUP, (re)opening this logfile'" \
	in_ct grep -qF "Received SIGHUP, (re)opening this logfile" "$LOG"
wait_for 10 "the policy reloaded" in_ct grep -qF "Policy reloaded from $POLICY_FILE: 7 rule(s)" "$LOG"
rules=$(in_ct nft list ruleset)
grep -q 192.0.2.97 <<<"$rules" || fail "reload: the new bypass prefix is not in the firewall"
[ "$(ct_systemctl show -p MainPID --value tcp-intercept)" = "$MAINPID" ] ||
	fail "reload: the main pid is no longer $MAINPID"
transfer # and the new file logs the next connection

phase "upgrade in place under a held transfer: apt-get install $(basename "$NEXT_DEB")"
# What systemd says of the unit, every 0.1 s until the old workers are gone.
sample_unit() {
	local deadline=$((SECONDS + 120))
	while [ ! -e "$WORK/sampled" ] && [ "$SECONDS" -lt "$deadline" ]; do
		# shellcheck disable=SC2016 # for sh -c
		in_ct sh -c 'echo "$(systemctl is-active tcp-intercept)" \
			$(systemctl show -p ActiveState,SubState,MainPID,NRestarts tcp-intercept)'
		sleep 0.1
	done
}
sample_unit >"$WORK/states" 2>&1 &
SAMPLER_PID=$!
upgrade_under_transfer "$MAINPID" "$NEXT_VERSION" ct_apt install -y "$CT_NEXT_DEB"
touch "$WORK/sampled"
wait "$SAMPLER_PID" || true
SAMPLER_PID=''
states=$(cut -d' ' -f1 "$WORK/states" | sort -u | paste -sd' ')
say "is-active said: $states; $(grep -o 'SubState=[a-z]*' "$WORK/states" | sort -u | paste -sd' ')"
[ "$(wc -l <"$WORK/states")" -ge 10 ] || fail "the unit's state was sampled $(wc -l <"$WORK/states") times: $(cat "$WORK/states")"
# Each line: is-active's word, then ActiveState= SubState= MainPID= NRestarts=.
grep -v -E '^(active|reloading) ' "$WORK/states" >&2 && fail "during the upgrade, systemctl is-active said the above"
grep -v -E " ActiveState=(active|reloading)( |$)" "$WORK/states" >&2 && fail "during the upgrade, ActiveState was as above"
grep -v -E " MainPID=$MAINPID( |$)" "$WORK/states" >&2 && fail "during the upgrade, MainPID was not always $MAINPID"
grep -v -E " NRestarts=0( |$)" "$WORK/states" >&2 && fail "during the upgrade, systemd restarted the unit"
[ "$(ct_systemctl show -p MainPID --value tcp-intercept)" = "$MAINPID" ] || fail "upgrade: MainPID is no longer $MAINPID"
state=$(ct_systemctl show -p ActiveState,SubState tcp-intercept | paste -sd' ')
[ "$state" = "ActiveState=active SubState=running" ] || fail "after the upgrade: $state"

kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=''

phase "systemctl stop"
ct_systemctl stop tcp-intercept || fail "systemctl stop: exit status $?"
status=$(exit_status ct_systemctl is-active tcp-intercept)
[ "$status" = 3 ] || fail "stop: systemctl is-active exits $status, not 3 (inactive)"
status=$(exit_status in_ct "$TPROXY" status)
[ "$status" = 3 ] || fail "stop left rules: tproxy.sh status exits $status, not 3"
left=$(in_ct sh -c 'grep -slx tcp-interceptd /proc/[0-9]*/comm') && fail "stop left tcp-interceptd running: $left"
failed=$(ct_systemctl --failed --no-legend --plain)
[ -z "$failed" ] || fail "failed units: $failed"

# -- 5. the unit's exposure ----------------------------------------------------

phase "systemd-analyze security"
exposure=$(in_ct systemd-analyze security --no-pager tcp-intercept.service) ||
	fail "systemd-analyze security: exit status $?"
overall=$(echo "$exposure" | grep -F 'Overall exposure level') || fail "systemd-analyze security printed no overall exposure"
echo "$overall"
level=$(echo "$overall" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9.]*\) .*/\1/p')
[ -n "$level" ] || fail "no number in: $overall"
awk -v level="$level" 'BEGIN { exit !(level <= 2.5) }' || fail "the unit's exposure level is $level, above 2.5"

# -- 6. denied system calls, errors -------------------------------------------

phase "denied system calls, errors: the kernel's log, the unit's journal, the daemon's log"
# SYSTEMD_LOG_SECCOMP=1: a call the unit's filter denies (with EPERM, as
# SystemCallErrorNumber= says) is an audit line in the kernel's log, with the
# program: the unit runs python3 (the daemon), sh (systemd-helper) and kill.
# The kernel's log is the host's (the container's journalctl -k is empty).
denied=$(dmesg | awk -v since="$UPTIME0" '{ t = $0; sub(/^\[ */, "", t); sub(/\].*/, "", t) }
	t + 0 >= since + 0 && /type=1326/ && /exe="\/usr\/bin\/(python3[.0-9]*|dash|kill)"/') ||
	fail "dmesg: exit status $?"
[ -z "$denied" ] || fail "system calls denied to the unit's processes (see ausyscall or /usr/include/asm/unistd_64.h):
$denied"
bad=$(in_ct journalctl --no-pager -k -o cat | grep -E 'type=1326|seccomp|SIGSYS|Bad system call') &&
	fail "the container's journalctl -k says:
$bad"
journal=$(in_ct journalctl --no-pager -u tcp-intercept -o cat) || fail "journalctl -u tcp-intercept: exit status $?"
bad=$(echo "$journal" | grep -E 'SIGSYS|Bad system call|status=31|seccomp|Operation not permitted|EPERM|Traceback|ERROR|CRITICAL|reception only permitted') &&
	fail "the unit's journal says:
$bad"
bad=$(in_ct cat "$LOG.1" "$LOG" | grep -E ' (ERROR|CRITICAL): |Traceback') &&
	fail "the daemon's log says:
$bad"

# -- 7. fail open: kill -9 and a hung master (fail_open.sh) -------------------

# restarted_from OLD: the unit active again under another MainPID.
restarted_from() {
	local now
	now=$(ct_systemctl show -p MainPID --value tcp-intercept) &&
		[ "$now" != 0 ] && [ "$now" != "$1" ] && ct_systemctl is-active tcp-intercept
}

phase "kill -9 of MainPID: connections pass within ${FAIL_OPEN_WITHIN} s; systemd restarts it, intercepting"
ct_systemctl start tcp-intercept || fail "systemctl start: exit status $?"
wait_for 10 "active tcp-intercept.service" ct_systemctl is-active tcp-intercept
MAINPID=$(ct_systemctl show -p MainPID --value tcp-intercept)
ip netns exec "$NS_S" python3 -c "$TRANSFER_SERVER" "$SERVER" "$SERVER_PORT" &
SERVER_PID=$!
wait_for 10 "server listening on $SERVER_PORT" sh -c \
	"ip netns exec '$NS_S' ss -Hltn 'sport = :$SERVER_PORT' | grep -q LISTEN"
transfer
kill_and_pass "$MAINPID"
say "the first connection after kill -9 reached its server in $PASSED_MS ms"
wait_for 20 "a restarted tcp-intercept.service" restarted_from "$MAINPID"
[ "$(ct_systemctl show -p NRestarts --value tcp-intercept)" = 1 ] || fail "NRestarts is not 1 after kill -9"
MAINPID=$(ct_systemctl show -p MainPID --value tcp-intercept)
wait_for 10 "the rules back after the restart" in_ct "$TPROXY" status
transfer # intercepted again

phase "SIGSTOP of MainPID: its workers serve on; the watchdog restarts it"
stopped_at=$SECONDS
in_ct kill -STOP "$MAINPID" || fail "kill -STOP $MAINPID"
transfer # the workers go on
wait_for 30 "the watchdog's restart of a stopped MainPID" restarted_from "$MAINPID"
say "restarted $((SECONDS - stopped_at)) s after SIGSTOP (WatchdogSec=$(ct_systemctl show -p WatchdogUSec --value tcp-intercept))"
[ "$(ct_systemctl show -p NRestarts --value tcp-intercept)" = 2 ] || fail "NRestarts is not 2 after the watchdog"
in_ct journalctl --no-pager -u tcp-intercept -o cat | grep -q 'Watchdog timeout' ||
	fail "the journal does not say the watchdog fired"
wait_for 10 "the rules back after the restart" in_ct "$TPROXY" status
transfer
ct_systemctl stop tcp-intercept || fail "systemctl stop: exit status $?"

# -- 8. FAIL=closed: a daemon that dies keeps its rules ------------------------

# set_fail open|closed: FAIL= in the settings (read at the next start).
set_fail() {
	in_ct sed -i "s/^FAIL=.*/FAIL=$1/" "$DEFAULTS"
	[ "$(in_ct grep -cx "FAIL=$1" "$DEFAULTS")" = 1 ] || fail "could not set FAIL=$1 in $DEFAULTS"
}
# start_unit: systemctl start, active, the rules in.
start_unit() {
	ct_systemctl start tcp-intercept || fail "systemctl start: exit status $?"
	wait_for 10 "active tcp-intercept.service" ct_systemctl is-active tcp-intercept
	[ "$(exit_status in_ct "$TPROXY" status)" = 0 ] || fail "start: the unit installed no interception rules"
	MAINPID=$(ct_systemctl show -p MainPID --value tcp-intercept)
}
# kill_unit: kill -9 of MainPID; the unit failed (no restart: the drop-in),
# its ExecStop and ExecStopPost done.
kill_unit() {
	in_ct kill -KILL "$MAINPID" || fail "kill -9 $MAINPID"
	wait_for 20 "a failed tcp-intercept.service after kill -9 of $MAINPID" ct_systemctl is-failed tcp-intercept
	[ "$(ct_systemctl show -p Result --value tcp-intercept)" = signal ] ||
		fail "kill -9: the unit's Result is $(ct_systemctl show -p Result --value tcp-intercept), not signal"
}
# A client's connection: "passed" (reached the server) or "dropped".
connect_once() {
	if ip netns exec "$NS_C" timeout 10 python3 -c 'import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()' "$SERVER" "$SERVER_PORT" 2>/dev/null; then
		echo passed
	else
		echo dropped
	fi
}
DROPIN=/run/systemd/system/tcp-intercept.service.d/no-restart.conf

phase "FAIL=closed: kill -9 (restarts off) leaves the rules, dropping; systemctl stop removes them"
in_ct sh -c "mkdir -p ${DROPIN%/*} && printf '[Service]\nRestart=no\n' >$DROPIN"
ct_systemctl daemon-reload || fail "systemctl daemon-reload: exit status $?"
set_fail closed
start_unit
rules=$(in_ct nft list ruleset)
grep -q 'tcp flags syn / fin,syn,rst,ack drop' <<<"$rules" || fail "FAIL=closed: no rule dropping SYNs in the firewall"
transfer
kill_unit
status=$(exit_status in_ct "$TPROXY" status)
[ "$status" = 0 ] || fail "FAIL=closed: the rules are gone after kill -9 (tproxy.sh status $status, not 0)"
journal=$(in_ct journalctl --no-pager -u tcp-intercept -o cat)
grep -qF 'FAIL=closed and the daemon ended unasked (signal)' <<<"$journal" ||
	fail "the journal does not say the rules stay"
[ "$(connect_once)" = dropped ] || fail "FAIL=closed: a connection passed while the daemon was down"
ct_systemctl reset-failed tcp-intercept
start_unit
transfer
ct_systemctl stop tcp-intercept || fail "systemctl stop: exit status $?"
status=$(exit_status in_ct "$TPROXY" status)
[ "$status" = 3 ] || fail "FAIL=closed: systemctl stop left rules (tproxy.sh status $status, not 3)"

phase "FAIL=open: kill -9 (restarts off): the unit removes the rules"
set_fail open
start_unit
kill_unit
status=$(exit_status in_ct "$TPROXY" status)
[ "$status" = 3 ] || fail "FAIL=open: kill -9 left rules (tproxy.sh status $status, not 3)"
[ "$(connect_once)" = passed ] || fail "FAIL=open: a connection did not pass while the daemon was down"
ct_systemctl reset-failed tcp-intercept
in_ct rm -f "$DROPIN"
ct_systemctl daemon-reload || fail "systemctl daemon-reload: exit status $?"

# -- 9. a policy the daemon refuses: reload fails, bypass set unchanged -------

phase "systemctl reload of a policy the daemon refuses: the reload fails, the bypass set stays"
start_unit
in_ct cp "$POLICY_FILE" "$POLICY_FILE.good"
# A new bypass prefix, and a congestion control this kernel lacks: the
# daemon refuses the file (it asks the kernel), tproxy.sh's reading of the
# bypass rules (no kernel probe) would take it.
in_ct sh -c "printf '\n[[rule]]\nname = \"refused\"\nbypass = true\ndestination = \"192.0.2.96/32\"\n' >>$POLICY_FILE"
in_ct sh -c "printf '\n[[rule]]\nname = \"nosuchcc\"\n[rule.server_leg]\ncongestion = \"nosuchcc\"\n' >>$POLICY_FILE"
bypass=$(in_ct python3 -m tcp_intercept.policy_file "$POLICY_FILE") && grep -q 192.0.2.96 <<<"$bypass" ||
	fail "tproxy.sh's reading of the policy does not take the test's file: the test proves nothing"
status=$(exit_status ct_systemctl reload tcp-intercept)
[ "$status" != 0 ] || fail "systemctl reload of a refused policy succeeded"
wait_for 10 "'policy not reloaded' in $LOG" in_ct grep -qF "policy not reloaded" "$LOG"
rules=$(in_ct nft list ruleset)
grep -q 192.0.2.96 <<<"$rules" && fail "reload: the refused policy's bypass prefix went to the firewall"
grep -q 192.0.2.97 <<<"$rules" || fail "reload: the bypass prefix of the policy in force left the firewall"
journal=$(in_ct journalctl --no-pager -u tcp-intercept -o cat)
grep -qF "policy $POLICY_FILE refused, the old one stays" <<<"$journal" ||
	fail "the journal does not say the policy was refused"
ct_systemctl is-active tcp-intercept >/dev/null || fail "a refused reload stopped the unit"
[ "$(ct_systemctl show -p MainPID --value tcp-intercept)" = "$MAINPID" ] ||
	fail "a refused reload: the main pid is no longer $MAINPID"
transfer # the old policy serves on
in_ct mv "$POLICY_FILE.good" "$POLICY_FILE"
ct_systemctl stop tcp-intercept || fail "systemctl stop: exit status $?"

kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=''

phase "poweroff"
nspawn_stop "$CT" || fail "the container did not power off cleanly"
