"""Slow clients (issue 14, item 9): `gateway serve` answers a request whose headers or body arrive too
slowly with 408 and closes the connection, and closes a connection that never sends anything; a
request at a fair pace, however large, and a kept-alive connection between requests are unaffected."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from gateway.testing.processes import GatewayProcess

from .conftest import BASE_CONFIG, gateway_environ

TIMEOUT = 0.6  # both deadlines, in the test's configuration


@pytest.fixture(scope="module")
def served(tmp_path_factory, _fake_ultravox_server):
    fake, server = _fake_ultravox_server  # never called here: these requests end before any call
    fake.base_url = server.url
    tmp_path: Path = tmp_path_factory.mktemp("read-timeouts")
    config = tmp_path / "gateway.toml"
    config.write_text(BASE_CONFIG.replace(
        "[gateway]\n", f"[gateway]\nheader_timeout_seconds = {TIMEOUT}\nbody_timeout_seconds = {TIMEOUT}\n", 1))
    environ = gateway_environ(fake, f"sqlite:///{tmp_path / 'gateway.db'}")
    with GatewayProcess(config, environ, work_dir=tmp_path) as process:
        yield process.start().wait_ready()


def connect(served) -> socket.socket:
    sock = socket.create_connection((served.host, served.port), timeout=10)
    sock.settimeout(10)  # longer than any deadline: a server that never answers fails the test
    return sock


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def one_response(sock: socket.socket) -> bytes:
    """One response with a content-length, read whole from a connection kept open."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_headers_that_never_end_get_408_and_the_connection_closed(served):
    with connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
        started = time.monotonic()
        received = answer(sock)
        waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 ")
    assert waited < 8, f"closed only after {waited:.1f} s"


def test_headers_trickled_byte_by_byte_are_cut_at_the_deadline(served):
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Filler: " + b"a" * 200 + b"\r\n\r\n"
    with connect(served) as sock:
        started = time.monotonic()
        sent = 0
        try:
            for byte in request:  # one byte each 20 ms: far longer in all than the deadline
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.02)
        except OSError:  # the server closed it under the sender
            pass
        received = answer(sock)
    assert sent < len(request), "the whole trickled request was accepted"
    assert received.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 8


def test_a_body_that_stops_coming_gets_408(served):
    with connect(served) as sock:
        sock.sendall(b"POST /twilio/inbound HTTP/1.1\r\nHost: gateway\r\nX-Twilio-Signature: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCallSid=CA")
        received = answer(sock)
    assert received.startswith(b"HTTP/1.1 408 ")


def test_a_connection_that_never_sends_anything_is_closed(served):
    with connect(served) as sock:
        started = time.monotonic()
        received = answer(sock)
    assert received == b""  # nothing was asked, so nothing is answered
    assert time.monotonic() - started < 8


def test_a_body_at_a_fair_rate_goes_through_although_it_takes_longer_than_the_deadline(served):
    body = b"Filler=" + b"x" * 1993
    with connect(served) as sock:
        sock.sendall(b"POST /twilio/inbound HTTP/1.1\r\nHost: gateway\r\nX-Twilio-Signature: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for start in range(0, len(body), 250):  # 2,000 bytes over ~1 s: 2 KB/s, above the minimum rate
            sock.sendall(body[start:start + 250])
            time.sleep(0.12)
        received = answer(sock)
    assert received.startswith(b"HTTP/1.1 403 ")  # the app's answer (a bad signature), not the deadline's


def test_a_kept_alive_connection_serves_requests_on_either_side_of_a_pause(served):
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
    with connect(served) as sock:
        sock.sendall(request)
        first = one_response(sock)
        time.sleep(TIMEOUT * 1.5)  # idle between requests: uvicorn's keep-alive time (5 s) applies
        sock.sendall(request)
        second = one_response(sock)
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 200 ")


def test_a_body_left_unsent_after_an_early_answer_gets_no_second_answer(served):
    """Refused before its body is read (no signature header): the connection is closed when the body
    time is up, without a 408 after the answer already given."""
    with connect(served) as sock:
        sock.sendall(b"POST /twilio/inbound HTTP/1.1\r\nHost: gateway\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCallSid=CA")
        received = answer(sock)
    assert received.startswith(b"HTTP/1.1 403 ") and b" 408 " not in received
