"""One descriptor held back for the moment the others run out.

Each connection needs two descriptors: the one accept() returns, then the
socket to the server. When accept() takes the last one, the server socket
cannot be made, and without a reserve every client waiting in the backlog
would be accepted and reset in turn. With it, that connection closes the
reserve and uses its number; the next accept() then fails with EMFILE, and
the listener pauses (listener.py) until descriptors are free again and the
reserve is back.
"""

from __future__ import annotations

import os


class Reserve:
    __slots__ = ("fd",)

    def __init__(self):
        self.fd: int | None = None
        self.restore()

    def release(self) -> bool:
        """Give the reserved descriptor up; False if it was already gone."""
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def restore(self) -> bool:
        """Hold a descriptor again; False while there is none to take."""
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def close(self) -> None:
        self.release()
