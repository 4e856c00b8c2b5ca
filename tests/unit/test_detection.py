from __future__ import annotations

from models import PaymentMethod
from pipeline.detection import UNKNOWN, PaymentTypeDetector

detect = PaymentTypeDetector().detect


def test_card_checkout_alone_is_card_at_the_approval_threshold():
    d = detect("card", {"paylinkID": "PL1", "status": "SUCCESS"})
    assert (d.type, d.confidence) == (PaymentMethod.CARD, 0.8)
    assert d.indicators[0].field == "checkout.payment_method"


def test_callback_evidence_that_agrees_raises_confidence():
    d = detect("card", {"paymentMethod": "CARD", "maskedCardNumber": "4111********1111"})
    assert d.type == PaymentMethod.CARD and d.confidence == 1.0
    # The card number itself is never copied into the indicators.
    assert all("4111" not in i.value for i in d.indicators)


def test_eft_checkout_is_eft():
    d = detect("eft", {})
    assert d.type == PaymentMethod.EFT and d.confidence >= 0.9


def test_conflicting_evidence_is_unknown():
    d = detect("card", {"paymentMethod": "Instant PaymentMethod.EFT"})
    assert d.type == UNKNOWN
    assert d.confidence < 0.8


def test_no_evidence_is_unknown_with_zero_confidence():
    d = detect(None, {})
    assert (d.type, d.confidence) == (UNKNOWN, 0.0)
