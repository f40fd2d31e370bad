"""HttpSender (gateway/flows/sending.py): one delivery's request as a receiver on loopback sees it,
and what each kind of answer (or none) comes to."""

from __future__ import annotations

import asyncio
import socket

import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.flows.sending import USER_AGENT, HttpSender
from gateway.settings import WebhookSettings
from gateway.testing import new_webhook_secret
from gateway.testing.server import ServerThread

SECRET = new_webhook_secret()
BODY = '{"type":"call.started","timestamp":"2026-12-07T15:00:00Z","data":{"call":{"id":"c1"}}}'


class Receiver:
    """Answers by path; keeps what it was sent and on which connections."""

    def __init__(self):
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.peers: set[tuple[str, int]] = set()
        self.app = Starlette(routes=[Route("/{kind}", self.answer, methods=["POST"])])

    async def answer(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append((request.path_params["kind"], dict(request.headers), body))
        if request.client:
            self.peers.add((request.client.host, request.client.port))
        kind = request.path_params["kind"]
        if kind == "ok":
            return Response(status_code=204)
        if kind == "chatty":
            return PlainTextResponse("thanks, " * 100)
        if kind == "busy":
            return Response(status_code=429, headers={"retry-after": "7"})
        if kind == "moved":
            return RedirectResponse("/ok", status_code=307)
        if kind == "slow":
            await asyncio.sleep(1)
            return Response(status_code=204)
        return Response(status_code=500)


@pytest.fixture
def receiver():
    receiver = Receiver()
    server = ServerThread(receiver.app).start()
    receiver.url = server.url
    yield receiver
    server.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send_to(paths: dict[str, str], endpoint: str, *, times: int = 1, timeout: float = 5.0):
    webhooks = [WebhookSettings(name=name, url=url, secret=SECRET) for name, url in paths.items()]

    async def scenario():
        sender = HttpSender(webhooks, timeout)
        await sender.start()
        try:
            return [await sender.send(endpoint, f"evt_{n}", BODY) for n in range(times)]
        finally:
            await sender.stop()

    return asyncio.run(scenario())


def test_a_delivery_is_signed_per_standard_webhooks_and_keeps_its_connection(receiver):
    sent = send_to({"crm": receiver.url + "/ok"}, "crm", times=3)
    assert all(s.delivered and s.status_code == 204 and s.error is None for s in sent)
    for number, (_, headers, body) in enumerate(receiver.requests):
        assert body.decode() == BODY and headers["content-type"] == "application/json"
        assert headers["user-agent"] == USER_AGENT and headers["webhook-id"] == f"evt_{number}"
        Webhook(SECRET).verify(body, headers)  # raises unless the signature and timestamp hold
    assert len(receiver.peers) == 1  # one keep-alive connection for the three
    # An answer with a body (not read) keeps its connection too.
    assert all(s.delivered for s in send_to({"talky": receiver.url + "/chatty"}, "talky", times=3))
    assert len(receiver.peers) == 2


def test_what_each_answer_comes_to(receiver):
    (busy,) = send_to({"crm": receiver.url + "/busy"}, "crm")
    assert (busy.delivered, busy.status_code, busy.retry_after, busy.error) == (False, 429, 7.0, "answered 429")
    (moved,) = send_to({"crm": receiver.url + "/moved"}, "crm")  # not followed: not delivered
    assert (moved.delivered, moved.status_code) == (False, 307)
    assert [kind for kind, _, _ in receiver.requests] == ["busy", "moved"]
    (failing,) = send_to({"crm": receiver.url + "/fail"}, "crm")
    assert (failing.delivered, failing.error) == (False, "answered 500")


def test_no_answer_is_an_error_not_a_status(receiver):
    (slow,) = send_to({"crm": receiver.url + "/slow"}, "crm", timeout=0.3)
    assert (slow.status_code, slow.error) == (None, "no answer within 0.3 s") and 250 <= slow.duration_ms < 1000
    (refused,) = send_to({"crm": f"http://127.0.0.1:{closed_port()}/ok"}, "crm")
    assert refused.status_code is None and refused.error.startswith("ClientConnectorError")
