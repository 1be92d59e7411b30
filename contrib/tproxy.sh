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
#                    2. skip interception: a packet to one of this host's
#                       addresses is left alone, and one to a bypassed
#                       destination or from a bypassed client (the
#                       policy's, see "Bypass" below), and with --pass-mark one that
#                       rules of the operator's own marked so (e.g.
#                       contrib/multi-router's hand-off); every rule that
#                       exempts traffic from interception goes here:
#                       *_skip_rules;
#                    3. fail open (--fail open, the default): a packet is
#                       left alone, forwarded as if there were no proxy,
#                       while the daemon cannot take it (below);
#                    4. every other connection's first packet (a SYN) goes
#                       to TPROXY on PORT, marked; with --fail closed, one
#                       that nothing takes is dropped. Later packets never
#                       do: those of an intercepted connection match rule 1,
#                       and those of one that went past the proxy (while it
#                       was down or full) go on past it when it is back,
#                       instead of meeting its listener, which resets them.
#                       The price: a handshake the listener answered with a
#                       SYN cookie (its SYN queue overflowing) has no socket
#                       for its last ACK to find, and fails.
#
# Failing open must not depend on the daemon's cleanup (a SIGKILL runs
# none), so it rests on what the kernel itself knows at each packet:
#   nft       the tproxy statement takes a packet only if a socket listens
#             on PORT, and otherwise lets the rule end: the packet goes on
#             to be forwarded. The daemon's master holds the listening
#             sockets and dies with its workers, so the first SYN after the
#             last of them is gone passes. No heartbeat, no privilege.
#   iptables  the TPROXY target drops a packet nothing listens for, and no
#             match can ask whether PORT is listened on, so the daemon says
#             it is alive instead: its master sends a UDP datagram to
#             127.0.0.1 and ::1 on PORT four times a second while every
#             worker answers (no privilege needed); a rule in OUTPUT notes it
#             in the recent list "tcp_intercept" (masked to one entry) and
#             drops it; TPROXY applies only while that entry is under
#             HEARTBEAT seconds old. Any local process could send the same
#             datagram: at worst that keeps today's fail-closed behaviour.
#
# The daemon's own connections to servers are never intercepted: packets a
# host sends itself traverse OUTPUT, not PREROUTING, so none of these rules
# sees them. Their answers do come through PREROUTING: addressed to the
# router they are local (rule 2); addressed to a client (-B client) they
# belong to the daemon's transparent socket (rule 1), and the mark routes
# them to it instead of forwarding them.
#
# Everything lives in containers of our own, so `down` removes exactly what
# `up` installed and nothing else: the iptables chains TCP_INTERCEPT and
# TCP_INTERCEPT_ALIVE in the mangle table (one jump to each from PREROUTING
# and OUTPUT), the nftables tables
# `ip tcp_intercept` and `ip6 tcp_intercept`, and ip rules and routes tagged
# with routing protocol number 84 (unassigned in rtnetlink.h and rt_protos).
#
# Backends: iptables (iptables + ip6tables, whichever variant they are) and
# nft; each is the same set of functions, <backend>_usable / _up / _down /
# _installed / _show, taking the family (4 or 6).
#
# Bypass (tcp-intercept's policy, its `bypass = true` rules): their prefixes
# go in two sets per family, destinations and clients, which rule 2 consults
# for a SYN's destination and source address, so those connections are
# routed as if there were no daemon (their later packets never meet TPROXY
# anyway). nft: the sets `bypass_dst` and `bypass_src` of our table;
# iptables: the ipsets tcp_intercept_bypass4dst / 4src / 6dst / 6src.
# `up --policy FILE` fills them; `bypass --policy FILE` (the package's
# reload) replaces their contents in place, in one transaction (nft) or one
# swap per set (ipset), changing no rule. The list
# comes from `python3 -m tcp_intercept.policy_file FILE` ($TCP_INTERCEPT_PYTHON
# for another interpreter). Its functions are bypass_*, in a section of
# their own below.

set -eu

