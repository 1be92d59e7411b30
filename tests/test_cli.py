"""The command line: every option long and short, and the original's exit
codes (64 bad option or value, 65 bad address, 0 for --help and --version).
main() runs in this process; past parsing, startup.run is replaced."""

from __future__ import annotations

import socket

import pytest

from tcp_intercept import __version__, cli, sockopts, startup
from tcp_intercept.address import Address
from tcp_intercept.config import Keepalive

EX_OK, EX_USAGE, EX_DATAERR = 0, 64, 65


@pytest.fixture
def started(monkeypatch):
    """The Configs main() would have run the daemon with."""
    configs = []
    monkeypatch.setattr(startup, "run",
                        lambda config, command, policy=None: configs.append(config) or 0)
    return configs


@pytest.fixture
def mptcp(monkeypatch):
    """Pretend the kernel has Multipath TCP (or not: mptcp(False))."""
    def set_available(available: bool = True) -> None:
        monkeypatch.setattr(sockopts, "mptcp_available", lambda: available)
    return set_available


def test_defaults():
    config = cli.parse_args([])
    assert config.listen == Address(socket.AF_INET, "0.0.0.0", 5000)
    assert config.outgoing == Address(socket.AF_INET, "0.0.0.0", 0)
    assert not (config.foreground or config.quiet or config.nodelay or config.mptcp
                or config.mptcp_listen)
    assert config.keepalive is None and config.user_timeout is None
    assert config.pid_file is None and config.log_file is None
    assert config.congestion is None and config.client_congestion is None


@pytest.mark.parametrize("short, long, field", [
    ("-n", "--tcp_nodelay", "nodelay"),
    ("-f", "--foreground", "foreground"),
    ("-q", "--quiet", "quiet"),
])
def test_switches(short, long, field):
    for option in (short, long):
        assert getattr(cli.parse_args([option]), field) is True


@pytest.mark.parametrize("options", [["-M"], ["--mptcp"]])
def test_mptcp(options, mptcp):
    mptcp(True)
    assert cli.parse_args(options).mptcp is True
    assert cli.parse_args(["--mptcp-listen"]).mptcp_listen is True


@pytest.mark.parametrize("options", [["-M"], ["--mptcp"], ["--mptcp-listen"]])
def test_mptcp_without_kernel_support_is_a_usage_error(options, mptcp, started, capsys):
    mptcp(False)
    assert cli.main(options) == EX_USAGE
    assert "Multipath TCP is not available" in capsys.readouterr().err
    assert not started


@pytest.mark.parametrize("option", ["-p", "--pid-file"])
def test_pid_file(option):
    assert cli.parse_args([option, "/run/ti.pid"]).pid_file == "/run/ti.pid"


@pytest.mark.parametrize("option", ["-l", "--log"])
def test_log_file(option):
    assert cli.parse_args([option, "/var/log/ti.log"]).log_file == "/var/log/ti.log"


@pytest.mark.parametrize("option", ["-b", "--bind-listen"])
def test_bind_listen(option):
    assert cli.parse_args([option, "[::]:[5001]"]).listen == Address(socket.AF_INET6, "::", 5001)


@pytest.mark.parametrize("option", ["-B", "--bind-outgoing"])
def test_bind_outgoing(option):
    config = cli.parse_args([option, "[10.0.0.1]:[0]"])
    assert config.outgoing == Address(socket.AF_INET, "10.0.0.1", 0)
    assert not config.spoof_client
    config = cli.parse_args([option, "client"])
    assert config.outgoing is None and config.spoof_client


@pytest.mark.parametrize("options, field", [
    (["-C", "reno"], "congestion"),
    (["--congestion", "reno"], "congestion"),
    (["--client-congestion", "reno"], "client_congestion"),
])
def test_congestion(options, field):
    assert getattr(cli.parse_args(options), field) == "reno"


@pytest.mark.parametrize("mode", ["queue", "reset", "bypass"])
def test_when_full(mode):
    config = cli.parse_args(["--max-connections", "9", "--when-full", mode])
    assert config.when_full == mode
    assert ("--when-full" in config.describe()) == (mode != "queue")


@pytest.mark.parametrize("options", [["-C", "no-such-algo"], ["--congestion", "no-such-algo"],
                                     ["--client-congestion", "no-such-algo"]])
def test_unknown_congestion_lists_the_available_ones(options, started, capsys):
    assert cli.main(options) == EX_USAGE
    err = capsys.readouterr().err
    assert "no-such-algo" in err
    offered = sockopts.available_congestion()
    assert "reno" in offered  # always built in: the list below is not empty
    assert all(name in err for name in offered)
    assert not started


@pytest.mark.parametrize("options", [["-k"], ["--keepalive"]])
def test_keepalive_alone_uses_minutes_not_hours(options):
    ka = cli.parse_args(options).keepalive
    assert (ka.idle, ka.interval, ka.count) == (60, 10, 6)  # the README's numbers
    assert ka.idle + ka.interval * ka.count < 600


