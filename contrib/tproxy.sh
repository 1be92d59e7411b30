#!/bin/bash
# tproxy.sh: install, remove or show the TPROXY interception rules that send
# the TCP connections passing through this router to tcp-intercept.
#
# Per address family it installs two things:
#
#   policy routing   ip rule fwmark MARK/MASK lookup TABLE
#                    ip route local default dev lo table TABLE
#                    (a marked packet is delivered locally, whatever its
#                    destination address)
#   mangle rules     in PREROUTING, for TCP only, in this order:
#                    1. a packet of an existing transparent socket (an
#                       intercepted connection, or the daemon's own outgoing
#                       one with -B client) is marked and left alone;
#                    2. a packet to one of this host's addresses is left alone;
#                    3. every other packet goes to TPROXY on PORT, marked.
#
# The daemon's own connections to servers are never intercepted: packets a
# host sends itself traverse OUTPUT, not PREROUTING, so none of these rules
# sees them. Their answers do come through PREROUTING: addressed to the
# router they are local (rule 2); addressed to a client (-B client) they
# belong to the daemon's transparent socket (rule 1), and the mark routes
# them to it instead of forwarding them.
#
# Everything lives in containers of our own, so `down` removes exactly what
# `up` installed and nothing else: the iptables chain TCP_INTERCEPT in the
# mangle table (one jump to it from PREROUTING), the nftables tables
# `ip tcp_intercept` and `ip6 tcp_intercept`, and ip rules and routes tagged
# with routing protocol number 84 (unassigned in rtnetlink.h and rt_protos).
#
# Backends: iptables (iptables + ip6tables, whichever variant they are) and
# nft; each is the same set of functions, <backend>_usable / _up / _down /
# _installed / _show, taking the family (4 or 6).

set -eu

PROG=${0##*/}
CHAIN=TCP_INTERCEPT
NFT_TABLE=tcp_intercept
RT_PROTO=84
EX_USAGE=64

PORT=5000
MARK=0x1
MASK=0x1
TABLE=5
FAMILIES="4 6"
BACKEND=

usage() {
	cat <<EOF
Usage: $PROG [OPTION]... up|down|status

Install (up), remove (down) or show (status) the TPROXY rules that send every
TCP connection forwarded by this router to tcp-intercept, for IPv4 and IPv6.

Options:
  --backend iptables|nft  firewall tool to use. Default: nft when the nft
                          command works and this kernel accepts our rules
                          (socket, fib and tproxy expressions), unless
                          iptables is the legacy (non-nf_tables) variant, whose
                          users look for rules in iptables-save; otherwise
                          iptables. Without --backend, down and status act on
                          both backends, whichever installed the rules; with
                          it, only on that one's (down removes our policy
                          routing either way).
  --family 4|6|all        address families (default all)
  --port N                the daemon's listening port (default 5000)
  --mark MARK[/MASK]      firewall mark for intercepted packets and its mask
                          (default 0x1/0x1; MASK defaults to 0xffffffff)
  --table N               routing table for marked packets (default 5)
  -h, --help              this help

up installs the rules, or replaces ours with the options given; it is
idempotent. down removes everything this script installed in the families
chosen, whatever options up had; with nothing installed it does nothing.
status prints what is installed. Start the daemon before up: like the
original's TPROXY rule, the rules drop forwarded TCP that no daemon takes.

Exit status: 0 success (status: installed), 1 error, 3 (status) not
installed or incomplete, 64 bad command line.
EOF
}

die() {
	echo "$PROG: $*" >&2
	exit 1
}

bad_usage() {
	echo "$PROG: $* (try --help)" >&2
	exit "$EX_USAGE"
}

# A failing command under set -e exits with its own status (2 from ip, 4
# from iptables...): report every such failure as 1.
on_exit() {
	local status=$?
	case $status in
	0 | 1 | 3 | "$EX_USAGE") exit "$status" ;;
	*) echo "$PROG: failed (status $status)" >&2; exit 1 ;;
	esac
}

# -- options ---------------------------------------------------------------

is_uint() {
	case $1 in
	'' | *[!0-9]*) return 1 ;;
	esac
	[ "${#1}" -le 10 ]
}

