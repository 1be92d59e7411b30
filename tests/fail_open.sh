# Sourced by deb_smoke.sh and systemd_smoke.sh, after traffic.sh: the
# router fails open when the daemon dies (issue 17). The caller defines
# what traffic.sh needs (fail, wait_for, on_router, NS_C, CLIENT, SERVER,
# SERVER_PORT, LOG, WORK).
#
#   FAIL_OPEN_WITHIN     seconds (2) a connection begun right after the
#                        daemon's death may take to reach its server
#   kill_and_pass MASTER kill -9 of MASTER (its workers follow it: EOF on
#                        their channel); a connection from the client begun
#                        at once reaches the server within FAIL_OPEN_WITHIN,
#                        its bytes intact (passing the proxy, or already
#                        intercepted by a restarted daemon); sets
#                        PASSED_MS (how long it took)
# shellcheck shell=bash

FAIL_OPEN_WITHIN=2
PASSED_MS=''

kill_and_pass() {
	local master=$1 began out
	on_router kill -KILL "$master" || fail "kill -9 $master: exit status $?"
	began=$(date +%s%N)
	out=$(timeout 30 ip netns exec "$NS_C" python3 -c "$_TRANSFER_CLIENT" "$SERVER" "$SERVER_PORT") ||
		fail "after kill -9 of the master $master: the client's connection failed"
	PASSED_MS=$((($(date +%s%N) - began) / 1000000))
	_check_result "a connection right after kill -9 of the master" "$out"
	[ "$PASSED_MS" -lt $((FAIL_OPEN_WITHIN * 1000)) ] ||
		fail "after kill -9 of the master: the connection took $PASSED_MS ms, not under ${FAIL_OPEN_WITHIN} s"
}
