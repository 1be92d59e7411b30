# Sourced by deb_smoke.sh and systemd_smoke.sh: traffic through the
# installed daemon, what its processes may do, and its seamless upgrade
# under a held transfer. The caller defines fail MESSAGE, wait_for SECONDS
# WHAT COMMAND... and on_router COMMAND... (runs COMMAND where the daemon
# runs: the host, or the container), and sets NS_C, CLIENT, SERVER,
# SERVER_PORT (the client's namespace and address, the server's address and
# port), LOG (the daemon's log, as on_router sees it) and WORK.
#
#   TRANSFER_SERVER      python3 -c "$TRANSFER_SERVER" ADDRESS PORT, in the
#                        server's namespace: answers each connection (in a
#                        thread: a held one blocks no other), once the client
#                        shut down writing, with "client-address:port
#                        sha256-of-what-it-received"; exits after 5 minutes
#                        without a new connection
#   transfer             a megabyte of random bytes from the client to the
#                        server: the server saw the client's own address and
#                        the same sha256, and the daemon logged it; sets
#                        TRANSFER_PORT (the client's port)
#   held_start NAME      a transfer held open in the background (NAME: a
#                        word): 16 KiB every 0.1 s until held_finish NAME;
#                        its pid joins HELD_PIDS, for the caller's cleanup.
#                        Once the daemon logged it, sets HELD_PORT (the
#                        client's port). Call it directly, not in $(...)
#   held_finish NAME     the held transfer shuts down writing: it must end
#                        within 20 s, intact as transfer's
#   check_processes WHAT MASTER
#                        the master and its children (the workers) run as
#                        user tcp-intercept (every uid in /proc/PID/status)
#                        with CapEff exactly CAP_NET_ADMIN (0x1000, as with
#                        BIND_OUTGOING=client); sets WORKER_PIDS
#   info KEY             the value of KEY in tcp-intercept-ctl show info
#   worker_of PORT       the pid of the worker relaying the client's PORT
#                        (show conns)
#   upgrade_under_transfer MASTER VERSION COMMAND...
#                        with a transfer held through an old worker, COMMAND
#                        installs VERSION (its output must show the init
#                        script's upgrade action); then: the same master pid
#                        (pid file, show info), show info's Version, "Upgrade
#                        done" in the log, the held transfer still flowing
#                        through its old worker while the others are gone,
#                        the master and new workers as check_processes wants,
#                        a new worker relaying a fresh connection; the held
#                        transfer completes intact, then its old worker
#                        exits; no ERROR or Traceback in the log
# shellcheck shell=bash

CTL_SOCKET=/run/tcp-intercept/tcp-intercept.sock
PID_FILE=/run/tcp-intercept/tcp-intercept.pid
HELD_PIDS=() HELD_PORT='' TRANSFER_PORT='' WORKER_PIDS=()

# shellcheck disable=SC2034 # for the caller
TRANSFER_SERVER='
import hashlib, socket, sys, threading

def serve(conn, peer):
    with conn:
        conn.settimeout(150)
        digest = hashlib.sha256()
        while chunk := conn.recv(65536):
            digest.update(chunk)
        conn.sendall(f"{peer[0]}:{peer[1]} {digest.hexdigest()}\n".encode())

listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
listener.settimeout(300)
while True:
    try:
        conn, peer = listener.accept()
    except TimeoutError:
        sys.exit(0)
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
'

# argv: address port [directory]. Without a directory: a megabyte at once.
# With one: its local port into DIR/port once connected, then 16 KiB every
# 0.1 s until DIR/release appears (at most 150 s). Prints, and with a
# directory writes to DIR/result: "port sha256-sent server's-answer".
_TRANSFER_CLIENT='
import hashlib, os, socket, sys, time

def put(name, text):
    with open(f"{held}/{name}.new", "w") as file:
        file.write(text)
    os.rename(f"{held}/{name}.new", f"{held}/{name}")

held = sys.argv[3] if len(sys.argv) > 3 else None
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
port = conn.getsockname()[1]
digest = hashlib.sha256()
if held is None:
    data = os.urandom(1 << 20)
    conn.sendall(data)
    digest.update(data)
else:
    put("port", f"{port}\n")
    deadline = time.monotonic() + 150
    while not os.path.exists(f"{held}/release"):
        if time.monotonic() > deadline:
            sys.exit("held for 150 s and never released")
        data = os.urandom(16384)
        conn.sendall(data)
        digest.update(data)
        time.sleep(0.1)
