"""GET /metrics in Prometheus' text format (`prometheus-client`), one registry per application.

Counted as requests go: requests by endpoint, modality and status; latency and time-to-first-token
histograms; generated tokens, images and denoising steps. Read from the engine at each scrape: requests in
flight, queued and running, KV cache blocks used and total per stage, whether each stage worker is up, and
tokens/s over the last `RATE_WINDOW_S` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "bagel_serve"
RATE_WINDOW_S = 10.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, omni: Any) -> None:
        self.omni = omni
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by endpoint, modality and status",
                                ["endpoint", "modality", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Time from a request's arrival to its "
                                 "last byte", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from a request's arrival to its "
                              "first generated token", ["endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated (answers and think plans)", registry=r)
        self.images = Counter(f"{PREFIX}_images", "Images generated", registry=r)
        self.denoise_steps = Counter(f"{PREFIX}_denoising_steps", "Denoising steps run (per request)", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        r.register(_EngineCollector(self))

    def count_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def render(self) -> bytes:
        """The exposition text (asks the stages for their KV use: call it off the event loop)."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from the engine when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):  # noqa: ANN201 (prometheus-client's collector protocol)
        omni = self.metrics.omni
        orch = omni.orchestrator
        transport = orch.transport
        up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while the stage's worker lives", labels=["stage"])
        for s in range(transport.num_stages):
            up.add_metric([str(s)], 0.0 if orch.is_shut_down or transport.exited(s) is not None else 1.0)
        yield up
        yield GaugeMetricFamily(f"{PREFIX}_requests_in_flight", "Requests submitted and not finished",
                                value=orch.in_flight)
        yield GaugeMetricFamily(f"{PREFIX}_generation_tokens_per_second",
                                f"Tokens generated per second over the last {RATE_WINDOW_S:g} s",
                                value=self.metrics.tokens_per_second())
        try:
            usage = [] if orch.is_shut_down else orch.usage()
        except Exception:  # a dead engine has no usage to report; worker_up says why
            usage = []
        queued = GaugeMetricFamily(f"{PREFIX}_queue_length", "Requests waiting for admission, per stage",
                                   labels=["stage"])
        running = GaugeMetricFamily(f"{PREFIX}_running_requests", "Requests running, per stage", labels=["stage"])
        used = GaugeMetricFamily(f"{PREFIX}_kv_blocks_used", "KV cache blocks in use, per stage", labels=["stage"])
        total = GaugeMetricFamily(f"{PREFIX}_kv_blocks_total", "KV cache blocks, per stage", labels=["stage"])
        for s, u in enumerate(usage):
            queued.add_metric([str(s)], u["waiting"])
            running.add_metric([str(s)], u["running"])
            used.add_metric([str(s)], u["used_blocks"])
            total.add_metric([str(s)], u["total_blocks"])
        yield from (queued, running, used, total)
