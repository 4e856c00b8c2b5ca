"""Bearer-token authentication and the admin check."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import g, request
from sqlalchemy.orm import Session

from models import User, new_session
from pipeline.accounts import user_for_token
from pipeline.errors import SkillpayError


class Unauthenticated(SkillpayError):
    """A valid bearer token is required (Authorization: Bearer <token>)."""

    code = "unauthenticated"
    http_status = 401


class Forbidden(SkillpayError):
    """This needs an admin."""

    code = "forbidden"
    http_status = 403


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def db() -> Session:
    """The request's session, closed at teardown."""
    if "db" not in g:
        g.db = new_session()
    return g.db


def current_user() -> User | None:
    if "user" not in g:
        token = bearer_token()
        g.user = user_for_token(db(), token) if token else None
    return g.user


def require_user(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_user() is None:
            raise Unauthenticated()
        return view(*args, **kwargs)

    return wrapper


def require_admin(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = current_user()
        if user is None:
            raise Unauthenticated()
        if not user.is_admin:
            raise Forbidden()
        return view(*args, **kwargs)

    return wrapper
