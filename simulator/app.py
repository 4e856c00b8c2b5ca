"""A faithful local stand-in for iKhokha's iK Pay API, for development and tests.

It checks IK-APPID and IK-SIGN on every API request as iKhokha does, creates payment links,
answers status and history, and serves a hosted payment page where a person chooses
"card succeeds", "card declined" or "cancel"; it then POSTs a signed callback to the link's
callbackUrl. For tests it can deliver a callback twice, late, or not at all (`/_sim/...`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

import requests
from flask import (
    Blueprint,
    Flask,
    abort,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
)
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from config.settings import DEV_APP_ID, DEV_APP_SECRET
from pipeline.callbacks import SUCCESS, callback_body
from pipeline.errors import AppIdMismatch, SignatureMismatch
from pipeline.signing import signed_callback, verify_callback

API = "/public-api/v1/api"
_URL = fields.String(
    required=True, validate=validate.URL(schemes={"http", "https"}, require_tld=False)
)


class LinkUrls(Schema):
    class Meta:
        unknown = EXCLUDE

    callbackUrl = _URL
    successPageUrl = _URL
    failurePageUrl = _URL
    cancelUrl = _URL


class LinkRequest(Schema):
    """What iKhokha requires of a create-link request, as far as the simulator checks it."""

    class Meta:
        unknown = EXCLUDE

    amount = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    currency = fields.String(required=True, validate=validate.Equal("ZAR"))
    description = fields.String(load_default="")
    externalTransactionID = fields.String(load_default="")
    urls = fields.Nested(LinkUrls, required=True)


class RefundRequest(Schema):
    amount = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    reason = fields.String(load_default="")
    externalRefundID = fields.String(required=True, validate=validate.Length(min=1, max=64))


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
    # By the merchant's refund id: asking twice with the same id refunds once.
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def refunded(self) -> int:
        return sum(r["amount"] for r in self.refunds.values())

    def as_status(self) -> dict[str, Any]:
        return {
            "responseCode": "00",
            "paylinkID": self.id,
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "externalTransactionID": self.external_transaction_id,
            "refundedAmount": self.refunded,
        }


def callback_target(url: str, base: str) -> str:
    """The callback URL, with its scheme and host replaced by `base` when one is set."""
    if not base:
        return url
    parts = urlsplit(url)
    return base + parts.path + (f"?{parts.query}" if parts.query else "")


def refuse(status: int, message: str) -> NoReturn:
    """Answer as iKhokha does: the status, and a JSON body with a responseCode."""
    abort(make_response(jsonify({"responseCode": str(status), "message": message}), status))


class Simulator:
    """The links the simulator knows, and the callbacks it sends for them."""

    def __init__(self, app_id: str, secret: str, public_url: str, callback_base: str = "") -> None:
        self.app_id, self._secret, self.public_url = app_id, secret, public_url
        # Where callbacks really go when the callback URL's host is not reachable from here
        # (in docker-compose.dev.yml it names localhost, which is the simulator's container).
        self.callback_base = callback_base.rstrip("/")
        self.links: dict[str, Link] = {}
        self.lock = threading.Lock()

    def authenticate(self) -> None:
        """Signed over the path alone (no query string) plus the exact body bytes."""
        try:
            verify_callback(
                request.headers,
                [request.path],
                request.get_data(),
                app_id=self.app_id,
                secret=self._secret,
            )
        except (AppIdMismatch, SignatureMismatch):
            refuse(401, "Unauthorized: invalid IK-APPID or IK-SIGN")

    def create(self, data: dict[str, Any]) -> Link:
        link = Link(
            id=uuid.uuid4().hex[:16],
            amount=data["amount"],
            currency=data["currency"],
            description=data["description"][:200],
            external_transaction_id=data["externalTransactionID"],
            urls=data["urls"],
        )
        with self.lock:
            self.links[link.id] = link
        return link

    def find(self, link_id: str) -> Link:
        link = self.links.get(link_id)
        if link is None:
            refuse(404, "paylink not found")
        return link

    def settle(self, link: Link, status: str) -> None:
        with self.lock:
            if link.status != SUCCESS:  # a paid link stays paid
                link.status = status

    def deliver(self, link: Link, status: str, delay: float = 0.0) -> None:
        """POST the callback iKhokha would send for this outcome, and remember how it went."""
        if delay:
            time.sleep(delay)
        url = callback_target(link.urls["callbackUrl"], self.callback_base)
        body, headers = signed_callback(
            callback_body(
                paylink_id=link.id,
                external_transaction_id=link.external_transaction_id,
                status=status,
            ),
            path=urlsplit(url).path,
            app_id=self.app_id,
            secret=self._secret,
        )
        try:
            response = requests.post(url, data=body, headers=headers, timeout=10)
            outcome = {"status": status, "http_status": response.status_code}
        except requests.RequestException as exc:
            outcome = {"status": status, "error": type(exc).__name__}
        with self.lock:
            link.deliveries.append(outcome)


def api_blueprint(sim: Simulator) -> Blueprint:
    """iK Pay's API, as far as Skillpay uses it."""
    bp = Blueprint("api", __name__, url_prefix=API)

    @bp.post("/payment")
    def create_link():
        sim.authenticate()
        try:
            data = LinkRequest().load(json.loads(request.get_data()))
        except (ValueError, ValidationError):
            refuse(400, "invalid payment request")
        link = sim.create(data)
        return jsonify(
            {
                "responseCode": "00",
                "message": "Paylink created",
                "paylinkUrl": f"{sim.public_url}/pay/{link.id}",
                "paylinkID": link.id,
                "externalTransactionID": link.external_transaction_id,
            }
        )

    @bp.get("/getStatus/<link_id>")
    def status(link_id: str):
        sim.authenticate()
        return jsonify(sim.find(link_id).as_status())

    @bp.post("/payments/<link_id>/refunds")
    def refund(link_id: str):
        """Not a verified iKhokha API (none is published for iK Pay): the shape Skillpay's
        SKILLPAY_REFUND_MODE=api speaks, at the default IKHOKHA_REFUND_PATH."""
        sim.authenticate()
        link = sim.find(link_id)
        try:
            data = RefundRequest().load(json.loads(request.get_data()))
        except (ValueError, ValidationError):
            refuse(400, "invalid refund request")
        with sim.lock:
            done = link.refunds.get(data["externalRefundID"])
            if done is None:
                if link.status != SUCCESS:
                    refuse(409, "only a paid link can be refunded")
                if data["amount"] > link.amount - link.refunded:
                    refuse(409, "refund exceeds what is left of the payment")
                done = {"refundID": uuid.uuid4().hex[:12], "amount": data["amount"]}
                link.refunds[data["externalRefundID"]] = done
        return jsonify({"responseCode": "00", "message": "Refund accepted", **done})

    @bp.get("/payments/history")
    def history():
        sim.authenticate()
        with sim.lock:
            items = [link.as_status() | {"created": link.created} for link in sim.links.values()]
        return jsonify({"responseCode": "00", "payments": items})

    return bp