# A 32-bit number, decimal or 0x hex, printed as its value in hex.
to_hex() {
	local hex
	case $1 in
	0[xX]*)
		hex=${1#0[xX]}
		case $hex in '' | *[!0-9a-fA-F]*) return 1 ;; esac
		[ "${#hex}" -le 8 ] || return 1
		printf '0x%x' $((16#$hex))
		;;
	*)
		is_uint "$1" && [ "$((10#$1))" -le 4294967295 ] || return 1
		printf '0x%x' $((10#$1))
		;;
	esac
}

parse_mark() {
	local mark mask=0xffffffff
	case $1 in */*) mask=${1#*/} ;; esac
	if ! mark=$(to_hex "${1%%/*}") || ! mask=$(to_hex "$mask"); then
		bad_usage "--mark: not MARK[/MASK] (decimal or 0x hex, 32 bits): '$1'"
	fi
	[ $((mark)) -ne 0 ] || bad_usage "--mark: the mark must not be 0"
	[ $((mark & ~mask)) -eq 0 ] || bad_usage "--mark: mark $mark has bits outside mask $mask"
	MARK=$mark
	MASK=$mask
}

is_port() {
	is_uint "$1" && [ "$((10#$1))" -ge 1 ] && [ "$((10#$1))" -le 65535 ]
}

# 0 is no table; 253, 254 and 255 are default, main and local.
is_table() {
	is_uint "$1" || return 1
	local n=$((10#$1))
	[ "$n" -ge 1 ] && [ "$n" -le 4294967295 ] && { [ "$n" -lt 253 ] || [ "$n" -gt 255 ]; }
}

parse_args() {
	COMMAND=
	while [ $# -gt 0 ]; do
		local opt=$1 value=
		case $opt in
		--*=*) value=${opt#*=}; opt=${opt%%=*} ;;
		--backend | --family | --port | --mark | --table)
			[ $# -ge 2 ] || bad_usage "$opt needs a value"
			value=$2
			shift
			;;
		esac
		case $opt in
		-h | --help) usage; exit 0 ;;
		--backend)
			case $value in iptables | nft) BACKEND=$value ;;
			*) bad_usage "--backend: iptables or nft, not '$value'" ;; esac
			;;
		--family)
			case $value in 4 | 6) FAMILIES=$value ;; all) FAMILIES="4 6" ;;
			*) bad_usage "--family: 4, 6 or all, not '$value'" ;; esac
			;;
		--port)
			is_port "$value" || bad_usage "--port: not a port number: '$value'"
			PORT=$((10#$value))
			;;
		--mark) parse_mark "$value" ;;
		--table)
			is_table "$value" ||
				bad_usage "--table: not a routing table number (1-252, 256-): '$value'"
			TABLE=$((10#$value))
			;;
		up | down | status)
			[ -z "$COMMAND" ] || bad_usage "one command only, not $COMMAND and $opt"
			COMMAND=$opt
			;;
		*) bad_usage "unknown option or command: '$opt'" ;;
		esac
		shift
	done
	[ -n "$COMMAND" ] || bad_usage "no command: up, down or status"
}

# -- policy routing (both backends) ----------------------------------------

# Our ip rules, as `ip rule show` prints them ("PREF:<tab>from all ..."),
# and our routes. Callers take them with `x=$(our_rules 4) || exit 1`: a
# failure to look must not pass for "nothing there".
our_rules() {
	local all
	all=$(ip -"$1" rule show) || die "IPv$1: cannot list the ip rules"
	printf '%s\n' "$all" | grep -E "[[:space:]]proto $RT_PROTO([[:space:]]|\$)" || true
}

our_routes() {
	ip -"$1" route show table all proto "$RT_PROTO" || die "IPv$1: cannot list the routes"
}

routing_up() {
	local fam=$1 fwmark="fwmark $MARK/$MASK" rules
	[ "$MASK" != 0xffffffff ] || fwmark="fwmark $MARK"
	rules=$(our_rules "$fam") || exit 1
	if [ "$(printf '%s\n' "$rules" | sed 's/^[0-9]*:[[:space:]]*//')" != \
		"from all $fwmark lookup $TABLE proto $RT_PROTO" ]; then
		routing_rules_down "$fam"
		ip -"$fam" rule add fwmark "$MARK/$MASK" lookup "$TABLE" protocol "$RT_PROTO"
	fi
	# Our route in another table (up with another --table before) goes;
	# a local default route already in TABLE, ours or not, stays as it is.
	routing_routes_down "$fam" "$TABLE"
	if ! ip -"$fam" route show table "$TABLE" 2>/dev/null | grep -q '^local default dev lo\b'; then
		ip -"$fam" route add local default dev lo table "$TABLE" protocol "$RT_PROTO"
	fi
}

