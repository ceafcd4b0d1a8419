"""`coordinator start --calibration FILE`: a model's own `consortium calibrate` report replaces
the committed one (another model's) for that model's thresholds, per range and CUSUM; a
malformed file or another model's is refused with one clear error."""

from __future__ import annotations

import copy
import json

import pytest
from helpers.cli import assert_one_line_error, consortium

from consortium.errors import ConsortiumError
from consortium.model.gguf_file import GGUFModel
from consortium.verification import tolerance
from consortium.verification.sequential import cusum_thresholds
from consortium.verification.tolerance import calibration_report, load_calibration, tolerance_for


@pytest.fixture(autouse=True)
def _no_loaded_reports(monkeypatch):
    monkeypatch.setattr(tolerance, "_loaded", {})


def _report_for(digest: str, n_layers: int = 4) -> dict:
    """The committed report re-labelled for another model, with recognisable thresholds."""
    r = copy.deepcopy(calibration_report())
    r["model_digest"] = digest
    starts = [0, 2]
    table = {"n_layers": n_layers, "sampled_starts": starts}
    for k, base in (("strict", 0.1), ("loose", 0.5)):
        rows = [[base + s + j / 100 for j in range(n_layers - s)] for s in starts]
        table[k] = {"rel_l2": rows, "max_rel": rows, "mean_rel_l2": rows}
        r["proposed"][k]["cusum_h"] = 77.0 if k == "strict" else 99.0
    r["ranges"] = table
    return r


def test_a_models_own_report_gives_its_thresholds(tiny_gguf, tmp_path):
    digest = GGUFModel(tiny_gguf).digest
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_report_for(digest)))
    before = tolerance_for("strict", (2, 4), 4, digest)  # the committed report's class-wide bound
    load_calibration(path, digest)
    assert tolerance_for("strict", (2, 4), 4, digest).rel_l2 == pytest.approx(2.11)  # start 2, 2 layers
    assert tolerance_for("loose", (0, 1), 4, digest).rel_l2 == pytest.approx(0.5)
    assert tolerance_for("strict", (2, 3), 4, digest).rel_l2 == pytest.approx(2.1)
    assert tolerance_for("strict", (3, 4), 4, digest).rel_l2 == pytest.approx(
        2.11
    )  # start 2's 2-4: holds 3-4
    assert before.rel_l2 == calibration_report()["proposed"]["strict"]["rel_l2"]
    assert cusum_thresholds(digest) == {"strict": 77.0, "loose": 99.0}
    other = calibration_report()["model_digest"]  # the committed model keeps its own table
    assert tolerance_for("strict", (0, 30), 30, other) == tolerance_for(
        "strict", (0, 30), 30, other, calibration_report()
    )


def test_another_models_report_or_a_malformed_one_is_refused(tiny_gguf, tmp_path):
    digest = GGUFModel(tiny_gguf).digest
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_report_for("f" * 64)))
    with pytest.raises(ConsortiumError, match="measured on the model ffffffffffffffff"):
        load_calibration(path, digest)
    short = _report_for(digest)
    short["ranges"]["strict"]["rel_l2"][1].pop()
    for text in ("{not json", json.dumps({"model_digest": digest}), json.dumps(short)):
        path.write_text(text)
        with pytest.raises(ConsortiumError, match="not a `consortium calibrate` report"):
            load_calibration(path, digest)
    assert tolerance._loaded == {}


def test_the_coordinator_refuses_another_models_report_in_one_line(tiny_gguf, tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(calibration_report()))  # SmolLM2's, not the tiny model's
    done = consortium(
        "coordinator",
        "start",
        "--model",
        str(tiny_gguf),
        "--port",
        "0",
        "--calibration",
        str(path),
        timeout=120,
    )
    assert_one_line_error(done, "was measured on the model")
