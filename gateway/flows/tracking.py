"""Call tracking: carrier progress callbacks and Ultravox call events move a call's record forward."""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from .. import statuses
from ..carriers.base import Carrier, Webhook
from ..logs import bind_call
from ..store import CallRecord, CallStore, CallUpdate, TransferStore
from ..ultravox import UltravoxEvent

log = logging.getLogger("gateway.tracking")


class CallTracking:
    def __init__(self, store: CallStore, transfers: TransferStore, *,
                 on_stray_leg: Callable[[Carrier, CallRecord], Awaitable[None]] | None = None):
        self.store = store
        self.transfers = transfers
        # A live leg the carrier names only after the call ended (canceled while its dial was in flight).
        self.on_stray_leg = on_stray_leg

    async def carrier_status(self, carrier: Carrier, webhook: Webhook, call_id: str | None) -> CallRecord | None:
        """A progress callback: for the call named in its URL, or else (inbound) by its carrier call id."""
        update = carrier.parse_status(webhook)
        if call_id is None:
            record = update.carrier_call_id and await self.store.find_by_carrier_call(carrier.name, update.carrier_call_id)
        else:
            record = await self.store.get(call_id)
        if not record or record.carrier != carrier.name:
            return None
        bind_call(record)
        result = await self.store.update(record.id, CallUpdate(
            status=update.status,
            carrier_call_id=update.carrier_call_id,
            duration_seconds=update.duration_seconds,
            end_reason=update.end_reason,
            answered_by=update.answered_by,
        ))
        if (record.is_final and not record.carrier_call_id and result.existing.carrier_call_id
                and update.status not in statuses.FINAL_STATUSES and self.on_stray_leg is not None):
            await self.on_stray_leg(carrier, result.existing)
        return result.record

    async def ultravox_event(self, event: UltravoxEvent) -> CallRecord | None:
        """call.joined and call.ended from Ultravox (per-call callbacks or account webhooks)."""
        record = await self.store.find_by_ultravox_call_id(event.call_id)
        if record is None:
            return None
        bind_call(record)
        if event.name == "call.joined":
            return (await self.store.update(record.id, CallUpdate(status=statuses.IN_PROGRESS))).record
        if event.name != "call.ended":
            return record
        if any(t.prior_ultravox_call_id == record.ultravox_call_id for t in await self.transfers.for_call(record.id)):
            # The agent's call ended because the caller was moved to an operator: the phone call goes on.
            return record
        unjoined = event.end_reason == "unjoined"  # the carrier never connected the stream
        return (await self.store.update(record.id, CallUpdate(
            status=statuses.FAILED if unjoined else statuses.COMPLETED,
            # The carrier knows better why (busy, no answer): its final status may still correct ours.
            provisional=unjoined,
            end_reason=event.end_reason,
            summary=event.summary,
            duration_seconds=event.duration_seconds,
            failure_reason="the carrier never joined the Ultravox call" if unjoined else None,
        ))).record
