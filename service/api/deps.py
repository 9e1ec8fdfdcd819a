"""``Annotated`` dependencies: the app's state, a database session, and the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.api.state import AppState
from service.auth import Principal, authenticate
from service.errors import Problem


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.antidote
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(request: Request, state: StateDep) -> Principal:
    """Runs before any body is read, so an unauthenticated upload costs us nothing."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret:
        raise Problem(
            401,
            "UNAUTHENTICATED",
            "send an API key as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with state.sessions() as session:
        principal = authenticate(session, secret.strip())
    if principal is None:
        raise Problem(
            401,
            "INVALID_API_KEY",
            "the API key is unknown or revoked",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
