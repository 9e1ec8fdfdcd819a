"""The message broker as both sides see it: the Celery configuration, the task's name, and
the embedded broker's transport.

The API publishes jobs by task name through ``make_celery(settings)`` and never imports the
worker's code; the worker (``worker.celery_app``) builds its app with the same function, adding
its tasks. Nothing here touches the broker or the disk at import time.

Delivery is at least once (``acks_late`` + ``task_reject_on_worker_lost``): a job survives a
worker killed mid-run. Running it at most once at a time is the database's job: the task claims
the job with a compare-and-set update and a lease (see ``service.jobs``), so a redelivered or
republished message for a job already held does nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from time import monotonic
from typing import Any

from celery import Celery
from kombu.entity import Queue
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

from service.settings import Settings

TASK_NAME = "antidote.purify"


class _WholeMessageChannel(filesystem.Channel):
    """kombu's filesystem channel creates a message's file and then writes it: a worker that
    lists the folder in between takes an empty message, fails to decode it and stops, and the
    job's message is lost with it. Writing under a name no consumer matches (it starts with a
    dot) and renaming it into place makes a message appear whole or not at all."""

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"  # kombu's own order
        final = Path(self.data_folder_out) / name
        staging = final.with_name(f".{name}.part")
        try:
            staging.write_bytes(dumps(payload).encode())  # type: ignore[no-untyped-call]
            os.replace(staging, final)
        except OSError as exc:
            staging.unlink(missing_ok=True)
            raise ChannelError(f"Cannot add file {str(final)!r} to directory") from exc


class WholeMessageTransport(filesystem.Transport):
    """The embedded broker: kombu's filesystem transport, with whole-message writes."""

    Channel = _WholeMessageChannel


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    """A Celery app for ``settings``' broker and queue; ``include`` names the task modules a
    worker loads (none for a publisher). The embedded broker's folders are made here."""
    app = Celery("antidote", broker=settings.broker, include=list(include))
    hard = settings.hard_time_limit_s
    transport: dict[str, object] = {}
    if settings.embedded:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
        app.conf.broker_transport = f"{__name__}:WholeMessageTransport"
    else:
        # Redis hands an unacknowledged message to another worker after this long; it must
        # outlast the longest job, or a running job would be delivered again mid-run.
        transport = {"visibility_timeout": hard + 2 * 3600}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the database is the source of truth
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=hard,
        task_soft_time_limit=settings.soft_limit_s,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        broker_transport_options=transport,
        visibility_timeout=transport.get("visibility_timeout"),
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(settings.worker_queue),),  # type: ignore[no-untyped-call]
        task_default_queue=settings.worker_queue,
        task_create_missing_queues=False,
        task_routes={TASK_NAME: {"queue": settings.worker_queue}},
    )
    return app
