"""`python -m services.payouts.worker`: the payouts service's Celery worker (and beat with --beat)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from celery import Celery

from services.common.bootstrap import load, run_main
from services.common.celery_app import beat_schedule_file, make_celery_app
from services.payouts import tasks
from services.payouts.config import PayoutsSettings

SERVICE = "payouts"

log = logging.getLogger(__name__)


def create_app(settings: PayoutsSettings) -> Celery:
    app = make_celery_app(SERVICE, settings.broker_url)
    app.conf.task_default_queue = settings.payout_queue
    tasks.register(app, settings)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{SERVICE}.worker")
    parser.add_argument("--beat", action="store_true", help="also run the periodic scheduler (one per deployment)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool", default="prefork")
    args = parser.parse_args(argv)

    def start() -> None:
        settings = load(PayoutsSettings, f"{SERVICE}-worker")
        app = create_app(settings)
        worker_argv = [
            "worker",
            f"--concurrency={args.concurrency}",
            f"--pool={args.pool}",
            f"--queues={settings.payout_queue}",
            # Named after its queue: workers of different queues on one broker (parallel test
            # runs, two deployments) never share a remote-control mailbox, which RabbitMQ
            # declares exclusive. The default queue keeps the name payouts@<host>.
            f"--hostname={settings.payout_queue}@%h",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if args.beat:
            worker_argv += ["--beat", f"--schedule={beat_schedule_file(SERVICE)}"]
        app.worker_main(worker_argv)

    run_main(f"{SERVICE}-worker", start)


if __name__ == "__main__":
    main()
