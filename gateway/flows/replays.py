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

What a repeat gets: on the inbound route, the first delivery's answer (the store's one record per
carrier call gives the same Ultravox call and the same media token, whose socket opens once), since
a carrier may re-send a delivery unchanged; on every other route a 403, since a replayed callback
could repeat an action (a transfer step, say). A store that cannot answer in time lets the webhook
through unremembered: the phone line matters more than the memory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass

from ..carriers.base import Carrier, SignatureRejected, Webhook
from ..settings import Settings
from ..store import CallStore
from ..store.calls import utcnow
from ..work import Work

log = logging.getLogger("gateway.replays")

PRUNE_EVERY_SECONDS = 600.0
# Kept a little past the carrier's window: clocks differ.
WINDOW_MARGIN_SECONDS = 60.0


@dataclass(frozen=True)
class PruneReplayMemory:
    """Periodic: remembered webhooks whose replay window has passed go."""


class ReplayMemory:
    def __init__(self, settings: Settings, store: CallStore, *, work: Work):
        self.settings = settings
        self.store = store
        work.register(PruneReplayMemory, self.prune, every=PRUNE_EVERY_SECONDS)

    async def first_delivery(self, carrier: Carrier, webhook: Webhook) -> bool:
        """Whether this verified webhook is the first with its one-time part (True also when the
        carrier has none, or the store cannot say in time)."""
        key = carrier.replay_key(webhook)
        if key is None or self.settings.insecure_skip_signature_verification:
            return True
        window = key.window_seconds + WINDOW_MARGIN_SECONDS if key.window_seconds is not None else (
            self.settings.replay_memory_hours * 3600.0)
        # A digest: fixed length whatever the carrier sends, and the store holds no signature.
        digest = hashlib.sha256(key.value.encode()).hexdigest()
        try:
            return await self.store.remember_delivery(carrier.name, digest, keep_for=dt.timedelta(seconds=window))
        except Exception as error:
            log.warning("%s webhook not checked for replay, the store did not answer: %s", carrier.name, error)
            return True

    async def refuse_replay(self, carrier: Carrier, webhook: Webhook) -> None:
        """Raise SignatureRejected when `webhook` was delivered before."""
        if not await self.first_delivery(carrier, webhook):
            raise SignatureRejected("this signed request was delivered before (a replay)")

    async def prune(self, _: PruneReplayMemory) -> None:
        while await self.store.forget_deliveries(before=utcnow()) > 0:
            pass
