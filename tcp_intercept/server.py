"""Wires the parts together and runs the loop: start-up, signals, shutdown.

Start-up follows the original, so its lines and exit codes stay true: log
file, "starting up", the listener (bound before detaching, so "address in
use" reaches the launcher's exit status directly), the outgoing address,
detach, pid file, "Setup done". Shutdown: stop accepting, close every
connection, remove the pid file.
"""

from __future__ import annotations

import resource
import signal
import socket
import sys

from loguru import logger as log

from . import NAME, __version__, sockopts
from .config import Config
from .connection import Context
from .daemon import EX_OSERR, Launch, StartupError, detach, write_pid_file
from .evloop import Loop
from .listener import Listener, open_listener
from .logs import Log
from .pipes import PipePool
from .table import ConnectionTable

# Two descriptors per connection, a few for pipes and the daemon itself.
FEW_DESCRIPTORS = 4096
PIPE_TRIM_INTERVAL = 1.0  # seconds; idle pipes go after one to two of these


def run(config: Config) -> int:
    """The daemon, from parsed options to exit status."""
    logs = Log(config.log_file)
    try:
        logs.open()
    except OSError as err:
        print(f"Can not open log file {config.log_file}: {err.strerror}", file=sys.stderr)
        return EX_OSERR
    log.info("{} version {} starting up", NAME, __version__)
    try:
        listener_sock = _listen(config)
    except StartupError as err:
        return _fatal(logs, err)
    if config.spoof_client:
        log.info("Outgoing connections will connect from original source address")
    else:
        log.info("Outgoing connections will connect from {}", config.outgoing)

    launch = Launch()
    if not config.foreground:
        keep = [listener_sock.fileno()]
        logs.close()  # reopened below: loguru's handles do not survive the fork
        result = detach(keep)
        if isinstance(result, int):
            return result
        launch = result
        logs.open(detached=True)
    try:
        pidfile = write_pid_file(config.pid_file) if config.pid_file else None
    except StartupError as err:
        launch.report(err.status, str(err))
        return _fatal(logs, err)
    _raise_descriptor_limit()
    daemon = Daemon(config, listener_sock, logs)
    launch.report(0)
    log.info("Setup done, starting event loop")
    daemon.run()
    log.info("Exiting cleanly...")
    if pidfile is not None:
        pidfile.release()
    logs.close()
    return 0


def _listen(config: Config) -> socket.socket:
    options = sockopts.tcp_options(config, config.client_congestion)
    try:
        sock = open_listener(config.listen, options, mptcp=config.mptcp_listen,
                             share_port=config.spoof_client)
    except sockopts.CapabilityError as err:
        raise StartupError(str(err)) from None
    except OSError as err:
        raise StartupError(f"Can not listen on {config.listen}: {err.strerror}") from None
    log.info("Listening on {}", config.listen)
    return sock


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


class Daemon:
    """The running daemon: loop, listener, connections, signal watchers."""

    def __init__(self, config: Config, listener_sock: socket.socket, logs: Log):
        self.logs = logs
        self.loop = Loop(on_error=self._on_error)
        self.pool = PipePool()
        self.table = ConnectionTable()
        self.ctx = Context(loop=self.loop, pool=self.pool, table=self.table,
                           log=None if config.quiet else logs,
                           **_outgoing(config))
        self.listener = Listener(listener_sock, config.listen, self.ctx)
        self.trim = self.loop.timer(PIPE_TRIM_INTERVAL, PIPE_TRIM_INTERVAL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # EPIPE is handled per send
        self.signals = []
        for signum, handler in ((signal.SIGINT, self._on_exit_signal),
                                (signal.SIGTERM, self._on_exit_signal),
                                (signal.SIGHUP, self._on_hup)):
            watcher = self.loop.signal(signum)
            watcher.start(handler, signum)
            self.signals.append(watcher)

    def run(self) -> None:
        self.listener.start()
        self.trim.start(self.pool.trim)
        self.logs.attach(self.loop)
        self.loop.run()
        self._close()

    # SIGINT, SIGTERM: leave the loop; _close() does the rest in order.
    def _on_exit_signal(self, signum: int) -> None:
        log.info("Received {}, exiting", signal.Signals(signum).name)
        self.loop.stop()

    # SIGHUP: logrotate moved the log file away.
    def _on_hup(self, signum: int) -> None:
        self.logs.reopen()

    def _on_error(self, context, err: BaseException) -> None:
        log.opt(exception=err).error("Unexpected error in {}", context)

    def _close(self) -> None:
        """Stop accepting, then close every connection, then the loop."""
        self.listener.close()
        for connection in self.table.connections():
            connection.close()
        for watcher in (*self.signals, self.trim):
            watcher.stop()
            watcher.close()
        self.pool.close()
        self.logs.detach()
        self.loop.destroy()


def _outgoing(config: Config) -> dict:
    """How Connection makes its socket to the original destination."""
    out = {"server_options": sockopts.tcp_options(config, config.congestion),
           "server_proto": sockopts.IPPROTO_MPTCP if config.mptcp else socket.IPPROTO_TCP,
           "spoof_client": config.spoof_client,
           "listen_port": config.listen.port}
    addr = config.outgoing
    if addr is not None and not (addr.is_wildcard and addr.port == 0):
        out.update(bind_address=addr.sockaddr, bind_family=addr.family,
                   bind_no_port=addr.port == 0)
    return out

