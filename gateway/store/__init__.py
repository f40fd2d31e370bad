"""Persistence of calls (SQLite by default, PostgreSQL for several replicas)."""

from .calls import (
    CallFilters,
    OutboundInsert,
    ANSWERED,
    BUSY,
    CANCELED,
    COMPLETED,
    CREATING,
    FAILED,
    FINAL_STATUSES,
    IN_PROGRESS,
    MACHINE_DETECTED,
    NO_ANSWER,
    QUEUED,
    REJECTED,
    RINGING,
    STATUSES,
    CallRecord,
    CallStore,
    Claim,
)

__all__ = [
    "ANSWERED", "BUSY", "CANCELED", "COMPLETED", "CREATING", "FAILED", "FINAL_STATUSES", "IN_PROGRESS",
    "MACHINE_DETECTED", "NO_ANSWER", "QUEUED", "REJECTED", "RINGING", "STATUSES", "CallFilters", "OutboundInsert", "CallRecord", "CallStore", "Claim",
]
