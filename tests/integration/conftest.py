"""Fixtures that start real coordinator and worker processes (helpers/cluster.py).

Every cluster runs in its own process groups, is polled for readiness, and is stopped
(SIGTERM, then SIGKILL of the groups) by a finalizer, whatever the test did.
"""

from __future__ import annotations

import pytest
from helpers.cluster import start_cluster

from consortium.coordinator.client import Client
from consortium.coordinator.launcher import LocalCluster
from consortium.core.config import LayerRange


@pytest.fixture(scope="module")
def tiny_cluster(request, tiny_gguf, tmp_path_factory) -> LocalCluster:
    """Tiny model: workers 0-1 and 1-2, the coordinator 2-4; 1 MiB message limit everywhere."""
    small = ["--max-message-mb", "1"]
    return start_cluster(
        request,
        tiny_gguf,
        tmp_path_factory.mktemp("tiny-cluster"),
        LayerRange(2, 4),
        [LayerRange(0, 1), LayerRange(1, 2)],
        coordinator_args=small,
        worker_args=[small, small],
    )


@pytest.fixture
def client_for():
    clients = []

    def make(cluster: LocalCluster) -> Client:
        c = Client(cluster.client_config())
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
