"""Least privilege: once everything that needs root is done (listening
sockets bound with IP_TRANSPARENT, log and pid file open, control socket
made), the master switches to --user / --group and keeps only the
capabilities the daemon still needs; the workers it forks, and the program
an upgrade execs, inherit exactly that.

What needs a capability after start-up:
  CAP_NET_ADMIN         IP_TRANSPARENT on each outgoing socket (-B client);
                        a congestion control (-C) the kernel does not allow
                        unprivileged sockets to choose
                        (net.ipv4.tcp_allowed_congestion_control)
  CAP_NET_BIND_SERVICE  an outgoing address with a port below 1024 (-B)
Nothing else: the listening sockets are bound already, and an upgrade
inherits them. The kept capabilities are effective, permitted, inheritable
and ambient (so that they survive the upgrade's exec); every other one
leaves the bounding set too, and no_new_privs is set. The process stays
dumpable (setuid() would clear that), so the master, of the same user, can
read its workers' /proc entries for show info and the metrics.

Run as root without --user, the daemon keeps root (the original's
behaviour). Started by another user (systemd's User= with
AmbientCapabilities=), it still drops the capabilities it does not need.

libcap (libcap.so.2, part of every Debian system) does the work, through
ctypes and its text form of capability sets: no kernel structure is
written here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import pwd
from dataclasses import dataclass

from .config import Config
from .errors import PrivilegeError

ALLOWED_CONGESTION = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CAP_SET = 1
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_BIND_SERVICE": 10}


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    group: str
    groups: tuple[int, ...]


def identity(user: str, group: str | None = None) -> Identity:
    """The user (and group) by name or number; KeyError naming what is unknown."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise KeyError(f"no such user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except KeyError:
            raise KeyError(f"no such group {group!r}") from None
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid)) | {gid}))
    return Identity(entry.pw_name, entry.pw_uid, gid, group_name, groups)


def needed(config: Config, policy=None) -> list[str]:
    """The capabilities the daemon still needs once it runs (with policy,
    a policy.Policy: for its rules as well)."""
    caps = []
    congestions = [config.congestion, *(policy.congestions() if policy else ())]
    if config.spoof_client or (policy is not None and policy.needs_net_admin) or \
            any(name and not _allowed(name) for name in congestions):
        caps.append("CAP_NET_ADMIN")
    ports = [config.outgoing.port if config.outgoing is not None else 0,
             *(policy.bind_ports() if policy else ())]
    if any(0 < port < 1024 for port in ports):
        caps.append("CAP_NET_BIND_SERVICE")
    return caps


def _allowed(congestion: str) -> bool:
    try:
        with open(ALLOWED_CONGESTION) as f:
            return congestion in f.read().split()
    except OSError:
        return False


def drop(who: Identity | None, keep: list[str]) -> str | None:
    """Become who (if given) with only the capabilities in keep; what was
    done, for the log, or None when running as root without --user (nothing
    is dropped). PrivilegeError if the kernel refuses."""
    if who is None and os.geteuid() == 0:
        return None
    lib = _libcap()
    if who is not None and (os.getuid(), os.getgid()) != (who.uid, who.gid):
        if os.geteuid() != 0:
            raise PrivilegeError(f"can not switch to user {who.user}: not running as root")
        _bound(lib, keep)
        groups = (ctypes.c_uint * len(who.groups))(*who.groups)
        _call(lib.cap_setgroups(who.gid, len(who.groups), groups), f"group {who.group}")
        _call(lib.cap_setuid(who.uid), f"user {who.user}")
    text = (",".join(keep).lower() + "=eip") if keep else "="
    caps = lib.cap_from_text(text.encode())
    if not caps:
        raise PrivilegeError(f"libcap does not know {text!r}")
    try:
        _call(lib.cap_set_proc(caps), f"capabilities {text}")
    finally:
        lib.cap_free(caps)
    _call(lib.cap_reset_ambient(), "the ambient capabilities")
    for name in keep:  # ambient: kept across the exec of an upgrade
        _call(lib.cap_set_ambient(CAPABILITIES[name], CAP_SET), f"ambient {name}")
    libc = ctypes.CDLL(None, use_errno=True)
    _call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # setuid() made us undumpable: /proc/PID/fd of the workers would be
    # root's, and the master could not count their descriptors.
    _call(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    return (f"Running as user {user} (uid {os.getuid()}), group {group} (gid {os.getgid()}); "
            f"capabilities kept: {', '.join(keep) or 'none'}")


def _bound(lib, keep: list[str]) -> None:
    """Take every capability but keep out of the bounding set (needs root)."""
    kept = {CAPABILITIES[name] for name in keep}
    for cap in range(lib.cap_max_bits()):
        if cap not in kept:
            _call(lib.cap_drop_bound(cap), f"capability {cap} from the bounding set")


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"can not set {what}: {os.strerror(err)}")


_LIB = None


def _libcap():
    global _LIB
    if _LIB is None:
        name = ctypes.util.find_library("cap") or "libcap.so.2"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as err:
            raise PrivilegeError(f"libcap is missing ({err})") from None
        lib.cap_from_text.restype = ctypes.c_void_p
        lib.cap_from_text.argtypes = [ctypes.c_char_p]
        lib.cap_set_proc.argtypes = [ctypes.c_void_p]
        lib.cap_free.argtypes = [ctypes.c_void_p]
        lib.cap_setgroups.argtypes = [ctypes.c_uint, ctypes.c_size_t,
                                      ctypes.POINTER(ctypes.c_uint)]
        lib.cap_setuid.argtypes = [ctypes.c_uint]
        lib.cap_set_ambient.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.cap_drop_bound.argtypes = [ctypes.c_int]
        _LIB = lib
    return _LIB
