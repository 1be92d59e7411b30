"""The policy (--policy FILE): which recipe each connection gets.

An ordered list of rules in TOML; the first rule that matches a connection
wins, and a connection no rule matches gets the command line's recipe
("default"). A rule matches on any of: destination prefixes, destination
ports and ranges, client prefixes, whether the client's SYN offered MPTCP;
what it does is a recipe (recipe.py) made once, when the policy is loaded.
The file is read and checked by policy_file.py.

Lookup, per connection: each rule is indexed once, by the first of its
destination prefixes, its ports (when they are at most PORTS_LISTED), its
client prefixes; a rule with none of these is tried for every connection.
A prefix table masks the address once per prefix length in use (a dict per
length: 10,000 prefixes of three lengths cost three lookups), the ports are
one dict; the few rules found are tried in the file's order on the rest
(port, client, MPTCP). About 1 µs per connection whatever the number of
rules (bench/policy.py).

`bypass` rules are the firewall's business: contrib/tproxy.sh installs
their prefixes in a set its rules skip, so their connections never reach
us (`python3 -m tcp_intercept.policy_file FILE` lists them). They take no part
in the lookup here.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from . import recipe as recipes
from . import sockopts
from .recipe import COPY, Recipe, syn_fields

SO_MARK = getattr(socket, "SO_MARK", 36)
TCP_IS_MPTCP = 43
# A rule whose ports are at most this many is found through a dict by port;
# one with wider ranges is tried for every connection.
PORTS_LISTED = 4096


class Prefix(NamedTuple):
    """A network: 4 or 6, its address as an integer, its prefix length."""
    version: int
    address: int
    length: int

    @property
    def bits(self) -> int:
        return 32 if self.version == 4 else 128

    def __str__(self) -> str:
        family, size = (socket.AF_INET, 4) if self.version == 4 else (socket.AF_INET6, 16)
        return f"{socket.inet_ntop(family, self.address.to_bytes(size, 'big'))}/{self.length}"


@dataclass(eq=False)
class Rule:
    number: int                      # 1.., in the file's order
    name: str
    recipe: Recipe
    bypass: bool = False
    destinations: list = field(default_factory=list)   # Prefix
    clients: list = field(default_factory=list)
    ports: tuple = ()                                   # ((low, high), ...)
    client_mptcp: bool | None = None
    client_table: dict = field(default_factory=dict)    # family -> PrefixTable

    def matches_rest(self, peer_ip: tuple[int, int] | None, port: int,
                     mptcp: bool | None) -> bool:
        """Everything but the destination prefix (already matched)."""
        if self.ports and not any(low <= port <= high for low, high in self.ports):
            return False
        if self.clients:
            table = self.client_table.get(peer_ip[0]) if peer_ip else None
            if table is None or not table.contains(peer_ip[1]):
                return False
        return self.client_mptcp is None or mptcp == self.client_mptcp

    def port_count(self) -> int:
        return sum(high - low + 1 for low, high in self.ports)

    def describe(self) -> str:
        words = [f"{self.number}", self.name]
        if self.destinations:
            words.append("destination=" + _few(self.destinations))
        if self.ports:
            words.append("port=" + ",".join(str(lo) if lo == hi else f"{lo}-{hi}"
                                            for lo, hi in self.ports))
        if self.clients:
            words.append("client=" + _few(self.clients))
        if self.client_mptcp is not None:
            words.append(f"client_mptcp={str(self.client_mptcp).lower()}")
        return " ".join(words)


def _few(networks: list) -> str:
    shown = ",".join(str(n) for n in networks[:3])
    return shown + (f",...({len(networks)} prefixes)" if len(networks) > 3 else "")


class PrefixTable:
    """Prefixes of one family: for each length, the prefixes' networks as
    integers shifted right; lookup() gives the values of every prefix
    containing an address."""
    __slots__ = ("bits", "tables", "by_length")

    def __init__(self, bits: int):
        self.bits = bits
        self.tables: dict[int, dict] = {}  # shift -> {network >> shift: [values]}
        self.by_length: list[tuple[int, dict]] = []  # the same, longest prefixes first

    def add(self, prefix: Prefix, value) -> None:
        shift = self.bits - prefix.length
        if shift not in self.tables:
            self.tables[shift] = {}
            self.by_length = sorted(self.tables.items())
        self.tables[shift].setdefault(prefix.address >> shift, []).append(value)

    def lookup(self, address: int) -> list:
        found = []
        for shift, table in self.by_length:
            hit = table.get(address >> shift)
            if hit is not None:
                found += hit
        return found

    def contains(self, address: int) -> bool:
        return any((address >> shift) in table for shift, table in self.by_length)


class Policy:
    """A loaded policy: its rules, where it came from, what each matched."""

    def __init__(self, path: str, rules: list[Rule], default: Recipe, digest: str = ""):
        self.path = path
        self.digest = digest  # the file's SHA-256: what a reload tells the workers to load
        self.loaded = time.time()
        self.rules = rules
        self.default = default
        active = [rule for rule in rules if not rule.bypass]
        self._index(active)
        self.by_number = {rule.number: rule for rule in rules}
        self.any_clients = any(rule.clients for rule in active)
        self.any_mptcp = any(rule.client_mptcp is not None for rule in active)
        # What the listener must keep of each SYN (TCP_SAVE_SYN): the DSCP
        # to copy, or the MPTCP option of a client on a plain TCP listener.
        self.needs_syn = any(rule.recipe.server_dscp == COPY or rule.recipe.client_dscp == COPY
                             or rule.client_mptcp is not None for rule in active)
        self.needs_net_admin = any(needs_net_admin(rule.recipe) for rule in active)
        # Matches since the worker last reported them to the master.
        self.matched = dict.fromkeys([rule.name for rule in active] + ["default"], 0)

    def _index(self, active: list[Rule]) -> None:
        """Each rule under the first of its destinations, ports (when they are
        few enough to list), clients; else among the rules tried always."""
        self.by_dst = {4: PrefixTable(32), 6: PrefixTable(128)}
        self.by_client = {4: PrefixTable(32), 6: PrefixTable(128)}
        self.by_port: dict[int, list[int]] = {}
        self.anywhere: list[int] = []   # tried for every connection, in order
        for rule in active:
            if rule.destinations:
                for network in rule.destinations:
                    self.by_dst[network.version].add(network, rule.number)
            elif rule.ports and rule.port_count() <= PORTS_LISTED:
                for low, high in rule.ports:
                    for port in range(low, high + 1):
                        self.by_port.setdefault(port, []).append(rule.number)
            elif rule.clients:
                for network in rule.clients:
                    self.by_client[network.version].add(network, rule.number)
            else:
                self.anywhere.append(rule.number)
        self.client_indexed = any(table.tables for table in self.by_client.values())

    def choose(self, client: socket.socket, peer: tuple, dst: tuple
               ) -> tuple[Recipe, int | None]:
        """The recipe for a connection just accepted (counted as its rule's
        match), and the DSCP of the client's SYN when a rule needs the SYN.

        The rules that may match come from the indexes (a dict lookup per
        prefix length in use, one for the port); they are tried in the
        file's order on what their index did not check."""
        dst_ip = _address(dst[0])
        candidates = self.by_dst[dst_ip[0]].lookup(dst_ip[1]) if dst_ip else []
        by_port = self.by_port.get(dst[1])
        if by_port is not None:
            candidates += by_port
        peer_ip = _address(peer[0]) if self.any_clients else None
        if self.client_indexed and peer_ip is not None:
            candidates += self.by_client[peer_ip[0]].lookup(peer_ip[1])
        if self.anywhere:
            candidates += self.anywhere
        dscp = mptcp = None
        if self.needs_syn:
            dscp, mptcp = _saved_syn(client)
        if self.any_mptcp and client.proto == sockopts.IPPROTO_MPTCP:
            mptcp = _is_mptcp(client)
        if len(candidates) > 1:
            candidates.sort()
        chosen = self.default
        for number in candidates:
            rule = self.by_number[number]
            if rule.matches_rest(peer_ip, dst[1], mptcp):
                chosen = rule.recipe
                break
        self.matched[chosen.name] += 1
        return chosen, dscp

    def describe(self) -> list[str]:
        """show policy's lines, but for the counts (the master adds them)."""
        loaded = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.loaded))
        lines = [f"Policy: {self.path}", f"Loaded: {loaded}", f"Rules: {len(self.rules)}"]
        for rule in self.rules:
            lines.append(f"Rule: {rule.describe()}" + (" bypass" if rule.bypass else ""))
        return lines

    @property
    def limits_clients(self) -> bool:
        """Whether a rule has a per-client limit of its own."""
        return any(rule.recipe.max_per_client is not None
                   for rule in self.rules if not rule.bypass)

    def recipes(self) -> list[Recipe]:
        return [self.default, *(rule.recipe for rule in self.rules if not rule.bypass)]

    def congestions(self) -> set[str]:
        """Every congestion control a rule names (either leg)."""
        return {value.decode() for recipe in self.recipes()
                for level, option, value in (*recipe.server_options, *recipe.client_options)
                if (level, option) == (socket.IPPROTO_TCP, sockopts.TCP_CONGESTION)}

    def bind_ports(self) -> list[int]:
        """The ports of the fixed source addresses rules give."""
        return [recipe.bind_address[1] for recipe in self.recipes() if recipe.bind_address]

    def take_matched(self) -> dict[str, int]:
        """The matches counted since the last call, per rule name (nonzero)."""
        taken = {name: count for name, count in self.matched.items() if count}
        for name in taken:
            self.matched[name] = 0
        return taken