routing_rules_down() {
	local pref rules
	rules=$(our_rules "$1") || exit 1
	# By preference number, and only those shown with our protocol: a
	# kernel without rule protocols would take `del protocol N` alone as a
	# wildcard.
	for pref in $(printf '%s\n' "$rules" | sed -n 's/^\([0-9]*\):.*/\1/p'); do
		ip -"$1" rule del pref "$pref" protocol "$RT_PROTO"
	done
}

routing_routes_down() { # family [table to keep]
	local table routes
	routes=$(our_routes "$1") || exit 1
	for table in $(printf '%s\n' "$routes" | sed -n 's/^local default dev lo table \([^ ]*\).*/\1/p'); do
		[ "$table" = "${2:-}" ] ||
			ip -"$1" route del local default dev lo table "$table" protocol "$RT_PROTO"
	done
}

routing_down() {
	routing_rules_down "$1"
	routing_routes_down "$1"
}

# -- iptables backend ------------------------------------------------------

iptables_cmd() {
	if [ "$1" = 4 ]; then echo iptables; else echo ip6tables; fi
}

iptables_usable() {
	local ipt
	ipt=$(iptables_cmd "$1")
	command -v "$ipt" >/dev/null && "$ipt" -w -t mangle -S PREROUTING >/dev/null 2>&1
}

iptables_up() {
	local ipt jump=
	ipt=$(iptables_cmd "$1")
	"$ipt" -w -t mangle -C PREROUTING -j "$CHAIN" 2>/dev/null || jump="-A PREROUTING -j $CHAIN"
	# One restore: declaring an existing chain with --noflush empties it, so
	# the old rules are replaced by the new ones in one atomic commit and no
	# packet of a live connection meets an empty chain.
	"$ipt-restore" -w --noflush <<EOF
*mangle
:$CHAIN - [0:0]
-A $CHAIN -p tcp -m socket --transparent -j MARK --set-mark $MARK/$MASK
-A $CHAIN -p tcp -m socket --transparent -j RETURN
-A $CHAIN -p tcp -m addrtype --dst-type LOCAL -j RETURN
-A $CHAIN -p tcp -j TPROXY --on-port $PORT --tproxy-mark $MARK/$MASK
$jump
COMMIT
EOF
}

iptables_down() {
	local ipt
	ipt=$(iptables_cmd "$1")
	"$ipt" -w -t mangle -S "$CHAIN" >/dev/null 2>&1 || return 0
	while "$ipt" -w -t mangle -D PREROUTING -j "$CHAIN" 2>/dev/null; do :; done
	"$ipt" -w -t mangle -F "$CHAIN"
	"$ipt" -w -t mangle -X "$CHAIN"
}

iptables_show() {
	local ipt
	ipt=$(iptables_cmd "$1")
	{
		"$ipt" -w -t mangle -S "$CHAIN" 2>/dev/null || true
		"$ipt" -w -t mangle -S PREROUTING | grep -- "-j $CHAIN\$" || true
	} | sed "s/^/  $ipt -t mangle /"
}

iptables_installed() {
	local ipt
	ipt=$(iptables_cmd "$1")
	"$ipt" -w -t mangle -C PREROUTING -j "$CHAIN" 2>/dev/null &&
		"$ipt" -w -t mangle -S "$CHAIN" | grep -q -- "-j TPROXY"
}

# -- nftables backend ------------------------------------------------------

nft_family() {
	if [ "$1" = 4 ]; then echo ip; else echo ip6; fi
}

