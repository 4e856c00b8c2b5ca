"""The signature scheme, held to vectors worked out by hand (escaping written out, HMAC from
`openssl dgst -sha256 -hmac`), not by this code."""

from __future__ import annotations

import pytest

from pipeline.errors import AppIdMismatch, SignatureMismatch
from pipeline.signing import body_variants, compact_json, escape, sign, verify_callback


def test_escape_is_addslashes():
    assert escape(b"a\\b\"c'd\x00e") == b"a\\\\b\\\"c\\'d\\0e"
    assert escape(b"plain") == b"plain"


@pytest.mark.parametrize(
    ("secret", "path", "body", "expected"),
    [
        (
            "test-secret",
            "/public-api/v1/api/payment",
            b'{"amount":1000,"currency":"ZAR"}',
            "fc8feee54eafe442f8dc8a2349598cea73d38ebe83bcafd4e12f804cddb4fea6",
        ),
        (
            # A single quote and an escaped backslash in the JSON text.
            "test-secret",
            "/webhooks/ikhokha",
            b'{"description":"It\'s a \\\\ test"}',
            "6ff21039733d63488a0c4cff9c5c74b6d18a033c96acbbcef66ba0e5b17db806",
        ),
        (
            # GET: the path alone, empty body.
            "test-secret",
            "/public-api/v1/api/getStatus/PL123",
            b"",
            "49e63ae376891c96b769700a617754c0e583c68c2c447f7d92b8b6fae069af79",
        ),
        (
            # Non-ASCII in the body and the key, UTF-8 on both.
            "sëcret",
            "/webhooks/ikhokha",
            '{"paylinkID":"PL1","status":"SUCCESS","description":"Café"}'.encode(),
            "9ab8a5a5d99785ec7dbd0f6a1299c417b5f56a81ec4fed6d6da08fbad5aa6fb1",
        ),
        (
            # A path prefix, a JSON-escaped quote in the body, and a quote in the secret.
            'k3y-with-"quote"',
            "/skillpay/webhooks/ikhokha",
            rb'{"paylinkID":"PL-7","status":"SUCCESS","text":"He said \"paid\""}',
            "29ba4e376c674d1d5c10c06dd8095a9d9ca35a0e3a6b350ae5a38cbbe3c67977",
        ),
        (
            # A percent-escaped id in the path is signed as sent, not decoded.
            "secret",
            "/public-api/v1/api/getStatus/PL%2F1",
            b"",
            "ef0c2a7e590d2c6133eb23e7820d8bc249a4a69e338c5c04337dff84aacf37e1",
        ),
        (
            # A \u escape stays as text; the four backslashes are signed as eight.
            "test-secret",
            "/webhooks/ikhokha",
            rb'{"externalTransactionID":"0b8c","status":"FAILURE","note":"\u00e9 \\\\ back"}',
            "2a6d3d2f188e85edbd3c03230c8f0b310926970d8895436b0b0d0b0f38d586e0",
        ),
    ],
)
def test_sign_matches_hand_worked_vectors(secret, path, body, expected):
    assert sign(secret, path, body) == expected


def test_compact_json_is_what_we_sign_and_send():
    assert compact_json({"url": "https://x/y", "name": "Café", "n": [1, 2]}) == (
        '{"url":"https://x/y","name":"Café","n":[1,2]}'.encode()
    )


def test_body_variants_include_compact_without_text():
    raw = b'{"paylinkID": "PL1", "status": "SUCCESS", "text": "Approved"}'
    assert list(body_variants(raw)) == [raw, b'{"paylinkID":"PL1","status":"SUCCESS"}']
    assert list(body_variants(b"not json")) == [b"not json"]


def _headers(secret, path, body, app_id="app"):
    return {"IK-APPID": app_id, "IK-SIGN": sign(secret, path, body)}


def test_verify_accepts_raw_body_and_any_header_case():
    body = b'{"paylinkID":"PL1","status":"SUCCESS"}'
    headers = {"ik-appid": "app", "ik-sign": sign("s", "/webhooks/ikhokha", body).upper()}
    verify_callback(headers, ["/webhooks/ikhokha"], body, app_id="app", secret="s")


def test_verify_accepts_signature_over_compact_body_without_text():
    raw = b'{"paylinkID": "PL1", "status": "SUCCESS", "text": "ok"}'
    signed_over = b'{"paylinkID":"PL1","status":"SUCCESS"}'
    verify_callback(
        _headers("s", "/webhooks/ikhokha", signed_over),
        ["/webhooks/ikhokha"],
        raw,
        app_id="app",
        secret="s",
    )


def test_verify_accepts_public_path_prefix():
    body = b'{"status":"SUCCESS"}'
    headers = _headers("s", "/skillpay/webhooks/ikhokha", body)
    verify_callback(
        headers, ["/skillpay/webhooks/ikhokha", "/webhooks/ikhokha"], body, app_id="app", secret="s"
    )


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, AppIdMismatch),
        ({"ik-appid": "other", "ik-sign": "00"}, AppIdMismatch),
        ({"ik-appid": "app"}, SignatureMismatch),
        ({"ik-appid": "app", "ik-sign": "deadbeef"}, SignatureMismatch),
    ],
)
def test_verify_rejects(headers, error):
    with pytest.raises(error):
        verify_callback(headers, ["/webhooks/ikhokha"], b"{}", app_id="app", secret="s")


def test_verify_rejects_signature_for_another_body_or_secret():
    body = b'{"paylinkID":"PL1","status":"SUCCESS"}'
    tampered = b'{"paylinkID":"PL1","status":"FAILURE"}'
    with pytest.raises(SignatureMismatch):
        verify_callback(
            _headers("s", "/webhooks/ikhokha", body),
            ["/webhooks/ikhokha"],
            tampered,
            app_id="app",
            secret="s",
        )
    with pytest.raises(SignatureMismatch):
        verify_callback(
            _headers("other", "/webhooks/ikhokha", body),
            ["/webhooks/ikhokha"],
            body,
            app_id="app",
            secret="s",
        )
