"""A copy of the tcp_intercept package with its counting stubbed out.

Every line of the package that counts (the shared counters, the bytes each
relay moved, the stamp of a connection's last activity) ends with
`# count` (see tcp_intercept/counters.py); here each becomes `pass`, so the
same commit runs with and without counting, for bench/variants.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tcp_intercept"
COUNTING = re.compile(r"^(\s*)\S.*#\s*count$", re.MULTILINE)


def stubbed_copy(into: Path) -> tuple[Path, int]:
    """(the directory to put on PYTHONPATH, how many lines were stubbed)."""
    target = into / "tcp_intercept"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    stubbed = 0
    for path in target.glob("*.py"):
        text, count = COUNTING.subn(r"\1pass  # count (stubbed by bench/nocount.py)",
                                    path.read_text())
        if count:
            path.write_text(text)
            stubbed += count
    return into, stubbed
