"""What a callback says, read tolerantly: iK Pay's field names and the older e-commerce API's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipeline.errors import MalformedCallback

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
_STATUS_ALIASES = {
    "success": SUCCESS,
    "successful": SUCCESS,
    "paid": SUCCESS,
    "completed": SUCCESS,
    "failure": FAILURE,
    "failed": FAILURE,
    "declined": FAILURE,
}
_PAYLINK_KEYS = ("paylinkid", "paylink_id")
_EXTERNAL_KEYS = ("externaltransactionid", "external_transaction_id")
_MAX_ID = 128


@dataclass(frozen=True)
class Callback:
    paylink_id: str | None
    external_transaction_id: str | None
    status: str
    response_code: str | None
    fields: dict[str, Any]

    @property
    def dedupe_key(self) -> str:
        """The same payment outcome delivered again has the same key; SUCCESS and FAILURE differ.

        The response code is left out, so a status check that learns the same outcome as a
        callback (pipeline.inbox.receive_status_answer) is the same event.
        """
        parts = [self.paylink_id or "", self.external_transaction_id or "", self.status]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def lowered_keys(data: dict[str, Any]) -> dict[str, Any]:
    """The same fields with lower-case names: iKhokha's casing varies between its APIs."""
    return {str(k).lower(): v for k, v in data.items()}


def callback_body(
    *, paylink_id: str | None, external_transaction_id: str, status: str, **extra: Any
) -> dict[str, Any]:
    """A callback's fields as iK Pay sends them (the simulator, `skillpay callback`, and an
    answer from the status endpoint fed into the pipeline all build theirs here)."""
    return {
        "paylinkID": paylink_id or "",
        "status": status,
        "externalTransactionID": external_transaction_id,
        "responseCode": "00" if status == SUCCESS else "05",
        **extra,
    }


def _storable(key: str, text: str) -> str:
    """Text PostgreSQL can store: no NUL, and valid UTF-8 (no lone surrogates)."""
    if "\x00" in text:
        raise MalformedCallback(f"{key} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedCallback(f"{key} is not valid UTF-8 text") from None
    return text


def _pick(lowered: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = lowered.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise MalformedCallback(f"{key} must be a string")
        text = _storable(key, str(value).strip())
        if len(text) > _MAX_ID:
            raise MalformedCallback(f"{key} is longer than {_MAX_ID} characters")
        return text or None
    return None


def normalise_status(raw: str) -> str:
    return _STATUS_ALIASES.get(raw.strip().lower(), raw.strip().upper())


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"status": "FAILURE", "status": "SUCCESS"}: which one counts differs between parsers,
    # so a signed body that says two things is refused rather than read one way.
    keys = [key.lower() for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise MalformedCallback("the body names a field twice")
    return dict(pairs)


def parse_callback(body: bytes) -> Callback:
    """Parse a callback body or raise MalformedCallback saying what is wrong."""
    try:
        data = json.loads(body, object_pairs_hook=_refuse_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise MalformedCallback("the body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise MalformedCallback("the body must be a JSON object")
    lowered = lowered_keys(data)
    paylink_id = _pick(lowered, _PAYLINK_KEYS)
    external_id = _pick(lowered, _EXTERNAL_KEYS)
    if not paylink_id and not external_id:
        raise MalformedCallback("paylinkID or externalTransactionID is required")
    status = lowered.get("status")
    if not isinstance(status, str) or not status.strip() or len(status) > 32:
        raise MalformedCallback("status must be a non-empty string")
    status = _storable("status", status)
    code = lowered.get("responsecode")
    if code is not None and not isinstance(code, str | int):
        raise MalformedCallback("responseCode must be a string")
    if code is not None:
        _storable("responseCode", str(code))
    return Callback(
        paylink_id=paylink_id,
        external_transaction_id=external_id,
        status=normalise_status(status),
        response_code=None if code is None else str(code)[:32],
        fields=data,
    )