conn.shutdown(socket.SHUT_WR)
reply = b""
while chunk := conn.recv(4096):
    reply += chunk
result = f"{port} {digest.hexdigest()} {reply.decode().strip()}\n"
print(result, end="")
if held is not None:
    put("result", result)
'

# argv: master pid. The master, then its children: "pid comm uids capeff".
_PROCESSES='
import os, sys

def status(pid):
    with open(f"/proc/{pid}/status") as file:
        return {key: value.split() for key, _, value in
                (line.partition(":") for line in file)}

master = sys.argv[1]
pids = [master]
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            if status(pid)["PPid"] == [master]:
                pids.append(pid)
        except (OSError, KeyError):
            pass
for pid in pids:
    fields = status(pid)
    print(pid, fields["Name"][0], ",".join(fields["Uid"]), hex(int(fields["CapEff"][0], 16)))
'

# _check_result WHAT "port sha256-sent seen-address sha256-received"
_check_result() {
	local what=$1 port sent seen received
	read -r port sent seen received <<<"$2"
	[ "$seen" = "$CLIENT:$port" ] || fail "$what: the server saw '$seen', not the client's '$CLIENT:$port'"
	[ "$received" = "$sent" ] || fail "$what: the server received sha256 '$received', the client sent $sent"
}

# _intercepted PORT: the daemon logged the client's connection from PORT.
_intercepted() {
	wait_for 5 "'Connection intercepted' in $LOG for [$CLIENT]:$1" \
		on_router grep -qF "[$CLIENT]:$1-->[$SERVER]:$SERVER_PORT: Connection intercepted" "$LOG"
}

transfer() {
	local out
	out=$(timeout 30 ip netns exec "$NS_C" python3 -c "$_TRANSFER_CLIENT" "$SERVER" "$SERVER_PORT") ||
		fail "the client's connection failed"
	_check_result "a connection from the client" "$out"
	TRANSFER_PORT=${out%% *}
	_intercepted "$TRANSFER_PORT"
}

held_start() {
	local dir=$WORK/held-$1
	mkdir "$dir"
	timeout 180 ip netns exec "$NS_C" python3 -c "$_TRANSFER_CLIENT" "$SERVER" "$SERVER_PORT" "$dir" \
		>/dev/null 2>"$dir/err" &
	HELD_PIDS+=("$!")
	echo $! >"$dir/pid"
	wait_for 10 "connection of the held transfer $1" test -s "$dir/port"
	HELD_PORT=$(cat "$dir/port")
	_intercepted "$HELD_PORT"
}

held_finish() {
	local dir=$WORK/held-$1 pid status=0
	pid=$(cat "$dir/pid")
	if ! kill -0 "$pid" 2>/dev/null || [ -e "$dir/result" ]; then
		fail "the held transfer $1 ended before it was released: $(cat "$dir/err")"
	fi
	touch "$dir/release"
	wait_for 20 "end of the held transfer $1 once released" test -e "$dir/result"
	wait "$pid" || status=$?
	[ "$status" = 0 ] || fail "the held transfer $1 exited $status: $(cat "$dir/err")"
	_check_result "the held transfer $1" "$(cat "$dir/result")"
}

check_processes() {
	local what=$1 master=$2 lines uid pid comm uids cap
	uid=$(on_router id -u tcp-intercept) || fail "no user tcp-intercept"
	lines=$(on_router python3 -c "$_PROCESSES" "$master") || fail "$what: no master process $master"
	WORKER_PIDS=()
	while read -r pid comm uids cap; do
		[ "$uids" = "$uid,$uid,$uid,$uid" ] ||
			fail "$what: $comm (pid $pid) has uids $uids, not tcp-intercept's $uid"
		[ "$cap" = 0x1000 ] || fail "$what: $comm (pid $pid) has CapEff $cap, not 0x1000 (CAP_NET_ADMIN)"
		[ "$pid" = "$master" ] || WORKER_PIDS+=("$pid")
	done <<<"$lines"
	[ "${#WORKER_PIDS[@]}" -gt 0 ] || fail "$what: the master $master has no worker"
}

info() {
	on_router /usr/sbin/tcp-intercept-ctl -s "$CTL_SOCKET" show info | sed -n "s/^$1: //p"
}

