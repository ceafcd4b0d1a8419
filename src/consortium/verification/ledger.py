"""The ledger: SQLite (WAL) record of nodes, sessions, tokens, receipts, audits, evidence, bans.

Receipts are stored with their signatures and the signer's public key so they can be
re-verified offline (`consortium receipts verify`). Every write is one transaction: a
failure leaves the ledger as it was.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from consortium.errors import ConsortiumError
from consortium.verification.commitment import token_digest
from consortium.verification.receipts import Receipt, ReceiptError, check_chain

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
  node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, address TEXT, backend TEXT, dtype TEXT,
  first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  work_completed INTEGER NOT NULL DEFAULT 0, work_failed INTEGER NOT NULL DEFAULT 0,
  audits_passed INTEGER NOT NULL DEFAULT 0, audits_failed INTEGER NOT NULL DEFAULT 0,
  banned INTEGER NOT NULL DEFAULT 0, ban_reason TEXT);
CREATE TABLE IF NOT EXISTS sessions (
  session_id TEXT PRIMARY KEY, created REAL NOT NULL, status TEXT NOT NULL, prompt_ids TEXT NOT NULL,
  params TEXT NOT NULL, stages TEXT NOT NULL DEFAULT '[]', error TEXT);
CREATE TABLE IF NOT EXISTS tokens (
  session_id TEXT NOT NULL, position INTEGER NOT NULL, token INTEGER NOT NULL,
  PRIMARY KEY (session_id, position));
CREATE TABLE IF NOT EXISTS receipts (
  id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, step INTEGER NOT NULL, start_position INTEGER NOT NULL,
  n_positions INTEGER NOT NULL, stage_index INTEGER NOT NULL, layer_start INTEGER NOT NULL,
  layer_end INTEGER NOT NULL, layers_digest TEXT NOT NULL, input_digest BLOB NOT NULL,
  output_digest BLOB NOT NULL, node_id TEXT NOT NULL, time_unix_ms INTEGER NOT NULL,
  signature BLOB NOT NULL, public_key BLOB NOT NULL, superseded INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS receipts_session ON receipts (session_id, step, stage_index);
CREATE TABLE IF NOT EXISTS audits (
  id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, stage_index INTEGER NOT NULL, position INTEGER NOT NULL,
  audited_node TEXT NOT NULL, auditor_node TEXT NOT NULL, passed INTEGER NOT NULL, tolerance TEXT NOT NULL,
  worst_rel_l2 REAL NOT NULL, worst_max_rel REAL NOT NULL, first_bad_position INTEGER, time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (
  id INTEGER PRIMARY KEY, node_id TEXT NOT NULL, session_id TEXT, kind TEXT NOT NULL, detail TEXT NOT NULL,
  time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL, time REAL NOT NULL);
"""


