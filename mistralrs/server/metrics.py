"""The server's /metrics (prometheus-client, a registry per server): HTTP requests, tokens in and out, time to first
token and inter-token latency, and, read from runner.stats() at each scrape, the engine's running and waiting
sequences, KV cache use, preemptions and prefix cache hits."""
import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class EngineGauges:
    """A custom collector: the engine's counters as they are when scraped."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats()
        if s is None:  # still loading
            return
        gauges = {"running_sequences": s["running"], "waiting_sequences": s["waiting"],
                  "kv_cache_usage": 1 - s["free_blocks"] / s["num_blocks"],
                  "prefix_cache_hit_rate": s["prefix_cache_hit_rate"]}
        counters = {"preemptions": s["preemptions"], "prefix_cache_hit_tokens": s["prefix_cache_hit_tokens"],
                    "prefix_cache_evictions": s["prefix_cache_evictions"]}
        for name, value in gauges.items():
            yield GaugeMetricFamily(f"mistralrs_{name}", name.replace("_", " "), value=value)
        for name, value in counters.items():
            yield CounterMetricFamily(f"mistralrs_{name}", name.replace("_", " "), value=value)


class Metrics:
    def __init__(self, stats):
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("mistralrs_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)
        self.prompt_tokens = prom.Counter("mistralrs_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.completion_tokens = prom.Counter("mistralrs_completion_tokens", "tokens generated", registry=r)
        self.ttft = prom.Histogram("mistralrs_time_to_first_token_seconds", "first stream chunk after the request",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.itl = prom.Histogram("mistralrs_inter_token_latency_seconds", "gap between a stream's chunks",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.latency = prom.Histogram("mistralrs_request_seconds", "non-streamed request time",
                                      buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineGauges(stats))

    def token_gap(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def served(self, usage: dict | None, seconds: float | None) -> None:
        if usage:
            self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            self.completion_tokens.inc(usage.get("completion_tokens", 0))
        if seconds is not None:
            self.latency.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
