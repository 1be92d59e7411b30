#!/usr/bin/env python3
"""What the policy's lookup costs a connection: CPU µs per connection.

    .venv/bin/python bench/policy.py [--rounds N] [--calls N]

In-process, without a network: the recipe a listener picks for a connection
just accepted, in the same run and in alternating rounds, as
  no policy        the listener's own branch: the command line's recipe
  1 rule           one rule on a destination /24, matched
  10,000 prefixes  one rule of 10,000 /24 prefixes (and one of a few
                   shorter ones behind it), matched, and missed (the default)
  200 rules        200 rules on ports, the last one matched (the worst case:
                   every rule without a destination is tried in order)
Each is the process CPU time of `calls` lookups / calls, median over the
rounds; reported against no policy in the same run. The choice's counting
per rule is included; the saved SYN is not read (no rule here asks for it).

The whole daemon with a policy against without, at the same time in two
topologies: `bench/variants.sh policy --together` (this module writes the
policy files it uses: write_policies()).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tcp_intercept import policy_file  # noqa: E402
from tcp_intercept.config import Config  # noqa: E402

POLICY_DIR = Path(tempfile.gettempdir()) / "ti-bench-policies"
ONE_RULE = POLICY_DIR / "one-rule.toml"
MANY_PREFIXES = POLICY_DIR / "10000-prefixes.toml"
MANY_RULES = POLICY_DIR / "200-rules.toml"


def write_policies() -> None:
    """The policies measured here and by bench/variants.py's policy preset.
    The bench's world sends to 10.91.2.2 (lab/topology.py): the rules match it."""
    POLICY_DIR.mkdir(exist_ok=True)
    # The rules set nothing: what is measured is choosing, not a socket option.
    ONE_RULE.write_text('[[rule]]\nname = "one"\ndestination = "10.91.2.0/24"\n')
    prefixes = ", ".join(f'"10.{i // 256}.{i % 256}.0/24"' for i in range(10_000))
    MANY_PREFIXES.write_text(
        f'[[rule]]\nname = "many"\ndestination = [{prefixes}, "10.91.2.0/24"]\n\n'
        '[[rule]]\nname = "wide"\ndestination = ["172.16.0.0/12", "192.168.0.0/16", '
        '"100.64.0.0/10", "fd00::/8"]\n')
    rules = "".join(f'[[rule]]\nname = "r{i}"\nport = {1000 + i}\n\n' for i in range(199))
    MANY_RULES.write_text(rules + '[[rule]]\nname = "last"\nport = 7001\n')


class Accepted:
    """What choose() may ask of an accepted socket (nothing, here)."""
    proto = 6


def per_call(choose, peer: tuple, dst: tuple, calls: int) -> float:
    """CPU µs per choose(Accepted, peer, dst)."""
    sock = Accepted()
    start = time.process_time()
    for _ in range(calls):
        choose(sock, peer, dst)
    return (time.process_time() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args(argv)
    write_policies()
    config = Config()
    default = policy_file.load(str(ONE_RULE), config).default
    one = policy_file.load(str(ONE_RULE), config)
    many = policy_file.load(str(MANY_PREFIXES), config)
    ports = policy_file.load(str(MANY_RULES), config)

    class NoPolicy:
        """The listener's branch without a policy: its context's recipe."""
        policy = None
        recipe = default

    def no_policy(sock, peer, dst):
        ctx = NoPolicy
        return ctx.recipe if ctx.policy is None else None

    peer, hit, miss = ("10.91.1.2", 40000), ("10.91.2.2", 7001), ("198.51.100.1", 7001)
    cases = {"no policy": (no_policy, hit), "1 rule": (one.choose, hit),
             "10,000 prefixes, matched": (many.choose, ("10.39.15.1", 7001)),
             "10,000 prefixes, missed": (many.choose, miss),
             "200 rules, the last matched": (ports.choose, hit),
             "IPv6 destination, 10,000 prefixes": (many.choose, ("fd91:2::2", 7001))}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for rnd in range(args.rounds):
        order = list(cases) if rnd % 2 == 0 else list(cases)[::-1]
        for name in order:
            choose, dst = cases[name]
            samples[name].append(per_call(choose, peer, dst, args.calls))
    base = statistics.median(samples["no policy"])
    print(f"| lookup ({args.rounds} rounds x {args.calls} calls) | CPU µs per connection "
          "| spread | less no policy |")
    print("|---|---|---|---|")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {min(values):.2f}-{max(values):.2f} "
              f"| {median - base:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
