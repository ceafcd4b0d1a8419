"""Workers that must not join: another model, a range beyond the model, no coordinator.
Each is refused with one readable line and exit status 1, and the cluster carries on."""

from __future__ import annotations

import pytest
from helpers.cli import assert_one_line_error, consortium
from helpers.tiny_model import TinySpec, write_tiny_gguf

from consortium.coordinator.client import Client
from consortium.core.config import ClientConfig, SessionRequest
from consortium.transport.rpc import free_port


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("other") / "other.gguf", TinySpec(seed=1))


def _worker(coordinator: str, model, layers: str, log, *extra: str):
    return consortium(
        "worker",
        "start",
        "--coordinator",
        coordinator,
        "--model",
        str(model),
        "--layers",
        layers,
        "--log-file",
        str(log),
        *extra,
        timeout=180,
    )


def test_worker_with_another_model_is_refused(tiny_cluster, other_model, tmp_path):
    done = _worker(tiny_cluster.address, other_model, "1-2", tmp_path / "w.log")
    line = assert_one_line_error(
        done, f"coordinator at {tiny_cluster.address} refused this worker: model digest mismatch"
    )
    assert "the coordinator serves tiny.gguf" in line
    assert "model digest mismatch" in (tmp_path / "w.log").read_text()  # the process logged why it stopped


def test_layer_range_beyond_the_model_is_refused(tiny_cluster, tiny_gguf, tmp_path):
    done = _worker(tiny_cluster.address, tiny_gguf, "3-6", tmp_path / "w.log")
    assert_one_line_error(
        done, "layer range 3-6 is beyond the model's 4 layers (half-open: 0 <= start < end <= 4)"
    )
    done = consortium("worker", "start", "--coordinator", tiny_cluster.address, "--layers", "5-2", timeout=60)
    assert done.returncode == 2 and "empty layer range '5-2'" in done.stderr  # a usage error, from click


def test_unreachable_coordinator_is_one_line(tiny_gguf, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    done = _worker(dead, tiny_gguf, "0-1", tmp_path / "w.log", "--register-timeout", "1")
    assert_one_line_error(done, f"cannot reach coordinator at {dead} (connection refused)")


def test_cluster_unaffected(tiny_cluster):
    with Client(ClientConfig(tiny_cluster.address)) as c:
        assert sorted(n["node_id"] for n in c.cluster_status()["nodes"]) == [
            "coordinator",
            "worker-0",
            "worker-1",
        ]
        assert c.run(SessionRequest("after the intruders", max_tokens=4)).tokens
