"""The iKhokha client: what it signs and sends, and how it classifies what comes back."""

from __future__ import annotations

import json

import pytest
import requests

from pipeline.errors import GatewayError
from pipeline.ikhokha import HttpGateway, LinkRequest, parse_status
from pipeline.signing import sign
from tests.support import make_settings

SECRET = "s3cr3t-value-that-must-not-leak"


class FakeResponse:
    def __init__(self, status: int, body: object) -> None:
        self.status_code = status
        self._body = body

    def json(self):
        if isinstance(self._body, Exception):
            raise self._body
        return self._body


class FakeSession(requests.Session):
    def __init__(self, outcome) -> None:
        super().__init__()
        self.outcome = outcome
        self.calls: list[dict] = []

    def request(self, method, url, **kwargs):  # type: ignore[override]
        self.calls.append({"method": method, "url": url, **kwargs})
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def gateway(outcome):
    settings = make_settings(
        "sqlite://",
        ikhokha_api_url="https://api.example",
        ikhokha_app_secret=SECRET,
        ikhokha_app_id="app-1",
    )
    session = FakeSession(outcome)
    return HttpGateway(settings, session=session), session


LINK = LinkRequest(
    amount_cents=149900,
    description="Course 'Python' \\ \"x\"",
    external_transaction_id="pay-1",
    payment_reference="SP-ABC",
    callback_url="https://sp.example/webhooks/ikhokha",
    success_url="https://sp.example/s",
    failure_url="https://sp.example/f",
    cancel_url="https://sp.example/c",
    requester_url="https://sp.example",
)


def test_create_link_signs_the_exact_bytes_it_sends():
    gw, session = gateway(
        FakeResponse(
            200,
            {
                "responseCode": "00",
                "paylinkUrl": "https://securepay.ikhokha.red/x",
                "paylinkID": "PL9",
                "externalTransactionID": "pay-1",
            },
        )
    )
    link = gw.create_payment_link(LINK)
    assert (link.paylink_id, link.paylink_url) == ("PL9", "https://securepay.ikhokha.red/x")
    call = session.calls[0]
    assert call["url"] == "https://api.example/public-api/v1/api/payment"
    body = call["data"]
    assert call["headers"]["IK-SIGN"] == sign(SECRET, "/public-api/v1/api/payment", body)
    assert call["headers"]["IK-APPID"] == "app-1"
    sent = json.loads(body)
    assert sent["amount"] == 149900 and sent["currency"] == "ZAR"
    assert sent["externalTransactionID"] == "pay-1"
    assert sent["urls"]["callbackUrl"] == "https://sp.example/webhooks/ikhokha"
    # Quotes and backslashes, which some official samples sign differently, are kept out.
    assert sent["description"] == "Course Python  x"
    assert b", " not in body and b'": ' not in body  # compact


def test_status_is_a_signed_get_over_the_path():
    gw, session = gateway(FakeResponse(200, {"status": "SUCCESS", "amount": 100}))
    status = gw.get_status("PL/1")
    assert status.paid and status.amount_cents == 100
    call = session.calls[0]
    assert call["url"].endswith("/getStatus/PL%2F1") and call["data"] is None
    assert call["headers"]["IK-SIGN"] == sign(SECRET, "/public-api/v1/api/getStatus/PL%2F1", b"")


def test_history_signs_the_path_without_the_query():
    gw, session = gateway(FakeResponse(200, {"payments": [{"paylinkID": "a"}, "junk"]}))
    assert gw.payment_history("2026-11-01", "2026-11-22") == [{"paylinkID": "a"}]
    call = session.calls[0]
    assert call["params"] == {"startDate": "2026-11-01", "endDate": "2026-11-22"}
    assert call["headers"]["IK-SIGN"] == sign(SECRET, "/public-api/v1/api/payments/history", b"")


@pytest.mark.parametrize(
    ("outcome", "kind", "retryable"),
    [
        (requests.ConnectTimeout("x"), "timeout", True),
        (requests.ReadTimeout("x"), "timeout", True),
        (requests.ConnectionError("refused"), "network", True),
        (FakeResponse(401, {}), "authentication", False),
        (FakeResponse(403, {}), "authentication", False),
        (FakeResponse(400, {"message": "bad"}), "validation", False),
        (FakeResponse(429, {}), "gateway", True),
        (FakeResponse(502, {}), "gateway", True),
        (FakeResponse(200, ValueError("not json")), "gateway", True),
        (
            FakeResponse(200, {"responseCode": "99", "message": "merchant disabled"}),
            "declined",
            False,
        ),
        (FakeResponse(200, {"responseCode": "00"}), "gateway", True),
    ],
)
def test_errors_are_classified_with_a_student_message_and_no_secret(outcome, kind, retryable):
    gw, _ = gateway(outcome)
    with pytest.raises(GatewayError) as info:
        gw.create_payment_link(LINK)
    err = info.value
    assert (err.kind, err.retryable) == (kind, retryable)
    assert err.student_message and "iKhokha" not in err.student_message
    assert SECRET not in str(err) and SECRET not in repr(gw)


def test_status_answers_of_unknown_shape_are_read_tolerantly():
    assert parse_status("a", {"paymentStatus": "paid"}).status == "SUCCESS"
    assert parse_status("a", {"transactionStatus": "Declined"}).status == "FAILURE"
    assert parse_status("a", {}).status == "UNKNOWN"
    assert parse_status("a", {"status": "SUCCESS", "amount": "12.00"}).amount_cents is None
