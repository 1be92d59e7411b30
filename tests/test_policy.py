"""The policy file: what it accepts, what it refuses and how it says so,
and which rule each connection gets (pure logic, no kernel but a probe)."""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path

import pytest

from tcp_intercept import policy_file
from tcp_intercept.config import Config
from tcp_intercept.errors import PolicyError
from tcp_intercept.policy import SO_MARK
from tcp_intercept.policy_values import read_prefix
from tcp_intercept.recipe import COPY, syn_fields


CONFIG = Config(congestion=None)
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "contrib" / "policy.example.toml"
LAN = """
[[rule]]
name = "lan"
destination = ["192.168.1.0/24", "fd00:1::/64"]
mptcp = false
[rule.server_leg]
congestion = "cubic"

[[rule]]
name = "web-lte"
port = [80, 443, "8000-8999"]
client = "10.0.0.0/8"
[rule.server_leg]
mark = 0x20
dscp = "copy"
pacing_rate = "80mbit"

[[rule]]
name = "vpn"
destination = "203.0.113.7/32"
bypass = true
"""


def write(tmp_path, text: str):
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def load(tmp_path, text: str, probe: bool = False):
    return policy_file.load(write(tmp_path, text), CONFIG, probe=probe)


class FakeSocket:
    """What choose() may ask of an accepted socket: its protocol and saved SYN."""
    proto = socket.IPPROTO_TCP

    def __init__(self, syn: bytes = b""):
        self.syn = syn

    def getsockopt(self, level, option, size=None):
        if not self.syn:
            raise OSError("no saved SYN")
        return self.syn


def choose(policy, dst: str, port: int = 80, client: str = "10.1.1.1", sock=None) -> str:
    return policy.choose(sock or FakeSocket(), (client, 40000), (dst, port))[0].name


def test_first_match_wins_and_the_rest_is_the_default(tmp_path):
    policy = load(tmp_path, LAN)
    assert choose(policy, "192.168.1.9", 80) == "lan"          # lan before web-lte
    assert choose(policy, "198.51.100.1", 443) == "web-lte"
    assert choose(policy, "198.51.100.1", 8500) == "web-lte"
    assert choose(policy, "198.51.100.1", 22) == "default"
    assert choose(policy, "198.51.100.1", 80, client="172.16.0.1") == "default"
    assert choose(policy, "fd00:1::5", 22, client="fd00:2::1") == "lan"
    assert choose(policy, "::ffff:192.168.1.9", 22) == "lan"   # a listener on [::]
    assert policy.matched == {"lan": 3, "web-lte": 2, "default": 2}


def test_bypass_rules_are_the_firewalls_and_listed_for_it(tmp_path):
    policy = load(tmp_path, LAN)
    assert choose(policy, "203.0.113.7", 22) == "default"
    assert policy_file.bypass_lines(policy) == ["4 dst 203.0.113.7/32"]


def test_a_rule_becomes_a_recipe_on_top_of_the_command_line(tmp_path):
    config = Config(congestion="reno", user_timeout=5.0)
    policy = policy_file.load(write(tmp_path, LAN), config, probe=False)
    lan, web = (rule.recipe for rule in policy.rules[:2])
    tcp = socket.IPPROTO_TCP
    assert dict(((lvl, opt), v) for lvl, opt, v in lan.server_options)[
        (tcp, socket.TCP_CONGESTION)] == b"cubic"
    server = {(lvl, opt): v for lvl, opt, v in web.server_options}
    assert server[(tcp, socket.TCP_CONGESTION)] == b"reno"       # the command line's
    assert server[(tcp, 18)] == 5000                              # --user-timeout
    assert server[(socket.SOL_SOCKET, SO_MARK)] == 0x20
    assert server[(socket.SOL_SOCKET, 47)] == 10_000_000          # 80 Mbit/s in bytes
    assert web.server_dscp == COPY and not web.touches_client  # the SYN is read in choose()
    assert not lan.touches_client and lan.client_options == ()
    assert policy.needs_syn and policy.needs_net_admin


