"""Users, roles and bearer tokens. A token is shown once and stored only as its SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from models import ApiToken, Role, User, utcnow
from pipeline.errors import NotFound, SkillpayError

TOKEN_PREFIX = "sp_"  # noqa: S105 - a prefix, not a secret


class DuplicateUser(SkillpayError):
    code = "duplicate_user"
    http_status = 409


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_user(session: Session, email: str, role: str = Role.STUDENT) -> User:
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise SkillpayError(f"not an email address: {email!r}")
    if role not in (Role.STUDENT, Role.ADMIN):
        raise SkillpayError(f"role must be student or admin, not {role!r}")
    if session.scalar(select(User.id).where(User.email == email)) is not None:
        raise DuplicateUser(f"a user with email {email} exists")
    user = User(email=email, role=role)
    session.add(user)
    session.flush()
    return user


def issue_token(session: Session, user: User, expires_in: timedelta | None = None) -> str:
    """A new bearer token for the user, valid for `expires_in` (None: until revoked); the
    only time the token itself exists."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + expires_in if expires_in is not None else None
    session.add(
        ApiToken(
            user_id=user.id, token_hash=hash_token(token), prefix=token[:10], expires_at=expires_at
        )
    )
    session.flush()
    return token


def parse_duration(text: str) -> timedelta | None:
    """'30d', '12h', '90m' as a timedelta; 'never' as None. Raises SkillpayError otherwise."""
    text = text.strip().lower()
    if text == "never":
        return None
    units = {"d": "days", "h": "hours", "m": "minutes"}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit() or not 0 < int(number) <= 100_000:
        raise SkillpayError(f"not a duration: {text!r} (use 30d, 12h, 90m or never)")
    return timedelta(**{units[unit]: int(number)})


def user_for_token(session: Session, token: str) -> User | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    # The lookup is by hash, so comparing in constant time is the database's index, not ours.
    row = session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(token),
            ApiToken.revoked_at.is_(None),
            or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > utcnow()),
        )
    )
    return row.user if row is not None else None


def find_user(session: Session, email: str) -> User | None:
    """The user with this e-mail address (any case, spaces around ignored)."""
    return session.scalar(select(User).where(User.email == email.strip().lower()))


def revoke_tokens(session: Session, email: str, token: str | None = None) -> int:
    """Revoke one token of a user, or all of them. Returns how many were revoked."""
    user = find_user(session, email)
    if user is None:
        raise NotFound(f"no user with email {email}")
    stmt = update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
    if token is not None:
        stmt = stmt.where(ApiToken.token_hash == hash_token(token))
    return session.execute(stmt.values(revoked_at=utcnow())).rowcount
