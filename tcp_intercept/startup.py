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

import os
import resource
import signal
import sys

from loguru import logger as log

from daemon.pidfile import TimeoutPIDLockFile
from . import NAME, __version__, handover, privileges
from .config import Config
from .control import open_control_socket, socket_file_id
from .counters import Board
from .detach import Launch, detach, notify, write_pid_file
from .errors import EX_OSERR, CapabilityError, PrivilegeError, StartupError
from .listener import open_listeners
from .logs import Log
from .policy import Policy, counts_clients
from .recipe import listener_options
from .master import Master, Sockets
from .steering import steer_by_client

# Two descriptors per connection, a few for pipes and the daemon itself.
FEW_DESCRIPTORS = 4096


def run(config: Config, command: list[str], policy: Policy | None = None) -> int:
    """The daemon, from parsed options to exit status. command: how this
    process was started, to exec again for an upgrade (handover.py)."""
    taken = handover.take()
    logs = Log(config.log_file)
    try:
        logs.open(detached=taken is not None and not config.foreground)
    except OSError as err:
        print(f"Can not open log file {config.log_file}: {err.strerror}", file=sys.stderr)
        return EX_OSERR
    if taken is not None:
        return _take_over(config, command, taken, logs, policy)
    log.info("{} version {} starting up", NAME, __version__)
    sockets = Sockets()
    try:
        _open_sockets(config, sockets, policy)
    except StartupError as err:
        sockets.close()
        return _fatal(logs, err)
    _say_outgoing(config, policy)
    launch = Launch()
    if not config.foreground:
        logs.close()  # reopened below: python-daemon closes what it does not know
        result = detach([sock.fileno() for sock in sockets.all()])
        if isinstance(result, int):
            return result
        launch = result
        logs.open(detached=True)
    try:
        pidfile = _settle(config, logs, policy)
    except StartupError as err:
        launch.report(err.status, str(err))
        sockets.close()
        return _fatal(logs, err)
    # A slot per worker, and room for the workers of upgrades (old and new).
    board = Board(slots=4 * config.workers + 8)
    master = Master(config, sockets, logs, board, command, policy=policy)

    def ready(status: int, message: str) -> None:
        launch.report(status, message)
        if status == 0:
            log.info("Setup done, starting event loop")
            notify("READY=1")
        else:
            log.error("{}", message)

    return _serve(master, ready, pidfile)


def _say_outgoing(config: Config, policy: Policy | None) -> None:
    if config.spoof_client:
        log.info("Outgoing connections will connect from original source address")
    else:
        log.info("Outgoing connections will connect from {}", config.outgoing)
    if policy is not None:
        log.info("Policy {}: {} rule(s)", policy.path, len(policy.rules))


def _take_over(config: Config, command: list[str], taken: handover.Handover,
               logs: Log, policy: Policy | None) -> int:
    """Started by an upgrade: adopt what the old program handed over."""
    log.info("{} version {} taking over from version {} (pid {} stays)", NAME, __version__,
             taken.version, os.getpid())
    sockets = Sockets(listeners=[handover.adopt(fd) for fd in taken.listeners],
                      control=None if taken.control is None else handover.adopt(taken.control),
                      control_path=taken.control_path,
                      control_file=tuple(taken.control_file) if taken.control_file else None,
                      metrics=None if taken.metrics is None else handover.adopt(taken.metrics))
    try:
        _drop_privileges(config, logs, policy)  # already done: keeps no more than before
    except StartupError as err:
        log.error("{}", err)  # nothing better to do than go on as we are
    master = Master(config, sockets, logs, Board(fd=taken.board), command, taken, policy)
    # The pid file holds our pid already; it goes at exit as before.
    pidfile = TimeoutPIDLockFile(config.pid_file) if config.pid_file else None
    return _serve(master, lambda status, message: None, pidfile)


def _serve(master: Master, ready, pidfile) -> int:
    """The master, until it stops; then everything it held goes. The exit status."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # EPIPE is handled per send
    outcome = []

    def on_ready(status: int, message: str) -> None:
        outcome.append(status)
        ready(status, message)

    master.run(on_ready)
    log.info("Exiting cleanly...")
    master.sockets.close()
    master.board.close()
    master.histograms.close()
    if pidfile is not None and pidfile.is_locked() and pidfile.i_am_locking():
        try:
            pidfile.release()
        except Exception as err:  # lockfile's own errors too; its directory is not ours?
            log.warning("Can not remove the pid file {}: {}", pidfile.path, err)
    master.logs.close()
    return outcome[0] if outcome else EX_OSERR

def _settle(config: Config, logs: Log, policy: Policy | None) -> TimeoutPIDLockFile | None:
    """Detached: the pid file, the descriptor limit, then privileges dropped."""
    pidfile = write_pid_file(config.pid_file) if config.pid_file else None
    _raise_descriptor_limit()
    try:
        _drop_privileges(config, logs, policy)
    except StartupError:
        if pidfile is not None:
            pidfile.release()
        raise
    return pidfile


def _drop_privileges(config: Config, logs: Log, policy: Policy | None) -> None:
    """Become --user with only the capabilities still needed (privileges.py)."""
    who = privileges.identity(config.user, config.group) if config.user else None
    if who is not None and os.geteuid() == 0 and logs.path:
        _give_log_file(logs, who)
    try:
        said = privileges.drop(who, privileges.needed(config, policy))
    except PrivilegeError as err:
        raise StartupError(str(err)) from None
    if said:
        log.info("{}", said)


def _give_log_file(logs: Log, who: privileges.Identity) -> None:
    """The user must be able to reopen the log file on SIGHUP: one it cannot
    write is given to it (as nginx does with its logs)."""
    found = os.fstat(logs.fileno())
    if found.st_uid != who.uid and not (found.st_gid in who.groups and found.st_mode & 0o020):
        os.fchown(logs.fileno(), who.uid, -1)
        log.info("The log file {} now belongs to user {}", logs.path, who.user)


def _open_sockets(config: Config, sockets: Sockets, policy: Policy | None) -> None:
    """The listeners, the control socket and the metrics endpoint, into sockets."""
    options = listener_options(config)
    try:
        sockets.listeners = open_listeners(config.listen, options, config.workers,
                                           mptcp=config.mptcp_listen)
        # Counted per client: one worker must see all of a client's connections.
        if counts_clients(config, policy) and config.workers > 1:
            steer_by_client(sockets.listeners)
    except CapabilityError as err:
        raise StartupError(str(err)) from None
    except OSError as err:
        raise StartupError(f"Can not listen on {config.listen}: {err.strerror}") from None
    log.info("Listening on {}", config.listen)
    if config.control or config.metrics:
        # Now, as root and from the files that started us: not at the first
        # scrape, after privileges are dropped (the user may not read the
        # library's directory) or an upgrade of the package replaced them.
        from . import metrics  # noqa: F401
    if config.control:
        owner = None
        if config.user and os.geteuid() == 0:
            who = privileges.identity(config.user, config.group)
            owner = (who.uid, who.gid)
        sockets.control = open_control_socket(config.control, owner)
        sockets.control_path = config.control
        sockets.control_file = socket_file_id(config.control)
    if config.metrics:
        from .metrics import open_metrics_socket
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
