"""What one running API holds: settings, sessions, blob store, queue and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service.blobs import BlobStore
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    celery: Celery
    metrics: Metrics
