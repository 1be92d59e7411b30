"""Every error the daemon raises on purpose, and the exit codes they become.

The exit codes are the original's (sysexits.h): 64 for a bad command line,
65 for an address that cannot be used, 71 for an operating-system failure.
Any module may import this one; it imports nothing of the package. Code
below the command line raises; only cli.py (and ctl.py for the client)
turns an error into a message and a status.
"""

from __future__ import annotations

EX_OK = 0
EX_FAILED = 1  # tcp-intercept-ctl: the daemon did not answer, or answered ERROR
EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70  # a worker that failed with an unexpected exception
EX_OSERR = 71


class UsageError(ValueError):
    """A command line that cannot be used (exit status 64)."""

    status = EX_USAGE

    def __init__(self, message: str, show_usage: bool = False):
        super().__init__(message)
        self.show_usage = show_usage


class PolicyError(UsageError):
    """A policy file that cannot be used (exit status 64 at start-up; on a
    reload the old policy stays)."""


class AddressError(ValueError):
    """An address that cannot be parsed, resolved or used (exit status 65)."""

    status = EX_DATAERR


class StartupError(Exception):
    """Start-up failed: the message for the operator, and the exit status."""

    def __init__(self, message: str, status: int = EX_OSERR):
        super().__init__(message)
        self.status = status


class CapabilityError(PermissionError):
    """IP_TRANSPARENT refused: the daemon lacks CAP_NET_ADMIN."""


class PrivilegeError(Exception):
    """Switching user or capabilities failed."""


class Exit(Exception):
    """Leave main() at once with this status (after --help or --version)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status
