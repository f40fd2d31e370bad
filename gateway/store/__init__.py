"""Persistence of calls (SQLite by default, PostgreSQL for several replicas)."""

from ..statuses import (
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
)
from .calls import CallFilters, CallRecord, CallScope, CallStore, CallUpdate, Claim, OutboundInsert, Updated
from .transfers import TransferRecord, TransferStore

__all__ = [
    "ANSWERED", "BUSY", "CANCELED", "COMPLETED", "CREATING", "FAILED", "FINAL_STATUSES", "IN_PROGRESS",
    "MACHINE_DETECTED", "NO_ANSWER", "QUEUED", "REJECTED", "RINGING", "STATUSES", "CallFilters", "OutboundInsert",
    "Updated", "CallRecord", "CallScope", "CallStore", "CallUpdate", "Claim", "TransferRecord", "TransferStore",
]
