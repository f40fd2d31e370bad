"""Call tracking: carrier progress callbacks and Ultravox call events move a call's record forward."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from .. import statuses
from ..carriers.base import Carrier, Webhook
from ..store import CallRecord, CallStore, TransferStore

log = logging.getLogger("gateway.tracking")


class CallTracking:
    def __init__(self, store: CallStore, transfers: TransferStore):
        self.store = store
        self.transfers = transfers

    async def carrier_status(self, carrier: Carrier, webhook: Webhook, call_id: str | None) -> CallRecord | None:
        """A progress callback: for the call named in its URL, or else (inbound) by its carrier call id."""
        update = carrier.parse_status(webhook)
        if call_id is None:
            record = update.carrier_call_id and await self.store.find_by_carrier_call(carrier.name, update.carrier_call_id)
        else:
            record = await self.store.get(call_id)
        if not record or record.carrier != carrier.name:
            return None
        call_id = record.id
        result = await self.store.update(
            call_id,
            update.status,
            carrier_call_id=update.carrier_call_id,
            duration_seconds=update.duration_seconds,
            end_reason=update.end_reason,
            answered_by=update.answered_by,
        )
        return result.record

    async def ultravox_event(self, event: str, call: dict[str, Any]) -> CallRecord | None:
        """call.joined and call.ended from Ultravox (per-call callbacks or account webhooks)."""
        record = await self.store.find_by_ultravox_call_id(str(call.get("callId")))
        if record is None:
            return None
        if event == "call.joined":
            return (await self.store.update(record.id, statuses.IN_PROGRESS)).record
        if event != "call.ended":
            return record
        if any(t.prior_ultravox_call_id == record.ultravox_call_id for t in await self.transfers.for_call(record.id)):
            # The agent's call ended because the caller was moved to an operator: the phone call goes on.
            return record
        end_reason = call.get("endReason")
        unjoined = end_reason == "unjoined"  # the carrier never connected the stream
        return (await self.store.update(
            record.id,
            statuses.FAILED if unjoined else statuses.COMPLETED,
            # The carrier knows better why (busy, no answer): its final status may still correct ours.
            provisional=unjoined,
            end_reason=end_reason if isinstance(end_reason, str) else None,
            summary=_text(call.get("summary")) or _text(call.get("shortSummary")),
            duration_seconds=_seconds_between(call.get("joined"), call.get("ended")),
            failure_reason="the carrier never joined the Ultravox call" if end_reason == "unjoined" else None,
        )).record


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _seconds_between(start: Any, end: Any) -> int | None:
    try:
        joined = dt.datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        ended = dt.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0, round((ended - joined).total_seconds()))