@pytest.mark.parametrize("option, field", [
    ("--keepalive-idle", "idle"),
    ("--keepalive-interval", "interval"),
    ("--keepalive-count", "count"),
])
def test_keepalive_details_imply_keepalive(option, field):
    ka = cli.parse_args([option, "7"]).keepalive
    assert ka == Keepalive(**{field: 7})


def test_keepalive_details_combine():
    ka = cli.parse_args(["--keepalive-idle", "30", "--keepalive-count", "3", "-k"]).keepalive
    assert ka == Keepalive(idle=30, count=3)


def test_user_timeout():
    assert cli.parse_args(["--user-timeout", "2.5"]).user_timeout == 2.5


def test_main_hands_the_config_to_the_daemon(started):
    assert cli.main(["-f", "-b", "[::]:[5000]", "-B", "client", "-n"]) == EX_OK
    [config] = started
    assert config.foreground and config.nodelay and config.spoof_client
    assert config.listen == Address(socket.AF_INET6, "::", 5000)


@pytest.mark.parametrize("options", [
    ["--no-such-option"],
    ["-x"],
    ["-b"],                                  # missing argument
    ["--pid-file"],
    ["extra-argument"],
    ["-p", "relative.pid"],                  # the pid file must be absolute
    ["--keepalive-idle", "0"],
    ["--keepalive-interval", "-5"],
    ["--keepalive-count", "three"],
    ["--keepalive-idle", "1.5"],
    ["--user-timeout", "0"],
    ["--user-timeout", "nan"],
    ["--user-timeout", "inf"],
    ["--user-timeout", "soon"],
    ["--max-connections", "9", "--when-full", "later"],
    ["--max-connections", "9", "--max-per-client", "2", "-w", "2", "--when-full", "bypass"],
])
def test_bad_options_and_values_exit_64(options, started, capsys):
    assert cli.main(options) == EX_USAGE
    captured = capsys.readouterr()
    assert captured.err and not captured.out
    assert not started


def test_unknown_option_prints_the_usage(capsys):
    assert cli.main(["--no-such-option"]) == EX_USAGE
    assert "--bind-listen" in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    ["-b", "no-colon"],
    ["--bind-listen", "[localhost]:[5000]"],
    ["-B", "[10.0.0.1]:[http]"],
    ["--bind-outgoing", "[10.0.0.1]:no-such-service"],
    ["-b", "[300.1.1.1]:[5000]"],
])
def test_bad_addresses_exit_65(options, started, capsys):
    assert cli.main(options) == EX_DATAERR
    captured = capsys.readouterr()
    assert options[1] in captured.err and not captured.out
    assert not started


@pytest.mark.parametrize("option", ["-h", "--help"])
def test_help_goes_to_stderr_and_exits_0(option, started, capsys):
    assert cli.main([option]) == EX_OK
    captured = capsys.readouterr()
    assert not captured.out
    for name in ("--keepalive", "--tcp_nodelay", "--foreground", "--pid-file", "--bind-listen",
                 "--bind-outgoing", "--log", "--quiet", "--congestion", "--client-congestion",
                 "--mptcp", "--mptcp-listen", "--keepalive-idle", "--keepalive-interval",
                 "--keepalive-count", "--user-timeout", "--version", "--help"):
        assert name in captured.err, f"{name} missing from --help"
    assert not started


@pytest.mark.parametrize("option", ["-V", "--version"])
def test_version_goes_to_stdout_and_exits_0(option, started, capsys):
    assert cli.main([option]) == EX_OK
    captured = capsys.readouterr()
    assert captured.out.startswith(f"tcp-intercept version {__version__}\n")
    assert not captured.err
    assert not started


def test_a_bad_policy_stops_the_start_with_64_naming_file_rule_and_key(tmp_path, capsys,
                                                                       started):
    path = tmp_path / "policy.toml"
    path.write_text("[[rule]]\nname = 'lte'\n[rule.server_leg]\ncongestion = 'nosuch'\n")
    assert cli.main(["-f", "--policy", str(path)]) == 64
    err = capsys.readouterr().err
    assert f"{path}:1: rule 1 (lte): server_leg.congestion: " in err and "nosuch" in err
    assert started == []
    assert cli.main(["-f", "--policy", "policy.toml"]) == 64  # relative: not after detaching
    assert "--policy: 'policy.toml' is not an absolute path" in capsys.readouterr().err


def test_a_good_policy_goes_to_the_daemon(tmp_path, started):
    path = tmp_path / "policy.toml"
    path.write_text("[[rule]]\ndestination = '192.0.2.0/24'\n")
    assert cli.main(["-f", "--policy", str(path)]) == EX_OK
    assert started[0].policy == str(path)
