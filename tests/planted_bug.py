"""tcp-intercept with one bug planted, for tests/test_faults.py.

A relay that reads a chunk starting with BOOM raises RuntimeError, as a bug
in the daemon's own code would: the daemon must close that connection only,
log the traceback, and go on serving the others.
"""

import sys

from tcp_intercept import cli, relay

TRIGGER = b"BOOM"
_send = relay.Relay._send


def _send_or_fail(self: relay.Relay, n: int) -> None:
    if relay._view[:len(TRIGGER)] == TRIGGER:
        raise RuntimeError("planted bug")
    _send(self, n)


relay.Relay._send = _send_or_fail
sys.exit(cli.main())