def test_ten_thousand_prefixes_and_the_longest_inside_a_shorter(tmp_path):
    prefixes = ", ".join(f'"10.{i // 256}.{i % 256}.0/24"' for i in range(10_000))
    policy = load(tmp_path, f"""
        [[rule]]
        name = "host"
        destination = "10.0.5.7/32"
        [[rule]]
        name = "many"
        destination = [{prefixes}]
        [[rule]]
        name = "wide"
        destination = "10.0.0.0/8"
        """)
    assert choose(policy, "10.0.5.7") == "host"
    assert choose(policy, "10.0.5.8") == "many"
    assert choose(policy, "10.39.15.1") == "many"
    assert choose(policy, "10.200.0.1") == "wide"
    assert choose(policy, "11.0.0.1") == "default"


def test_rules_without_destination_are_found_by_port_and_client(tmp_path):
    rules = "".join(f'[[rule]]\nname = "p{i}"\nport = {1000 + i}\n' for i in range(200))
    policy = load(tmp_path, rules + """
        [[rule]]
        name = "lan-clients"
        client = ["10.1.0.0/16", "fd00::/8"]
        [[rule]]
        name = "wide"
        port = "1-65535"
        client = "172.16.0.0/12"
        [[rule]]
        name = "web-range"
        port = "8000-8999"
        """.replace("\n        ", "\n"))
    assert choose(policy, "198.51.100.1", 1199) == "p199"
    assert policy.by_port[1199] == [200] and not policy.anywhere[1:]
    assert choose(policy, "198.51.100.1", 22, client="10.1.2.3") == "lan-clients"
    assert choose(policy, "198.51.100.1", 22, client="fd00::7") == "lan-clients"
    assert choose(policy, "198.51.100.1", 22, client="172.16.9.9") == "wide"
    assert choose(policy, "198.51.100.1", 8500, client="192.0.2.1") == "web-range"
    assert choose(policy, "198.51.100.1", 1000, client="10.1.2.3") == "p0"  # first match
    assert choose(policy, "198.51.100.1", 22, client="192.0.2.1") == "default"


def test_the_saved_syn_is_read_once_for_both_mptcp_and_dscp(tmp_path):
    policy = load(tmp_path, """
        [[rule]]
        name = "mp"
        client_mptcp = true
        [rule.server_leg]
        dscp = "copy"
        """)
    reads = []

    class Once(FakeSocket):
        def getsockopt(self, level, option, size=None):
            reads.append(option)
            return super().getsockopt(level, option, size)

    recipe, dscp = policy.choose(Once(syn(True, tos=34 << 2)), ("10.0.0.1", 1), ("10.0.0.2", 80))
    assert (recipe.name, dscp, reads) == ("mp", 34, [28])


def test_client_mptcp_is_read_from_the_saved_syn(tmp_path):
    policy = load(tmp_path, """
        [[rule]]
        name = "mp"
        client_mptcp = true
        """)
    assert policy.needs_syn
    assert choose(policy, "10.9.9.9", sock=FakeSocket(syn(mptcp=True))) == "mp"
    assert choose(policy, "10.9.9.9", sock=FakeSocket(syn(mptcp=False))) == "default"
    assert choose(policy, "10.9.9.9", sock=FakeSocket()) == "default"


