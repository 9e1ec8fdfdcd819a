"""Uploaded files: content-addressed blobs registered per tenant."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.blobs import Blob
from service.errors import Problem
from service.models import File

JOB_FILE_FIELDS = ("checkpoint_file", "dataset_file", "model_config_file")


def file_id(*, tenant: str, sha256: str) -> str:
    """Stable per tenant and content: the same bytes again give the same id."""
    return "file_" + hashlib.sha256(f"{tenant}\n{sha256}".encode()).hexdigest()[:32]


def register(session: Session, *, tenant: str, blob: Blob) -> str:
    """The id of ``blob`` for ``tenant``, its row committed. Blocks on the database, so async
    routes run it in the threadpool: on the event loop a wait for a pooled connection would
    stall the requests that are to give one back."""
    ident = file_id(tenant=tenant, sha256=blob.sha256)
    if session.get(File, ident) is None:
        session.add(File(id=ident, tenant=tenant, sha256=blob.sha256, size=blob.size))
        try:
            session.commit()
        except IntegrityError:  # the same bytes raced in from a parallel upload
            session.rollback()
            session.execute(select(File).where(File.id == ident)).scalar_one()
    return ident


def owned(session: Session, *, tenant: str, ids: dict[str, str | None]) -> dict[str, File]:
    """The rows of the files a request names by field, each the tenant's own, or a 404
    naming the field; another tenant's file is as missing as one that never was."""
    found: dict[str, File] = {}
    for field, ident in ids.items():
        if ident is None:
            continue
        row = session.get(File, ident) if len(ident) <= 40 else None
        if row is None or row.tenant != tenant:
            raise Problem(404, "FILE_NOT_FOUND", f"no file {ident!r} ({field})", field=field)
        found[field] = row
    return found
