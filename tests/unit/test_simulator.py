"""The local iKhokha answers as iKhokha does: signed requests only, clear 4xx otherwise."""

from __future__ import annotations

from pipeline.signing import compact_json, sign
from simulator.app import create_app

URLS = {
    k: "http://web:8000/x" for k in ("callbackUrl", "successPageUrl", "failurePageUrl", "cancelUrl")
}


def signed_post(client, path, payload, key="s"):
    body = compact_json(payload)
    headers = {"IK-APPID": "a", "IK-SIGN": sign(key, path, body)}
    return client.post(path, data=body, headers=headers)


def test_links_are_created_and_reported_only_for_signed_requests():
    client = create_app("a", "s", "http://sim").test_client()
    path = "/public-api/v1/api/payment"
    link = signed_post(client, path, {"amount": 100, "currency": "ZAR", "urls": URLS}).json
    assert link["responseCode"] == "00"
    assert link["paylinkUrl"] == f"http://sim/pay/{link['paylinkID']}"
    status_path = f"/public-api/v1/api/getStatus/{link['paylinkID']}"
    unsigned = client.get(status_path)
    assert unsigned.status_code == 401 and unsigned.json["responseCode"] == "401"
    wrong = signed_post(client, path, {"amount": 100, "currency": "ZAR", "urls": URLS}, "x")
    assert wrong.status_code == 401
    status = client.get(status_path, headers={"IK-APPID": "a", "IK-SIGN": sign("s", status_path)})
    assert (status.status_code, status.json["status"]) == (200, "PENDING")


def test_bad_requests_and_unknown_links_are_4xx_with_iKhokhas_body():
    client = create_app("a", "s", "http://sim").test_client()
    path = "/public-api/v1/api/payment"
    for payload in (
        {"amount": "100", "currency": "ZAR", "urls": URLS},
        {"amount": 100, "currency": "USD", "urls": URLS},
        {"amount": 100, "currency": "ZAR", "urls": {**URLS, "callbackUrl": "ftp://x"}},
        [1, 2],
    ):
        response = signed_post(client, path, payload)
        assert response.status_code == 400 and response.json["responseCode"] == "400", payload
    missing = client.post("/_sim/links/nope/settle", json={})
    assert missing.status_code == 404 and missing.json["message"] == "paylink not found"


def test_callbacks_can_be_sent_to_another_host_with_the_same_path():
    from simulator.app import callback_target

    url = "http://localhost:8000/skillpay/webhooks/ikhokha"
    assert callback_target(url, "") == url
    assert callback_target(url, "http://web:8000") == "http://web:8000/skillpay/webhooks/ikhokha"
