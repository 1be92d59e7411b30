"""Start-up: from parsed options to a running master, and the exit status.

Start-up follows the original, so its lines and exit codes stay true: log
file, "starting up", the listening sockets (bound before detaching, so
"address in use" reaches the launcher's exit status directly), the control
socket and the metrics endpoint likewise, the outgoing address, detach, pid
file; then the master starts the workers, and once every one serves: the
launcher's report and "Setup done". Shutdown is the master's (master.py):
the workers close their connections; then the control socket and the pid
file go.
"""

from __future__ import annotations

import resource
import signal
import socket
import sys
from dataclasses import dataclass, field

from loguru import logger as log

from . import NAME, __version__, sockopts
from .config import Config
from .control import open_control_socket, remove_control_socket, socket_file_id
from .counters import Board
from .daemon import EX_OSERR, Launch, StartupError, detach, write_pid_file
from .listener import open_listeners
from .logs import Log
from .master import Master
from .steering import steer_by_client

# Two descriptors per connection, a few for pipes and the daemon itself.
FEW_DESCRIPTORS = 4096


@dataclass
class Sockets:
    """Every socket the master holds: made before detaching, kept for life."""
    listeners: list[socket.socket] = field(default_factory=list)
    control: socket.socket | None = None
    control_path: str | None = None
    control_file: tuple[int, int] | None = None
    metrics: socket.socket | None = None

    def all(self) -> list[socket.socket]:
        return [s for s in (*self.listeners, self.control, self.metrics) if s is not None]

    def close(self) -> None:
        if self.control is not None:
            remove_control_socket(self.control_path, self.control_file)
        for sock in self.all():
            sock.close()


def run(config: Config) -> int:
    """The daemon, from parsed options to exit status."""
    logs = Log(config.log_file)
    try:
        logs.open()
    except OSError as err:
        print(f"Can not open log file {config.log_file}: {err.strerror}", file=sys.stderr)
        return EX_OSERR
    log.info("{} version {} starting up", NAME, __version__)
    sockets = Sockets()
    try:
        _open_sockets(config, sockets)
    except StartupError as err:
        sockets.close()
        return _fatal(logs, err)
    if config.spoof_client:
        log.info("Outgoing connections will connect from original source address")
    else:
        log.info("Outgoing connections will connect from {}", config.outgoing)
    launch = Launch()
    if not config.foreground:
        logs.close()  # reopened below: python-daemon closes what it does not know
        result = detach([sock.fileno() for sock in sockets.all()])
        if isinstance(result, int):
            return result
        launch = result
        logs.open(detached=True)
    try:
        pidfile = write_pid_file(config.pid_file) if config.pid_file else None
    except StartupError as err:
        launch.report(err.status, str(err))
        sockets.close()
        return _fatal(logs, err)
    status = _serve(config, sockets, logs, launch)
    log.info("Exiting cleanly...")
    sockets.close()
    if pidfile is not None:
        pidfile.release()
    logs.close()
    return status


def _serve(config: Config, sockets: Sockets, logs: Log, launch: Launch) -> int:
    """The master, until it stops; the exit status."""
    _raise_descriptor_limit()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # EPIPE is handled per send
    # A slot per worker, and room for the workers of an upgrade (old and new).
    board = Board(slots=4 * config.workers + 8)
    master = Master(config, sockets.listeners, logs, board, control_sock=sockets.control,
                    metrics_sock=sockets.metrics)
    outcome = []

    def ready(status: int, message: str) -> None:
        outcome.append(status)
        launch.report(status, message)
        if status == 0:
            log.info("Setup done, starting event loop")
        else:
            log.error("{}", message)

    master.run(ready)
    board.close()
    return outcome[0] if outcome else EX_OSERR


def _open_sockets(config: Config, sockets: Sockets) -> None:
    """The listeners, the control socket and the metrics endpoint, into sockets."""
    options = sockopts.tcp_options(config, config.client_congestion)
    try:
        sockets.listeners = open_listeners(config.listen, options, config.workers,
                                           mptcp=config.mptcp_listen)
        if config.max_per_client and config.workers > 1:
            steer_by_client(sockets.listeners)
    except sockopts.CapabilityError as err:
        raise StartupError(str(err)) from None
    except OSError as err:
        raise StartupError(f"Can not listen on {config.listen}: {err.strerror}") from None
    log.info("Listening on {}", config.listen)
    if config.control:
        sockets.control = open_control_socket(config.control)
        sockets.control_path = config.control
        sockets.control_file = socket_file_id(config.control)
    if config.metrics:
        from .metrics import open_metrics_socket  # prometheus_client: only when asked for
        sockets.metrics = open_metrics_socket(config.metrics)
        log.info("Serving metrics on http://{}/metrics", config.metrics)


def _fatal(logs: Log, err: StartupError) -> int:
    log.error("{}", err)
    if logs.path:  # the operator at the terminal must see it too
        print(err, flush=True, file=sys.stderr)
    return err.status


def _raise_descriptor_limit() -> None:
    """Two descriptors per connection: take all the kernel allows us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < FEW_DESCRIPTORS:
        log.warning("The open-file limit is {} (hard): at most about {} "
                    "connections at once; raise it (ulimit -Hn, LimitNOFILE=)",
                    hard, (hard - 8) // 2)
