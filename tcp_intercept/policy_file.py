"""Reading and checking a policy file (TOML, with Python's tomllib) into
the rules of a Policy (policy.py), each with the recipe it gives.

Every mistake is a PolicyError naming the file and, past TOML's own syntax
(whose message gives the line), the rule's number and name and the key:
`policy.toml:31: rule 3 (lte): server_leg.congestion: 'bbr2' is not available...`
(31: the line of that rule's [[rule]]).
With probe, what only the kernel can say is asked of it too: whether a
congestion control is available and this process may set it (one that
net.ipv4.tcp_allowed_congestion_control leaves out needs CAP_NET_ADMIN),
MPTCP enabled, and CAP_NET_ADMIN there for a mark or for spoofing the
client's address.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tomllib
from dataclasses import replace

from . import recipe as recipes
from . import sockopts
from .address import parse as parse_address
from .config import DEFAULT_OUTGOING
from .errors import AddressError, PolicyError, UsageError
from .policy import SO_MARK, Policy, PrefixTable, Rule, needs_net_admin
from .policy_values import (Where, read_bool, read_int, read_ports, read_prefixes, read_rate,
                            read_seconds)
from .recipe import COPY, Recipe

TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
MAX_BYTES = 1 << 31
MAX_FILE = 64 << 20  # a policy file longer than this is a mistake
NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

MATCH_KEYS = ("destination", "port", "client", "client_mptcp")
RULE_KEYS = ("name", *MATCH_KEYS, "bypass", "mptcp", "source", "keepalive", "user_timeout",
             "connect_timeout", "idle_timeout", "max_per_client", "server_leg", "client_leg")
LEG_KEYS = ("congestion", "mark", "dscp", "sndbuf", "rcvbuf", "notsent_lowat", "pacing_rate")


def load(path: str, config, probe: bool = True) -> Policy:
    """The policy in path, on top of config's recipe; PolicyError naming the
    file, the rule and the key of the first thing wrong. probe: check what
    only the kernel can say (congestion controls, the capability a mark needs)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_FILE + 1)
    except OSError as err:
        raise PolicyError(f"{path}: can not read the policy: {err.strerror}") from None
    if len(text) > MAX_FILE:
        raise PolicyError(f"{path}: longer than {MAX_FILE >> 20} MiB")
    try:
        data = tomllib.loads(text.decode())
    except UnicodeDecodeError as err:
        raise PolicyError(f"{path}: not UTF-8 text: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{path}: not valid TOML: {err}") from None
    unknown = set(data) - {"rule"}
    if unknown:
        raise PolicyError(f"{path}: unknown key {sorted(unknown)[0]!r} "
                          "(a policy is a list of [[rule]] tables)")
    entries = data.get("rule", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PolicyError(f"{path}: 'rule' must be a list of tables: write [[rule]]")
    default = recipes.from_config(config)
    rules, names = [], set()
    # The line of each [[rule]], for the messages (tomllib gives no positions);
    # only when they can be told apart from a [[rule]] inside a string.
    lines = [i for i, line in enumerate(text.decode().splitlines(), 1)
             if line.strip().startswith("[[rule]]")]
    if len(lines) != len(entries):
        lines = [None] * len(entries)
    for number, entry in enumerate(entries, 1):
        rule = _rule(path, number, entry, default, probe and _Probe(config.mptcp_listen),
                     lines[number - 1])
        if rule.name in names or rule.name == "default":
            raise Where(path, number, None, lines[number - 1]).error(
                "name", f"{rule.name!r} is already taken")
        names.add(rule.name)
        rules.append(rule)
    return Policy(os.path.abspath(path), rules, default, hashlib.sha256(text).hexdigest())


class _Probe:
    """What the kernel is asked about a rule: whether the client leg may be
    an MPTCP socket (--mptcp-listen)."""

    def __init__(self, mptcp_listen: bool):
        self.mptcp_listen = mptcp_listen


def _rule(path: str, number: int, entry: dict, default: Recipe, probe: _Probe | bool,
          line: int | None) -> Rule:
    name = entry.get("name")
    where = Where(path, number, name if isinstance(name, str) else None, line)
    for key in entry:
        if key not in RULE_KEYS:
            raise where.error(key, f"unknown key; a rule knows {', '.join(RULE_KEYS)}")
    if name is None:
        name = f"rule{number}"
    elif not isinstance(name, str) or not NAME.fullmatch(name):
        raise where.error("name", "letters, digits and _.:- only, at most 64")
    rule = Rule(number, name, default, bypass=read_bool(where, entry, "bypass") or False)
    rule.destinations = read_prefixes(where, entry, "destination")
    rule.clients = read_prefixes(where, entry, "client")
    for network in rule.clients:
        rule.client_table.setdefault(network.version, PrefixTable(network.bits)) \
            .add(network, True)
    rule.ports = read_ports(where, entry.get("port"))
    rule.client_mptcp = read_bool(where, entry, "client_mptcp")
    if rule.bypass:
        extra = [key for key in entry if key not in ("name", "destination", "client", "bypass")]
        if extra:
            raise where.error(extra[0], "a bypass rule matches on destination and client "
                              "prefixes only (the firewall skips them before any socket)")
        if bool(rule.destinations) == bool(rule.clients):
            raise where.error("bypass", "give the destination prefixes or the client "
                              "prefixes to bypass (one rule each, not both)")
        return rule
    rule.recipe = _recipe(where, name, entry, default, probe)
    return rule


def _recipe(where: Where, name: str, entry: dict, default: Recipe,
            probe: _Probe | bool) -> Recipe:
    server = {(level, option): value for level, option, value in default.server_options}
    client: dict = {}
    both = _connection_options(where, entry)
    server.update(both)
    client.update(both)
    changes = {"name": name, **_connection(where, entry, probe)}
    for leg, options, dscp_key in (("server_leg", server, "server_dscp"),
                                   ("client_leg", client, "client_dscp")):
        table = entry.get(leg, {})
        if not isinstance(table, dict):
            raise where.error(leg, f"must be a table: write [rule.{leg}]")
        dscp = _leg(where, leg, table, options, probe)
        if dscp is not None:
            changes[dscp_key] = dscp
    changes["server_options"] = tuple((lvl, opt, v) for (lvl, opt), v in server.items())
    changes["client_options"] = tuple((lvl, opt, v) for (lvl, opt), v in client.items())
    made = replace(default, **changes)
    if probe:
        _check_mptcp_options(where, made, probe.mptcp_listen)
        if probe.mptcp_listen and COPY in (made.server_dscp, made.client_dscp):
            leg = "server_leg" if made.server_dscp == COPY else "client_leg"
            raise where.error(f"{leg}.dscp", "\"copy\" reads the client's SYN, which an "
                              "MPTCP listener (--mptcp-listen) does not keep (TCP_SAVE_SYN)")
        if needs_net_admin(made):
            _check_net_admin(where, made)
    return made


def _connection(where: Where, entry: dict, probe: bool) -> dict:
    """mptcp, source, the timeouts and the per-client limit, as Recipe fields."""
    changes: dict = {}
    mptcp = read_bool(where, entry, "mptcp")
    if mptcp is not None:
        if mptcp and probe and not sockopts.mptcp_available():
            raise where.error("mptcp", "Multipath TCP is not available: the kernel lacks it "
                              "or net.mptcp.enabled is 0")
        changes["server_proto"] = sockopts.IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP
    if "source" in entry:
        changes.update(_source(where, entry["source"]))
    for key in ("connect_timeout", "idle_timeout"):
        if key in entry:
            changes[key] = read_seconds(where, key, entry[key])
    if "max_per_client" in entry:
        changes["max_per_client"] = read_int(where, "max_per_client", entry["max_per_client"],
                                         1, MAX_BYTES)
    return changes


def _check_mptcp_options(where: Where, made: Recipe, mptcp_listen: bool) -> None:
    """An option that this kernel's MPTCP sockets refuse (SO_MAX_PACING_RATE,
    TCP_USER_TIMEOUT in 6.x) would fail every connection of the rule."""
    for leg, options, mptcp in (
            ("server_leg", made.server_options, made.server_proto == sockopts.IPPROTO_MPTCP),
            ("client_leg", made.client_options, mptcp_listen)):
        for level, option, value in options if mptcp else ():
            if sockopts.mptcp_refuses(level, option, value):
                key = _KEYS.get((level, option), "?")
                key = key if key in ("keepalive", "user_timeout") else f"{leg}.{key}"
                raise where.error(key, "this kernel's Multipath TCP sockets refuse it; "
                                  f"use mptcp = false in this rule or leave {key} out")


def _connection_options(where: Where, entry: dict) -> dict:
    """keepalive and user_timeout: both legs, as on the command line."""
    options = {}
    if "keepalive" in entry:
        value = entry["keepalive"]
        tcp = socket.IPPROTO_TCP
        if value is False:
            options[(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] = 0
        elif value is True or isinstance(value, dict):
            timing = {"idle": 60, "interval": 10, "count": 6}
            for key, number in (value.items() if isinstance(value, dict) else ()):
                if key not in timing:
                    raise where.error(f"keepalive.{key}", "unknown key; idle, interval, count")
                timing[key] = read_int(where, f"keepalive.{key}", number, 1, 32767)
            options[(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] = 1
            options[(tcp, socket.TCP_KEEPIDLE)] = timing["idle"]
            options[(tcp, socket.TCP_KEEPINTVL)] = timing["interval"]
            options[(tcp, socket.TCP_KEEPCNT)] = timing["count"]
        else:
            raise where.error("keepalive", "true, false or {idle=, interval=, count=}")
    if "user_timeout" in entry:
        seconds = read_seconds(where, "user_timeout", entry["user_timeout"], zero=True)
        options[(socket.IPPROTO_TCP, sockopts.TCP_USER_TIMEOUT)] = int(seconds * 1000)
    return options


def _leg(where: Where, leg: str, table: dict, options: dict, probe: bool) -> int | None:
    """The leg's keys into options; its DSCP (a value or COPY), if set."""
    dscp = None
    for key, value in table.items():
        name = f"{leg}.{key}"
        if key == "dscp":
            dscp = COPY if value == "copy" else read_int(where, name, value, 0, 63)
        elif key in LEG_OPTIONS:
            option, convert = LEG_OPTIONS[key]
            options[option] = convert(where, name, value, probe)
        else:
            raise where.error(name, f"unknown key; a leg knows {', '.join(LEG_KEYS)}")
    return dscp


def _congestion(where: Where, name: str, value, probe: bool) -> bytes:
    if not isinstance(value, str):
        raise where.error(name, "the name of a congestion control, e.g. \"bbr\"")
    if probe:
        try:
            sockopts.check_congestion(value)
        except UsageError as err:
            raise where.error(name, str(err)) from None
        with socket.socket() as sock:  # as each connection of the rule will
            try:
                sock.setsockopt(socket.IPPROTO_TCP, sockopts.TCP_CONGESTION, value.encode())
            except PermissionError:
                raise where.error(name, f"{value!r} is not allowed for this process: add it "
                                  "to net.ipv4.tcp_allowed_congestion_control, or give the "
                                  "daemon CAP_NET_ADMIN (run as root, or restart it with "
                                  "this policy so that it is kept)") from None
    return value.encode()


def _bounded(low: int, high: int):
    return lambda where, name, value, probe: read_int(where, name, value, low, high)


# A leg's keys but dscp: the option each sets, and how its value is read.
LEG_OPTIONS = {
    "congestion": ((socket.IPPROTO_TCP, sockopts.TCP_CONGESTION), _congestion),
    "mark": ((socket.SOL_SOCKET, SO_MARK), _bounded(0, 2**32 - 1)),
    "sndbuf": ((socket.SOL_SOCKET, socket.SO_SNDBUF), _bounded(1024, MAX_BYTES)),
    "rcvbuf": ((socket.SOL_SOCKET, socket.SO_RCVBUF), _bounded(1024, MAX_BYTES)),
    "notsent_lowat": ((socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT), _bounded(1, MAX_BYTES)),
    "pacing_rate": ((socket.SOL_SOCKET, SO_MAX_PACING_RATE),
                    lambda where, name, value, probe: read_rate(where, name, value)),
}


# The key of the file that sets each option, for the messages.
_KEYS = {option: key for key, (option, _) in LEG_OPTIONS.items()} | {
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): "keepalive",
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): "keepalive",
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): "keepalive",
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): "keepalive",
    (socket.IPPROTO_TCP, sockopts.TCP_USER_TIMEOUT): "user_timeout"}


