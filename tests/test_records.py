"""The typed session records convert to and from protobuf and ledger dicts without loss."""

from __future__ import annotations

import json

from consortium.core.config import LayerRange
from consortium.core.records import (
    AuditCounts,
    FailoverRecord,
    ReplayCheck,
    RollbackRecord,
    StageRef,
    StageReport,
    StageStats,
)


def test_failover_round_trips_through_proto_and_the_ledger_dict():
    f = FailoverRecord(
        1, 7, "w1", "coordinator", 12.5, 3.0, 40, 1.5, "gone", 41, ReplayCheck(True, 1e-4, "strict")
    )
    assert FailoverRecord.from_proto(f.to_proto()) == f
    assert FailoverRecord.from_dict(json.loads(json.dumps(f.to_dict()))) == f
    bare = FailoverRecord(0, 0, "a", "b", 1.0)
    assert FailoverRecord.from_proto(bare.to_proto()) == bare and not bare.to_proto().HasField("replay_check")
    # an older ledger's event: unknown keys ignored, missing ones take their defaults
    old = {"stage": 1, "token_index": 2, "failed_node": "a", "backup_node": "b", "latency_ms": 3.0, "x": 1}
    assert FailoverRecord.from_dict(old) == FailoverRecord(1, 2, "a", "b", 3.0)


def test_rollback_audits_and_stage_stats_round_trip():
    r = RollbackRecord(2, 19, "w1", "failed audit: rel-L2 0.05", 3, "coordinator")
    assert RollbackRecord.from_proto(r.to_proto()) == r and RollbackRecord.from_dict(r.to_dict()) == r
    assert r.to_proto().node_id == "w1" and r.to_proto().new_node_id == "coordinator"
    a = AuditCounts(5, 3, 1, 1)
    assert AuditCounts.from_proto(a.to_proto()) == a
    ref = StageRef(1, "w1", "127.0.0.1:5", LayerRange(10, 20), "cpu", "fp16", False)
    s = StageReport.from_proto(StageStats(ref, 9.0, 2.0, 1.5, 64, 100, 200).to_proto())
    assert (s.index, s.node_id, s.layers, s.dtype, s.prefill_ms, s.mean_step_ms, s.steps) == (
        1,
        "w1",
        [10, 20],
        "fp16",
        9.0,
        2.0,
        64,
    )
