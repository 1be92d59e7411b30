"""The man page documents exactly the options of --help, and renders cleanly;
its metrics that only --leg-stats fills are listed under it.

Both sides are parsed into {option: argument name or None}: --help from the
program's own output, the man page from the tags of its OPTIONS section.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
MANPAGE = ROOT / "man" / "tcp-interceptd.8"
CTL_MANPAGE = ROOT / "man" / "tcp-intercept-ctl.8"
OPTION = re.compile(r"^--?[A-Za-z0-9][\w-]*$")


def _options(words: list[str]) -> dict[str, str | None]:
    """['--pid-file', '-p', 'file'] -> {'--pid-file': 'file', '-p': 'file'}."""
    names = [w for w in words if OPTION.match(w)]
    rest = [w for w in words if not OPTION.match(w)]
    assert len(rest) <= 1, f"more than one argument name in {words}"
    return {name: rest[0] if rest else None for name in names}


def help_options(module: str = "tcp_intercept") -> dict[str, str | None]:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=30)
    out = done.stderr or done.stdout
    found: dict[str, str | None] = {}
    for line in out.splitlines():
        if re.match(r"^ {2}-", line):  # "  -p --pid-file file    The file ..."
            found.update(_options(re.split(r"\s{2,}", line.strip())[0].split()))
    return found


def _plain(roff: str) -> str:
    """A line of roff as the reader sees it (enough for option tags)."""
    text = re.sub(r"^\.(BR|BI|IR|RB|B|I)\s+", "", roff)
    text = re.sub(r"\\f(\[\w*\]|\w)", "", text)
    return text.replace("\\-", "-").replace('"', " ").replace(",", " ")


def manpage_options(page: Path = MANPAGE) -> dict[str, str | None]:
    lines = page.read_text().splitlines()
    start = lines.index(".SH OPTIONS")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(".SH "))
    found: dict[str, str | None] = {}
    for i in range(start, end):
        if lines[i] == ".TP":  # the next line is the tag: the option and its argument
            found.update(_options(_plain(lines[i + 1]).split()))
    return found


def test_help_is_parsed():
    options = help_options()
    assert options["-p"] == options["--pid-file"] == "file"
    assert options["--tcp_nodelay"] is None
    assert len(options) > 20


def test_manpage_lists_every_option_of_help_and_no_other():
    assert manpage_options() == help_options()


def test_ctl_manpage_lists_every_option_of_its_help():
    assert manpage_options(CTL_MANPAGE) == help_options("tcp_intercept.ctl") == {
        "-h": None, "--help": None, "-s": "path", "--socket": "path"}


@pytest.mark.parametrize("page", [MANPAGE, CTL_MANPAGE], ids=lambda p: p.name)
def test_manpage_is_of_this_version(page):
    from tcp_intercept import __version__

    title = next(line for line in page.read_text().splitlines() if line.startswith(".TH "))
    assert f'"tcp-intercept {__version__}"' in title


def test_tcp_intercept_page_is_the_same_page():
    assert (MANPAGE.parent / "tcp-intercept.8").read_text() == ".so man8/tcp-interceptd.8\n"


@pytest.mark.parametrize("page", [MANPAGE, CTL_MANPAGE], ids=lambda p: p.name)
def test_manpage_renders_without_warnings(page):
    assert shutil.which("groff") and shutil.which("man"), "scripts/setup.sh installs groff and man"
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr == ""
    result = subprocess.run(["man", "--warnings", "-l", str(page)],
                            capture_output=True, text=True, timeout=60,
                            env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0
    assert result.stderr == ""
    assert ("--bind-outgoing" if page == MANPAGE else "--socket") in \
        result.stdout.replace("\u2010", "-")


def test_what_only_leg_stats_fills_is_listed_under_it():
    """The metrics that --leg-stats alone fills (the histograms; the counters
    whose help says so) come after "with --leg-stats" in the Metrics section:
    tcp_intercept_retransmits_total is exported without it, and stays 0."""
    from tcp_intercept import counters, histograms

    lines = MANPAGE.read_text().splitlines()
    start = lines.index(".SS Metrics")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith((".SH", ".SS")))
    text = " ".join(_plain(line) for line in lines[start + 1:end])
    names = {f"tcp_intercept_{h.family}" for h in histograms.HISTOGRAMS} | {
        f"tcp_intercept_{name}_total" for name, (kind, help_text, _) in counters.FAMILIES.items()
        if kind == "counter" and "--leg-stats" in help_text}
    assert "tcp_intercept_retransmits_total" in names
    with_leg_stats = text.index("with --leg-stats")
    assert all(text.index(name) > with_leg_stats for name in names), text
