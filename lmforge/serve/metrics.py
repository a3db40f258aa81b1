"""Counters, gauges and histograms in the Prometheus text format (exposition format 0.0.4), kept in
memory under one lock: enough for /metrics without a client library."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# name -> (type, help, buckets for histograms)
METRICS = {
    "lmforge_requests_total": ("counter", "HTTP requests by endpoint and status code", None),
    "lmforge_request_duration_seconds": ("histogram", "HTTP request latency by endpoint", LATENCY_BUCKETS),
    "lmforge_adapter_requests_total": ("counter", "Inference requests by adapter (base = no adapter)", None),
    "lmforge_adapter_sequences_total": ("counter", "Sequences run by adapter (base = no adapter)", None),
    "lmforge_batches_total": ("counter", "Forward passes run by the batcher, by kind", None),
    "lmforge_batch_size": ("histogram", "Sequences per forward pass", SIZE_BUCKETS),
    "lmforge_batch_adapters": ("histogram", "Distinct adapters per forward pass", SIZE_BUCKETS),
    "lmforge_batch_duration_seconds": ("histogram", "Forward pass time", LATENCY_BUCKETS),
    "lmforge_queue_wait_seconds": ("histogram", "Time a sequence waits before its forward pass", LATENCY_BUCKETS),
    "lmforge_queue_depth": ("gauge", "Sequences waiting for a forward pass", None),
    "lmforge_queue_rejections_total": ("counter", "Requests refused with 429 because the queue was full", None),
    "lmforge_adapters_loaded": ("gauge", "LoRA adapters loaded on the base model", None),
    "lmforge_worker_errors_total": ("counter", "Forward passes that raised (answered with 500)", None),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc)) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[str, dict[tuple, list]] = defaultdict(dict)  # key -> [bucket counts..., sum, count]

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = METRICS[name][2]
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hist[name].setdefault(key, [0] * len(buckets) + [0.0, 0])
            for i, b in enumerate(buckets):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_, buckets) in METRICS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    for key, h in sorted(self._hist[name].items()):
                        labels = dict(key)
                        for b, n in zip(buckets, h):
                            lines.append(f"{name}_bucket{_labels({**labels, 'le': repr(float(b))})} {n}")
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h[-1]}")
                        lines.append(f"{name}_sum{_labels(labels)} {h[-2]:.6f}")
                        lines.append(f"{name}_count{_labels(labels)} {h[-1]}")
                else:
                    for key, v in sorted(self._values[name].items()):
                        lines.append(f"{name}{_labels(dict(key))} {v:g}")
        return "\n".join(lines) + "\n"