def hosted_page_blueprint(sim: Simulator) -> Blueprint:
    """The page a student pays on; it sends the callback, then the student back."""
    bp = Blueprint("pay", __name__)

    @bp.get("/pay/<link_id>")
    def hosted_page(link_id: str):
        return render_template("pay.html", link=sim.find(link_id))

    @bp.post("/pay/<link_id>")
    def pay(link_id: str):
        link = sim.find(link_id)
        choice = request.form.get("choice", "")
        if choice == "cancel":
            return redirect(link.urls["cancelUrl"], 303)
        if choice not in ("succeed", "decline"):
            refuse(400, "choose succeed, decline or cancel")
        status = SUCCESS if choice == "succeed" else "FAILURE"
        sim.settle(link, status)
        sim.deliver(link, status)
        target = link.urls["successPageUrl"] if status == SUCCESS else link.urls["failurePageUrl"]
        return redirect(target, 303)

    return bp


def controls_blueprint(sim: Simulator) -> Blueprint:
    """Not part of iKhokha's API: what tests and demos use to misbehave like a network."""
    bp = Blueprint("sim", __name__, url_prefix="/_sim/links")

    def options() -> dict[str, Any]:
        data = request.get_json(force=True, silent=True)
        return data if isinstance(data, dict) else {}

    @bp.post("/<link_id>/settle")
    def settle(link_id: str):
        """Set a link's outcome; deliver its callback `times` times, after `delay` seconds,
        or not at all (times=0), in the background."""
        link = sim.find(link_id)
        data = options()
        status = str(data.get("status", SUCCESS))
        with sim.lock:
            link.status = status
        try:
            times, delay = int(data.get("times", 1)), float(data.get("delay", 0))
        except (TypeError, ValueError):
            refuse(400, "times and delay must be numbers")
        for _ in range(min(times, 10)):
            threading.Thread(target=sim.deliver, args=(link, status, delay), daemon=True).start()
        return jsonify(link.as_status())

    @bp.post("/<link_id>/deliver")
    def deliver_now(link_id: str):
        """Deliver a callback with this status now, whatever the link's status (out of order)."""
        link = sim.find(link_id)
        sim.deliver(link, str(options().get("status", link.status)))
        return jsonify({"deliveries": link.deliveries})

    @bp.get("/<link_id>")
    def inspect(link_id: str):
        link = sim.find(link_id)
        return jsonify(link.as_status() | {"deliveries": link.deliveries, "urls": link.urls})

    return bp


def create_app(
    app_id: str | None = None, secret: str | None = None, public_url: str | None = None
) -> Flask:
    public_url = (
        public_url
        or os.environ.get("SIMULATOR_PUBLIC_URL")
        or f"http://127.0.0.1:{os.environ.get('SIMULATOR_PORT', '8010')}"
    ).rstrip("/")
    sim = Simulator(
        app_id or os.environ.get("IKHOKHA_APP_ID") or DEV_APP_ID,
        secret or os.environ.get("IKHOKHA_APP_SECRET") or DEV_APP_SECRET,
        public_url,
        os.environ.get("SIMULATOR_CALLBACK_BASE", ""),
    )
    app = Flask(__name__)
    app.extensions["simulator"] = sim
    for blueprint in (api_blueprint, hosted_page_blueprint, controls_blueprint):
        app.register_blueprint(blueprint(sim))

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    return app
