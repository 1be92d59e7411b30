#!/usr/bin/env python3
"""tcp-intercept, shown end to end on this machine in a few seconds.

Builds client / router / server network namespaces, installs the TPROXY
rules in the router, runs tcp-interceptd there in the foreground with
``-B client``, two workers and a control socket, sends a curl request and a
Python transfer from the client to servers in the server namespace, shows
what the servers saw, what the daemon's control socket says while a
connection is open, and what the daemon logged, and removes everything
again. Needs root; touches nothing
outside the namespaces it creates.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.peers import ECHO, PeerServer, exchange, payload, sha256  # noqa: E402
from lab.topology import TPROXY_SH, Daemon, Topology  # noqa: E402

TIME_LIMIT = 30  # seconds for the whole demo, teardown included
HTTP_PORT = 8080
GREETING = "Hello from the server namespace!\n"


def say(text: str = "") -> None:
    print(text, flush=True)


def show_topology(topo: Topology) -> None:
    say("1. Three network namespaces, joined by veth pairs:")
    say(f"     client  {topo.cli}   {topo.CLIENT4:<10}  {topo.CLIENT6}")
    say(f"     router  {topo.rtr}   {topo.ROUTER4_C:<10}  {topo.ROUTER6_C}   (client side)")
    say(f"                            {topo.ROUTER4_S:<10}  {topo.ROUTER6_S}   (server side)")
    say(f"     server  {topo.srv}   {topo.SERVER4:<10}  {topo.SERVER6}")
    say("   The client and the server route through the router, which forwards.")
    say("   Its interception rules (every forwarded TCP connection goes to port "
        f"{topo.port}):")
    if TPROXY_SH.exists():
        say(f"   (installed with: ip netns exec {topo.rtr} contrib/tproxy.sh up)")
        rules = topo.run(topo.rtr, str(TPROXY_SH), "status").stdout.splitlines()
    else:
        rules = [f"iptables -t mangle {line}" for line in
                 topo.run(topo.rtr, "iptables-save", "-t", "mangle").stdout.splitlines()
                 if line.startswith("-A")]
        rules += [f"ip rule: {line.split(':', 1)[1].strip()}" for line in
                  topo.run(topo.rtr, "ip", "rule").stdout.splitlines() if "fwmark" in line]
        rules.append("(and the same for IPv6, with ip6tables and ip -6 rule)")
    for line in rules:
        say(f"     {line}")
    say()


def curl(topo: Topology, workdir: Path) -> None:
    (workdir / "www").mkdir()
    (workdir / "www" / "hello.txt").write_text(GREETING)
    access_log = workdir / "http.log"
    with open(access_log, "wb") as out:
        topo.serve(topo.srv, HTTP_PORT, sys.executable, "-m", "http.server", "--bind",
                   topo.SERVER4, "--directory", str(workdir / "www"), str(HTTP_PORT),
                   stdout=out, stderr=out)
    url = f"http://{topo.SERVER4}:{HTTP_PORT}/hello.txt"
    say(f"3. curl {url}   (run in the client namespace)")
    result = topo.run(topo.cli, "curl", "-sS", "--noproxy", "*", "--max-time", "10", url)
    say(f"   curl printed: {result.stdout.strip()!r}")
    for line in access_log.read_text().splitlines():
        if "GET /hello.txt" in line:
            say(f"   the web server logged: {line}")
    say(f"   -> the server saw the client's own address {topo.CLIENT4}, not the router's.")
    say()


def transfer(topo: Topology) -> None:
    data = payload(10 << 20, seed=1)
    say(f"4. A Python client sends 10 MiB to an echo server at {topo.SERVER4}:{ECHO} "
        "and reads it back")
    with PeerServer(topo, {"echo": ECHO}) as server:
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            client = sock.getsockname()
            started = time.monotonic()
            size, digest, _ = exchange(sock, data)
            took = time.monotonic() - started
        [record] = server.wait_records(sha256=sha256(data))
    say(f"   sent      {len(data):>9} bytes  sha256 {sha256(data)[:16]}...")
    say(f"   received  {size:>9} bytes  sha256 {digest[:16]}...  "
        f"({'identical' if digest == sha256(data) else 'DIFFERENT'}, {took:.2f} s)")
    say(f"   the echo server got {record.received} bytes from [{record.peer[0]}]:{record.peer[1]};"
        f" the client was [{client[0]}]:{client[1]}")
    say()


def inside_view(topo: Topology, daemon: Daemon) -> None:
    say("5. A connection held open, and what the daemon says about it:")
    with PeerServer(topo, {"echo": ECHO}), topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"still here")
        sock.recv(10)
        for command in ("show conns", "show info"):
            say(f"   $ tcp-intercept-ctl -s {daemon.control_path} {command}")
            lines = daemon.ask(command).splitlines()
            if command == "show info":
                lines = [line for line in lines if line.split(":")[0] in INFO_SHOWN]
            for line in lines:
                say(f"     {line}")
    say()


INFO_SHOWN = ("Version", "Pid", "Workers", "Connections_open", "Connections_accepted",
              "Closed_clean", "Bytes_c2s", "Bytes_s2c", "Process")


def main() -> int:
    if os.geteuid() != 0:
        say("demo.py: run as root: it creates network namespaces and TPROXY rules")
        return 1

    def out_of_time(*_):
        raise TimeoutError(f"the demo took longer than {TIME_LIMIT} s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(TIME_LIMIT)
    started = time.monotonic()
    say("tcp-intercept demo: a transparent TCP proxy between a client and a server\n")
    with tempfile.TemporaryDirectory(prefix="ti-demo-") as tmp, Topology() as topo:
        workdir = Path(tmp)
        show_topology(topo)
        daemon = Daemon(topo, "-B", "client", "-w", "2", workdir=workdir, control=True)
        say(f"2. In the router: {' '.join(['tcp-interceptd', *daemon.args])}")
        daemon.start()
        say(f"   the master is pid {daemon.pid}, its workers {daemon.workers()}; "
            f"listening on port {daemon.port}")
        say()
        curl(topo, workdir)
        transfer(topo)
        inside_view(topo, daemon)
        status = daemon.stop()
        say(f"6. SIGTERM: the daemon exited with status {status}. Everything it logged:")
        for line in daemon.output().splitlines():
            say(f"     {line}")
        say()
        say("7. Removing the namespaces (and with them every rule and address).")
    signal.alarm(0)
    say(f"Done in {time.monotonic() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
