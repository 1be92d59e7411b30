"""Config declares its options once: the parser, --help and describe() are
made from the declarations, so what describe() says parses back to the same
Config."""

from __future__ import annotations

import dataclasses

import pytest

from tcp_intercept import cli
from tcp_intercept.config import FIELDS, Config



def test_every_field_is_set_by_an_option_listed_in_help():
    assert [name for name, _, _ in FIELDS] == [f.name for f in dataclasses.fields(Config)]
    text = cli.usage("tcp-interceptd")
    for _, options, _ in FIELDS:
        for option in options:
            assert f"  {' '.join(option.flags)}" in text


@pytest.mark.parametrize("argv", [
    [],
    ["-k", "-n", "-q", "-B", "client", "-C", "cubic", "-w", "3", "--max-connections", "9",
     "--idle-timeout", "2.5", "--control", "/run/x.sock", "--metrics", "[127.0.0.1]:[9105]"],
    ["--keepalive-idle", "30", "-b", "[::1]:[7000]", "-B", "[10.0.0.1]:[0]",
     "--user-timeout", "0.5", "--drain-timeout", "4", "--max-per-client", "2",
     "--connect-timeout", "1", "-p", "/run/t.pid", "-l", "/var/log/t.log", "-f"],
])
def test_describe_parses_back_to_the_same_config(argv):
    config = cli.parse_args(argv)
    assert cli.parse_args(config.describe().split()) == config
