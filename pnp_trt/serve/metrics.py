"""Prometheus metrics of one server (its own registry: several apps in one process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..runtime.translation import Translation


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pnp_requests", "Translation requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("pnp_request_seconds", "Time to answer a request, whatever its status",
                                 buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=self.registry)
        self.queue_depth = Gauge("pnp_queue_depth", "Requests waiting or running", registry=self.registry)
        self.cache = Counter("pnp_source_cache", "Translations by whether their source came from the cache",
                             ["result"], registry=self.registry)
        self.unet_evaluations = Counter("pnp_unet_evaluations", "UNet sample-evaluations run",
                                        registry=self.registry)
        self.translations = Counter("pnp_translations", "Translations run (coalesced requests count once)",
                                    registry=self.registry)
        self._answered, self._seconds = 0, 0.0

    def record_translation(self, result: Translation) -> None:
        self.translations.inc()
        self.cache.labels(result="hit" if result.source_cache_hit else "miss").inc()
        self.unet_evaluations.inc(result.unet_evaluations)

    def answered(self, status: int, seconds: float) -> None:
        """One answered request, whatever its status (404s, 405s and errors included)."""
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        if status == 200:
            self._answered, self._seconds = self._answered + 1, self._seconds + seconds

    def typical_latency(self) -> float:
        """Mean seconds per successfully answered request so far (a Retry-After hint); 1 before any."""
        return self._seconds / self._answered if self._answered else 1.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
