"""What an adversarial test of the running gateway broke (issue 14), each kept broken no more."""

from __future__ import annotations

import contextlib
import random
import socket
import string
import threading

import httpx

import pytest
from twilio.request_validator import RequestValidator

from gateway.carriers import CARRIERS
from gateway.carriers.base import Webhook
from gateway.carriers.twilio import signature_matches
from gateway.settings import load_settings
from gateway.testing import double

from .conftest import BASE_CONFIG, SUPPORT_NUMBER

SIGNING_CARRIERS = [name for name, carrier in CARRIERS.items() if carrier.signature_headers]


def form_for(carrier: str, **fields: str) -> dict[str, str]:
    return double(carrier).inbound_form(to=SUPPORT_NUMBER, **fields)


def roomy(make_gateway, body_bytes: int = 64 * 1024):
    """A gateway whose own max_body_bytes leaves the carriers' limits to decide."""
    return make_gateway(config=BASE_CONFIG.replace("max_body_bytes = 8192", f"max_body_bytes = {body_bytes}"))


# --- 1. the unauthenticated CPU flood -------------------------------------------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES := list(CARRIERS))
def test_more_fields_than_the_carrier_ever_sends_are_refused_unparsed(make_gateway, fake_ultravox, carrier):
    gateway = roomy(make_gateway)
    limit = CARRIERS[carrier].webhook_max_fields
    form = form_for(carrier, **{f"X{index}": "1" for index in range(limit)})  # signed, within max_body_bytes
    response = gateway.post(carrier, form)
    assert response.status_code == 400, response.text
    assert fake_ultravox.requests == [] and gateway.records() == []


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_body_larger_than_the_carrier_ever_sends_is_refused(make_gateway, fake_ultravox, carrier):
    gateway = roomy(make_gateway)
    padding = "x" * CARRIERS[carrier].webhook_max_bytes
    response = gateway.post(carrier, form_for(carrier, Padding=padding))
    assert response.status_code in (413, 414), response.text
    assert fake_ultravox.requests == []


