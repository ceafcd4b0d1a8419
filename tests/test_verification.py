"""Identity, commitments, receipts, tolerance comparison, cheats and the ledger."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys

import pytest
import torch

from consortium.errors import ConsortiumError
from consortium.identity import IdentityError, NodeIdentity, node_id_for, verify_signature
from consortium.transport.proto import consortium_pb2 as pb
from consortium.verification.commitment import CommitHeader, digest, seed_style_hash, token_digest
from consortium.verification.ledger import Ledger, LedgerError
from consortium.verification.misbehave import Misbehaviour, requantize
from consortium.verification.receipts import Receipt, ReceiptError, check_chain
from consortium.verification.tolerance import Tolerance, compare_rows, tolerance_class


def test_identity_created_once_with_mode_0600(tmp_path):
    a = NodeIdentity.load_or_create(tmp_path / "data")
    key = tmp_path / "data" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    b = NodeIdentity.load_or_create(tmp_path / "data")
    assert a.node_id == b.node_id == node_id_for(a.public_key)
    assert a.node_id != NodeIdentity.generate().node_id


def test_identity_bad_key_files(tmp_path):
    key = tmp_path / "node.key"
    key.write_bytes(b"short")
    os.chmod(key, 0o600)
    with pytest.raises(IdentityError, match="malformed"):
        NodeIdentity.load(key)
    key.write_bytes(b"x" * 32)
    os.chmod(key, 0o644)
    with pytest.raises(IdentityError, match="accessible by others"):
        NodeIdentity.load(key)
    with pytest.raises(IdentityError, match="cannot read"):
        NodeIdentity.load(tmp_path / "missing.key")


def test_signatures():
    ident = NodeIdentity.generate()
    sig = ident.sign(b"hello")
    assert verify_signature(ident.public_key, sig, b"hello")
    assert not verify_signature(ident.public_key, sig, b"hellO")
    assert not verify_signature(ident.public_key, sig[:-1], b"hello")  # truncated
    assert not verify_signature(b"\x00" * 31, sig, b"hello")
    assert not verify_signature(NodeIdentity.generate().public_key, sig, b"hello")


def _receipt(ident: NodeIdentity, stage: int, inp: bytes, out: bytes, step: int = 0) -> Receipt:
    return Receipt(
        "s1",
        step,
        0,
        3,
        stage,
        10 * stage,
        10 * stage + 10,
        "ab" * 32,
        inp,
        out,
        ident.node_id,
        1_700_000_000_000,
    ).signed(ident)


def test_receipt_signature_binds_every_field():
    ident = NodeIdentity.generate()
    r = _receipt(ident, 0, b"i" * 32, b"o" * 32)
    r.check_signature(ident.public_key)
    from dataclasses import fields, replace

    for f in fields(Receipt):
        if f.name in ("signature", "node_id"):
            continue
        v = getattr(r, f.name)
        bad = replace(
            r, **{f.name: (v + 1) if isinstance(v, int) else v[:-1] + (b"X" if isinstance(v, bytes) else "X")}
        )
        with pytest.raises(ReceiptError, match="bad signature"):
            bad.check_signature(ident.public_key)
    other = NodeIdentity.generate()
    with pytest.raises(ReceiptError, match="bad signature"):
        r.check_signature(other.public_key)
    with pytest.raises(ReceiptError):
        replace(r, signature=b"garbage").check_signature(ident.public_key)
    with pytest.raises(ReceiptError):
        r.check_signature(b"short")


def test_digest_chain():
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    t = token_digest("s1", 0, [1, 2, 3])
    r0, r1 = _receipt(a, 0, t, b"h" * 32), _receipt(b, 1, b"h" * 32, b"o" * 32)
    check_chain([r1, r0], t)
    with pytest.raises(ReceiptError, match="chain broken at stage 1"):
        check_chain([r0, _receipt(b, 1, b"x" * 32, b"o" * 32)], t)
    with pytest.raises(ReceiptError, match="chain broken at stage 0"):
        check_chain([r0, r1], token_digest("s1", 0, [1, 2, 4]))


def test_commitment_binds_header_and_bytes():
    h = CommitHeader("s", 1, 5, 2, "fp32", (2, 576))
    data = torch.randn(2, 576).numpy().tobytes()
    d = digest(h, data)
    assert len(d) == 32 and d == digest(h, data)
    assert d != digest(CommitHeader("s", 1, 6, 2, "fp32", (2, 576)), data)
    assert d != digest(CommitHeader("s", 0, 5, 2, "fp32", (2, 576)), data)
    assert d != digest(h, data[:-1] + b"\x00")
    assert token_digest("s", 0, [1, 2]) != token_digest("s", 1, [1, 2])


def test_compare_rows_and_classes():
    torch.manual_seed(0)
    ref = torch.randn(4, 576)
    cmp = compare_rows(ref + 1e-6 * torch.randn(4, 576), ref)
    assert cmp.worst_rel_l2 < 1e-5
    bad = ref.clone()
    bad[2, 7] = -bad[2].abs().max() * 3
    cmp = compare_rows(bad, ref)
    tol = Tolerance("t", 1e-3, 0.5)
    assert cmp.failing_rows(tol) == [2]
    nan = ref.clone()
    nan[1, 0] = float("nan")
    assert compare_rows(nan, ref).failing_rows(tol) == [1]
    strict, loose = tolerance_class("fp32", "fp16"), tolerance_class("fp32", "bf16")
    assert strict.name == "strict" and loose.name == "loose"
    assert strict.rel_l2 < loose.rel_l2


def test_seed_style_hash_is_brittle():
    x = torch.randn(8, 576) * 10
    assert seed_style_hash(x) == seed_style_hash(x.clone())
    # a difference of 3e-5 that straddles the middle of two 1/64 grid points changes the hash
    y, z = x.clone(), x.clone()
    y[0, 0], z[0, 0] = 1 / 128 - 2**-16, 1 / 128 + 2**-16
    assert seed_style_hash(y)[0] != seed_style_hash(z)[0]


def test_misbehaviour_is_refused_unless_enabled(monkeypatch):
    monkeypatch.delenv("CONSORTIUM_ALLOW_MISBEHAVE", raising=False)
    with pytest.raises(ConsortiumError, match="for tests only"):
        Misbehaviour.parse("skip-layer")
    monkeypatch.setenv("CONSORTIUM_ALLOW_MISBEHAVE", "1")
    assert Misbehaviour.parse("noise=0.01") == Misbehaviour("noise", 0.01)
    assert Misbehaviour.parse("die-at=5") == Misbehaviour("die-at", step=5)
    assert Misbehaviour.parse("hang-at=12") == Misbehaviour("hang-at", step=12)
    for bad in ["teleport", "noise=abc", "skip-layer=3", "die-at", "die-at=0", "hang-at=-1", "hang-at=x"]:
        with pytest.raises(ConsortiumError):
            Misbehaviour.parse(bad)


def test_output_cheats():
    x = torch.randn(3, 64)
    flipped = Misbehaviour("flip-max").corrupt_output(x, 0)
    i = x.abs().argmax(-1)
    assert torch.equal(flipped.gather(-1, i[:, None]), -x.gather(-1, i[:, None]))
    noisy = Misbehaviour("noise", 0.01).corrupt_output(x, 0)
    rel = ((noisy - x).norm(dim=-1) / x.norm(dim=-1)).mean()
    assert 0.005 < rel < 0.02
    w = torch.randn(16, 64)
    assert 0 < (requantize(w, 4) - w).norm() / w.norm() < 0.2
    assert 0 < (requantize(w, 8) - w).norm() / w.norm() < 0.01


def test_faults_fire_at_the_decode_order_of_step_n_of_a_normal_session():
    m = Misbehaviour.parse("die-at=3", enabled=True)

    def due(step: int, start: int, sid: str = "3f2a") -> bool:
        return m.fault_due(pb.WorkOrder(session_id=sid, step=step, start_position=start))

    assert due(3, 12)  # prompt of 10: step 3 decodes token 2 at position 12
    assert not due(2, 11) and not due(4, 13)
    assert not due(3, 0)  # a prefill (resumed session) or a replay to a backup starts at position 0
    assert not due(3, 12, "3f2a.audit1")  # an auditor's recompute
    assert not Misbehaviour("noise", 0.01).fault_due(pb.WorkOrder(session_id="s", step=0, start_position=5))


_FAULT_SCRIPT = """
import sys
from consortium.core.config import EngineConfig, LayerRange
from consortium.model.gguf_file import GGUFModel
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor
from consortium.verification.misbehave import Misbehaviour, make_runner