PROG=${0##*/}
CHAIN=TCP_INTERCEPT
ALIVE_CHAIN=TCP_INTERCEPT_ALIVE
RECENT=tcp_intercept
HEARTBEAT=1  # seconds without the daemon's heartbeat before iptables fails open
NFT_TABLE=tcp_intercept
# TPROXY takes a connection's first packet only (iptables' --syn): the
# others of an intercepted connection find its socket (the rule before), and
# those of a connection that went past the proxy (daemon down, full, or a
# bypass) go on past it, instead of meeting the listener, which would reset
# them, once the daemon is back.
NFT_SYN="tcp flags & (fin | syn | rst | ack) == syn"
RT_PROTO=84
EX_USAGE=64

PORT=5000
MARK=0x1
MASK=0x1
TABLE=5
PASS_MARK=
PASS_MASK=
FAMILIES="4 6"
BACKEND=
FAIL=open
POLICY=
IPSET_PREFIX=tcp_intercept_bypass

usage() {
	cat <<EOF
Usage: $PROG [OPTION]... up|down|status|bypass

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
  --pass-mark MARK[/MASK] leave alone (route as usual) every packet that
                          already carries MARK when it reaches our rules,
                          e.g. set by rules of your own that send some
                          packets elsewhere (contrib/multi-router); its bits
                          must not meet --mark's mask
  --fail open|closed      when no daemon listens (none runs, it was killed
                          or failed to start): open (default) forwards new
                          connections as if there were no proxy, within 2
                          seconds; closed drops them, as the original did
  --policy FILE           tcp-intercept's policy: its bypass rules' prefixes
                          are never intercepted (up, bypass)
  -h, --help              this help

up installs the rules, or replaces ours with the options given; it is
idempotent. down removes everything this script installed in the families
chosen, whatever options up had; with nothing installed it does nothing.
status prints what is installed. bypass replaces the bypass sets' contents
with the policy's (after the policy changed; up does it too). With --fail
open the order of up and the daemon's start does not matter; with --fail
closed start the daemon first: the rules then drop forwarded TCP that no
daemon takes.

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

parse_mark() { # option value: sets PARSED_MARK and PARSED_MASK
	local mark mask=0xffffffff
	case $2 in */*) mask=${2#*/} ;; esac
	if ! mark=$(to_hex "${2%%/*}") || ! mask=$(to_hex "$mask"); then
		bad_usage "$1: not MARK[/MASK] (decimal or 0x hex, 32 bits): '$2'"
	fi
	[ $((mark)) -ne 0 ] || bad_usage "$1: the mark must not be 0"
	[ $((mark & ~mask)) -eq 0 ] || bad_usage "$1: mark $mark has bits outside mask $mask"
	PARSED_MARK=$mark
	PARSED_MASK=$mask
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
		--backend | --family | --port | --mark | --table | --fail | --policy | --pass-mark)
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
		--mark) parse_mark "$opt" "$value"; MARK=$PARSED_MARK; MASK=$PARSED_MASK ;;
		--pass-mark)
			parse_mark "$opt" "$value"
			PASS_MARK=$PARSED_MARK
			PASS_MASK=$PARSED_MASK
			;;
		--fail)
			case $value in open | closed) FAIL=$value ;;
			*) bad_usage "--fail: open or closed, not '$value'" ;; esac
			;;
		--policy)
			[ -r "$value" ] || bad_usage "--policy: cannot read '$value'"
			POLICY=$value
			;;
		--table)
			is_table "$value" ||
				bad_usage "--table: not a routing table number (1-252, 256-): '$value'"
			TABLE=$((10#$value))
			;;
		up | down | status | bypass)
			[ -z "$COMMAND" ] || bad_usage "one command only, not $COMMAND and $opt"
			COMMAND=$opt
			;;
		*) bad_usage "unknown option or command: '$opt'" ;;
		esac
		shift
	done
	[ -n "$COMMAND" ] || bad_usage "no command: up, down, status or bypass"
	[ "$COMMAND" != bypass ] || [ -n "$POLICY" ] || bad_usage "bypass needs --policy FILE"
	if [ -n "$PASS_MARK" ] && [ $((PASS_MASK & MASK)) -ne 0 ]; then
		bad_usage "--pass-mark: mask $PASS_MASK meets --mark's mask $MASK"
	fi
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

# The loopback address the daemon's heartbeat goes to, and a mask that
# makes every address one entry of the recent list.
iptables_loopback() {
	if [ "$1" = 4 ]; then echo "127.0.0.1 0.0.0.0"; else echo "::1 ::"; fi
}

# Step 2: connections never intercepted.
iptables_skip_rules() {
	echo "-A $CHAIN -p tcp -m addrtype --dst-type LOCAL -j RETURN"
	bypass_iptables_rules "$1"
	[ -z "$PASS_MARK" ] || echo "-A $CHAIN -p tcp -m mark --mark $PASS_MARK/$PASS_MASK -j RETURN"
}

# Step 3 and the heartbeat's rule; nothing with --fail closed.
iptables_fail_rules() {
	local loopback mask
	[ "$FAIL" = open ] || return 0
	read -r loopback mask <<<"$(iptables_loopback "$1")"
	echo "-A $CHAIN -p tcp -m recent ! --rcheck --seconds $HEARTBEAT --name $RECENT --mask $mask --rsource -j RETURN"
	echo "-A $ALIVE_CHAIN -o lo -p udp -d $loopback --dport $PORT -m recent --set --name $RECENT --mask $mask --rsource -j DROP"
}

