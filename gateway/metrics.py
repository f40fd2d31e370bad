"""What /metrics shows: counters and histograms, labelled with the registry's carriers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

MEDIA_EVENTS = ("gaps", "late_frames", "clears", "dtmf", "malformed")


class Metrics:
    def __init__(self, carriers: list[str]) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "gateway_inbound_webhooks", "Inbound call webhooks by carrier and outcome",
            ["carrier", "outcome"], registry=self.registry,
        )
        self.transfers = Counter(
            "gateway_transfers", "Finished operator transfers by operator, kind and result",
            ["operator", "kind", "result"], registry=self.registry,
        )
        self.media_frames = Counter(
            "gateway_media_frames", "Audio frames relayed in bridge mode", ["direction"], registry=self.registry,
        )
        self.media_events = Counter(
            "gateway_media_events", "Bridge-mode events: gaps, late frames, clears (barge-ins), dtmf, malformed frames",
            ["event"], registry=self.registry,
        )
        self.webhook_seconds = Histogram(
            "gateway_inbound_webhook_seconds", "Time to answer an inbound call webhook",
            ["carrier"], registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
        )
        for carrier in carriers:  # every carrier's series exists from the start, at zero
            self.webhooks.labels(carrier, "connected")
            self.webhook_seconds.labels(carrier)

    def add_media_stats(self, stats) -> None:
        self.media_frames.labels("caller_to_agent").inc(stats.frames_in)
        self.media_frames.labels("agent_to_caller").inc(stats.frames_out)
        for event in MEDIA_EVENTS:
            self.media_events.labels(event).inc(getattr(stats, event))