def _source(where: Where, value) -> dict:
    if value == "client":
        return recipes.source(None)
    if value == "any":
        return recipes.source(parse_address(DEFAULT_OUTGOING))
    if not isinstance(value, str):
        raise where.error("source", "\"client\", \"any\" or an address like "
                          "\"[192.0.2.1]:[0]\"")
    try:
        return recipes.source(parse_address(value))
    except AddressError as err:
        raise where.error("source", str(err)) from None


def _check_net_admin(where: Where, made: Recipe) -> None:
    """Whether this process may set SO_MARK and IP_TRANSPARENT (CAP_NET_ADMIN)."""
    with socket.socket() as probe:
        try:
            if made.spoof_client:
                sockopts.set_transparent(probe)
            for level, option, value in (*made.server_options, *made.client_options):
                if (level, option) == (socket.SOL_SOCKET, SO_MARK):
                    probe.setsockopt(level, option, value)
        except PermissionError:
            key = "source" if made.spoof_client else "mark"
            raise where.error(key, "needs the CAP_NET_ADMIN capability, which this daemon "
                              "does not have (run as root, or start it with a policy that "
                              "needs it so that it is kept)") from None


def bypass_lines(policy: Policy) -> list[str]:
    """What contrib/tproxy.sh installs in its bypass sets: `FAMILY dst|src
    PREFIX` per line (4 or 6), from the bypass rules."""
    lines = []
    for rule in policy.rules:
        if rule.bypass:
            lines += [f"{n.version} dst {n}" for n in rule.destinations]
            lines += [f"{n.version} src {n}" for n in rule.clients]
    return lines


def main(argv: list[str] | None = None) -> int:
    """python3 -m tcp_intercept.policy_file FILE: the bypass list of FILE
    (for tproxy.sh), or the error and 64."""
    import sys

    from .config import Config
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python3 -m tcp_intercept.policy_file POLICY_FILE\n")
        return 64
    try:
        policy = load(argv[0], Config(), probe=False)
    except PolicyError as err:
        sys.stderr.write(f"{err}\n")
        return err.status
    sys.stdout.write("".join(f"{line}\n" for line in bypass_lines(policy)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
