"""What a SIGTERM does: stop being ready, let live bridged calls go on, hand over what is left.

At once /readyz answers 503, so the load balancer (a Kubernetes Service) sends new calls to other
replicas. Requests already routed here are still served. Bridged calls (whose audio passes this
process) carry on both ways until they end or `drain_seconds` pass; the ones still live then are
handed over to another replica (flows/handover.py). Direct-mode calls never touch this process's
sockets and need nothing. Then the server may stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from .flows.handover import HandoverFlow
from .logs import bind_call
from .media.bridge import HANDOVER_STREAM_SECONDS, MediaBridge
from .store import CallRecord

log = logging.getLogger("gateway.drain")

POLL_SECONDS = 0.1
# After the handovers, how long their old streams may stay: the bridge closes each one itself once
# the carrier has had HANDOVER_STREAM_SECONDS to do it; the second is for that clean-up.
HANDED_OVER_STREAMS_SECONDS = HANDOVER_STREAM_SECONDS + 1.0


class Drain:
    def __init__(self, bridge: MediaBridge, handover: HandoverFlow, *, drain_seconds: float,
                 on_change: Callable[[bool], None] = lambda draining: None, clock=time.monotonic):
        self.bridge = bridge
        self.handover = handover
        self.drain_seconds = drain_seconds
        self.on_change = on_change
        self._clock = clock
        self.draining = False

    async def run(self) -> None:
        """Drain, then return: the caller stops the server."""
        self.draining = True
        self.on_change(True)
        live = len(self.bridge.live)
        log.info("draining: %d bridged call(s) live; up to %g s before handing them over", live, self.drain_seconds)
        if await self._until_idle(self.drain_seconds):
            log.info("drained: no bridged call left")
            return
        leftovers = list(self.bridge.live.values())
        log.info("drain deadline: handing over %d bridged call(s)", len(leftovers))
        moved = await asyncio.gather(*(self._hand_over(session.record) for session in leftovers), return_exceptions=True)
        for session, outcome in zip(leftovers, moved):
            if outcome is not True:
                log.warning("call %s could not be handed over (%s); it ends with this process", session.record.id,
                            outcome if isinstance(outcome, BaseException) else "no redirect")
        if not await self._until_idle(HANDED_OVER_STREAMS_SECONDS):
            log.warning("%d handed-over stream(s) still open; closing them", len(self.bridge.live))

    async def _hand_over(self, record: CallRecord) -> bool:
        with bind_call(record):  # the lines about it carry its ids, as while it was served
            return await self.handover.hand_over(record, self._releaser(record.id))

    def _releaser(self, call_id: str) -> Callable[[], Awaitable[bool]]:
        return lambda: self.bridge.release(call_id)

    async def _until_idle(self, seconds: float) -> bool:
        deadline = self._clock() + seconds
        while self.bridge.live:
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)
        return True