TOKEN_SQL = "INSERT OR REPLACE INTO tokens (session_id, position, token) VALUES (?,?,?)"
RECEIPT_SQL = (
    "INSERT INTO receipts (session_id, step, start_position, n_positions, stage_index, layer_start, layer_end, "
    "layers_digest, input_digest, output_digest, node_id, time_unix_ms, signature, public_key) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _receipt_row(r: Receipt, public_key: bytes) -> tuple:
    return (
        r.session_id,
        r.step,
        r.start_position,
        r.n_positions,
        r.stage_index,
        r.layer_start,
        r.layer_end,
        r.layers_digest,
        r.input_digest,
        r.output_digest,
        r.node_id,
        r.time_unix_ms,
        r.signature,
        public_key,
    )


class LedgerError(ConsortiumError):
    """The ledger file is missing, unwritable or corrupt, or a stored record does not verify."""


@dataclass(frozen=True)
class NodeScore:
    node_id: str
    audits_passed: int
    audits_failed: int
    banned: bool


@dataclass(frozen=True)
class VerifySummary:
    session_id: str
    receipts: int
    steps: int
    nodes: list[str]
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


class Ledger:
    def __init__(self, path: str | Path, create: bool = True, readonly: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LedgerError(f"ledger not found: {self.path}")
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
            self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except (sqlite3.DatabaseError, OSError) as e:
            raise LedgerError(f"cannot open ledger {self.path}: {e}") from e
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def _write(self, sql_params: list[tuple[str, tuple]]) -> None:
        """Run statements in one transaction; on any error nothing is written."""
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                for sql, params in sql_params:
                    self.db.execute(sql, params)
                self.db.execute("COMMIT")
            except sqlite3.Error as e:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise LedgerError(f"ledger write failed ({self.path}): {e}") from e

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self.db.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise LedgerError(f"ledger read failed ({self.path}): {e}") from e

    # --- nodes ----------------------------------------------------------------------------

    def upsert_node(self, node_id: str, public_key: bytes, address: str, backend: str, dtype: str) -> None:
        now = time.time()
        self._write(
            [
                (
                    "INSERT INTO nodes (node_id, public_key, address, backend, dtype, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET address=excluded.address, "
                    "backend=excluded.backend, dtype=excluded.dtype, last_seen=excluded.last_seen",
                    (node_id, public_key, address, backend, dtype, now, now),
                )
            ]
        )

    def public_key(self, node_id: str) -> bytes | None:
        rows = self._query("SELECT public_key FROM nodes WHERE node_id=?", (node_id,))
        return bytes(rows[0][0]) if rows else None

    def ban(self, node_id: str, reason: str) -> None:
        self._write([("UPDATE nodes SET banned=1, ban_reason=? WHERE node_id=?", (reason, node_id))])

    def is_banned(self, node_id: str) -> bool:
        rows = self._query("SELECT banned FROM nodes WHERE node_id=?", (node_id,))
        return bool(rows and rows[0][0])

    def banned_nodes(self) -> list[str]:
        return [r[0] for r in self._query("SELECT node_id FROM nodes WHERE banned=1 ORDER BY node_id")]

    def score(self, node_id: str) -> NodeScore | None:
        rows = self._query(
            "SELECT node_id, audits_passed, audits_failed, banned FROM nodes WHERE node_id=?", (node_id,)
        )
        return NodeScore(*rows[0][:3], bool(rows[0][3])) if rows else None

    # --- sessions and tokens ---------------------------------------------------------------

    def create_session(
        self, session_id: str, prompt_ids: list[int], params: dict, stages: list[dict]
    ) -> None:
        self._write(
            [
                (
                    "INSERT INTO sessions (session_id, created, status, prompt_ids, params, stages) VALUES (?,?,?,?,?,?)",
                    (
                        session_id,
                        time.time(),
                        "running",
                        json.dumps(prompt_ids),
                        json.dumps(params),
                        json.dumps(stages),
                    ),
                )
            ]
        )

    def set_session_status(self, session_id: str, status: str, error: str | None = None) -> None:
        self._write(
            [("UPDATE sessions SET status=?, error=? WHERE session_id=?", (status, error, session_id))]
        )

    def interrupt_running(self) -> list[str]:
        """At a coordinator's start: sessions still "running" were cut off by its stop; they become
        "interrupted" (resumable), with everything committed so far kept."""
        ids = self.sessions("running")
        if ids:
            self._write(
                [
                    (
                        "UPDATE sessions SET status='interrupted', error='the coordinator stopped while it ran' "
                        "WHERE status='running'",
                        (),
                    )
                ]
            )
        return ids

    def resume_session(self, session_id: str, stages: list[dict]) -> int:
        """Marks an interrupted session running again; returns the first free step number (the
        resumed steps' receipts must not collide with the stored ones)."""
        rows = self._query("SELECT coalesce(max(step), -1) FROM receipts WHERE session_id=?", (session_id,))
        n_tokens = len(self.tokens(session_id))
        self._write(
            [
                (
                    "UPDATE sessions SET status='running', error=NULL, stages=? WHERE session_id=?",
                    (json.dumps(stages), session_id),
                )
            ]
        )
        return max(rows[0][0] + 1, n_tokens + 1)

    def session(self, session_id: str) -> dict | None:
        rows = self._query(
            "SELECT session_id, created, status, prompt_ids, params, stages, error FROM sessions WHERE session_id=?",
            (session_id,),
        )
        if not rows:
            return None
        sid, created, status, prompt, params, stages, error = rows[0]
        return {
            "session_id": sid,
            "created": created,
            "status": status,
            "prompt_ids": json.loads(prompt),
            "params": json.loads(params),
            "stages": json.loads(stages),
            "error": error,
            "tokens": self.tokens(sid),
        }

    def sessions(self, status: str | None = None) -> list[str]:
        if status is None:
            return [r[0] for r in self._query("SELECT session_id FROM sessions ORDER BY created")]
        return [
            r[0]
            for r in self._query("SELECT session_id FROM sessions WHERE status=? ORDER BY created", (status,))
        ]

    def rollback_tokens(self, session_id: str, from_position: int) -> None:
        """Forget tokens at positions >= from_position and mark their receipts superseded."""
        self._write(
            [
                ("DELETE FROM tokens WHERE session_id=? AND position>=?", (session_id, from_position)),
                (
                    "UPDATE receipts SET superseded=1 WHERE session_id=? AND start_position+n_positions>?",
                    (session_id, from_position),
                ),
            ]
        )

    def tokens(self, session_id: str) -> list[int]:
        return [
            r[0]
            for r in self._query(
                "SELECT token FROM tokens WHERE session_id=? ORDER BY position", (session_id,)
            )
        ]

    def event(self, session_id: str, kind: str, detail: dict) -> None:
        self._write(
            [
                (
                    "INSERT INTO events (session_id, kind, detail, time) VALUES (?,?,?,?)",
                    (session_id, kind, json.dumps(detail), time.time()),
                )
            ]
        )

    def events(self, session_id: str, kind: str | None = None) -> list[dict]:
        rows = self._query("SELECT kind, detail FROM events WHERE session_id=? ORDER BY id", (session_id,))
        return [{"kind": k, **json.loads(d)} for k, d in rows if kind is None or k == kind]

    # --- receipts, audits, evidence --------------------------------------------------------

    def commit_step(
        self, session_id: str, receipts: list[tuple[Receipt, bytes]], position: int, token: int | None
    ) -> None:
        """One step of a session in one transaction: the receipts of its remote stages (with the
        keys that checked them) and its token at `position` (None: the step ended in EOS)."""
        stmts = [(RECEIPT_SQL, _receipt_row(r, key)) for r, key in receipts]
        if token is not None:
            stmts.append((TOKEN_SQL, (session_id, position, token)))
        if stmts:
            self._write(stmts)

    def receipts(self, session_id: str, include_superseded: bool = False) -> list[tuple[Receipt, bytes]]:
        rows = self._query(
            "SELECT session_id, step, start_position, n_positions, stage_index, layer_start, layer_end, "
            "layers_digest, input_digest, output_digest, node_id, time_unix_ms, signature, public_key, superseded "
            "FROM receipts WHERE session_id=? ORDER BY step, stage_index, id",
            (session_id,),
        )
        out = []
        for row in rows:
            if row[14] and not include_superseded:
                continue
            r = Receipt(*row[:8], bytes(row[8]), bytes(row[9]), row[10], row[11], bytes(row[12]))
            out.append((r, bytes(row[13])))
        return out

    def add_audit(
        self,
        session_id: str,
        stage_index: int,
        position: int,
        audited: str,
        auditor: str,
        passed: bool,
        tolerance: str,
        worst_rel_l2: float,
        worst_max_rel: float,
        first_bad_position: int | None,
    ) -> None:
        col = "audits_passed" if passed else "audits_failed"
        self._write(
            [
                (
                    "INSERT INTO audits (session_id, stage_index, position, audited_node, auditor_node, passed, tolerance, "
                    "worst_rel_l2, worst_max_rel, first_bad_position, time) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        session_id,
                        stage_index,
                        position,
                        audited,
                        auditor,
                        int(passed),
                        tolerance,
                        worst_rel_l2,
                        worst_max_rel,
                        first_bad_position,
                        time.time(),
                    ),
                ),
                (f"UPDATE nodes SET {col}={col}+1 WHERE node_id=?", (audited,)),
            ]
        )

    def audits(self, session_id: str) -> list[dict]:
        rows = self._query(
            "SELECT stage_index, position, audited_node, auditor_node, passed, tolerance, worst_rel_l2, "
            "worst_max_rel, first_bad_position FROM audits WHERE session_id=? ORDER BY id",
            (session_id,),
        )
        keys = (
            "stage",
            "position",
            "node",
            "auditor",
            "passed",
            "tolerance",
            "worst_rel_l2",
            "worst_max_rel",
            "first_bad_position",
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def add_evidence(self, node_id: str, session_id: str | None, kind: str, detail: dict) -> None:
        self._write(
            [
                (
                    "INSERT INTO evidence (node_id, session_id, kind, detail, time) VALUES (?,?,?,?,?)",
                    (node_id, session_id, kind, json.dumps(detail, default=str), time.time()),
                )
            ]
        )

    def evidence(self, node_id: str | None = None) -> list[dict]:
        rows = self._query("SELECT node_id, session_id, kind, detail FROM evidence ORDER BY id")
        return [
            {"node_id": n, "session_id": s, "kind": k, "detail": json.loads(d)}
            for n, s, k, d in rows
            if node_id is None or n == node_id
        ]

    # --- offline verification ---------------------------------------------------------------

    def verify_session(self, session_id: str) -> VerifySummary:
        """Re-check every live receipt's signature, its key's binding to the node id, and the
        digest chain of each step (stage k's input = stage k-1's output, stage 0's input = the
        digest of the token ids it consumed). Raises LedgerError on the first failure."""
        sess = self.session(session_id)
        if sess is None:
            raise LedgerError(f"unknown session {session_id!r} in {self.path}")
        items = self.receipts(session_id)
        if not items:
            raise LedgerError(f"session {session_id} has no receipts in {self.path}")
        ids = sess["prompt_ids"] + sess["tokens"]
        by_step: dict[int, list[Receipt]] = {}
        for r, key in items:
            known = self.public_key(r.node_id)
            if known is not None and known != key:
                raise LedgerError(f"receipt of {r.node_id} stored with a key that is not the node's")
            try:
                r.check_signature(key)
            except ReceiptError as e:
                raise LedgerError(str(e)) from e
            by_step.setdefault(r.step, []).append(r)
        for step, rs in sorted(by_step.items()):
            first = min(rs, key=lambda r: r.stage_index)
            start, n = first.start_position, first.n_positions
            if start + n > len(ids):
                raise LedgerError(
                    f"step {step} covers positions {start}..{start + n - 1} beyond the stored tokens"
                )
            try:
                check_chain(rs, token_digest(session_id, start, ids[start : start + n]))
            except ReceiptError as e:
                raise LedgerError(str(e)) from e
        nodes = sorted({r.node_id for r, _ in items})
        return VerifySummary(session_id, len(items), len(by_step), nodes, len(sess["tokens"]))
