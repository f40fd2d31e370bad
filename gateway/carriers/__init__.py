"""The registry: the one list of carriers the gateway speaks.

A carrier is one module with a `Carrier` subclass (see base.py). The built-in ones are listed
below; a separate package adds its own through the entry-point group `ultravox_gateway.carriers`
(`mycarrier = "my_package.carrier:MyCarrier"`). Settings, routes, the dialer API, the CLI and the
metrics are all built from CARRIERS.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Literal

from .base import Carrier

ENTRY_POINT_GROUP = "ultravox_gateway.carriers"

BUILT_IN = (
    "gateway.carriers.twilio:TwilioCarrier",
    "gateway.carriers.telnyx:TelnyxCarrier",
    "gateway.carriers.plivo:PlivoCarrier",
    "gateway.carriers.exotel:ExotelCarrier",
)


def _load(reference: str) -> type[Carrier]:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _registry() -> dict[str, type[Carrier]]:
    classes = [_load(reference) for reference in BUILT_IN]
    classes += [entry.load() for entry in entry_points(group=ENTRY_POINT_GROUP)]
    registry: dict[str, type[Carrier]] = {}
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Carrier)):
            raise TypeError(f"{cls!r} registered as a carrier is not a gateway.carriers.base.Carrier")
        registry.setdefault(cls.name, cls)  # a built-in carrier is not replaced by a plug-in
    return registry


CARRIERS: dict[str, type[Carrier]] = _registry()
if TYPE_CHECKING:  # the registry is read at run time: to the type checker, a carrier's name is a string
    CarrierName = str
else:
    CarrierName = Literal[tuple(CARRIERS)]  # the dialer API's enum

__all__ = ["CARRIERS", "Carrier", "CarrierName", "ENTRY_POINT_GROUP"]
