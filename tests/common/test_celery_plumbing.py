"""The Celery plumbing delivers tasks to a real worker on every broker: the
embedded default, Redis and RabbitMQ (COINSTORE_TEST_BROKER_URL; CI fails without either)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from services.common.celery_app import make_celery_app
from tests.support.celery_probe import create_probe_app, thread_worker


def test_reliability_settings() -> None:
    app = make_celery_app("probe", "redis://127.0.0.1:6379/0")
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["visibility_timeout"] == 3600


@pytest.mark.timeout(120)
def test_worker_consumes_from_broker(broker_url: str, tmp_path: Path) -> None:
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    app = create_probe_app(broker_url, queue)
    out = tmp_path / "out.txt"
    with thread_worker(app, queue):
        for i in range(3):
            app.send_task("probe.record", args=[str(out), f"v{i}"], queue=queue)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and len(out.read_text().splitlines()) == 3:
                break
            time.sleep(0.1)
    assert sorted(out.read_text().splitlines()) == ["v0", "v1", "v2"]
