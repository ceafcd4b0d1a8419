"""Which CPUs a node's process runs on (`--cpus`), and how a local cluster splits this machine's.

Processes that share a machine and float over all its cores migrate between them and evict
each other's caches; the coordinator's work is on every step's path (its own stage, then each
batch's receipts, sampling and next orders) and is the busiest process. On the 2-core demo,
the coordinator alone on one core and the two workers on the other made 8 sessions 10% faster
(298 vs 270 tok/s over four alternating pairs) and one session no slower (docs/performance.md,
session 12).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from consortium.errors import ConsortiumError

CPUs = tuple[int, ...]


def available() -> CPUs | None:
    """The CPUs this process may run on; None where the platform cannot pin (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return tuple(sorted(os.sched_getaffinity(0)))


def machine(given: CPUs = ()) -> CPUs:
    """The CPUs a local cluster splits: `given`, else those this process may use; () where the
    platform cannot tell."""
    return given or available() or ()


def parse(text: str) -> CPUs:
    """'0-3,6' -> (0, 1, 2, 3, 6): taskset's list form; a clear error for anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConsortiumError(f"CPU list {text!r}: expected numbers and ranges such as 0-3,6") from None
        if a < 0 or b < a:
            raise ConsortiumError(f"CPU list {text!r}: {part.strip()!r} is not a CPU or an ascending range")
        cpus.update(range(a, b + 1))
    return tuple(sorted(cpus))


def pin(cpus: CPUs) -> None:
    """Every thread of this process (and those it starts later) runs on `cpus` only; () keeps
    them where they are. A CPU this process may not use is a clear error."""
    if not cpus:
        return
    allowed = available()
    if allowed is None:
        raise ConsortiumError("--cpus needs Linux (sched_setaffinity); leave it out here")
    if missing := sorted(set(cpus) - set(allowed)):
        raise ConsortiumError(
            f"--cpus {to_text(cpus)}: CPUs {to_text(missing)} are not available here (allowed: {to_text(allowed)})"
        )
    # the threads already running too (as taskset -a): those started from now on inherit the set
    tasks = Path("/proc/self/task")
    ids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [threading.get_native_id()]
    for tid in ids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


def local_plan(cpus: Sequence[int], workers: int) -> list[CPUs]:
    """CPU sets for a coordinator and `workers` workers on one machine, coordinator first; [] when
    there is nothing to split (one CPU). With a CPU for each process or more, each gets an equal
    run of them and the coordinator the rest too; with fewer, the coordinator gets one CPU of
    its own and the workers share the others."""
    cpus, n = tuple(cpus), 1 + workers
    if len(cpus) < 2:
        return []
    if len(cpus) < n:
        return [cpus[-1:]] + [cpus[:-1]] * workers
    per = len(cpus) // n
    runs = [cpus[i * per : (i + 1) * per] for i in range(workers)]
    return [cpus[workers * per :], *runs]


def to_text(cpus: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5': the --cpus argument for `cpus`."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
