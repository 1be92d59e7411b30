"""contrib/grafana/tcp-intercept.json against a real Prometheus (Debian's
`prometheus`, installed by scripts/setup.sh): it scrapes a relaying daemon
every second, in the router namespace, and every query of every panel of
the dashboard must return data through Prometheus' HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from lab.intercept import REPO
from lab.peers import ECHO, REFUSED, exchange, payload, sha256
from lab.netns import terminate
from lab.topology import inside, wait_for

DASHBOARD = REPO / "contrib" / "grafana" / "tcp-intercept.json"
METRICS = "127.0.0.1:9109"
PROMETHEUS = "127.0.0.1:9190"
# Grafana's variables, as an operator's choice would fill them in.
VARIABLES = {"$job": ".*"}


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((panel["title"], expr))
    return found


def query(topo, expr: str) -> list:
    """Prometheus' answer to an instant query (in the router namespace)."""
    url = f"http://{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with inside(topo.rtr), urllib.request.urlopen(url, timeout=10) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(topo, tmp_path):
    """Prometheus in the router namespace, scraping the daemon every second."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: scripts/setup.sh installs it", pytrace=False)
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      "scrape_configs:\n  - job_name: tcp-intercept\n"
                      f"    static_configs:\n      - targets: ['{METRICS}']\n")
    with open(tmp_path / "prometheus.log", "w") as output:
        proc = topo.popen(topo.rtr, "prometheus", f"--config.file={config}",
                          f"--storage.tsdb.path={tmp_path / 'data'}",
                          f"--web.listen-address={PROMETHEUS}", stdout=subprocess.DEVNULL,
                          stderr=output)
    yield proc
    terminate(proc)


def test_every_panel_of_the_dashboard_returns_data(topo, peers, start_daemon, prometheus):
    start_daemon("-w", "2", "--leg-stats", "--metrics", f"[{METRICS.replace(':', ']:[')}]")

    def scraped() -> bool:
        try:
            return any(r["value"][1] == "1" for r in query(topo, "up"))
        except OSError:
            return False
    wait_for(scraped, 20, "Prometheus to scrape the daemon")
    # Traffic over a few seconds of scrapes: each rate() sees a change.
    for n in range(6):
        data = payload(20_000, seed=n)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
        with pytest.raises(ConnectionResetError), topo.connect(topo.cli, topo.SERVER4,
                                                                 REFUSED) as sock:
            sock.recv(1)
        time.sleep(0.5)
    time.sleep(2)  # two more scrapes after the last close
    empty, routers = [], 0
    for title, expr in queries():
        result = query(topo, expr)
        values = [float(r["value"][1]) for r in result]
        if not values or all(v != v for v in values):  # none, or only NaN
            empty.append(f"{title}: {expr}")
        if "by (instance)" in expr:  # several routers side by side: one series each
            routers += 1
            assert [r["metric"] for r in result] == [{"instance": METRICS}], (title, result)
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert len(queries()) >= 16 and routers >= 3
