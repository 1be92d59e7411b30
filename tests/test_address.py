"""Address strings as the original took them: split at the last colon,
[numeric] parts never resolved, exactly one result or an AddressError."""

from __future__ import annotations

import socket

import pytest

from tcp_intercept import address
from tcp_intercept.address import Address, format_sockaddr, parse
from tcp_intercept.errors import AddressError


@pytest.mark.parametrize("text, family, host, port", [
    ("[10.0.0.1]:[80]", socket.AF_INET, "10.0.0.1", 80),
    ("[::1]:[80]", socket.AF_INET6, "::1", 80),
    ("[::]:[5000]", socket.AF_INET6, "::", 5000),
    ("[0.0.0.0]:[0]", socket.AF_INET, "0.0.0.0", 0),
    ("[10.0.0.1]:http", socket.AF_INET, "10.0.0.1", 80),   # service name resolved
    ("10.0.0.1:80", socket.AF_INET, "10.0.0.1", 80),       # numeric without brackets
    ("::1:80", socket.AF_INET6, "::1", 80),                 # the LAST colon splits
    ("[fd00::1:2]:[65535]", socket.AF_INET6, "fd00::1:2", 65535),
])
def test_parse(text, family, host, port):
    assert parse(text) == Address(family, host, port)


@pytest.mark.parametrize("text", [
    "10.0.0.1",            # no colon
    "",                    # nothing at all
    "[localhost]:[80]",    # brackets: numeric only, never resolved
    "[10.0.0.1]:[http]",
    "[10.0.0.1]:no-such-service",
    "[10.0.0.1]:[70000]",
    "[300.0.0.1]:[80]",
    "[10.0.0.1]:[-1]",
])
def test_unusable_addresses_raise_address_error(text):
    with pytest.raises(AddressError):
        parse(text)


def test_no_colon_says_so():
    with pytest.raises(AddressError, match="could not find ':'"):
        parse("10.0.0.1")


def test_localhost_resolves_to_a_loopback_address_or_lists_every_one():
    try:
        addr = parse("localhost:5000")
    except AddressError as err:
        # /etc/hosts gives both families: the operator must pick one.
        assert "multiple" in str(err)
        assert "[127.0.0.1]:5000" in str(err) and "[::1]:5000" in str(err)
    else:
        assert addr.host in ("127.0.0.1", "::1") and addr.port == 5000


def test_unresolvable_host_raises_address_error(monkeypatch):
    def no_such_name(host, *args):
        assert host == "no-such-host.invalid"  # resolved, not taken as numeric
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(address.socket, "getaddrinfo", no_such_name)
    with pytest.raises(AddressError, match="Could not resolve.*Name or service not known"):
        parse("no-such-host.invalid:80")


def test_several_results_are_refused_and_listed(monkeypatch):
    results = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 80)),
               (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 80, 0, 0)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 80))]  # a duplicate
    monkeypatch.setattr(address.socket, "getaddrinfo", lambda *args: results)
    with pytest.raises(AddressError) as err:
        parse("www.example:80")
    assert "multiple" in str(err.value)
    assert str(err.value).count("[192.0.2.1]:80") == 1
    assert "[2001:db8::1]:80" in str(err.value)


def test_duplicates_of_one_address_are_one_address(monkeypatch):
    one = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 80))
    monkeypatch.setattr(address.socket, "getaddrinfo", lambda *args: [one, one])
    assert parse("www.example:80") == Address(socket.AF_INET, "192.0.2.1", 80)


@pytest.mark.parametrize("sockaddr, text", [
    (("10.0.0.1", 5000), "[10.0.0.1]:5000"),
    (("::1", 80, 0, 0), "[::1]:80"),
    (("fd91:1::2", 41000, 0, 0), "[fd91:1::2]:41000"),
])
def test_format_sockaddr(sockaddr, text):
    assert format_sockaddr(sockaddr) == text


def test_an_address_prints_as_the_log_does():
    assert str(parse("[::]:[5000]")) == "[::]:5000"
    assert str(parse("[10.0.0.1]:http")) == "[10.0.0.1]:80"
    assert parse("[::1]:[80]").sockaddr == ("::1", 80)


@pytest.mark.parametrize("text, wildcard", [
    # The original's IPv6 "any" test was inverted; its loopback test compared
    # in the wrong byte order. Both feed loop prevention.
    ("[0.0.0.0]:[0]", True),
    ("[::]:[0]", True),
    ("[::1]:[0]", False),
    ("[127.0.0.1]:[0]", False),
    ("[1.0.0.127]:[0]", False),
    ("[10.0.0.1]:[0]", False),
    ("[fd91:1::1]:[0]", False),
])
def test_is_wildcard(text, wildcard):
    assert parse(text).is_wildcard is wildcard
