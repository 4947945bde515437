"""The server's Prometheus metrics (prometheus_client, one registry per app), all named `softtool_*`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# Seconds; time to first token spans a queued request on a busy CPU, latency a long completion.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
UNKNOWN_TASK = "_unknown"  # requests naming no served task share one label, so a client cannot add series


class Metrics:
    """Counters and histograms updated by the routes; gauges read the engine's published state on scrape."""

    def __init__(self, engine_stats, inflight) -> None:
        disable_created_metrics()  # no `_created` twin of every series (the server is its own process)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "softtool_requests",
            "Completion requests answered, by task and HTTP status (499: client left)",
            ["task", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "softtool_prompt_tokens",
            "Prompt tokens (virtual tokens included) of accepted requests",
            ["task"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "softtool_generated_tokens", "Tokens generated (each choice's, its EOS included)", ["task"], registry=r
        )
        self.ttft = Histogram(
            "softtool_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            ["task"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "softtool_request_latency_seconds",
            "From a request's arrival to its last token",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        queue = Gauge("softtool_queue_depth", "Rows waiting for a slot", registry=r)
        queue.set_function(lambda: engine_stats.pending)
        busy = Gauge("softtool_slots_busy", "Slots holding a row", registry=r)
        busy.set_function(lambda: engine_stats.active)
        total = Gauge("softtool_slots", "Slots of the engine", registry=r)
        total.set_function(lambda: engine_stats.slots)
        occupancy = Gauge("softtool_slot_occupancy", "Share of the slots holding a row (0..1)", registry=r)
        occupancy.set_function(lambda: engine_stats.active / max(engine_stats.slots, 1))
        rows = Gauge("softtool_rows_in_flight", "Rows accepted and not finished (in a slot or waiting)", registry=r)
        rows.set_function(inflight)
        steps = Gauge("softtool_engine_steps", "Engine iterations run so far", registry=r)
        steps.set_function(lambda: engine_stats.steps)
        self.tasks = Gauge("softtool_tasks", "Tasks (soft prompts) served", registry=r)
