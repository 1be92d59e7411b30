"""The values a policy file holds, read and checked: prefixes, ports and
ranges, booleans, whole numbers, seconds, rates. Each wrong one is a
PolicyError that says where it is (Where: the file, the rule, the key).
"""

from __future__ import annotations

import re
import socket

from .errors import PolicyError
from .policy import Prefix

RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps|b|byte|bytes)?(?:/s)?", re.I)
UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}
EMPTY = "an empty list; give at least one {} (or leave the key out to match any)"


class Where:
    """Says where an error is: file, the line of the rule's [[rule]] (when
    known), rule number (and name), key."""

    def __init__(self, path: str, number: int, name: str | None, line: int | None = None):
        self.prefix = (f"{path}:{line}: " if line else f"{path}: ") + f"rule {number}" + \
            (f" ({name})" if name else "")

    def error(self, key: str, message: str) -> PolicyError:
        return PolicyError(f"{self.prefix}: {key}: {message}")


def read_prefixes(where: Where, entry: dict, key: str) -> list:
    """The prefixes of key, none when it is left out. An empty list is
    refused: a rule without prefixes matches every connection, which []
    never means."""
    if key not in entry:
        return []
    value = entry[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise where.error(key, "a prefix such as \"192.0.2.0/24\", or a list of them")
    if not value:
        raise where.error(key, EMPTY.format("prefix"))
    networks = []
    for text in value:
        prefix = read_prefix(text)
        if isinstance(prefix, str):
            raise where.error(key, f"{text!r} is not a prefix: {prefix}")
        networks.append(prefix)
    return networks


def read_prefix(text) -> Prefix | str:
    """"192.0.2.0/24", "2001:db8::/32" or an address alone (all of its
    bits) as a Prefix, or what is wrong with it. (ipaddress.ip_network
    takes ten times as long: 10,000 prefixes are read at every reload.)"""
    if not isinstance(text, str):
        return "not text"
    address, _, length = text.partition("/")
    version, family, size = (6, socket.AF_INET6, 16) if ":" in address else \
        (4, socket.AF_INET, 4)
    try:
        value = int.from_bytes(socket.inet_pton(family, address), "big")
    except OSError:
        return f"{address!r} is not an IPv{version} address"
    bits = size * 8
    if not length:
        length = str(bits)
    if not length.isdigit() or not 0 <= int(length) <= bits:
        return f"the prefix length must be 0 to {bits}"
    if value & ((1 << (bits - int(length))) - 1):
        return f"{text} has host bits set"
    return Prefix(version, value, int(length))


def read_ports(where: Where, value) -> tuple:
    """The (low, high) ranges of port, none when it is left out; [] is
    refused, as read_prefixes refuses it."""
    if value is None:
        return ()
    if value == []:
        raise where.error("port", EMPTY.format("port"))
    items = value if isinstance(value, list) else [value]
    ports = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and re.fullmatch(r"\d+-\d+", item):
            low, high = map(int, item.split("-"))
        else:
            raise where.error("port", f"{item!r}: a port, a range \"1000-2000\", or a list")
        if not 1 <= low <= high <= 65535:
            raise where.error("port", f"{item!r}: ports are 1 to 65535, low to high")
        ports.append((low, high))
    return tuple(ports)


def read_bool(where: Where, entry: dict, key: str) -> bool | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, bool):
        raise where.error(key, "true or false")
    return value


def read_int(where: Where, key: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise where.error(key, f"{value!r}: a whole number from {low} to {high}")
    return value


def read_seconds(where: Where, key: str, value, zero: bool = False) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not (value >= 0 if zero else value > 0) or not value < 2**31 / 1000:
        raise where.error(key, f"{value!r}: seconds, greater than zero"
                          + (" (or 0: the kernel's)" if zero else ""))
    return float(value)


def read_rate(where: Where, key: str, value) -> int:
    """Bytes per second: a number, or text such as "50mbit" or "10MB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = RATE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise where.error(key, f"{value!r}: bytes per second, or \"50mbit\", \"10MB\"")
    number, unit, kind = match.groups()
    rate = float(number) * UNITS[unit.lower()]
    if (kind or "").lower() in ("bit", "bps"):
        rate /= 8
    if not 1 <= rate < 2**32:
        raise where.error(key, f"{value!r}: from 1 byte/s to 4 GB/s")
    return int(rate)
