"""How calls and transfers are shown outside the gateway: in the /v1 API and in events."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel

from .store import CallRecord, TransferRecord
from .store.campaigns import CampaignRecord, RowRecord


class CallView(BaseModel):
    """A call as the API shows it (inbound and outbound)."""

    id: str
    direction: str
    carrier: str
    via: str | None
    status: str
    from_: str | None
    to: str
    route: str | None
    carrier_call_id: str | None
    ultravox_call_id: str | None
    failure_reason: str | None
    end_reason: str | None
    answered_by: str | None
    duration_seconds: int | None
    summary: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    answered_at: dt.datetime | None
    ended_at: dt.datetime | None
    # Bridge mode with recording: the call's stereo WAVs on the gateway's disk (comma-separated, one
    # per stretch of the call), how many, and where to download them (?part=N, from 0).
    recording_path: str | None
    recording_parts: int
    recording_url: str | None
    media: dict[str, int] | None  # bridge mode: audio counters (frames, gaps, late frames, clears…)

    @classmethod
    def of(cls, record: CallRecord) -> dict[str, Any]:
        computed: dict[str, Any] = {
            "from_": record.from_number,
            "to": record.to_number,
            "media": record.media,
            "recording_parts": len(record.recordings),
            "recording_url": f"/v1/calls/{record.id}/recording" if record.recordings else None,
        }
        view = cls(**computed, **{name: getattr(record, name) for name in cls.model_fields if name not in computed})
        data = view.model_dump(mode="json")
        data["from"] = data.pop("from_")
        return data


class TransferView(BaseModel):
    id: str
    kind: str
    operator: str
    operators_tried: list[str]
    reason: str
    status: str
    outcome: str | None
    created_at: dt.datetime
    answered_at: dt.datetime | None
    ended_at: dt.datetime | None
    duration_seconds: float | None

    @classmethod
    def of(cls, transfer: TransferRecord) -> dict[str, Any]:
        end = transfer.ended_at or transfer.answered_at
        return cls(
            operators_tried=list(transfer.tried),
            duration_seconds=(end - transfer.created_at).total_seconds() if end else None,
            **{name: getattr(transfer, name) for name in cls.model_fields if name not in ("operators_tried", "duration_seconds")},
        ).model_dump(mode="json")


def campaign_view(campaign: CampaignRecord, counts: dict[str, int]) -> dict[str, Any]:
    spec = campaign.spec
    return {
        "id": campaign.id, "name": campaign.name, "status": campaign.status,
        "created_at": campaign.created_at.isoformat(), "updated_at": campaign.updated_at.isoformat(),
        "ended_at": campaign.ended_at.isoformat() if campaign.ended_at else None,
        "rows": sum(counts.values()), "counts": counts,
        # Ultravox's 429/503 slow a campaign down: the share of calls_per_second it dials at now,
        # and until when it dials nothing (Retry-After).
        "pace": campaign.pace, "held_until": campaign.held_until.isoformat() if campaign.held_until else None,
        **{name: spec.get(name) for name in ("route", "agent_id", "carrier", "from", "max_concurrency",
                                             "calls_per_second", "window", "timezone", "starts_at", "ends_at",
                                             "retry")},
    }


def row_view(row: RowRecord) -> dict[str, Any]:
    return {"position": row.position, "to": row.to_number, "status": row.status, "attempts": row.attempts,
            "call_id": row.call_id, "reason": row.reason, "timezones": list(row.timezones),
            "due_at": row.due_at.isoformat(), "metadata": row.metadata, "updated_at": row.updated_at.isoformat()}
