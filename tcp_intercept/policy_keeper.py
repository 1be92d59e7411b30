"""The master's side of the policy: the one in force, its reload, and what
each rule matched.

Reload (tcp-intercept-ctl reload, SIGHUP): the master reads and checks the
file (policy_file.py). A bad file changes nothing: the error goes to the
log and to the reloading command's answer, and the old policy stays in
force everywhere. A good one replaces the master's (workers started from
now on are forked with it) and each worker is told to load it too, by the
file's SHA-256: a worker that reads something else (the file changed in
between) keeps its old policy and says so in the log. Each worker answers
once it has loaded it (or kept the old one), and the reloading command's
answer waits for every worker's (at most ANSWER_TIMEOUT): once it says so,
every connection accepted from then on gets the new policy. Connections
already open keep the recipe they were given.

Matches: each worker counts per rule and reports the counts of the last
second over its channel (`matched RULE N`); the master adds them up by rule
name for show policy and tcp_intercept_policy_matches_total. A worker that
dies loses at most its last second of counts; the totals start again at
zero after an upgrade, as a new program's counters do.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger as log

from . import policy_file
from .config import Config
from .errors import PolicyError
from .evloop import Loop
from .policy import Policy, counts_clients


ANSWER_TIMEOUT = 5.0  # seconds the workers get to load a reloaded policy
Done = Callable[[bool, str], None]


@dataclass(eq=False)
class _Pending:
    """A reload whose workers have not all answered yet."""
    digest: str
    waiting: set[int]
    done: Done
    message: str
    timer: object = None
    kept: list[int] = field(default_factory=list)


class PolicyKeeper:
    def __init__(self, config: Config, policy: Policy | None, loop: Loop,
                 tell_workers: Callable[[str], list[int]]):
        self.config = config
        self.policy = policy
        self.loop = loop
        # Sends the digest to every serving worker; the pids it told.
        self.tell_workers = tell_workers
        self.pending: list[_Pending] = []
        self.matched: Counter = Counter()
        self.failed: str | None = None    # the last reload's error, while it stands
        self.counting = counts_clients(config, policy)  # per client, from start-up

    def reload(self, done: Done = lambda ok, message: None) -> None:
        """Re-read the policy; done(whether it is in force in every worker,
        what to tell the operator) once it is, or why not."""
        path = self.config.policy
        if path is None:
            done(False, "no policy to reload: the daemon was started without --policy")
            return
        try:
            new = policy_file.load(path, self.config)
            if new.limits_clients and not self.counting:
                raise PolicyError(f"{path}: max_per_client: the daemon started without a "
                                  "per-client limit, so it does not count connections per "
                                  "client; restart it to use one")
        except PolicyError as err:
            self.failed = str(err)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.policy.loaded))
            message = f"policy not reloaded, the one loaded at {since} stays: {err}"
            log.error("{}", message)
            done(False, message)
            return
        self.policy, self.failed = new, None
        message = f"Policy reloaded from {new.path}: {len(new.rules)} rule(s)"
        log.info("{}", message)
        pending = _Pending(new.digest, set(self.tell_workers(new.digest)), done, message)
        if not pending.waiting:
            done(True, f"{message}, in force in every worker")
            return
        pending.timer = self.loop.timer(ANSWER_TIMEOUT)
        pending.timer.start(lambda: self._finish(pending))
        self.pending.append(pending)

    def answered(self, pid: int, digest: str, loaded: bool) -> None:
        """Worker pid loaded the policy of that digest, or kept its old one."""
        for pending in list(self.pending):
            if pending.digest == digest and pid in pending.waiting:
                pending.waiting.discard(pid)
                if not loaded:
                    pending.kept.append(pid)
                if not pending.waiting:
                    self._finish(pending)

    def gone(self, pid: int) -> None:
        """Worker pid exited: nothing to wait for (its successor is forked
        with the master's policy, the new one)."""
        for pending in list(self.pending):
            if pid in pending.waiting:
                pending.waiting.discard(pid)
                if not pending.waiting:
                    self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        if pending not in self.pending:
            return
        pending.timer.stop()
        pending.timer.close()
        self.pending.remove(pending)
        if pending.kept or pending.waiting:
            why = [f"worker {pid} kept the old one (see the log)" for pid in pending.kept]
            why += [f"worker {pid} did not answer" for pid in sorted(pending.waiting)]
            pending.done(False, f"{pending.message}, but {'; '.join(why)}")
        else:
            pending.done(True, f"{pending.message}, in force in every worker")

    def add(self, rule: str, count: int) -> None:
        """A worker's report: count more connections matched rule."""
        self.matched[rule] += count

    def lines(self) -> list[str]:
        """show policy: the rules in force, where they came from, what each matched."""
        if self.policy is None:
            return ["Policy: none (every connection gets the command line's options)"]
        lines = self.policy.describe()
        if self.failed:
            lines.insert(2, f"Last_reload_failed: {self.failed}")
        lines = [line + self._matched_suffix(line) for line in lines]
        lines.append(f"Default: matched={self.matched['default']}")
        return lines

    def _matched_suffix(self, line: str) -> str:
        if not line.startswith("Rule: ") or line.endswith(" bypass"):
            return ""
        name = line.split()[2]
        return f" matched={self.matched[name]}"

    def totals(self) -> dict[str, int]:
        """Per rule name, every match since start-up (rules of earlier
        policies included), for the metrics."""
        if self.policy is None:
            return {}
        names = [rule.name for rule in self.policy.rules if not rule.bypass] + ["default"]
        return {**dict.fromkeys(names, 0), **self.matched}
