"""A slow path to the server (this kernel has no netem): packets toward
SLOW4 wait DELAY seconds in a user-space delay line in the server
namespace, so the router's leg to that address has a round trip of at
least DELAY while the client's leg stays fast.

    router: SLOW4/32 via the server (10.91.2.2)
    server: SLOW4 is a local address (on lo); packets for it arriving on s0
            are routed (policy rule, ahead of the local table) into the TUN
            device dl0; this process reads each one and writes it back into
            dl0 DELAY later, where the kernel receives it and delivers it
            locally (iif dl0: the rule no longer applies). Answers leave on
            s0 at once. dl0's MTU is large: GRO's merged packets pass whole.

Run as `python -m lab.delayline DELAY` inside the server namespace (the
test starts it with Topology.popen and stops it by pid); it prints "ready"
once dl0 is up.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import select
import struct
import subprocess
import sys
import time

SLOW4 = "10.91.4.2"
SLOW_MS = 40  # what the tests delay the server leg by
FAST_MS = 20  # the client's leg stays under this even on a loaded machine
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def setup(topo) -> None:
    """The routes and rules (in the test's own namespaces only)."""
    topo.run(topo.rtr, "ip", "route", "add", f"{SLOW4}/32", "via", topo.SERVER4)
    topo.run(topo.srv, "ip", "addr", "add", f"{SLOW4}/32", "dev", "lo")
    topo.run(topo.srv, "ip", "rule", "add", "pref", "10", "iif", "s0", "to", SLOW4,
             "lookup", "104")
    topo.run(topo.srv, "ip", "rule", "del", "pref", "0", "lookup", "local")
    topo.run(topo.srv, "ip", "rule", "add", "pref", "20", "lookup", "local")
    # Early demux would find the server's socket for a packet arriving on s0
    # and mark it as the socket's, and the forwarding path drops such packets.
    topo.run(topo.srv, "sysctl", "-qw", "net.ipv4.tcp_early_demux=0")


def main(delay: float) -> None:
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", b"dl0", IFF_TUN | IFF_NO_PI))
    for cmd in (["ip", "link", "set", "dl0", "mtu", "65000", "up"],
                ["ip", "route", "add", SLOW4, "dev", "dl0", "table", "104"],
                ["sysctl", "-qw", "net.ipv4.conf.dl0.rp_filter=0"],
                ["sysctl", "-qw", "net.ipv4.conf.dl0.accept_local=1"]):
        subprocess.run(cmd, check=True)
    print("ready", flush=True)
    waiting: list[tuple[float, int, bytes]] = []
    serial = 0
    while True:
        timeout = max(waiting[0][0] - time.monotonic(), 0) if waiting else None
        if select.select([tun], [], [], timeout)[0]:
            serial += 1
            heapq.heappush(waiting, (time.monotonic() + delay, serial, os.read(tun, 65536)))
        while waiting and waiting[0][0] <= time.monotonic():
            os.write(tun, heapq.heappop(waiting)[2])


if __name__ == "__main__":
    main(float(sys.argv[1]))
