#!/bin/bash
# Installs what the demo, the tests and the bench need, on Debian, as root:
# the system tools (apt) and a virtualenv in .venv with tcp-intercept in it.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (namespaces, TPROXY)" >&2; exit 1; }

# bird2: BFD and ECMP routes for the multi-router tests (contrib/multi-router).
# Its package enables bird.service with Debian's default configuration,
# which exports no route; the tests run BIRD of their own in namespaces.
PACKAGES="iproute2 iptables nftables ipset tcpdump iperf3 curl openssh-client openssh-server
          procps kmod groff-base man-db python3 python3-venv python3-pip tmux
          prometheus bird2"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup.sh: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    # The tests run their own Prometheus in a namespace; the package's
    # service (started by apt where systemd runs) is not wanted here.
    if [[ " $missing " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
