"""Prometheus metrics under an ``afdserve:`` prefix, with vLLM's meanings and a ``model_name`` label.

Request metrics (TTFT, inter-token latency, end-to-end latency, queue time, token counters) are observed by
the engine thread as it publishes tokens. Engine metrics are read at scrape time from the last
``stats()`` the engine returned; the keys this module understands (``ENGINE_STATS_KEYS``):

- ``running``, ``waiting``: requests (summed over attention replicas); ``kv_usage``: 0..1;
  ``num_preemptions``, ``prefix_cache_queries``, ``prefix_cache_hits`` (tokens): cumulative.
- AFD, optional (metrics appear once the engine reports them), cumulative since start, summed
  over attention replicas: ``expert_group_tokens``: list[int], tokens dispatched to each expert
  group; ``dispatch_seconds``, ``combine_seconds``: (total seconds, number of transfers) of A2E
  dispatch and E2A combine; ``bubble_seconds``: (total seconds, number of steps) a side waited
  idle inside the ping-pong pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

ENGINE_STATS_KEYS = ("running", "waiting", "kv_usage", "num_preemptions", "prefix_cache_queries",
                     "prefix_cache_hits", "expert_group_tokens",
                     "dispatch_seconds", "combine_seconds", "bubble_seconds", "expert_group_load",
                     "expert_balancedness", "placement_version")
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                 120.0, 240.0, 480.0, 960.0)
P = "afdserve:"


class ServerMetrics:
    def __init__(self, model_name: str, prefix: str = "afdserve"):
        """``prefix``: the metric names' namespace (``vllm`` serves vLLM's names to its dashboards)."""
        disable_created_metrics()  # no "_created" samples (as vLLM); a process-wide switch
        self.model_name, self.prefix = model_name, prefix
        self.registry = CollectorRegistry()
        labels, r = ["model_name"], self.registry
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS_S, registry=r).labels(model_name)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between consecutive tokens.", labels,
                             buckets=LATENCY_BUCKETS_S, registry=r).labels(model_name)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end latency of finished requests.",
                             labels, buckets=E2E_BUCKETS_S, registry=r).labels(model_name)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time requests waited before they were first "
                               "scheduled.", labels, buckets=LATENCY_BUCKETS_S, registry=r).labels(model_name)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens admitted.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self.success = Counter(P + "request_success", "Requests finished, by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.engine_stats: Callable[[], dict] = dict

    def watch(self, stats: Callable[[], dict]) -> None:
        """Read engine gauges and AFD counters from ``stats()`` at every scrape."""
        self.engine_stats = stats
        self.registry.register(_EngineCollector(self))

    def on_added(self, children) -> None:
        self.prompt_tokens.inc(sum(len(c.prompt_token_ids) for c in children))

    def on_tokens(self, num_new: int, since_last_s: float, first: bool, finish_reason: str | None,
                  since_arrival_s: float, queue_s: float | None = None) -> None:
        """One request's update in one step (``since_last_s``: since arrival for the first token;
        ``queue_s``: how long it waited to be scheduled, observed with its first token)."""
        if first and num_new and queue_s is not None:
            self.queue.observe(queue_s)
        if num_new:
            self.generation_tokens.inc(num_new)
            (self.ttft if first else self.itl).observe(since_last_s)
        if finish_reason in ("stop", "length", "abort"):
            self.e2e.observe(since_arrival_s)
            self.success.labels(self.model_name, finish_reason).inc()

    def on_aborted(self, since_arrival_s: float) -> None:
        """A request aborted by its client or the shutdown deadline (vLLM counts these too)."""
        self.on_tokens(0, 0.0, False, "abort", since_arrival_s)

    def render(self) -> bytes:
        text = generate_latest(self.registry)
        if self.prefix + ":" == P:
            return text
        return re.sub(rb"^(# (?:HELP|TYPE) )?" + re.escape(P.encode()), rb"\g<1>" + self.prefix.encode() + b":", text,
                      flags=re.MULTILINE)


class _EngineCollector:
    """Engine gauges and AFD counters, built from the latest engine stats at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s, name = self.metrics.engine_stats(), self.metrics.model_name
        yield _gauge("num_requests_running", "Requests in the running batches.", name, s.get("running", 0))
        yield _gauge("num_requests_waiting", "Requests waiting to be scheduled.", name, s.get("waiting", 0))
        yield _gauge("kv_cache_usage_perc", "KV-cache usage, 0 to 1 (mean over attention replicas).", name,
                     s.get("kv_usage", 0.0))
        for metric, doc in (("num_preemptions", "Preemptions (by recomputation)."),
                            ("prefix_cache_queries", "Tokens of admitted requests looked up in the prefix cache."),
                            ("prefix_cache_hits", "Tokens found in the prefix cache.")):
            c = CounterMetricFamily(P + metric, doc, labels=["model_name"])
            c.add_metric([name], s.get(metric, 0))
            yield c
        yield from _afd_metrics(s, name)


def _gauge(metric: str, doc: str, model_name: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(P + metric, doc, labels=["model_name"])
    g.add_metric([model_name], value)
    return g


def _afd_metrics(s: dict, model_name: str) -> Iterator[Metric]:
    if "expert_group_tokens" in s:
        c = CounterMetricFamily(P + "expert_group_tokens", "Tokens dispatched to each expert group.",
                                labels=["model_name", "expert_group"])
        for group, n in enumerate(s["expert_group_tokens"]):
            c.add_metric([model_name, str(group)], n)
        yield c
    if "expert_group_load" in s:
        g = GaugeMetricFamily(P + "expert_group_load", "Tokens routed to each expert group over the EPLB window.",
                              labels=["model_name", "expert_group"])
        for group, n in enumerate(s["expert_group_load"]):
            g.add_metric([model_name, str(group)], n)
        yield g
    if "expert_balancedness" in s:
        yield _gauge("expert_balancedness", "Mean over max expert-group load in the EPLB window (1 = balanced).",
                     model_name, s["expert_balancedness"])
    docs = {"dispatch_seconds": ("dispatch_latency_seconds", "A2E dispatch latency per transfer."),
            "combine_seconds": ("combine_latency_seconds", "E2A combine latency per transfer."),
            "bubble_seconds": ("micro_batch_bubble_seconds", "Idle time inside the ping-pong pipeline per step.")}
    for key, (metric, doc) in docs.items():
        if key in s:
            total_s, count = s[key]
            m = SummaryMetricFamily(P + metric, doc, labels=["model_name"])
            m.add_metric([model_name], count_value=count, sum_value=total_s)
            yield m
