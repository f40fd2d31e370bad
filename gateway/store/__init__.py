"""Persistence of calls (SQLite by default, PostgreSQL for several replicas)."""

from .calls import CONNECTED, CREATING, FAILED, REJECTED, CallRecord, CallStore, Claim

__all__ = ["CONNECTED", "CREATING", "FAILED", "REJECTED", "CallRecord", "CallStore", "Claim"]
