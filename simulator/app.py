"""A faithful local stand-in for iKhokha's iK Pay API, for development and tests.

It checks IK-APPID and IK-SIGN on every API request as iKhokha does, creates payment links,
answers status and history, and serves a hosted payment page where a person chooses
"card succeeds", "card declined" or "cancel"; it then POSTs a signed callback to the link's
callbackUrl. For tests it can deliver a callback twice, late, or not at all.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import Flask, abort, jsonify, redirect, render_template, request

from config.settings import DEV_APP_ID, DEV_APP_SECRET
from pipeline.errors import AppIdMismatch, SignatureMismatch
from pipeline.signing import compact_json, sign, verify_callback

API = "/public-api/v1/api"


@dataclass
class Link:
    id: str
    amount: int
    currency: str
    description: str
    external_transaction_id: str
    urls: dict[str, str]
    status: str = "PENDING"
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def as_status(self) -> dict[str, Any]:
        return {
            "responseCode": "00",
            "paylinkID": self.id,
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "externalTransactionID": self.external_transaction_id,
        }


def create_app(
    app_id: str | None = None, secret: str | None = None, public_url: str | None = None
) -> Flask:
    app = Flask(__name__)
    app_id = app_id or os.environ.get("IKHOKHA_APP_ID") or DEV_APP_ID
    secret = secret or os.environ.get("IKHOKHA_APP_SECRET") or DEV_APP_SECRET
    public_url = (
        public_url
        or os.environ.get("SIMULATOR_PUBLIC_URL")
        or f"http://127.0.0.1:{os.environ.get('SIMULATOR_PORT', '8010')}"
    ).rstrip("/")
    links: dict[str, Link] = {}
    lock = threading.Lock()

    def authenticate() -> None:
        # Signed over the path alone (no query string) plus the exact body bytes.
        try:
            verify_callback(
                request.headers, [request.path], request.get_data(), app_id=app_id, secret=secret
            )
        except (AppIdMismatch, SignatureMismatch):
            abort(
                jsonify(
                    {"responseCode": "401", "message": "Unauthorized: invalid IK-APPID or IK-SIGN"}
                ),
                401,
            )

    def deliver(link: Link, status: str, delay: float = 0.0) -> None:
        if delay:
            time.sleep(delay)
        body = compact_json(
            {
                "paylinkID": link.id,
                "status": status,
                "externalTransactionID": link.external_transaction_id,
                "responseCode": "00" if status == "SUCCESS" else "05",
            }
        )
        url = link.urls["callbackUrl"]
        headers = {
            "Content-Type": "application/json",
            "ik-appid": app_id,
            "ik-sign": sign(secret, urlsplit(url).path, body),
        }
        try:
            response = requests.post(url, data=body, headers=headers, timeout=10)
            outcome = {"status": status, "http_status": response.status_code}
        except requests.RequestException as exc:
            outcome = {"status": status, "error": type(exc).__name__}
        with lock:
            link.deliveries.append(outcome)

    def find(link_id: str) -> Link:
        link = links.get(link_id)
        if link is None:
            abort(jsonify({"responseCode": "404", "message": "paylink not found"}), 404)
        return link

    @app.post(f"{API}/payment")
    def create_link():
        authenticate()
        try:
            data = json.loads(request.get_data())
            amount = data["amount"]
            urls = data["urls"]
            assert isinstance(amount, int) and amount > 0
            assert data.get("currency") == "ZAR"
            assert all(
                isinstance(urls.get(k), str) and urls[k].startswith("http")
                for k in ("callbackUrl", "successPageUrl", "failurePageUrl", "cancelUrl")
            )
        except (ValueError, KeyError, TypeError, AssertionError, AttributeError):
            return jsonify({"responseCode": "400", "message": "invalid payment request"}), 400
        link = Link(
            id=uuid.uuid4().hex[:16],
            amount=amount,
            currency="ZAR",
            description=str(data.get("description", ""))[:200],
            external_transaction_id=str(data.get("externalTransactionID", "")),
            urls=urls,
        )
        with lock:
            links[link.id] = link
        return jsonify(
            {
                "responseCode": "00",
                "message": "Paylink created",
                "paylinkUrl": f"{public_url}/pay/{link.id}",
                "paylinkID": link.id,
                "externalTransactionID": link.external_transaction_id,
            }
        )

    @app.get(f"{API}/getStatus/<link_id>")
    def status(link_id: str):
        authenticate()
        return jsonify(find(link_id).as_status())

    @app.get(f"{API}/payments/history")
    def history():
        authenticate()
        with lock:
            items = [link.as_status() | {"created": link.created} for link in links.values()]
        return jsonify({"responseCode": "00", "payments": items})

    @app.get("/pay/<link_id>")
    def hosted_page(link_id: str):
        return render_template("pay.html", link=find(link_id))

    @app.post("/pay/<link_id>")
    def pay(link_id: str):
        link = find(link_id)
        choice = request.form.get("choice", "")
        if choice == "cancel":
            return redirect(link.urls["cancelUrl"], 303)
        if choice not in ("succeed", "decline"):
            abort(400)
        status = "SUCCESS" if choice == "succeed" else "FAILURE"
        with lock:
            if link.status != "SUCCESS":  # a paid link stays paid
                link.status = status
        deliver(link, status)
        target = link.urls["successPageUrl"] if status == "SUCCESS" else link.urls["failurePageUrl"]
        return redirect(target, 303)

    # Test controls: not part of iKhokha's API.
    @app.post("/_sim/links/<link_id>/settle")
    def settle(link_id: str):
        """Set a link's outcome; deliver its callback `times` times, after `delay` seconds,
        or not at all (times=0), in the background."""
        link = find(link_id)
        data = request.get_json(force=True, silent=True) or {}
        status = data.get("status", "SUCCESS")
        with lock:
            link.status = status
        for _ in range(int(data.get("times", 1))):
            threading.Thread(
                target=deliver, args=(link, status, float(data.get("delay", 0))), daemon=True
            ).start()
        return jsonify(link.as_status())

    @app.post("/_sim/links/<link_id>/deliver")
    def deliver_now(link_id: str):
        """Deliver a callback with this status now, whatever the link's status (out of order)."""
        link = find(link_id)
        data = request.get_json(force=True, silent=True) or {}
        deliver(link, data.get("status", link.status))
        return jsonify({"deliveries": link.deliveries})

    @app.get("/_sim/links/<link_id>")
    def inspect(link_id: str):
        link = find(link_id)
        return jsonify(link.as_status() | {"deliveries": link.deliveries, "urls": link.urls})

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    return app