iptables_up() {
	local ipt jump= alive_jump= alive_chain=
	ipt=$(iptables_cmd "$1")
	bypass_ipset_fill "$1"
	"$ipt" -w -t mangle -C PREROUTING -j "$CHAIN" 2>/dev/null || jump="-A PREROUTING -j $CHAIN"
	if [ "$FAIL" = open ]; then
		alive_chain=":$ALIVE_CHAIN - [0:0]"
		"$ipt" -w -t mangle -C OUTPUT -j "$ALIVE_CHAIN" 2>/dev/null ||
			alive_jump="-A OUTPUT -j $ALIVE_CHAIN"
	fi
	# One restore: declaring an existing chain with --noflush empties it, so
	# the old rules are replaced by the new ones in one atomic commit and no
	# packet of a live connection meets an empty chain.
	"$ipt-restore" -w --noflush <<EOF
*mangle
:$CHAIN - [0:0]
$alive_chain
-A $CHAIN -p tcp -m socket --transparent -j MARK --set-mark $MARK/$MASK
-A $CHAIN -p tcp -m socket --transparent -j RETURN
$(iptables_skip_rules "$1")
$(iptables_fail_rules "$1")
-A $CHAIN -p tcp --syn -j TPROXY --on-port $PORT --tproxy-mark $MARK/$MASK
$jump
$alive_jump
COMMIT
EOF
	[ "$FAIL" = open ] || iptables_chain_down "$1" OUTPUT "$ALIVE_CHAIN"
}

iptables_chain_down() { # family hook chain
	local ipt
	ipt=$(iptables_cmd "$1")
	"$ipt" -w -t mangle -S "$3" >/dev/null 2>&1 || return 0
	while "$ipt" -w -t mangle -D "$2" -j "$3" 2>/dev/null; do :; done
	"$ipt" -w -t mangle -F "$3"
	"$ipt" -w -t mangle -X "$3"
}

iptables_down() {
	iptables_chain_down "$1" PREROUTING "$CHAIN"
	iptables_chain_down "$1" OUTPUT "$ALIVE_CHAIN"
	bypass_ipset_down "$1"
}

