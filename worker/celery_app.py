"""The worker's Celery app: one task (``worker.tasks``), one queue per accelerator kind.

``celery -A worker.celery_app worker`` loads this module; the configuration is
``service.broker``'s, shared with the API, which publishes by task name.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from service.broker import TASK_NAME, make_celery
from service.logs import configure_logging
from service.settings import get_settings

__all__ = ["TASK_NAME", "app"]


@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _json_logs(**_: Any) -> None:
    """Worker logs are JSON lines like the API's; connecting here stops Celery's own setup."""
    configure_logging()


app = make_celery(get_settings(), include=["worker.tasks"])