nft_ruleset() {
	local table setmark
	table="$(nft_family "$1") $NFT_TABLE"
	setmark="meta mark set meta mark and $(printf '0x%x' $((~MASK & 0xffffffff))) or $MARK"
	# Declaring, deleting and re-creating the table in one file is one
	# transaction: the old rules are replaced atomically. The tproxy
	# statement skips the rest of its rule when no socket listens on PORT;
	# the drop after it then does what iptables' TPROXY target does.
	cat <<EOF
table $table
delete table $table
table $table {
	chain prerouting {
		type filter hook prerouting priority -150; policy accept;
		meta l4proto tcp socket transparent 1 $setmark accept
		meta l4proto tcp fib daddr type local accept
		meta l4proto tcp tproxy to :$PORT $setmark accept
		meta l4proto tcp drop
	}
}
EOF
}

nft_usable() {
	command -v nft >/dev/null && nft_ruleset "$1" | nft -c -f - >/dev/null 2>&1
}

nft_up() {
	nft_ruleset "$1" | nft -f -
}

nft_down() {
	local fam
	fam=$(nft_family "$1")
	if nft list table "$fam" "$NFT_TABLE" >/dev/null 2>&1; then
		nft delete table "$fam" "$NFT_TABLE"
	fi
}

nft_show() {
	nft list table "$(nft_family "$1")" "$NFT_TABLE" 2>/dev/null | sed 's/^/  /' || true
}

nft_installed() {
	nft list table "$(nft_family "$1")" "$NFT_TABLE" 2>/dev/null | grep -q tproxy
}

# -- commands --------------------------------------------------------------

iptables_is_legacy() {
	command -v iptables >/dev/null && iptables -V 2>/dev/null | grep -q legacy
}

pick_backend() { # for up
	local fam=$1
	if nft_usable "$fam" && ! iptables_is_legacy; then
		echo nft
	elif iptables_usable "$fam"; then
		echo iptables
	elif nft_usable "$fam"; then
		echo nft
	else
		die "IPv$fam: neither nft nor iptables can install TPROXY rules here (root? kernel modules?)"
	fi
}

# The backends down and status look at: the one asked for, or every one
# that runs here.
backends() {
	local fam=$1
	if [ -n "$BACKEND" ]; then
		echo "$BACKEND"
		return
	fi
	command -v nft >/dev/null && nft list tables >/dev/null 2>&1 && echo nft
	iptables_usable "$fam" && echo iptables
	true
}

cmd_up() {
	local fam backend
	for fam in $FAMILIES; do
		backend=${BACKEND:-$(pick_backend "$fam")}
		# Checked before anything changes, so a failure leaves no half set.
		"${backend}_usable" "$fam" ||
			die "IPv$fam: $backend cannot install TPROXY rules here (installed? kernel modules?)"
		routing_up "$fam"
		"${backend}_up" "$fam"
		# Switching backends: the other one's copy of our rules goes.
		if [ "$backend" = nft ]; then
			if iptables_usable "$fam"; then iptables_down "$fam"; fi
		elif command -v nft >/dev/null; then
			nft_down "$fam"
		fi
	done
}

cmd_down() {
	local fam backend
	for fam in $FAMILIES; do
		for backend in $(backends "$fam"); do
			"${backend}_down" "$fam"
		done
		routing_down "$fam"
	done
}

cmd_status() {
	local fam backend installed=yes found rules routes usable
	for fam in $FAMILIES; do
		rules=$(our_rules "$fam") || exit 1
		routes=$(our_routes "$fam") || exit 1
		usable=$(backends "$fam")
		[ -n "$usable" ] || die "IPv$fam: neither nft nor iptables works here"
		found=
		for backend in $usable; do
			if "${backend}_installed" "$fam"; then
				found="$found $backend"
			fi
		done
		if [ -n "$found" ] && [ -n "$rules" ] && [ -n "$routes" ]; then
			echo "IPv$fam: installed (${found# })"
		elif [ -n "$found$rules$routes" ]; then
			echo "IPv$fam: incomplete"
			installed=no
		else
			echo "IPv$fam: not installed"
			installed=no
		fi
		[ -z "$rules" ] || printf '%s\n' "$rules" | sed 's/^/  ip rule:  /'
		[ -z "$routes" ] || printf '%s\n' "$routes" | sed 's/^/  ip route: /'
		for backend in $usable; do
			"${backend}_show" "$fam"
		done
	done
	[ "$installed" = yes ] || exit 3
}

trap on_exit EXIT
parse_args "$@"
[ "$(id -u)" = 0 ] || die "$COMMAND needs root (CAP_NET_ADMIN)"
"cmd_$COMMAND"
