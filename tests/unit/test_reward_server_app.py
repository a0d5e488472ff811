"""The reward server's app in this process (Starlette's TestClient): health and the batcher's liveness."""

from __future__ import annotations

import time

from starlette.testclient import TestClient

from lampo.reward_model import RewardModelTemplate
from lampo.reward_server import Batcher, ServerSettings, create_app


class Echo(RewardModelTemplate):
    async def compute(self, messages):
        return [float(len(c[-1])) for c in messages]


SETTINGS = ServerSettings(host="127.0.0.1", port=8000, token=None, max_batch_size=8, max_wait_ms=1,
                          max_request_bytes=1 << 20)


def wait_loaded(client: TestClient) -> None:
    end = time.monotonic() + 10
    while client.get("/health").status_code == 503:
        assert time.monotonic() < end, "the model did not load"
        time.sleep(0.01)


def test_health_reports_a_dead_batching_task_and_compute_does_not_hang(monkeypatch):
    async def dies(self):
        raise RuntimeError("bug in the batching loop")

    monkeypatch.setattr(Batcher, "_run", dies)
    app, _ = create_app(Echo, {}, SETTINGS)
    with TestClient(app) as client:
        wait_loaded(client)
        health = client.get("/health")
        assert health.status_code == 500, health.text
        assert health.json() == {"error": "the micro-batching task stopped (RuntimeError: bug in the batching "
                                          "loop); this server scores nothing more: restart it"}
        reply = client.post("/compute", json={"messages": [["q", "abc"]]})
        assert reply.status_code == 500 and reply.json() == health.json()
