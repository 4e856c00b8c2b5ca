from __future__ import annotations

import pytest

from pipeline.callbacks import parse_callback
from pipeline.errors import MalformedCallback


def test_parses_ik_pay_fields():
    cb = parse_callback(
        b'{"paylinkID":"PL1","status":"SUCCESS","externalTransactionID":"abc","responseCode":"00"}'
    )
    assert (cb.paylink_id, cb.status, cb.external_transaction_id, cb.response_code) == (
        "PL1",
        "SUCCESS",
        "abc",
        "00",
    )


def test_reads_older_field_spellings_and_statuses():
    cb = parse_callback(b'{"paylinkId":"PL1","status":"failed"}')
    assert cb.status == "FAILURE"
    assert parse_callback(b'{"paylinkID":"PL1","status":"success"}').status == "SUCCESS"
    assert parse_callback(b'{"paylinkID":"PL1","status":"Pending"}').status == "PENDING"


def test_dedupe_key_ignores_formatting_and_response_code_but_not_status():
    a = parse_callback(b'{"paylinkID":"PL1","status":"SUCCESS","responseCode":"00"}')
    b = parse_callback(b'{ "status": "SUCCESS", "paylinkID": "PL1", "text": "x" }')
    c = parse_callback(b'{"paylinkID":"PL1","status":"FAILURE"}')
    assert a.dedupe_key == b.dedupe_key
    assert a.dedupe_key != c.dedupe_key


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"SUCCESS"',
        b'{"status":"SUCCESS"}',
        b'{"paylinkID":"PL1"}',
        b'{"paylinkID":"PL1","status":""}',
        b'{"paylinkID":"PL1","status":7}',
        b'{"paylinkID":{"a":1},"status":"SUCCESS"}',
        b'{"paylinkID":true,"status":"SUCCESS"}',
        b'{"paylinkID":"' + b"x" * 200 + b'","status":"SUCCESS"}',
        b"\xff\xfe{}",
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(body):
    with pytest.raises(MalformedCallback) as info:
        parse_callback(body)
    assert info.value.message


def test_absurdly_deep_nesting_is_malformed_not_a_crash():
    from pipeline.signing import body_variants

    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MalformedCallback):
        parse_callback(deep)
    assert list(body_variants(deep)) == [deep]
