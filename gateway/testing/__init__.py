"""Public test doubles: local fakes of Ultravox and of the carriers, with their signers.

They let the gateway's own tests, and users testing their own configuration,
run the real app against local fakes without any network access::

    fake = FakeUltravox()
    with fake.serve() as ultravox:
        os.environ["ULTRAVOX_BASE_URL"] = ultravox.url
        ...
        assert fake.schema_errors == []

* `gateway.testing.server`: `ServerThread`, any ASGI app served on loopback from a thread.
* `gateway.testing.ultravox`: `FakeUltravox`, a fake Ultravox REST API that validates every
  request against Ultravox's OpenAPI schema, and its ``serverWebSocket`` medium; with
  ``converse()`` it stands in for a real agent (greets, listens, answers), as in ``gateway demo``.
* `gateway.testing.speech`: `Speech` (PCM from a WAV), the WAVs shipped with the package
  (`shipped_wav`: the stand-in's greeting and answer, a caller) and `Utterances`.
* `gateway.testing.callees`: `Callees`, the people a fake carrier's placed calls reach.
* `gateway.testing.carrier`: `FakeCarrier`, what the fake carrier REST APIs share, and
  `CarrierDouble`, everything a test needs to play one carrier; ``double(name)`` finds it.
* `gateway.testing.stream`: `CarrierStream`, a carrier's side of a media stream.
* `gateway.testing.processes`: `GatewayProcess` (the real ``gateway serve`` in a child process),
  `LoadBalancer` (HAProxy in front of several) and `Replicas` (both), for multi-replica tests.
* `gateway.testing.<carrier>` (twilio, telnyx, plivo, …): one module per carrier with its
  fake REST API, webhook signer, inbound webhook form, media-stream dialect and double. Each
  defines ``FAKE_API`` (its `FakeCarrier` subclass),
  ``STREAM_DIALECT`` (its `StreamDialect`, which `CarrierStream` finds by the carrier's name)
  and ``DOUBLE`` (its `CarrierDouble`, which `double` finds by the carrier's name): a new
  carrier is a new module, with no table to edit.

A test written against `double` covers every carrier in ``gateway.carriers.CARRIERS``::

    d = double(carrier)
    form = d.inbound_form(to="+15550001111")
    method, headers, body, query = d.inbound_request(public_url, f"/{carrier}/inbound", form)
    ...
    join_url, attributes = d.connected_url(response.text)

Every public name is re-exported here (a carrier module's ``__all__`` too, found by looking
at the package), so ``from gateway.testing import FakeTwilio`` works.

The schema validation needs the ``test`` extra (``openapi-schema-validator``
and ``pyyaml``); those imports happen lazily so that importing this package
never requires them.
"""

from __future__ import annotations

import importlib
import pkgutil

from .carrier import (
    CallUpdate,
    CarrierDouble,
    CarrierRequest,
    Conference,
    Declined,
    Detection,
    Dialled,
    FakeCarrier,
    PickUp,
    PlacedCarrierCall,
    WebhookRequest,
    XmlDouble,
    double,
)
from .processes import REPLICA_HEADER, Backend, GatewayProcess, LoadBalancer, ProcessFailed, Replicas, free_port, haproxy_path
from .receiver import EventReceiver, ReceivedEvent, new_webhook_secret
from .server import ServerThread
from .speech import SHIPPED_SPEECH, Speech, Utterances, shipped_wav
from .stream import CarrierStream, Received, StreamDialect
from .ultravox import (
    DATA_MESSAGE_TYPES,
    FakeResponse,
    FakeUltravox,
    FakeUltravoxSession,
    RecordedRequest,
    validate_ultravox_request,
)

__all__ = [
    "Backend",
    "CallUpdate",
    "CarrierDouble",
    "CarrierRequest",
    "CarrierStream",
    "Conference",
    "DATA_MESSAGE_TYPES",
    "Declined",
    "Detection",
    "Dialled",
    "FakeCarrier",
    "FakeResponse",
    "FakeUltravox",
    "FakeUltravoxSession",
    "GatewayProcess",
    "LoadBalancer",
    "PickUp",
    "PlacedCarrierCall",
    "ProcessFailed",
    "REPLICA_HEADER",
    "Received",
    "EventReceiver",
    "ReceivedEvent",
    "new_webhook_secret",
    "shipped_wav",
    "RecordedRequest",
    "Replicas",
    "SHIPPED_SPEECH",
    "ServerThread",
    "Speech",
    "StreamDialect",
    "Utterances",
    "WebhookRequest",
    "XmlDouble",
    "double",
    "free_port",
    "haproxy_path",
    "validate_ultravox_request",
]

# The carriers' own modules: whatever module of this package has a DOUBLE is one.
_SHARED = {"callees", "carrier", "processes", "receiver", "server", "speech", "stream", "ultravox"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        _carrier = importlib.import_module(f"{__name__}.{_module.name}")
        if hasattr(_carrier, "DOUBLE"):
            globals().update({name: getattr(_carrier, name) for name in _carrier.__all__})
            __all__ += list(_carrier.__all__)
