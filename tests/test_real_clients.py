"""Real programs through the daemon (-B client): curl against Python's
http.server, and ssh against sshd, over IPv4 and IPv6. The bytes are
checked with hashes, and the servers' own logs must name the client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.peers import payload, sha256

HTTP_PORT, SSH_PORT = 8080, 2222
FAMILIES = ["4", "6"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    (root / "blob").write_bytes(payload(5 << 20, seed=42))
    return root


@pytest.fixture(scope="module")
def http_server(topo, files):
    """python -m http.server on both families (it binds :: dual-stack)."""
    log = files.parent / "http.log"
    with open(log, "wb") as out:
        topo.serve(topo.srv, HTTP_PORT, sys.executable, "-m", "http.server", "--bind", "::",
                   "--directory", str(files), str(HTTP_PORT), stdout=out, stderr=out)
    return log


@pytest.fixture(scope="module")
def sshd(topo, tmp_path_factory):
    """sshd in the server namespace, root login with a key made here."""
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    (d / "sshd_config").write_text(
        f"Port {SSH_PORT}\nListenAddress 0.0.0.0\nListenAddress ::\n"
        f"HostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nLogLevel VERBOSE\n")
    log = d / "sshd.log"
    # sshd needs its privilege separation directory; an empty tmpfs on /run
    # in this process's own mount namespace (ip netns exec makes one) gives
    # it one without touching the machine's /run.
    script = f"mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && " \
             f"exec /usr/sbin/sshd -D -e -f {d / 'sshd_config'}"
    with open(log, "wb") as out:
        topo.serve(topo.srv, SSH_PORT, "sh", "-c", script, stdout=out, stderr=out)
    return d, log


@pytest.fixture(scope="module", params=FAMILIES, ids=[f"ipv{f}" for f in FAMILIES])
def family(request, start_module_daemon):
    v6 = request.param == "6"
    daemon = start_module_daemon("-B", "client", listen="[::]:[5000]" if v6 else None,
                                 name=f"ipv{request.param}")
    yield v6, daemon
    daemon.stop()


def test_curl_downloads_through_the_daemon(topo, http_server, files, family):
    v6, daemon = family
    server, client = (topo.SERVER6, topo.CLIENT6) if v6 else (topo.SERVER4, topo.CLIENT4)
    url = f"http://[{server}]:{HTTP_PORT}/blob" if v6 else f"http://{server}:{HTTP_PORT}/blob"
    out = files.parent / f"downloaded-ipv{6 if v6 else 4}"
    result = topo.run(topo.cli, "curl", "-sS", "--noproxy", "*", "--max-time", "20", "-o", str(out),
                      "-w", "%{http_code} %{local_port}", url)
    status, port = result.stdout.split()
    assert status == "200"
    assert sha256(out.read_bytes()) == sha256((files / "blob").read_bytes())
    conn_id = f"[{client}]:{port}-->[{server}]:{HTTP_PORT}"
    daemon.wait_log(f"{conn_id}: closed")
    access = [line for line in http_server.read_text().splitlines() if "GET /blob" in line]
    # Dual-stack: IPv4 clients appear as ::ffff:a.b.c.d.
    seen = {line.split()[0].removeprefix("::ffff:") for line in access}
    assert client in seen, access


def test_ssh_runs_a_command_and_carries_stdin(topo, sshd, family):
    v6, daemon = family
    d, log = sshd
    server, client = (topo.SERVER6, topo.CLIENT6) if v6 else (topo.SERVER4, topo.CLIENT4)
    data = payload(2 << 20, seed=43)
    result = topo.run(topo.cli, "ssh", "-i", str(d / "user"), "-p", str(SSH_PORT),
                      "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                      "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
                      f"root@{server}", "sha256sum", input=data, text=False, timeout=30)
    assert result.stdout.split()[0].decode() == sha256(data)
    daemon.wait_log(f"-->[{server}]:{SSH_PORT}: closed")
    assert f"Accepted publickey for root from {client} port" in log.read_text()
