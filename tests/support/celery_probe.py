"""A Celery app with one task that records its argument in a file, used to prove a
real worker consumes from each broker."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from services.common.celery_app import make_celery_app


def create_probe_app(broker_url: str, queue: str) -> Celery:
    app = make_celery_app(queue, broker_url)

    @app.task(name="probe.record")
    def record(path: str, value: str) -> None:
        with Path(path).open("a") as handle:
            handle.write(value + "\n")

    return app
