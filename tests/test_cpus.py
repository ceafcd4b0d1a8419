"""--cpus: the CPU lists, the local cluster's split of the machine, and pinning a process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from consortium.coordinator.launcher import LocalCluster, demo_ranges
from consortium.core import cpus
from consortium.core.config import EngineConfig, LayerRange
from consortium.errors import ConsortiumError

LINUX = cpus.available() is not None


def test_lists_parse_as_taskset_writes_them():
    assert cpus.parse("0-3,6") == (0, 1, 2, 3, 6)
    assert cpus.parse(" 5 , 1-2,2") == (1, 2, 5)
    assert cpus.to_text((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert cpus.parse(cpus.to_text((3, 4, 9))) == (3, 4, 9)
    for bad in ("", "a", "1-", "3-1", "-2", "1,,2", "0x1"):
        with pytest.raises(ConsortiumError, match="CPU list"):
            cpus.parse(bad)


@pytest.mark.parametrize(
    ("machine", "workers", "plan"),
    [
        # fewer CPUs than processes: the coordinator has one to itself, the workers share the rest
        ((0, 1), 2, [(1,), (0,), (0,)]),
        ((0, 1), 3, [(1,), (0,), (0,), (0,)]),
        ((4, 5, 6), 3, [(6,), (4, 5), (4, 5), (4, 5)]),
        # enough: equal runs, the rest to the coordinator
        ((0, 1, 2), 2, [(2,), (0,), (1,)]),
        (tuple(range(7)), 2, [(4, 5, 6), (0, 1), (2, 3)]),
        (tuple(range(16)), 2, [(10, 11, 12, 13, 14, 15), (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]),
        # nothing to split
        ((3,), 2, []),
        ((), 2, []),
    ],
)
def test_a_local_cluster_splits_the_machine(machine, workers, plan):
    got = cpus.local_plan(machine, workers)
    assert got == plan
    assert all(c and set(c) <= set(machine) for c in got)


def test_local_cluster_passes_each_process_its_cpus(tmp_path):
    engine = EngineConfig(threads=1, cpus=(0, 1, 2, 3))
    c = LocalCluster(Path("m.gguf"), LayerRange(2, 4), [LayerRange(0, 1), LayerRange(1, 2)], tmp_path, engine)
    assert c.cpu_plan == [(2, 3), (0,), (1,)]
    c.port = 1  # the workers' arguments name the coordinator's address
    args = [c._coordinator().args, c._worker(0, LayerRange(0, 1)).args, c._worker(1, LayerRange(1, 2)).args]
    assert [a[a.index("--cpus") + 1] for a in args] == ["2-3", "0", "1"]
    two = LocalCluster(Path("m.gguf"), None, [None], tmp_path, EngineConfig(cpus=(0, 1, 2, 3)))
    assert two.engine.threads == 2  # threads from the CPUs given, not the machine's
    unpinned = LocalCluster(
        Path("m.gguf"), LayerRange(2, 4), [LayerRange(0, 1)], tmp_path, engine, cpu_plan=[]
    )
    assert "--cpus" not in unpinned._coordinator().args


def test_the_demo_gives_the_coordinator_more_layers_where_the_workers_share_a_cpu():
    def split(n, plan):
        return [str(r) for r in demo_ranges(n, plan)]

    shared, apart = cpus.local_plan((0, 1), 2), cpus.local_plan((0, 1, 2), 2)
    assert split(30, shared) == ["0-9", "9-18", "18-30"]
    assert split(30, apart) == split(30, []) == ["0-10", "10-20", "20-30"]
    assert split(32, shared) == ["0-10", "10-19", "19-32"]
    for n in range(3, 80):  # three non-empty contiguous ranges covering every layer
        ranges = demo_ranges(n, shared)
        assert ranges[0].start == 0 and ranges[-1].end == n
        assert all(r.start < r.end for r in ranges) and ranges[0].end == ranges[1].start
        assert ranges[1].end == ranges[2].start
    with pytest.raises(ConsortiumError, match="at least 3 layers"):
        demo_ranges(2, shared)


@pytest.mark.skipif(not LINUX, reason="pinning needs sched_setaffinity (Linux)")
def test_pin_moves_every_thread_and_refuses_cpus_it_may_not_use():
    # in a process of its own: pinning this one would pin the rest of the test run
    code = textwrap.dedent(
        """
        import os, threading
        from pathlib import Path
        from consortium.core import cpus
        from consortium.errors import ConsortiumError
        stop = threading.Event()
        before = threading.Thread(target=stop.wait)
        before.start()
        one = (cpus.available()[-1],)
        cpus.pin(one)
        after = threading.Thread(target=stop.wait)
        after.start()
        sets = {tuple(sorted(os.sched_getaffinity(int(t.name)))) for t in Path("/proc/self/task").iterdir()}
        stop.set()
        assert sets == {one}, sets
        try:
            cpus.pin((4096,))
        except ConsortiumError as e:
            print(e)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--cpus 4096: CPUs 4096 are not available here (allowed: " in done.stdout