@pytest.mark.parametrize("carrier", SIGNING_CARRIERS)
def test_a_request_without_any_signature_header_is_refused_before_its_body_is_read(gateway, carrier):
    # Headers announcing a body that never comes: refused at once, not after waiting for it.
    head = (f"POST /{carrier}/inbound HTTP/1.1\r\nHost: {gateway.server.host}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4000\r\n\r\n")
    with socket.create_connection((gateway.server.host, gateway.server.port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = sock.recv(4096).decode()  # a hang fails the test through the socket's timeout
    assert answer.startswith("HTTP/1.1 403"), answer


class _CountingFields(dict):
    """Webhook parameters that count how often the signature check walks them."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


def test_twilio_verification_builds_the_signed_text_once():
    carrier = CARRIERS["twilio"](load_settings(environ=double("twilio").environ("http://127.0.0.1:9")))
    url = "https://gateway.example.test/twilio/inbound"
    form = form_for("twilio")
    params = _CountingFields({name: [value] for name, value in form.items()})
    headers = {name.lower(): value for name, value in double("twilio").sign(url, form, b"").items()}
    carrier.verify(Webhook(url=url, method="POST", headers=headers, body=b"", params=params))
    assert _CountingFields.walks == 1


def test_twilio_signature_check_agrees_with_twilios_validator():
    validator, rng = RequestValidator("secret"), random.Random(14)

    class Fields(dict):
        def getall(self, name):
            return self[name]

    for _ in range(300):
        params = {rng.choice(string.ascii_letters) + str(n): [rng.choice(["a", "b", "é", "+1 2", ""])
                                                              for _ in range(rng.randint(1, 3))]
                  for n in range(rng.randint(0, 6))}
        received = rng.choice(["https://h.example/p?q=1", "https://h.example:443/p", "http://h:8080/x"])
        for signed in (received, received.replace(":443", ""), received.replace("h.example/", "h.example:443/")):
            signature = validator.compute_signature(signed, Fields(params))
            for sent in (signature, signature[:-4] + "AAA="):
                assert (signature_matches(b"secret", received, params, sent, "HMAC_SHA1")
                        == validator.validate(received, Fields(params), sent))


# --- 2. a stalled PostgreSQL connection ------------------------------------------------------------


class StallingProxy:
    """A TCP proxy on loopback to PostgreSQL whose `stall()` leaves every connection open at that
    moment half-open: nothing more crosses it either way, and nothing is closed (new connections
    still go through, as to a server whose other sockets are fine)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stalled: set[socket.socket] = set()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            with self._lock:
                stalled = source in self._stalled
            if not data or stalled:  # stalled: what arrives is swallowed, never forwarded
                if not data:
                    return
                continue
            try:
                sink.sendall(data)
            except OSError:
                return

    def stall(self) -> None:
        with self._lock:
            self._stalled.update(self._open)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_a_stalled_postgresql_connection_connects_callers_unrecorded_and_readyz_says_so(
        make_gateway, fake_ultravox, postgres_database_url):
    url = httpx.URL(postgres_database_url.replace("postgresql://", "http://"))
    proxy = StallingProxy((url.host, url.port or 5432))
    try:
        proxied = postgres_database_url.replace(f"{url.host}:{url.port}", f"127.0.0.1:{proxy.port}")
        gateway = make_gateway(database_url=proxied)
        first = form_for("twilio")
        assert double("twilio").connected_url(gateway.post("twilio", first).text)
        assert gateway.client.get("/readyz").status_code == 200
        proxy.stall()  # the writer's pooled connection (and every other open one) now swallows all

        second = form_for("twilio")
        answer = gateway.post("twilio", second)
        assert answer.status_code == 200
        double("twilio").connected_url(answer.text)  # connected (unrecorded), not the apology
        ready = gateway.client.get("/readyz")
        assert ready.status_code == 503 and any("store" in p for p in ready.json()["problems"]), ready.text
        assert len(fake_ultravox.created_calls) == 2
    finally:
        proxy.close()


# --- 3. and 4. call ids in the carrier's own shape; no control characters -------------------------


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
@pytest.mark.parametrize("call_id", ["x" * 300, "CA" + "0" * 31 + "\x00", "a b"])
def test_a_call_id_not_in_the_carriers_shape_is_refused_and_creates_nothing(gateway, fake_ultravox, carrier, call_id):
    form = form_for(carrier, **{double(carrier).call_id_param: call_id})
    for _ in range(3):  # every delivery: refused, never an unrecorded Ultravox call
        assert gateway.post(carrier, form).status_code == 400
    assert fake_ultravox.requests == [] and gateway.records() == []


@pytest.mark.parametrize("carrier", CARRIER_NAMES)
def test_a_nul_in_any_field_or_a_status_callback_is_a_400(gateway, fake_ultravox, carrier):
    assert gateway.post(carrier, form_for(carrier, From="+1555\x000001")).status_code == 400
    status = {**form_for(carrier), "CallStatus": "completed\x00"}
    assert gateway.post(carrier, status, path=f"/{carrier}/status").status_code == 400
    assert fake_ultravox.requests == []


@pytest.mark.parametrize("carrier", [name for name in ("twilio", "plivo") if name in CARRIERS])
def test_moving_the_next_fields_text_into_the_call_id_keeps_no_signature_valid(gateway, fake_ultravox, carrier):
    # Names and values are signed concatenated: "CallSid" + id + "From" + number. Moving "From…"
    # into the id keeps the signed text (and the signature) the same; the id's shape refuses it.
    call_id_param = double(carrier).call_id_param
    form = form_for(carrier)
    url = gateway.settings.public_url + f"/{carrier}/inbound"
    headers = double(carrier).sign(url, form, b"")
    names = sorted(form)
    after = names[names.index(call_id_param) + 1]
    shifted = {name: value for name, value in form.items() if name != after}
    shifted[call_id_param] = form[call_id_param] + after + form[after]
    response = gateway.post(carrier, shifted, headers=headers, sign=False)
    assert response.status_code in (400, 403)
    assert fake_ultravox.requests == []


@pytest.mark.parametrize("lookalike", ["+1٩٠٠5551234", "+1８765551234", "+15557654321\n"])
def test_lookalike_numbers_are_refused_by_the_dial_api_and_dial_nothing(gateway, fake_carriers, lookalike):
    """Arabic-Indic digits for a 900 number, full-width digits for a denied prefix, a trailing newline."""
    from .test_outbound import dial

    response = dial(gateway, to=lookalike, carrier="twilio")
    assert response.status_code == 422, response.text
    assert fake_carriers["twilio"].calls == []


@pytest.mark.parametrize("prefix", ["+1٩", "+44８", "+1\n"])
def test_dial_policy_prefixes_take_ascii_digits_only(prefix):
    from gateway import numbers

    with pytest.raises(numbers.InvalidNumber):
        numbers.prefix(prefix)
    assert numbers.prefix("+1900") == "+1900"


def test_sip_uris_with_a_trailing_newline_are_refused():
    from gateway import numbers

    with pytest.raises(numbers.InvalidNumber):
        numbers.sip_uri("sip:desk@pbx.example.com\n")
    assert numbers.sip_uri("sip:desk@pbx.example.com") == "sip:desk@pbx.example.com"


# --- 9. smaller ones ---------------------------------------------------------------------------------


def test_metrics_behind_a_bearer_token_when_one_is_configured(make_gateway):
    token = "metrics-token-for-the-scraper"
    gateway = make_gateway(GATEWAY_METRICS_TOKEN=token)
    for authorization in (None, "Bearer wrong-token-of-the-same-size", f"Basic {token}"):
        headers = {"Authorization": authorization} if authorization else {}
        refused = gateway.client.get("/metrics", headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "gateway_" not in refused.text
    scraped = gateway.client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert scraped.status_code == 200 and "gateway_inbound_webhooks_total" in scraped.text
    assert token in gateway.settings.secrets()  # kept out of the logs like the other secrets


def test_metrics_stay_open_without_a_token(gateway):
    assert gateway.client.get("/metrics").status_code == 200
