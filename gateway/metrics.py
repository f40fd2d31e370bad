"""What /metrics shows: counters and histograms, labelled with the registry's carriers, and gauges."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .flows.connect import MODES

MEDIA_EVENTS = ("gaps", "late_frames", "clears", "dtmf", "malformed")
TRANSFER_KINDS = ("cold", "warm")


@dataclass(frozen=True)
class LiveCounts:
    """What is under way now, as the store has it."""

    calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (carrier, mode) -> calls not final
    transfers: dict[str, int] = field(default_factory=dict)  # kind -> transfers not final


class LiveGauges:
    """gateway_live_calls and gateway_live_transfers, read from the store at each scrape.

    Every replica (and worker) reads the same rows, so they show the same numbers: aggregate them
    with max (or pick one instance), never sum. A collector rather than Gauges: the figures are
    whatever the scraped process just read, never state kept between scrapes (nor files shared by
    worker processes). When the store could not be read, the series are absent from that scrape.
    """

    def __init__(self, carriers: list[str]):
        self._carriers = carriers
        self._counts: LiveCounts | None = None

    def show(self, counts: LiveCounts | None) -> None:
        self._counts = counts

    def describe(self):
        return []  # nothing to check at registration: the names are fixed below

    def collect(self):
        counts = self._counts
        if counts is None:
            return
        calls = GaugeMetricFamily(
            "gateway_live_calls", "Calls not ended yet, by carrier and mode (direct: the carrier streams to "
            "Ultravox; bridge: the gateway relays), from the shared store: the same on every replica, aggregate "
            "with max", labels=["carrier", "mode"],
        )
        for carrier in self._carriers:
            for mode in MODES:
                calls.add_metric([carrier, mode], counts.calls.get((carrier, mode), 0))
        transfers = GaugeMetricFamily(
            "gateway_live_transfers", "Operator transfers under way, by kind, from the shared store: the same on "
            "every replica, aggregate with max", labels=["kind"],
        )
        for kind in TRANSFER_KINDS:
            transfers.add_metric([kind], counts.transfers.get(kind, 0))
        yield calls
        yield transfers


# Campaign series are per campaign, so their number must stay bounded: only campaigns running or
# paused have them (a campaign's series go when it ends), and at most this many, the newest.
MAX_CAMPAIGN_SERIES = 50


@dataclass(frozen=True)
class CampaignFigures:
    campaign_id: str
    status: str  # running | paused
    rows: dict[str, int]  # rows by status
    pace: float  # the share of calls_per_second dispatched now


class CampaignGauges:
    """gateway_campaign_rows and gateway_campaign_pace, read from the store at each scrape (as
    LiveGauges: the same on every replica, aggregate with max)."""

    def __init__(self) -> None:
        self._figures: list[CampaignFigures] | None = None

    def show(self, figures: list[CampaignFigures] | None) -> None:
        self._figures = figures

    def describe(self):
        return []

    def collect(self):
        figures = self._figures
        if figures is None:
            return
        rows = GaugeMetricFamily(
            "gateway_campaign_rows", f"Rows of each running or paused campaign (at most the {MAX_CAMPAIGN_SERIES} "
            "newest) by status, from the shared store: aggregate with max", labels=["campaign", "status"])
        pace = GaugeMetricFamily(
            "gateway_campaign_pace", "The share of calls_per_second a running or paused campaign dials at now "
            "(below 1 after Ultravox answered 429/503)", labels=["campaign"])
        for figure in figures:
            for status, count in sorted(figure.rows.items()):
                rows.add_metric([figure.campaign_id, status], count)
            pace.add_metric([figure.campaign_id], figure.pace)
        yield rows
        yield pace


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
        # Set to 1 while this process drains on SIGTERM (it takes no new calls, live ones go on).
        self.draining = Gauge(
            "gateway_draining", "1 while this process is draining for shutdown, else 0", registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.deliveries = Counter(
            "gateway_event_deliveries", "Attempts to deliver events to the user's endpoints, by endpoint and result "
            "(delivered, retrying, failed: given up, disabled: the endpoint answered 410)",
            ["endpoint", "result"], registry=self.registry,
        )
        self.delivery_lag = Histogram(
            "gateway_event_delivery_lag_seconds", "From an event happening to its delivery being accepted",
            ["endpoint"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400),
        )
        self.live = LiveGauges(carriers)
        # Campaign rows settled by this process, by outcome (pending: a retry is due). No campaign
        # label: campaigns come and go without bound, and a counter's series stay (see CampaignGauges).
        self.campaign_rows = Counter(
            "gateway_campaign_rows_total", "Campaign row attempts settled by this process, by outcome",
            ["status"], registry=self.registry,
        )
        self.campaign_refusals = Counter(
            "gateway_campaign_capacity_refusals_total", "Campaign calls Ultravox refused for capacity (429/503)",
            registry=self.registry,
        )
        self.campaigns = CampaignGauges()
        self.registry.register(self.live)
        self.registry.register(self.campaigns)
        for carrier in carriers:  # every carrier's series exists from the start, at zero
            self.webhooks.labels(carrier, "connected")
            self.webhook_seconds.labels(carrier)

    def delivery_counted(self, endpoint: str, result: str, count: int = 1) -> None:
        self.deliveries.labels(endpoint, result).inc(count)

    def delivery_lag_seen(self, endpoint: str, seconds: float) -> None:
        self.delivery_lag.labels(endpoint).observe(seconds)

    def campaign_row_outcome(self, campaign_id: str, status: str) -> None:
        self.campaign_rows.labels(status).inc()

    def add_media_stats(self, stats) -> None:
        self.media_frames.labels("caller_to_agent").inc(stats.frames_in)
        self.media_frames.labels("agent_to_caller").inc(stats.frames_out)
        for event in MEDIA_EVENTS:
            self.media_events.labels(event).inc(getattr(stats, event))
