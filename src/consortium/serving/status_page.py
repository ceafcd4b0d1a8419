"""The status page's data (/api/status, polled by static/status.js): layer coverage, nodes,
sessions, a feed of failovers, rollbacks and bans, and the verification settings."""

from __future__ import annotations

import hashlib
import json
import time

from consortium.core.session import RUNNING
from consortium.serving.config import ServeConfig
from consortium.transport.proto import consortium_pb2 as pb
from consortium.verification.tolerance import calibration_report

HOLDING = ("dead", "banned")  # roles whose layers serve nobody
FEED_ROWS = 40


def coverage(st: pb.ClusterStatus) -> list[list[str]]:
    """Per layer, the live and unbanned nodes that hold it."""
    holders: list[list[str]] = [[] for _ in range(st.n_layers)]
    for ns in st.nodes:
        if ns.role not in HOLDING and ns.node.HasField("layers"):
            for i in range(ns.node.layers.start, min(ns.node.layers.end, st.n_layers)):
                holders[i].append(ns.node.node_id)
    return holders


def min_holders(cov: list[list[str]]) -> int:
    return min((len(h) for h in cov), default=0)


def fingerprint(public_key: bytes) -> str:
    if not public_key:
        return ""
    h = hashlib.sha256(public_key).hexdigest()[:16]
    return ":".join(h[i : i + 4] for i in range(0, 16, 4))


def step_ms(coordinator) -> dict[str, float]:
    """Each node's mean decode round trip in the latest session it served."""
    out: dict[str, float] = {}
    for s in coordinator.sessions.all():  # oldest first: the latest wins
        for x in s.stats():
            if x.steps > 1:
                out[x.stage.node_id] = round(x.mean_step_ms, 2)
    return out


def nodes(coordinator, st: pb.ClusterStatus, scores: dict[str, tuple]) -> list[dict]:
    steps = step_ms(coordinator)
    rows = []
    for ns in st.nodes:
        n = ns.node
        passed, failed, banned, reason = scores.get(n.node_id, (0, 0, 0, None))
        rows.append(
            {
                "node_id": n.node_id,
                "fingerprint": fingerprint(n.public_key),
                "role": ns.role,
                "alive": ns.alive,
                "local": ns.local,
                "address": n.address,
                "layers": [n.layers.start, n.layers.end] if n.HasField("layers") else None,
                "device": n.device,
                "dtype": n.dtype + (" packed" if n.packed else ""),
                "heartbeat_age_s": round(ns.heartbeat_age_s, 1),
                "step_ms": steps.get(n.node_id),
                "audits_passed": passed,
                "audits_failed": failed,
                "banned": bool(banned) or ns.role == "banned",
                "ban_reason": reason,
            }
        )
    return rows


def sessions(coordinator, limit: int = 20) -> list[dict]:
    now, rows = time.monotonic(), []
    for s in coordinator.sessions.all()[-limit:][::-1]:
        n = len(s.tokens) - s.resumed
        rate = s.tokens_per_second
        if s.state == RUNNING and s.time_to_first_token_s and n > 1:
            rate = (n - 1) / max(1e-9, now - s.created - s.time_to_first_token_s)
        rows.append(
            {
                "session_id": s.session_id,
                "state": s.state,
                "tokens": len(s.tokens),
                "max_tokens": s.max_tokens,
                "prompt_tokens": len(s.prompt_ids),
                "ttft_ms": round(s.time_to_first_token_s * 1000, 1),
                "tokens_per_second": round(rate, 2),
                "age_s": round((s.finished or now) - s.created, 1),
                "audits": s.audits.counts().total if s.audits is not None else 0,
            }
        )
    return rows


def feed(db) -> list[dict]:
    """Latest failovers, rollbacks, lost auditors and evidence (each evidence bans a node)."""
    events = db.execute(
        "SELECT time, kind, session_id, detail FROM events WHERE kind != 'resumed' ORDER BY id DESC LIMIT ?",
        (FEED_ROWS,),
    ).fetchall()
    evidence = db.execute(
        "SELECT time, kind, session_id, node_id FROM evidence ORDER BY id DESC LIMIT ?", (FEED_ROWS,)
    ).fetchall()
    rows = [{"time": t, "kind": k, "session_id": s, "detail": json.loads(d)} for t, k, s, d in events]
    rows += [
        {"time": t, "kind": "ban", "session_id": s, "detail": {"node": n, "reason": k}}
        for t, k, s, n in evidence
    ]
    return sorted(rows, key=lambda r: -r["time"])[:FEED_ROWS]


def settings(coordinator, serve: ServeConfig) -> dict:
    cfg = coordinator.cfg
    return {
        "audit_probability": cfg.audit_probability,
        "audit_recheck_probability": cfg.audit_recheck_probability,
        "audit_workers": cfg.audit_workers,
        "node_timeout_s": cfg.node_timeout_s,
        "hang_after_s": cfg.hang_after_s,
        "backup": cfg.backup,
        "release": serve.release,
        "tolerances": calibration_report()["proposed"],
    }


def status(coordinator, serve: ServeConfig, tally) -> dict:
    st = coordinator.status()
    with tally.lock:
        scores = {
            r[0]: r[1:]
            for r in tally.db.execute(
                "SELECT node_id, audits_passed, audits_failed, banned, ban_reason FROM nodes"
            )
        }
        events = feed(tally.db)
    cov = coverage(st)
    return {
        "time": time.time(),
        "model": {"name": coordinator.gguf.path.name, "digest": st.model_digest, "n_layers": st.n_layers},
        "coverage": cov,
        "min_holders": min_holders(cov),
        "route": [{"node_id": r.node_id, "layers": [r.layers.start, r.layers.end]} for r in st.route],
        "placement_error": st.placement_error,
        "nodes": nodes(coordinator, st, scores),
        "sessions": sessions(coordinator),
        "feed": events,
        "verification": settings(coordinator, serve),
    }
