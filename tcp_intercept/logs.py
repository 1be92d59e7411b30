"""Logging through loguru: stderr, a log file (reopened on SIGHUP), or syslog.

The log lines themselves are the original's: operators grep them.
"""

from __future__ import annotations

import logging.handlers
import os
import sys

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level}: {message}"


class Log:
    """Where the log goes. `path` None: stderr in the foreground, syslog
    once detached (stderr is /dev/null then)."""

    def __init__(self, path: str | None):
        self.path = os.path.abspath(path) if path else None
        self._sink_id: int | None = None
        self._file = None
        logger.remove()

    def to_stderr(self) -> None:
        """Before detaching, and for good in the foreground without -l."""
        self._replace(sys.stderr)

    def open(self, detached: bool = False) -> None:
        """The log file if there is one; else stderr, or syslog once detached."""
        if self.path:
            # Opened here, not by loguru, so that a failure is an OSError
            # the caller reports, and the file is appended to as the
            # original did.
            new = open(self.path, "a", buffering=1, encoding="utf-8")
            self._replace(new)
            self._file = new
        elif detached:
            self._replace(_syslog())
        else:
            self.to_stderr()

    def reopen(self) -> None:
        """SIGHUP: logrotate moved the file away; start a new one."""
        if not self.path:
            return
        logger.info("Received SIGHUP, closing this logfile")
        self.open()
        logger.info("Received SIGHUP, (re)opening this logfile")

    def close(self) -> None:
        if self._sink_id is not None:
            logger.remove(self._sink_id)
            self._sink_id = None
        if self._file is not None:
            self._file.close()  # loguru leaves streams it did not open
            self._file = None

    def fileno(self) -> int | None:
        return self._file.fileno() if self._file is not None else None

    def _replace(self, sink) -> None:
        self.close()
        if sink is None:
            return
        options = {"level": "INFO", "format": FORMAT, "backtrace": False,
                   "diagnose": False, "colorize": False}
        if isinstance(sink, logging.Handler):
            options["format"] = "{message}"
        self._sink_id = logger.add(sink, **options)


def _syslog() -> logging.Handler | None:
    if not os.path.exists("/dev/log"):
        return None
    handler = logging.handlers.SysLogHandler(
        "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    handler.ident = "tcp-intercept: "
    return handler