worker_of() {
	on_router /usr/sbin/tcp-intercept-ctl -s "$CTL_SOCKET" show conns |
		awk -v client="[$CLIENT]:$1" '$2 == client { print $1 }'
}

# _c2s PORT: bytes from the client's PORT to the server so far (show conns).
_c2s() {
	on_router /usr/sbin/tcp-intercept-ctl -s "$CTL_SOCKET" show conns |
		awk -v client="[$CLIENT]:$1" '$2 == client { print $8 }'
}
_c2s_past() { [ "$(_c2s "$1")" -gt "$2" ]; }

# _alive PID...: which of them still run (zombies do not), as on_router sees it.
_alive() {
	local pid
	for pid in "$@"; do
		case $(on_router cat "/proc/$pid/stat" 2>/dev/null | sed 's/.*) //') in
			"" | Z*) ;;
			*) echo "$pid" ;;
		esac
	done
}

_one_alive() { [ "$(_alive "$@" | wc -l)" = 1 ]; }
_none_alive() { [ -z "$(_alive "$@")" ]; }

upgrade_under_transfer() {
	local master=$1 version=$2 old held_worker new=() pid fresh_worker errors bytes
	shift 2
	check_processes "before the upgrade" "$master"
	old=("${WORKER_PIDS[@]}")
	held_start old
	held_worker=$(worker_of "$HELD_PORT")
	[ -n "$held_worker" ] || fail "show conns lists no worker for the held transfer (port $HELD_PORT)"

	"$@" >"$WORK/upgrade.log" 2>&1 || { cat "$WORK/upgrade.log" >&2; fail "installing $version: exit status $?"; }
	grep -F "in place" "$WORK/upgrade.log" | grep -qF "$version" || {
		cat "$WORK/upgrade.log" >&2
		fail "installing $version did not run the init script's upgrade to $version"
	}

	[ "$(on_router cat "$PID_FILE")" = "$master" ] || fail "after the upgrade, $PID_FILE no longer says $master"
	[ "$(info Pid)" = "$master" ] || fail "after the upgrade, show info's Pid is not $master"
	[ "$(info Version)" = "$version" ] || fail "after the upgrade, show info says version '$(info Version)', not $version"
	on_router grep -qF "Upgrade done: version $version serves" "$LOG" || fail "no 'Upgrade done: version $version' in $LOG"

	# The old worker relaying the held transfer drains it (its bytes still
	# flow); the others go.
	[ -n "$(_alive "$held_worker")" ] || fail "the old worker $held_worker exited while its transfer was held"
	bytes=$(_c2s "$HELD_PORT")
	wait_for 5 "bytes of the held transfer through the old worker $held_worker after the upgrade (show conns)" \
		_c2s_past "$HELD_PORT" "$bytes"
	wait_for 10 "exit of the idle old workers (only $held_worker left of ${old[*]})" _one_alive "${old[@]}"
	check_processes "after the upgrade" "$master"
	for pid in "${WORKER_PIDS[@]}"; do
		[ "$pid" = "$held_worker" ] || new+=("$pid")
	done
	if [ "${#new[@]}" != "$(info Workers)" ] || [ "${#new[@]}" != "${#old[@]}" ]; then
		fail "after the upgrade: new workers ${new[*]}, show info's Workers $(info Workers), before ${#old[@]}"
	fi
	[ "$(info Workers_draining)" = 1 ] || fail "show info's Workers_draining is $(info Workers_draining), not 1"

	# A fresh connection: a new worker takes it.
	held_start new
	fresh_worker=$(worker_of "$HELD_PORT")
	case " ${new[*]} " in
		*" $fresh_worker "*) ;;
		*) fail "a fresh connection went to worker '$fresh_worker', not a new one (${new[*]})" ;;
	esac
	transfer
	held_finish new

	# The held transfer ends intact; then its old worker exits.
	held_finish old
	wait_for 10 "exit of the old worker $held_worker once its transfer ended" _none_alive "$held_worker"
	wait_for 5 "'Worker N (pid $held_worker) exited with status 0' in $LOG" \
		on_router grep -qE "Worker [0-9]+ \(pid $held_worker\) exited with status 0" "$LOG"
	[ "$(info Workers_draining)" = 0 ] || fail "show info's Workers_draining is $(info Workers_draining) after the drain"
	errors=$(on_router grep -E ' (ERROR|CRITICAL): |Traceback' "$LOG") && fail "the daemon logged errors: $errors"
	return 0
}