def syn(mptcp: bool, tos: int = 0, version: int = 4) -> bytes:
    options = bytes([2, 4, 5, 0xB4]) + (bytes([30, 12, 0, 0x81]) + bytes(8) if mptcp else b"")
    options += bytes(-len(options) % 4)
    tcp = bytes(12) + bytes([(20 + len(options)) // 4 << 4, 0x02]) + bytes(6) + options
    if version == 4:
        return bytes([0x45, tos]) + bytes(18) + tcp
    return bytes([0x60 | tos >> 4, (tos & 0x0F) << 4]) + bytes(38) + tcp


@pytest.mark.parametrize("version", [4, 6])
def test_saved_syn_fields(version):
    assert syn_fields(syn(True, tos=46 << 2 | 1, version=version)) == (46, True)
    assert syn_fields(syn(False, tos=10 << 2, version=version)) == (10, False)
    assert syn_fields(b"\x45") == (None, False)


@pytest.mark.parametrize("text, where", [
    ("[[rule]]\nname = 'a'\ndestinaton = '10.0.0.0/8'\n", "rule 1 (a): destinaton: unknown key"),
    ("[[rule]]\ndestination = '10.0.0.300/8'\n", "rule 1: destination: '10.0.0.300/8' is not"),
    ("[[rule]]\ndestination = '10.0.0.1/8'\n", "has host bits set"),
    ("[[rule]]\n[[rule]]\nport = 70000\n", "policy.toml:2: rule 2: port: 70000"),
    ("[[rule]]\nport = '9-3'\n", "port: '9-3'"),
    ("[[rule]]\n[rule.server_leg]\ndscp = 64\n", "server_leg.dscp: 64"),
    ("[[rule]]\n[rule.client_leg]\nspeed = 1\n", "client_leg.speed: unknown key"),
    ("[[rule]]\n[rule.server_leg]\npacing_rate = 'fast'\n", "server_leg.pacing_rate"),
    ("[[rule]]\nsource = '[300.1.1.1]:[0]'\n", "rule 1: source:"),
    ("[[rule]]\nidle_timeout = 0\n", "idle_timeout: 0"),
    ("[[rule]]\nname='x'\n[[rule]]\nname='x'\n", ":3: rule 2: name: 'x' is already taken"),
    ("[[rule]]\nbypass = true\nport = 80\ndestination = '10.0.0.0/8'\n", "port: a bypass rule"),
    ("[[rule]]\nbypass = true\n", "bypass: give the destination"),
    # [] would match every connection, as a rule without the key does
    ("[[rule]]\nname = 'a'\ndestination = []\n", "rule 1 (a): destination: an empty list"),
    ("[[rule]]\nclient = []\nport = 80\n", "rule 1: client: an empty list"),
    ("[[rule]]\nport = []\n", "rule 1: port: an empty list"),
    ("[[rule]]\nbypass = true\nclient = []\ndestination = '10.0.0.0/8'\n",
     "rule 1: client: an empty list"),
    ("[rules]\n", "unknown key 'rules'"),
    ("[[rule]]\nname = 'a\n", "not valid TOML"),
])
def test_bad_input_names_file_rule_and_key(tmp_path, text, where):
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, text)
    assert str(caught.value).startswith(str(tmp_path / "policy.toml") + ":")
    assert where in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.status == 64


def test_probe_refuses_a_congestion_control_the_kernel_lacks(tmp_path):
    with pytest.raises(PolicyError, match=r"rule 1 \(x\): server_leg.congestion: .*not available"):
        load(tmp_path, "[[rule]]\nname = 'x'\n[rule.server_leg]\ncongestion = 'nosuchcc'\n",
             probe=True)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(PolicyError, match="can not read the policy"):
        policy_file.load(str(tmp_path / "none.toml"), CONFIG)


def test_the_bypass_list_for_tproxy_sh(tmp_path, capsys):
    path = write(tmp_path, LAN + '[[rule]]\nbypass = true\nclient = ["fd00:9::/64"]\n')
    assert policy_file.main([path]) == 0
    assert capsys.readouterr().out == "4 dst 203.0.113.7/32\n6 src fd00:9::/64\n"
    assert policy_file.main([str(tmp_path / "none")]) == 64


def test_the_packaged_example_policy_loads():
    policy = policy_file.load(str(EXAMPLE), CONFIG, probe=False)
    assert [rule.name for rule in policy.rules] == [
        "vpn-peer", "bank", "lan", "interactive", "no-mptcp", "satellite"]
    assert policy_file.bypass_lines(policy)[0] == "4 dst 203.0.113.7/32"


def test_the_readmes_worked_example_can_match_what_its_show_policy_says(tmp_path):
    """The README's example: its show policy lines are those of its file; no
    rule sends to the clients' own LAN (the first line of the drawing), whose
    traffic never crosses the router; its rules match as the packaged
    example's of the same name, which it says it is."""
    section = (ROOT / "README.md").read_text().split("## A policy per destination")[1]
    policy = load(tmp_path, section.split("```toml\n")[1].split("```")[0])
    shown = [line.strip().split(" matched=")[0] for line in section.splitlines()
             if line.startswith("    Rule: ")]
    assert shown == policy.describe()[3:]
    drawing = section.split("):\n\n")[1].splitlines()[0]
    clients = [read_prefix(text) for text in re.findall(r"[0-9a-f.:]+/\d+", drawing)]
    assert clients
    for rule in policy.rules:
        for network in rule.destinations:
            assert not any(overlap(network, own) for own in clients), \
                f"rule {rule.name}: {network} is the clients' own LAN"
    packaged = {rule.name: rule.describe().split(" ", 1)[1]
                for rule in policy_file.load(str(EXAMPLE), CONFIG, probe=False).rules}
    for rule in policy.rules:
        assert rule.describe().split(" ", 1)[1] == packaged[rule.name]


def overlap(one, other) -> bool:
    """Whether two prefixes share addresses (one holds the other)."""
    shift = one.bits - min(one.length, other.length)
    return one.version == other.version and one.address >> shift == other.address >> shift


# The reload probes the options on a real socket, as the daemon does: root.
@pytest.mark.usefixtures("as_root")
def test_reload_keeps_the_old_policy_on_a_bad_file_or_a_first_per_client_limit(tmp_path):
    from tcp_intercept.evloop import Loop
    from tcp_intercept.policy_keeper import PolicyKeeper
    path = write(tmp_path, LAN)
    config = Config(policy=path)
    told, answers = [], []
    loop = Loop()

    def tell(digest: str) -> list[int]:
        told.append(digest)
        return [101, 102]  # two workers

    keeper = PolicyKeeper(config, policy_file.load(path, config, probe=False), loop, tell)
    old = keeper.policy
    for text, why in (("[[rule]]\nport = 0\n", "rule 1: port: 0"),
                      ("[[rule]]\ndestination = []\n", "rule 1: destination: an empty list"),
                      ("[[rule]]\nmax_per_client = 3\n", "restart it to use one")):
        write(tmp_path, text)
        keeper.reload(lambda ok, message: answers.append((ok, message)))
        ok, message = answers.pop()
        assert not ok and why in message and keeper.policy is old and told == []
        assert any(line.startswith("Last_reload_failed: ") for line in keeper.lines())
    write(tmp_path, LAN.replace("cubic", "reno"))
    keeper.reload(lambda ok, message: answers.append((ok, message)))
    assert told == [keeper.policy.digest] and keeper.policy is not old and answers == []
    keeper.answered(101, keeper.policy.digest, True)
    assert answers == []                                   # the answer waits for both
    keeper.answered(102, keeper.policy.digest, True)
    assert answers == [(True, f"Policy reloaded from {path}: 3 rule(s), in force in every "
                              "worker")]
    keeper.reload(lambda ok, message: answers.append((ok, message)))
    keeper.answered(101, keeper.policy.digest, False)
    keeper.gone(102)
    assert not answers[-1][0] and "worker 101 kept the old one" in answers[-1][1]
    keeper.add("lan", 2)
    assert "Rule: 1 lan destination=192.168.1.0/24,fd00:1::/64 matched=2" in keeper.lines()
    assert keeper.totals() == {"lan": 2, "web-lte": 0, "default": 0}
    loop.destroy()


def test_probe_refuses_what_mptcp_sockets_refuse(tmp_path):
    """Linux's MPTCP sockets refuse SO_MAX_PACING_RATE (6.x): a rule asking
    for both would fail every one of its connections, so it fails to load."""
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, "[[rule]]\nname = 'x'\nmptcp = true\n[rule.server_leg]\n"
                       "pacing_rate = '10mbit'\n", probe=True)
    assert ("rule 1 (x): server_leg.pacing_rate: this kernel's Multipath TCP sockets refuse it"
            in str(caught.value)) or "mptcp: Multipath TCP is not available" in str(caught.value)


def test_dscp_copy_needs_a_listener_that_keeps_the_syn(tmp_path):
    path = write(tmp_path, "[[rule]]\n[rule.server_leg]\ndscp = 'copy'\n")
    with pytest.raises(PolicyError, match=r"rule 1: server_leg.dscp: \"copy\" reads the "
                                          r"client's SYN, which an MPTCP listener"):
        policy_file.load(path, Config(mptcp_listen=True))
    assert policy_file.load(path, Config()).needs_syn
