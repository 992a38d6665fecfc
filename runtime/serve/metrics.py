"""The server's Prometheus metrics, in a registry of their own per server (not prometheus_client's global one), so
that one process can hold several servers (tests, a Ray replica beside Ray's own metrics)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a tiny model's tens of milliseconds on a CPU to a large batch's minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServeMetrics:
    """What /metrics exposes, names prefixed `fastdiff_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fastdiff_requests", "Image generation requests answered, by HTTP status", ["status"], registry=r
        )
        self.latency = Histogram(
            "fastdiff_request_seconds",
            "Time from a request's arrival to its answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "fastdiff_queue_wait_seconds",
            "Time a request waited before its batch ran",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("fastdiff_queue_depth", "Requests waiting for a batch", registry=r)
        self.queued_images = Gauge("fastdiff_queued_images", "Images waiting for a batch", registry=r)
        self.batch_images = Histogram(
            "fastdiff_batch_images",
            "Images per pipeline call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.batch_requests = Histogram(
            "fastdiff_batch_requests", "Requests per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 16), registry=r
        )
        self.batch_seconds = Histogram(
            "fastdiff_batch_seconds", "Time of one pipeline call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter(
            "fastdiff_images",
            "Images generated and returned, by model id (the base's or a LoRA's)",
            ["model"],
            registry=r,
        )
        self.lora_switches = Counter(
            "fastdiff_lora_switches",
            "Adapter switches before a pipeline call (a LoRA merged, or the base back)",
            registry=r,
        )
        self.dropped = Counter(
            "fastdiff_dropped_requests",
            "Requests dropped before or during their batch, by reason",
            ["reason"],
            registry=r,
        )
        self.load_seconds = Gauge("fastdiff_load_seconds", "Time to load and warm up the pipeline", registry=r)
        self.ready = Gauge("fastdiff_ready", "1 while the server takes requests", registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