iptables_show() {
	local ipt
	ipt=$(iptables_cmd "$1")
	{
		"$ipt" -w -t mangle -S "$CHAIN" 2>/dev/null || true
		"$ipt" -w -t mangle -S PREROUTING | grep -- "-j $CHAIN\$" || true
		"$ipt" -w -t mangle -S "$ALIVE_CHAIN" 2>/dev/null || true
		"$ipt" -w -t mangle -S OUTPUT | grep -- "-j $ALIVE_CHAIN\$" || true
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

# Step 2: connections never intercepted.
nft_skip_rules() {
	echo "meta l4proto tcp fib daddr type local accept"
	bypass_nft_rules "$1"
	[ -z "$PASS_MARK" ] || echo "meta l4proto tcp meta mark and $PASS_MASK == $PASS_MARK accept"
}

nft_ruleset() {
	local table setmark nothing_listens
	table="$(nft_family "$1") $NFT_TABLE"
	setmark="meta mark set meta mark and $(printf '0x%x' $((~MASK & 0xffffffff))) or $MARK"
	# The tproxy statement ends its rule when no socket listens on PORT:
	# --fail open lets the packet go on (step 3; the counter shows how many
	# connections passed so), --fail closed drops it as iptables' TPROXY
	# target does.
	if [ "$FAIL" = open ]; then
		nothing_listens="meta l4proto tcp $NFT_SYN counter"
	else
		nothing_listens="meta l4proto tcp $NFT_SYN drop"
	fi
	# Declaring, deleting and re-creating the table in one file is one
	# transaction: the old rules are replaced atomically.
	cat <<EOF
table $table
delete table $table
table $table {
$(bypass_nft_set "$1")
	chain prerouting {
		type filter hook prerouting priority -150; policy accept;
		meta l4proto tcp socket transparent 1 $setmark accept
		$(nft_skip_rules "$1")
		meta l4proto tcp $NFT_SYN tproxy to :$PORT $setmark accept
		$nothing_listens
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

# -- bypass (the policy's bypass rules) -------------------------------------

# The policy's bypass prefixes of one family, one per line (none without
# --policy). A policy that does not parse stops us: better no change than
# a bypass set emptied by mistake.
bypass_lines() { # family: "dst|src PREFIX" lines
	local list
	[ -n "$POLICY" ] || return 0
	list=$("${TCP_INTERCEPT_PYTHON:-python3}" -m tcp_intercept.policy_file "$POLICY") ||
		die "--policy: cannot read the bypass rules of $POLICY (see above)"
	printf '%s\n' "$list" | sed -n "s/^$1 //p"
}

# One family's bypassed prefixes of one way (dst or src), comma-separated,
# from bypass_lines' output.
bypass_join() { # lines way
	printf '%s\n' "$1" | sed -n "s/^$2 //p" | paste -sd, -
}

# The sets: a connection's first packet (the only one TPROXY takes) is
# left alone when it goes to a bypassed destination (daddr) or comes from a
# bypassed client (saddr); a bypassed destination's own clients are not.
bypass_nft_rules() {
	local fam
	fam=$(nft_family "$1")
	printf '\t\tmeta l4proto tcp %s daddr @bypass_dst accept\n' "$fam"
	printf '\t\tmeta l4proto tcp %s saddr @bypass_src accept\n' "$fam"
}

bypass_nft_set() {
	local type=ipv4_addr lines way elements
	[ "$1" = 4 ] || type=ipv6_addr
	lines=$(bypass_lines "$1") || exit 1
	for way in dst src; do
		elements=$(bypass_join "$lines" "$way")
		printf '\tset bypass_%s {\n\t\ttype %s; flags interval; auto-merge;\n' "$way" "$type"
		[ -z "$elements" ] || printf '\t\telements = { %s }\n' "$elements"
		printf '\t}\n'
	done
}

# Replace the sets' contents in one transaction: no moment without them.
bypass_nft_update() {
	local table lines way elements
	table="$(nft_family "$1") $NFT_TABLE"
	nft list set $table bypass_dst >/dev/null 2>&1 || return 0  # not installed: up fills it
	lines=$(bypass_lines "$1") || exit 1
	{
		for way in dst src; do
			elements=$(bypass_join "$lines" "$way")
			echo "flush set $table bypass_$way"
			[ -z "$elements" ] || echo "add element $table bypass_$way { $elements }"
		done
	} | nft -f -
}

bypass_ipset_name() { # family way
	echo "$IPSET_PREFIX$1$2"
}

# The ipsets' rules in our chain, with --policy only (no ipset needed otherwise).
bypass_iptables_rules() {
	[ -n "$POLICY" ] || return 0
	echo "-A $CHAIN -p tcp -m set --match-set $(bypass_ipset_name "$1" dst) dst -j RETURN"
	echo "-A $CHAIN -p tcp -m set --match-set $(bypass_ipset_name "$1" src) src -j RETURN"
}

# Fill the ipsets: new ones swapped in, so the rules never see one half full.
bypass_ipset_fill() {
	local fam=$1 family=inet lines way set
	[ -n "$POLICY" ] || return 0
	command -v ipset >/dev/null || die "--policy with iptables needs the ipset command (apt install ipset)"
	[ "$fam" = 4 ] || family=inet6
	lines=$(bypass_lines "$fam") || exit 1
	for way in dst src; do
		set=$(bypass_ipset_name "$fam" "$way")
		ipset -exist create "$set" hash:net family "$family"
		ipset -exist create "$set.new" hash:net family "$family"
		ipset flush "$set.new"
		printf '%s\n' "$lines" | sed -n "s/^$way \(..*\)/add $set.new \1/p" | ipset -exist restore
		ipset swap "$set.new" "$set"
		ipset destroy "$set.new"
	done
}

bypass_ipset_down() {
	local way set
	command -v ipset >/dev/null || return 0
	# "" too: the one set of both ways that 2.1.0's first builds made.
	for way in dst src ""; do
		set=$(bypass_ipset_name "$1" "$way")
		if ipset list -n "$set" >/dev/null 2>&1; then ipset destroy "$set"; fi
	done
}

cmd_bypass() {
	local fam ipt
	for fam in $FAMILIES; do
		if command -v nft >/dev/null; then bypass_nft_update "$fam"; fi
		ipt=$(iptables_cmd "$fam")
		if iptables_usable "$fam" && "$ipt" -w -t mangle -C PREROUTING -j "$CHAIN" 2>/dev/null; then
			bypass_ipset_fill "$fam"
			# Installed by an up without --policy: the rules that consult the set.
			"$ipt" -w -t mangle -S "$CHAIN" | grep -q -- "--match-set" || iptables_up "$fam"
		fi
	done
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
		# A policy that does not parse stops us before anything changes.
		bypass_lines "$fam" >/dev/null
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
