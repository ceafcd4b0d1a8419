"""Prometheus metrics (prefix consortium_), without touching the token loop.

Request metrics are measured here as the API releases tokens (sessions run over gRPC by
`session run` do not feed them). Everything else is read on each scrape: the cluster from
`Coordinator.status()` and the registry, step times from the coordinator's session table
(every session, gRPC ones too), and verification history from the ledger (read-only
connection; rows are counted once, by id).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter as Tally
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)

from consortium.core.session import RUNNING
from consortium.serving.status_page import coverage, min_holders

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RequestMetrics:
    """What the API measures as it serves."""

    def __init__(self, registry: CollectorRegistry):
        disable_created_metrics()  # no *_created series: they only double the scrape
        self.requests = Counter(
            "consortium_requests",
            "API requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "consortium_prompt_tokens", "Prompt tokens of API requests", registry=registry
        )
        self.generation_tokens = Counter(
            "consortium_generation_tokens", "Tokens sent to API clients", registry=registry
        )
        self.ttft = Histogram(
            "consortium_time_to_first_token_seconds",
            "Request received to first token sent (after verified release, if on)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "consortium_inter_token_latency_seconds",
            "Between consecutive tokens sent to a client",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "consortium_e2e_request_latency_seconds",
            "Request received to response complete",
            buckets=E2E_BUCKETS,
            registry=registry,
        )

    def token(self, gap_s: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(gap_s)
        self.generation_tokens.inc()

    def request(
        self, endpoint: str, outcome: str, prompt_tokens: int = 0, elapsed_s: float | None = None
    ) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if elapsed_s is not None:
            self.e2e.observe(elapsed_s)


def receipt_reason(kind: str, detail: dict) -> str:
    """A short reason for a rejected result (a bounded label set)."""
    text = f"{kind} {detail.get('error', '')}".lower()
    for key, reason in (
        ("signature", "signature"),
        ("describes", "order_mismatch"),
        ("layer weights", "weights"),
        ("input digest", "chain"),
        ("chain", "chain"),
        ("output digest", "output_digest"),
    ):
        if key in text:
            return reason
    return kind.replace(" ", "_")


class LedgerTally:
    """Counts from the ledger, read incrementally (each row once) on a read-only connection."""

    def __init__(self, path, coordinator_id: str):
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.coordinator_id = coordinator_id
        self.last = {"audits": 0, "evidence": 0, "events": 0}
        self.audits: Tally = Tally()  # (result, auditor kind)
        self.evidence: Tally = Tally()  # (kind, reason)
        self.events: Tally = Tally()  # kind
        self.failover_s: list[float] = []
        self.lock = threading.Lock()

    def _rows(self, table: str, columns: str) -> list[tuple]:
        rows = self.db.execute(
            f"SELECT id, {columns} FROM {table} WHERE id > ? ORDER BY id", (self.last[table],)
        ).fetchall()
        if rows:
            self.last[table] = rows[-1][0]
        return [r[1:] for r in rows]

    def update(self) -> None:
        with self.lock:
            for passed, auditor in self._rows("audits", "passed, auditor_node"):
                self.audits[
                    "passed" if passed else "failed",
                    "coordinator" if auditor == self.coordinator_id else "remote",
                ] += 1
            for kind, detail in self._rows("evidence", "kind, detail"):
                self.evidence[kind, receipt_reason(kind, json.loads(detail))] += 1
            for kind, detail in self._rows("events", "kind, detail"):
                self.events[kind] += 1
                if kind == "failover":
                    self.failover_s.append(json.loads(detail).get("latency_ms", 0.0) / 1000)

    def bans(self) -> int:
        with self.lock:
            return self.db.execute("SELECT count(*) FROM nodes WHERE banned=1").fetchone()[0]


def histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...]) -> HistogramMetricFamily:
    cumulative = [(str(b), sum(v <= b for v in values)) for b in buckets] + [("+Inf", len(values))]
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=sum(values))


class ClusterCollector:
    """The cluster and verification metrics, computed on each scrape."""

    def __init__(self, coordinator, tally: LedgerTally):
        self.c, self.tally = coordinator, tally
        self.steps: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
        self.counted: set[str] = set()  # finished sessions whose steps are in self.steps
        self.lock = threading.Lock()

    def collect(self):
        st = self.c.status()
        yield from self._cluster(st)
        self.tally.update()
        yield from self._verification()
        yield self._step_seconds()

    def _cluster(self, st):
        nodes = GaugeMetricFamily("consortium_nodes", "Nodes by role and backend", labels=["role", "backend"])
        for (role, backend), n in sorted(Tally((ns.role, ns.node.backend) for ns in st.nodes).items()):
            nodes.add_metric([role, backend], n)
        yield nodes
        yield GaugeMetricFamily(
            "consortium_layer_min_holders",
            "Fewest live, unbanned nodes holding any one layer (0: a layer is uncovered)",
            value=min_holders(coverage(st)),
        )
        sessions = GaugeMetricFamily("consortium_sessions", "Sessions in memory by state", labels=["state"])
        for state, n in sorted(Tally(s.state for s in self.c.sessions.all()).items()):
            sessions.add_metric([state], n)
        yield sessions

    def _verification(self):
        t = self.tally
        audits = CounterMetricFamily(
            "consortium_audits", "Audits by result and auditor", labels=["result", "auditor"]
        )
        for (result, auditor), n in sorted(t.audits.items()):
            audits.add_metric([result, auditor], n)
        yield audits
        contradicted = sum(n for (kind, _), n in t.evidence.items() if kind == "false audit")
        yield CounterMetricFamily(
            "consortium_audit_rechecks_contradicted",
            "Remote auditors' verdicts the coordinator's re-check contradicted (auditor banned)",
            value=contradicted,
        )
        yield CounterMetricFamily(
            "consortium_audit_rechecks",
            "Remote auditors' verdicts the coordinator recomputed (every reported failure, a share of passes)",
            value=t.events["recheck"],
        )
        rejections = CounterMetricFamily(
            "consortium_receipt_rejections", "Remote results refused before use, by reason", labels=["reason"]
        )
        for (kind, reason), n in sorted(t.evidence.items()):
            if kind not in ("failed audit", "false audit"):
                rejections.add_metric([reason], n)
        yield rejections
        for name, kind, doc in (
            ("rollbacks", "rollback", "Fraud rollbacks"),
            ("failovers", "failover", "Stage failovers"),
            ("auditors_lost", "auditor_lost", "Remote auditors that died or lied mid-audit"),
        ):
            yield CounterMetricFamily(f"consortium_{name}", doc, value=t.events[kind])
        yield histogram(
            "consortium_failover_latency_seconds",
            "Failure detected to the replacement ready",
            t.failover_s,
            FAILOVER_BUCKETS,
        )
        yield CounterMetricFamily("consortium_bans", "Nodes banned (the ledger's record)", value=t.bans())

    def _step_seconds(self) -> SummaryMetricFamily:
        """Round trips of finished sessions' steps per stage, node and phase (prefill, decode)."""
        with self.lock:
            table = self.c.sessions.all()
            for s in table:
                if s.state == RUNNING or s.session_id in self.counted:
                    continue
                self.counted.add(s.session_id)
                for x in s.stats():
                    key = (str(x.stage.index), x.stage.node_id)
                    if x.steps:
                        self._add((*key, "prefill"), x.prefill_ms, 1)
                    if x.steps > 1:
                        self._add((*key, "decode"), x.mean_step_ms * (x.steps - 1), x.steps - 1)
            self.counted &= {s.session_id for s in table}
            m = SummaryMetricFamily(
                "consortium_step_seconds",
                "Stage round trips as the coordinator saw them",
                labels=["stage", "node", "phase"],
            )
            for labels, (total, n) in sorted(self.steps.items()):
                m.add_metric(list(labels), count_value=n, sum_value=total)
            return m

    def _add(self, key: tuple[str, str, str], ms: float, n: int) -> None:
        self.steps[key][0] += ms / 1000
        self.steps[key][1] += n