def counts_clients(config, policy: Policy | None) -> bool:
    """Whether connections are counted per client address (--max-per-client,
    or a rule's max_per_client at start-up). Fixed for the daemon's life:
    counting and steering by client start with it, so a reload may not add
    the first per-client limit."""
    return config.max_per_client is not None or (policy is not None and policy.limits_clients)


def _address(text: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer); an IPv4-mapped IPv6 address is IPv4."""
    try:
        if ":" not in text:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        raw = socket.inet_pton(socket.AF_INET6, text.split("%", 1)[0])
    except OSError:
        return None
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return 4, int.from_bytes(raw[12:], "big")
    return 6, int.from_bytes(raw, "big")


def _saved_syn(client: socket.socket) -> tuple[int | None, bool]:
    """(DSCP, whether it offered MPTCP) of the client's SYN, which the
    listener kept (TCP_SAVE_SYN); the kernel gives it once, so here only."""
    try:
        syn = client.getsockopt(socket.IPPROTO_TCP, recipes.TCP_SAVED_SYN,
                                recipes.SAVED_SYN_MAX)
    except OSError:
        return None, False
    return syn_fields(syn)


def _is_mptcp(client: socket.socket) -> bool:
    """An MPTCP listener's accepted socket: whether the client spoke MPTCP
    (it did not when the socket fell back to TCP)."""
    try:
        return client.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP) == 1
    except OSError:
        return False


def needs_net_admin(recipe: Recipe) -> bool:
    options = (*recipe.server_options, *recipe.client_options)
    return recipe.spoof_client or any(option[:2] == (socket.SOL_SOCKET, SO_MARK)
                                      for option in options)


