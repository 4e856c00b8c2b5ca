"""The iKhokha iK Pay API behind a small interface, chosen by configuration.

HttpGateway speaks to iKhokha (or to the local simulator, which speaks the same API). Every
request is signed over exactly the bytes sent. Errors come out as GatewayError with a kind
(network, timeout, authentication, validation, declined, gateway), whether a retry could help,
and a message fit for a student. No secret ever goes into a log line or an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import requests
import structlog
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from config import Settings
from pipeline.callbacks import lowered_keys, normalise_status
from pipeline.errors import GatewayError
from pipeline.signing import compact_json, sign

log = structlog.get_logger(__name__)

CREATE_PATH = "/public-api/v1/api/payment"
STATUS_PATH = "/public-api/v1/api/getStatus/{paylink_id}"
HISTORY_PATH = "/public-api/v1/api/payments/history"

STUDENT_MESSAGES = {
    "network": "We could not reach the payment service. Please try again in a few minutes.",
    "timeout": "The payment service took too long to answer. Please try again in a few minutes.",
    "authentication": (
        "Card payments are unavailable right now. Please try again later or pay by EFT."
    ),
    "validation": "The payment could not be set up. Please contact support.",
    "declined": (
        "The payment service declined to set up this payment. Please try again or pay by EFT."
    ),
    "gateway": "The payment service had a problem. Please try again in a few minutes.",
}


@dataclass(frozen=True)
class PaymentLink:
    paylink_id: str
    paylink_url: str
    external_transaction_id: str | None


@dataclass(frozen=True)
class LinkStatus:
    paylink_id: str
    status: str  # SUCCESS | FAILURE | PENDING | other, upper case
    amount_cents: int | None
    raw: dict[str, Any]

    @property
    def paid(self) -> bool:
        return self.status == "SUCCESS"


@dataclass(frozen=True)
class LinkRequest:
    amount_cents: int
    description: str
    external_transaction_id: str
    payment_reference: str
    callback_url: str
    success_url: str
    failure_url: str
    cancel_url: str
    requester_url: str


class Gateway(Protocol):
    def create_payment_link(self, request: LinkRequest) -> PaymentLink: ...

    def get_status(self, paylink_id: str) -> LinkStatus: ...

    def payment_history(self, start_date: str, end_date: str) -> list[dict[str, Any]]: ...

    def refund(self, paylink_id: str, amount_cents: int, reason: str, refund_id: str) -> str:
        """Refund part or all of a paid link; returns the gateway's reference for it.
        refund_id is ours, sent so that asking twice refunds once."""
        ...


def _error(kind: str, message: str, retryable: bool) -> GatewayError:
    return GatewayError(
        message, kind=kind, retryable=retryable, student_message=STUDENT_MESSAGES[kind]
    )


def _safe_text(value: str) -> str:
    # Quotes and backslashes are signed differently by some official samples: keep them out.
    return "".join(ch for ch in value if ch not in "\\'\"\x00")[:200]


class HttpGateway:
    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.base_url = settings.ikhokha_api_url
        self.app_id = settings.ikhokha_app_id
        self._secret = settings.ikhokha_app_secret
        self.mode = settings.ikhokha_mode
        self.refund_path = settings.ikhokha_refund_path
        self.timeout = (settings.ikhokha_connect_timeout, settings.ikhokha_read_timeout)
        self.session = session or requests.Session()
        # Retry a connection that failed before anything was sent (any method), and a GET that
        # met a 502/503/504. A POST that may have reached iKhokha is never sent twice.
        retry = Retry(
            total=3,
            connect=2,
            read=0,
            status=2,
            other=0,
            allowed_methods=frozenset({"GET"}),
            status_forcelist=(502, 503, 504),
            backoff_factor=0.2,
            raise_on_status=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    def __repr__(self) -> str:
        return f"HttpGateway({self.base_url!r}, app_id={self.app_id!r})"

    def _request(
        self, method: str, path: str, *, body: bytes = b"", query: dict[str, str] | None = None
    ) -> dict[str, Any]:
        headers = {  # as iKhokha's API documents them; callbacks come with lower-case names
            "IK-APPID": self.app_id,
            "IK-SIGN": sign(self._secret, path, body),
            "Content-Type": "application/json",
        }
        try:
            response = self.session.request(
                method,
                self.base_url + path,
                params=query,
                data=body or None,
                headers=headers,
                timeout=self.timeout,
            )
        except requests.Timeout as exc:
            raise _error("timeout", f"iKhokha {method} {path} timed out", True) from exc
        except requests.RequestException as exc:
            raise _error(
                "network", f"iKhokha {method} {path} unreachable: {type(exc).__name__}", True
            ) from exc
        status = response.status_code
        if status in (401, 403):
            raise _error(
                "authentication",
                f"iKhokha {method} {path} refused our credentials ({status})",
                False,
            )
        if status == 429 or status >= 500:
            raise _error("gateway", f"iKhokha {method} {path} answered {status}", True)
        if status >= 400:
            raise _error("validation", f"iKhokha {method} {path} answered {status}", False)
        try:
            data = response.json()
        except ValueError as exc:
            raise _error("gateway", f"iKhokha {method} {path} answered with no JSON", True) from exc
        if not isinstance(data, dict | list):
            raise _error("gateway", f"iKhokha {method} {path} answered with unexpected JSON", True)
        return data if isinstance(data, dict) else {"items": data}

    def create_payment_link(self, request: LinkRequest) -> PaymentLink:
        payload = {
            "entityID": request.external_transaction_id,
            "externalEntityID": request.external_transaction_id,
            "amount": request.amount_cents,
            "currency": "ZAR",
            "requesterUrl": request.requester_url,
            "mode": self.mode,
            "description": _safe_text(request.description),
            "paymentReference": _safe_text(request.payment_reference),
            "externalTransactionID": request.external_transaction_id,
            "urls": {
                "callbackUrl": request.callback_url,
                "successPageUrl": request.success_url,
                "failurePageUrl": request.failure_url,
                "cancelUrl": request.cancel_url,
            },
        }
        data = self._request("POST", CREATE_PATH, body=compact_json(payload))
        code = str(data.get("responseCode", ""))
        if code != "00":
            message = str(data.get("message", ""))[:200]
            raise _error("declined", f"iKhokha refused the payment link: {code} {message}", False)
        paylink_id, url = data.get("paylinkID"), data.get("paylinkUrl")
        if (
            not isinstance(paylink_id, str)
            or not isinstance(url, str)
            or not url.startswith("http")
        ):
            raise _error("gateway", "iKhokha's answer had no paylinkID or paylinkUrl", True)
        return PaymentLink(paylink_id, url, data.get("externalTransactionID"))

    def get_status(self, paylink_id: str) -> LinkStatus:
        data = self._request(
            "GET", STATUS_PATH.format(paylink_id=requests.utils.quote(paylink_id, safe=""))
        )
        return parse_status(paylink_id, data)

    def payment_history(self, start_date: str, end_date: str) -> list[dict[str, Any]]:
        # Signed over the path alone; the query string is appended after signing.
        data = self._request(
            "GET", HISTORY_PATH, query={"startDate": start_date, "endDate": end_date}
        )
        for key in ("items", "payments", "data", "transactions"):
            if isinstance(data.get(key), list):
                return [item for item in data[key] if isinstance(item, dict)]
        return []

    def refund(self, paylink_id: str, amount_cents: int, reason: str, refund_id: str) -> str:
        path = self.refund_path.format(paylink_id=requests.utils.quote(paylink_id, safe=""))
        payload = {
            "amount": amount_cents,
            "reason": _safe_text(reason),
            "externalRefundID": refund_id,
        }
        data = self._request("POST", path, body=compact_json(payload))
        lowered = lowered_keys(data)
        code = str(lowered.get("responsecode", "00"))
        if code != "00":
            message = str(lowered.get("message", ""))[:200]
            raise _error("declined", f"iKhokha refused the refund: {code} {message}", False)
        for key in ("refundid", "id", "transactionid", "reference"):
            if isinstance(lowered.get(key), str | int):
                return str(lowered[key])
        return refund_id


def parse_status(paylink_id: str, data: dict[str, Any]) -> LinkStatus:
    """Read a status answer tolerantly: its shape is not documented."""
    lowered = lowered_keys(data)
    raw_status = ""
    for key in ("status", "paymentstatus", "transactionstatus", "paylinkstatus"):
        if isinstance(lowered.get(key), str):
            raw_status = lowered[key]
            break
    amount = lowered.get("amount")
    return LinkStatus(
        paylink_id=paylink_id,
        status=normalise_status(raw_status) if raw_status else "UNKNOWN",
        amount_cents=amount if isinstance(amount, int) and not isinstance(amount, bool) else None,
        raw=data,
    )


class MemoryGateway:
    """iKhokha in memory, for tests: links are paid with settle(), and `failure`, when set,
    is raised by every call (an outage, a refusal). Production refuses it."""

    def __init__(self) -> None:
        self.links: dict[str, dict[str, Any]] = {}
        self.requests: list[LinkRequest] = []
        self.refunds: dict[str, dict[str, Any]] = {}  # by our refund id
        self.failure: Exception | None = None

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def create_payment_link(self, request: LinkRequest) -> PaymentLink:
        self._check()
        paylink_id = f"MEM{len(self.links) + 1:06d}"
        self.requests.append(request)
        self.links[paylink_id] = {
            "paylinkID": paylink_id,
            "status": "PENDING",
            "amount": request.amount_cents,
            "externalTransactionID": request.external_transaction_id,
        }
        url = f"https://pay.ikhokha.invalid/{paylink_id}"
        return PaymentLink(paylink_id, url, request.external_transaction_id)

    def settle(self, paylink_id: str, status: str, amount_cents: int | None = None) -> None:
        link = self.links.setdefault(paylink_id, {"paylinkID": paylink_id})
        link["status"] = status
        if amount_cents is not None:
            link["amount"] = amount_cents

    def get_status(self, paylink_id: str) -> LinkStatus:
        self._check()
        return parse_status(paylink_id, self.links.get(paylink_id, {"status": "PENDING"}))

    def payment_history(self, start_date: str, end_date: str) -> list[dict[str, Any]]:
        self._check()
        return list(self.links.values())

    def refund(self, paylink_id: str, amount_cents: int, reason: str, refund_id: str) -> str:
        self._check()
        self.refunds.setdefault(
            refund_id, {"paylinkID": paylink_id, "amount": amount_cents, "reason": reason}
        )
        return f"MEMREF-{refund_id[:8]}"


GATEWAYS = {"http": HttpGateway, "memory": lambda settings: MemoryGateway()}


def make_gateway(settings: Settings) -> Gateway:
    """The gateway IKHOKHA_GATEWAY names: iKhokha over HTTP (or the local simulator, which
    speaks the same API), or in memory for tests."""
    return GATEWAYS[settings.ikhokha_gateway](settings)  # type: ignore[no-any-return]
