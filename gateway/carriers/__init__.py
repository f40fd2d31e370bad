"""Carriers the gateway speaks. Adding a carrier is one module and one line here."""

from .base import Carrier
from .plivo import PlivoCarrier
from .telnyx import TelnyxCarrier
from .twilio import TwilioCarrier

CARRIER_CLASSES: dict[str, type[Carrier]] = {
    cls.name: cls for cls in (TwilioCarrier, TelnyxCarrier, PlivoCarrier)
}

__all__ = ["CARRIER_CLASSES", "Carrier", "PlivoCarrier", "TelnyxCarrier", "TwilioCarrier"]
