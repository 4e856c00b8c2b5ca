"""iKhokha's request and callback signature: HMAC-SHA256 over escape(path + body).

escape() is PHP's addslashes, as iKhokha's own samples apply it: a backslash before every
backslash, double quote and single quote, and NUL as \\0. It works on bytes: those are all
ASCII, and UTF-8 never uses ASCII bytes inside a multi-byte character.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Mapping

from pipeline.errors import AppIdMismatch, SignatureMismatch


def escape(data: bytes) -> bytes:
    return (
        data.replace(b"\\", b"\\\\")
        .replace(b'"', b'\\"')
        .replace(b"'", b"\\'")
        .replace(b"\x00", b"\\0")
    )


def sign(secret: str, path: str, body: bytes | str = b"") -> str:
    """Lowercase hex HMAC-SHA256 of escape(path + body), keyed with the App Secret (UTF-8)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    message = escape(path.encode("utf-8") + body)
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def compact_json(value: object) -> bytes:
    """The exact text we sign and send: compact, unescaped slashes and non-ASCII."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signed_callback(
    body: object, *, path: str, app_id: str, secret: str
) -> tuple[bytes, dict[str, str]]:
    """A callback's exact bytes and the headers that authenticate them, as iKhokha sends
    them. `body` is a JSON value, or bytes sent as they are."""
    raw = body if isinstance(body, bytes) else compact_json(body)
    headers = {
        "Content-Type": "application/json",
        "ik-appid": app_id,
        "ik-sign": sign(secret, path, raw),
    }
    return raw, headers


def body_variants(body: bytes) -> Iterator[bytes]:
    """The raw body, then (worked out only if asked for) the compact re-serialisation
    without `text`: integrations report iKhokha signatures that match only the latter.
    """
    yield body
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return
    if isinstance(parsed, dict):
        parsed.pop("text", None)
        try:
            compact = compact_json(parsed)
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): no UTF-8 form to sign
            return
        if compact != body:
            yield compact


def header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return ""


def verify_callback(
    headers: Mapping[str, str],
    paths: Iterable[str],
    body: bytes,
    *,
    app_id: str,
    secret: str,
) -> None:
    """Raise AppIdMismatch or SignatureMismatch unless the callback is iKhokha's, for us."""
    given_app_id = header(headers, "ik-appid").strip()
    if not given_app_id or not hmac.compare_digest(given_app_id.encode(), app_id.encode()):
        raise AppIdMismatch()
    given = header(headers, "ik-sign").strip().lower().encode()
    if not given:
        raise SignatureMismatch("the ik-sign header is missing")
    candidate_paths = list(dict.fromkeys(paths))
    # The raw body first: the compact variant (a JSON parse and dump) is built only when the
    # raw body matches on no path. Each comparison is constant-time; which variant matched
    # is no secret.
    for variant in body_variants(body):
        for path in candidate_paths:
            if hmac.compare_digest(sign(secret, path, variant).encode(), given):
                return
    raise SignatureMismatch()