r = make_runner(GGUFModel(sys.argv[1]), LayerRange(0, 1), EngineConfig(), 2**22, 600.0,
                misbehaviour=Misbehaviour.parse(sys.argv[2], enabled=True))
for sid in ("a", "b"):
    r.open(pb.OpenSessionRequest(session_id=sid, capacity=16, layers=pb.LayerRange(start=0, end=1)))
    for step, pos, ids in [(0, 0, [5, 9, 200]), (1, 3, [17]), (2, 4, [3]), (3, 5, [8])]:
        order = pb.WorkOrder(session_id=sid, step=step, layers=pb.LayerRange(start=0, end=1),
                             start_position=pos, input=WireTensor.from_tokens(ids).to_proto())
        r.execute(order)
        print(sid, step, flush=True)
"""


def test_die_at_and_hang_at_stop_the_process_before_answering_step_n(tiny_gguf):
    """die-at=2: killed (-9) on step 2's order, after answering steps 0 and 1. hang-at=2: stopped
    there; continued, it answers step 2 and never hangs again (session b passes step 2)."""
    cmd = [sys.executable, "-c", _FAULT_SCRIPT, str(tiny_gguf)]
    done = subprocess.run(cmd + ["die-at=2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and done.stdout.split("\n")[:-1] == ["a 0", "a 1"], done.stderr
    assert "die-at=2: dying (SIGKILL) at step 2" in done.stderr
    p = subprocess.Popen(cmd + ["hang-at=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(p.pid, os.WUNTRACED)  # returns once the child stops itself
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert out.split() == [w for sid in "ab" for step in "0123" for w in (sid, step)]


def test_ledger_records_and_verifies(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    for n in (a, b):
        led.upsert_node(n.node_id, n.public_key, "127.0.0.1:1", "cpu", "fp32")
    led.create_session("s1", [1, 2, 3], {"seed": 0}, [])
    t = token_digest("s1", 0, [1, 2, 3])
    receipts = [
        (_receipt(a, 0, t, b"h" * 32), a.public_key),
        (_receipt(b, 1, b"h" * 32, b"o" * 32), b.public_key),
    ]
    led.commit_step("s1", receipts, 3, 42)  # one transaction: the step's receipts and its token
    s = led.verify_session("s1")
    assert (s.receipts, s.steps, s.tokens) == (2, 1, 1)

    led.add_audit("s1", 1, 2, b.node_id, "coordinator", False, "strict", 0.5, 3.0, 0)
    led.add_evidence(b.node_id, "s1", "audit-failed", {"rel_l2": 0.5})
    led.ban(b.node_id, "failed audit")
    assert led.is_banned(b.node_id) and led.banned_nodes() == [b.node_id]
    assert led.score(b.node_id).audits_failed == 1
    led.close()

    # reopened: everything persisted
    again = Ledger(tmp_path / "ledger.db", create=False)
    assert again.banned_nodes() == [b.node_id] and again.tokens("s1") == [42]
    again.close()

    # tampering with any stored row makes verification fail
    for sql in [
        "UPDATE receipts SET output_digest=X'00' WHERE stage_index=1",
        "UPDATE receipts SET step=5 WHERE stage_index=0",
        "UPDATE receipts SET public_key=(SELECT public_key FROM receipts WHERE stage_index=0) WHERE stage_index=1",
        "UPDATE sessions SET prompt_ids='[1, 2, 4]'",
    ]:
        copy = tmp_path / "copy.db"
        copy.unlink(missing_ok=True)
        src = sqlite3.connect(tmp_path / "ledger.db")
        src.execute(f"VACUUM INTO '{copy}'")
        src.close()
        db = sqlite3.connect(copy)
        db.execute(sql)
        db.commit()
        db.close()
        with pytest.raises(LedgerError):
            Ledger(copy, create=False).verify_session("s1")


def test_ledger_bad_files(tmp_path):
    with pytest.raises(LedgerError, match="ledger not found"):
        Ledger(tmp_path / "none.db", create=False)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger(junk)
    led = Ledger(tmp_path / "ro.db")
    led.create_session("s", [1], {}, [])
    led.close()
    ro = Ledger(tmp_path / "ro.db", readonly=True)
    with pytest.raises(LedgerError, match="write failed"):
        ro.commit_step("s", [], 1, 5)
    assert ro.session("s")["tokens"] == []  # nothing lost, nothing half-written
    with pytest.raises(LedgerError, match="unknown session"):
        ro.verify_session("nope")


def test_work_receipt_round_trip_and_every_lie():
    from consortium.transport.proto import consortium_pb2 as pb
    from consortium.transport.tensors import WireTensor
    from consortium.verification.receipts import check_work_receipt, input_digest, make_receipt, to_proto

    node = NodeIdentity.generate()
    inp = WireTensor.from_tokens([5, 6, 7])
    out = WireTensor.from_torch(torch.randn(3, 8))
    order = pb.WorkOrder(
        session_id="s",
        step=0,
        stage_index=0,
        layers=pb.LayerRange(start=0, end=10),
        start_position=0,
        input=inp.to_proto(),
    )
    r = to_proto(make_receipt(node, "w0", order, "d" * 64, inp, out))
    want_in = token_digest("s", 0, [5, 6, 7])
    assert input_digest("s", 0, 0, inp) == want_in
    check_work_receipt(r, order, node.public_key, "d" * 64, want_in, out)

    with pytest.raises(ReceiptError, match="no receipt"):
        check_work_receipt(pb.Receipt(), order, node.public_key, "d" * 64, want_in, out)
    with pytest.raises(ReceiptError, match="bad signature"):
        bad = pb.Receipt()
        bad.CopyFrom(r)
        bad.signature = bytes(64)
        check_work_receipt(bad, order, node.public_key, "d" * 64, want_in, out)
    later = pb.WorkOrder()
    later.CopyFrom(order)
    later.step, later.start_position = 1, 3
    with pytest.raises(ReceiptError, match="replayed or forged"):
        check_work_receipt(r, later, node.public_key, "d" * 64, want_in, out)
    with pytest.raises(ReceiptError, match="layer weights"):
        check_work_receipt(r, order, node.public_key, "e" * 64, want_in, out)
    with pytest.raises(ReceiptError, match="chain broken"):
        check_work_receipt(r, order, node.public_key, "d" * 64, token_digest("s", 0, [5, 6, 8]), out)
    with pytest.raises(ReceiptError, match="output digest"):
        check_work_receipt(
            r, order, node.public_key, "d" * 64, want_in, WireTensor.from_torch(torch.randn(3, 8))
        )
