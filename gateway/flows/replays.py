"""Replay protection: each signed webhook's one-time part (a nonce, a timestamp and signature) is
remembered in the store, shared by every replica, for as long as a replay of it could pass its
carrier's signature check; afterwards it is forgotten by the durable work loop.

Per carrier (see each module's `replay_key`):
- Plivo V3 signs a nonce and no time: a captured webhook verifies forever, so the nonce is kept
  for `[gateway] replay_memory_hours` (a replay older than that is answered as a retry would be).
- Telnyx signs timestamp|body and accepts it within its tolerance either side of now: kept for
  that window, after which the signature check refuses the replay itself.
- Twilio signs neither a nonce nor a time (a retry is byte-for-byte the first delivery), and
  Exotel signs nothing: no memory; a replay of their webhook is answered as a retry is.

What a repeat gets: exactly the first delivery's answer (status, type and body, recorded when it
was sent), on any route, so neither a replay nor a carrier re-sending a delivery unchanged gets
anything new (no fresh media token, no transfer step taken twice). A repeat arriving while the
first is still being answered goes to the flow as a retry does (the flows answer retries
idempotently: one Ultravox call per carrier call, one media token per inbound call). A store that
cannot answer in time lets the webhook through unremembered: the phone line matters more.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass

from starlette.responses import Response

from ..carriers.base import Carrier, Webhook
from ..settings import Settings
from ..store import CallStore
from ..store.calls import StoredAnswer, utcnow
from ..work import Work

log = logging.getLogger("gateway.replays")

PRUNE_EVERY_SECONDS = 600.0
# Kept a little past the carrier's window: clocks differ.
WINDOW_MARGIN_SECONDS = 60.0


@dataclass(frozen=True)
class PruneReplayMemory:
    """Periodic: remembered webhooks whose replay window has passed go."""


class Replayed(Exception):
    """A repeat of a webhook answered before: `answer` is that answer, given again."""

    def __init__(self, answer: StoredAnswer):
        super().__init__("a repeat of a webhook answered before")
        self.answer = answer


@dataclass(frozen=True)
class FirstDelivery:
    """A webhook seen for the first time: its answer is to be recorded for its repeats."""

    carrier: str
    key: str


# Answers larger than this are not kept (carrier answers are a few hundred bytes).
MAX_ANSWER_CHARS = 64 * 1024


class ReplayMemory:
    def __init__(self, settings: Settings, store: CallStore, *, work: Work):
        self.settings = settings
        self.store = store
        self._pending: set[asyncio.Task] = set()
        work.register(PruneReplayMemory, self.prune, every=PRUNE_EVERY_SECONDS)

    async def check(self, carrier: Carrier, webhook: Webhook) -> FirstDelivery | None:
        """Raise Replayed when this verified webhook repeats one already answered; the first
        delivery of a key gets a FirstDelivery to `answered` with; None: nothing to remember (the
        carrier signs nothing one-time, a repeat whose first answer is not known yet, or a store
        that cannot say in time)."""
        key = carrier.replay_key(webhook)
        if key is None or self.settings.insecure_skip_signature_verification:
            return None
        window = key.window_seconds + WINDOW_MARGIN_SECONDS if key.window_seconds is not None else (
            self.settings.replay_memory_hours * 3600.0)
        # A digest: fixed length whatever the carrier sends, and the store holds no signature.
        digest = hashlib.sha256(key.value.encode()).hexdigest()
        try:
            remembered = await self.store.remember_delivery(carrier.name, digest, keep_for=dt.timedelta(seconds=window))
        except Exception as error:
            log.warning("%s webhook not checked for replay, the store did not answer: %s", carrier.name, error)
            return None
        if remembered.first:
            return FirstDelivery(carrier.name, digest)
        if remembered.answer is not None:
            log.warning("%s webhook delivered before (a replay, or re-sent unchanged): given its first answer",
                        carrier.name)
            raise Replayed(remembered.answer)
        log.warning("%s webhook delivered before, its first answer not sent yet: answered as a retry", carrier.name)
        return None

    def answered(self, first: FirstDelivery, response: Response) -> None:
        """Record what the first delivery was answered, off the response's path."""
        body = bytes(response.body).decode("utf-8", "replace")
        if response.status_code >= 300 or len(body) > MAX_ANSWER_CHARS:
            return  # an error is not an answer to repeat: the carrier's retry is served afresh
        answer = StoredAnswer(response.status_code, response.media_type, body)
        task = asyncio.get_running_loop().create_task(self._record(first, answer))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record(self, first: FirstDelivery, answer: StoredAnswer) -> None:
        try:
            await self.store.remember_answer(first.carrier, first.key, answer)
        except Exception as error:
            log.warning("%s webhook answer not remembered for its repeats: %s", first.carrier, error)

    @staticmethod
    def replayed_response(replayed: Replayed) -> Response:
        answer = replayed.answer
        return Response(answer.body, status_code=answer.status_code, media_type=answer.media_type)

    async def prune(self, _: PruneReplayMemory) -> None:
        while await self.store.forget_deliveries(before=utcnow()) > 0:
            pass
