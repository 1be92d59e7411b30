"""tcp-intercept with bugs planted, for tests/test_faults.py and
tests/test_fail_open.py.

A relay that reads a chunk starting with BOOM raises RuntimeError, as a bug
in the daemon's own code would: the daemon must close that connection only,
log the traceback, and go on serving the others. One that reads a chunk
starting with SPIN loops forever, as a worker stuck in a tight loop: its
master must notice, kill it and start another.
"""

import sys

from tcp_intercept import cli, relay

TRIGGER = b"BOOM"
SPIN = b"SPIN"
_send = relay.Relay._send


def _send_or_fail(self: relay.Relay, n: int) -> None:
    if relay._view[:len(TRIGGER)] == TRIGGER:
        raise RuntimeError("planted bug")
    if relay._view[:len(SPIN)] == SPIN:
        while True:
            pass
    _send(self, n)


relay.Relay._send = _send_or_fail
sys.exit(cli.main())
