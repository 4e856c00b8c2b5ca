"""Payment-type detection: card, EFT or unknown, with a confidence and the reasons.

iKhokha's callback carries no documented field that tells card from Instant EFT, so the
method the student chose at checkout is the main indicator, and whatever the callback does
carry can raise or lower the confidence. Unknown or low confidence never auto-approves: the
routing stage sends it to an admin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from models import PaymentMethod
from pipeline.callbacks import lowered_keys

UNKNOWN = "unknown"  # neither side is sure enough: a person decides

# Callback fields some integrations see, and what they suggest.
_METHOD_KEYS = ("paymentmethod", "payment_method", "paymenttype", "payment_type", "method")
_CARD_DETAIL_KEYS = (
    "cardtype",
    "maskedcard",
    "maskedcardnumber",
    "maskedpan",
    "authcode",
    "authorisationcode",
    "authorizationcode",
    "cardbrand",
    "scheme",
)
_EFT_DETAIL_KEYS = ("bankname", "bankreference", "eftreference", "bank")
_CARD_WORDS = (
    "card",
    "credit",
    "debit",
    "visa",
    "mastercard",
    "amex",
    "apple",
    "google",
    "samsung",
)
_EFT_WORDS = ("eft", "bank", "transfer", "ozow", "instant")


@dataclass(frozen=True)
class Indicator:
    field: str
    value: str
    suggests: str
    weight: float


@dataclass(frozen=True)
class Detection:
    type: str
    confidence: float
    indicators: list[Indicator] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _classify_word(value: str) -> str | None:
    lowered = value.lower()
    if any(word in lowered for word in _EFT_WORDS):
        return PaymentMethod.EFT
    if any(word in lowered for word in _CARD_WORDS):
        return PaymentMethod.CARD
    return None


class PaymentTypeDetector:
    """Weighs the indicators; the heaviest side wins, its share of the weight is the confidence."""

    CHECKOUT_WEIGHT = {PaymentMethod.CARD: 0.8, PaymentMethod.EFT: 0.9}
    CALLBACK_METHOD_WEIGHT = 0.9
    DETAIL_WEIGHT = 0.3

    def detect(self, checkout_method: str | None, callback: dict[str, Any]) -> Detection:
        indicators: list[Indicator] = []
        if checkout_method in self.CHECKOUT_WEIGHT:
            indicators.append(
                Indicator(
                    "checkout.payment_method",
                    checkout_method,
                    checkout_method,
                    self.CHECKOUT_WEIGHT[checkout_method],
                )
            )
        lowered = lowered_keys(callback)
        for key in _METHOD_KEYS:
            value = lowered.get(key)
            if isinstance(value, str) and (kind := _classify_word(value)):
                indicators.append(
                    Indicator(f"callback.{key}", value[:64], kind, self.CALLBACK_METHOD_WEIGHT)
                )
        for keys, kind in (
            (_CARD_DETAIL_KEYS, PaymentMethod.CARD),
            (_EFT_DETAIL_KEYS, PaymentMethod.EFT),
        ):
            for key in keys:
                if lowered.get(key) not in (None, ""):
                    # The value may be card data: only say that the field is there.
                    indicators.append(
                        Indicator(f"callback.{key}", "present", kind, self.DETAIL_WEIGHT)
                    )
        return self.score(indicators)

    @staticmethod
    def score(indicators: list[Indicator]) -> Detection:
        weights = {PaymentMethod.CARD: 0.0, PaymentMethod.EFT: 0.0}
        for ind in indicators:
            weights[ind.suggests] += ind.weight
        total = weights[PaymentMethod.CARD] + weights[PaymentMethod.EFT]
        if total == 0:
            return Detection(UNKNOWN, 0.0, indicators)
        kind = (
            PaymentMethod.CARD
            if weights[PaymentMethod.CARD] >= weights[PaymentMethod.EFT]
            else PaymentMethod.EFT
        )
        share = weights[kind] / total
        # Agreement raises the confidence towards 1; a single indicator is worth its weight.
        strength = min(1.0, weights[kind])
        confidence = round(share * strength, 3)
        if share < 0.6:
            return Detection(UNKNOWN, confidence, indicators)
        return Detection(kind, confidence, indicators)
