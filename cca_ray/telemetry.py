"""The one home of every metric cca-ray exports to Prometheus (through Ray's metrics agent).

The trainer and the Serve deployment record through the two small recorders here;
Grafana dashboards under ``dashboards/`` query the exported names in ``METRIC_NAMES``
(a test checks that every name a dashboard panel queries is listed here or is one
of Ray's own built-in metrics, and an end-to-end test scrapes a real Ray node).

Exported names (checked on Ray 2.60 by scraping a node's metrics endpoint): Ray
prefixes every custom metric with ``ray_``; a Counter ``cca_x`` is exported as
``ray_cca_x_total``; a Histogram ``cca_x`` as ``ray_cca_x_bucket`` / ``_count`` /
``_sum``. Ray's OpenTelemetry path rebuilds histograms from bucket counts, so ``_sum``
is approximate (each observation counts as its bucket's midpoint): take percentiles
from ``_bucket`` with ``histogram_quantile``, never means from ``_sum / _count``.

Both recorders are safe anywhere: before ``ray.init()`` (or outside a Ray worker) they
check their input and record nothing, so pure code paths and unit tests pay nothing.
Ray metric objects are created lazily, once per process, on first use.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Literal, Mapping

RAY_EXPORT_PREFIX = "ray_"  # Ray adds this to every custom metric name in its Prometheus export

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: the name given to ``ray.util.metrics`` and the names Prometheus sees."""

    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()  # histogram bucket upper bounds (Prometheus "le")

    @property
    def exported(self) -> str:
        """The base name in the Prometheus export (counters carry ``_total``)."""
        base = RAY_EXPORT_PREFIX + self.name
        return base + "_total" if self.kind == "counter" else base

    @property
    def series(self) -> tuple[str, ...]:
        """Every sample name this metric produces in the export."""
        if self.kind == "histogram":
            return tuple(f"{self.exported}_{s}" for s in ("bucket", "count", "sum"))
        return (self.exported,)


# -- training (recorded by rank 0 after the all-reduce, once per log step) -------------
TRAIN_TAG_KEYS = ("run", "objective")

# step-metric key (as the trainer names it) -> gauge. Gauges, not counters: a resumed
# run continues its curves instead of restarting a cumulative series at zero.
TRAIN_GAUGES: dict[str, MetricSpec] = {
    key: MetricSpec(f"cca_train_{key}", "gauge", desc, TRAIN_TAG_KEYS)
    for key, desc in {
        "loss": "training loss of the run's objective (mean over the log window)",
        "rel_logp_pos": "mean log p_theta(x|c) - log p_phi(x|c) on matched pairs (nats, summed over image tokens)",
        "rel_logp_neg": "mean log p_theta(x|c_neg) - log p_phi(x|c_neg) on mismatched pairs (nats)",
        "pair_accuracy": "fraction of pairs with rel_logp_pos > rel_logp_neg",
        "margin": "mean rel_logp_pos - rel_logp_neg over pairs (nats)",
        "grad_norm": "global gradient L2 norm before clipping",
        "lr": "learning rate of the last optimizer step",
        "tokens_per_s": "image tokens scored per second, all workers together",
        "samples_per_s": "training rows (pairs) per second, all workers together",
        "step": "optimizer steps taken so far",
    }.items()
}

# -- serving ---------------------------------------------------------------------------
# Generation runs from milliseconds (tiny demo model) to minutes (Emu3 at 720x720).
LATENCY_BOUNDARIES_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
BATCH_SIZE_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128)

SERVE_LATENCY = MetricSpec(
    "cca_serve_request_latency_seconds", "histogram",
    "HTTP request latency from arrival at the deployment to response (seconds)",
    ("deployment", "status"), LATENCY_BOUNDARIES_S)
SERVE_BATCH_SIZE = MetricSpec(
    "cca_serve_batch_size", "histogram", "requests per @serve.batch call", ("deployment",), BATCH_SIZE_BOUNDARIES)
SERVE_QUEUE_LENGTH = MetricSpec(
    "cca_serve_queue_length", "gauge", "requests waiting in this replica for a batch slot", ("deployment",))
SERVE_IMAGES = MetricSpec("cca_serve_images", "counter", "images generated", ("deployment",))
SERVE_ERRORS = MetricSpec(
    "cca_serve_errors", "counter", "failed requests by HTTP status code and reason", ("deployment", "status", "reason"))

SERVE_METRICS: tuple[MetricSpec, ...] = (SERVE_LATENCY, SERVE_BATCH_SIZE, SERVE_QUEUE_LENGTH, SERVE_IMAGES, SERVE_ERRORS)
ALL_METRICS: tuple[MetricSpec, ...] = (*TRAIN_GAUGES.values(), *SERVE_METRICS)

METRIC_NAMES: frozenset[str] = frozenset(s for spec in ALL_METRICS for s in spec.series)
"""Every sample name cca-ray puts in the Prometheus export (what dashboards may query)."""


# -- lazy, process-wide Ray metric objects ---------------------------------------------
_lock = threading.Lock()
_objects: dict[str, Any] = {}


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a hard dependency, but stay harmless
        return False
    return ray.is_initialized()


def _metric(spec: MetricSpec):
    """The process's Ray metric object for ``spec`` (created on first use)."""
    obj = _objects.get(spec.name)
    if obj is None:
        from ray.util import metrics

        with _lock:
            obj = _objects.get(spec.name)
            if obj is None:
                if spec.kind == "counter":
                    obj = metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
                elif spec.kind == "gauge":
                    obj = metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
                else:
                    obj = metrics.Histogram(spec.name, spec.description, list(spec.boundaries), tag_keys=spec.tag_keys)
                _objects[spec.name] = obj
    return obj


def _tags(spec: MetricSpec, tags: Mapping[str, Any]) -> dict[str, str]:
    missing = [k for k in spec.tag_keys if k not in tags]
    if missing:
        raise ValueError(f"metric {spec.name}: missing tag(s) {missing}; needs {list(spec.tag_keys)}")
    return {k: str(tags[k]) for k in spec.tag_keys}


def _number(spec: MetricSpec, value: Any) -> float:
    try:
        return float(value)  # python/numpy scalars and 0-d tensors alike
    except (TypeError, ValueError):
        raise TypeError(f"metric {spec.name}: value must be a number, got {type(value).__name__}") from None


class TrainMetrics:
    """Training curves as Prometheus gauges; call ``record`` on rank 0 after the all-reduce.

    >>> TrainMetrics().record({"loss": 0.7, "pair_accuracy": 0.5}, {"run": "trial_0", "objective": "cca"})
    """

    def record(self, step_metrics: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        """Set one gauge per known key of ``step_metrics`` (see ``TRAIN_GAUGES``).

        Keys the dashboards do not chart (e.g. ``epoch``) are ignored and None values
        skipped; NaN/inf are exported as they are, since a diverging loss must show.
        ``tags`` needs ``run`` and ``objective``. Bad tags or values raise even when
        Ray is not running, so a trainer's unit test catches them.
        """
        points = [(spec, _number(spec, value), _tags(spec, tags))
                  for key, value in step_metrics.items()
                  if (spec := TRAIN_GAUGES.get(key)) is not None and value is not None]
        if _ray_ready():
            for spec, value, final_tags in points:
                _metric(spec).set(value, tags=final_tags)


class ServeMetrics:
    """Request-level metrics of one Serve deployment (one instance per replica)."""

    def __init__(self, deployment: str):
        self.deployment = str(deployment)

    def _emit(self, spec: MetricSpec, value: Any, **extra: Any) -> None:
        value, tags = _number(spec, value), _tags(spec, {"deployment": self.deployment, **extra})
        if not _ray_ready():
            return
        if spec.kind == "histogram":
            _metric(spec).observe(value, tags=tags)
        elif spec.kind == "gauge":
            _metric(spec).set(value, tags=tags)
        elif value > 0 and math.isfinite(value):  # counters only go up
            _metric(spec).inc(value, tags=tags)

    def observe_request(self, latency_s: float, status: int | str = 200) -> None:
        """One finished HTTP request, failed ones included: latency in seconds, status code."""
        self._emit(SERVE_LATENCY, latency_s, status=status)

    def observe_batch(self, size: int) -> None:
        """One ``@serve.batch`` call with ``size`` requests in it."""
        self._emit(SERVE_BATCH_SIZE, size)

    def set_queue_length(self, n: int) -> None:
        """Requests currently waiting in this replica."""
        self._emit(SERVE_QUEUE_LENGTH, n)

    def add_images(self, n: int) -> None:
        """``n`` images generated (n <= 0 is ignored: counters only go up)."""
        self._emit(SERVE_IMAGES, n)

    def record_error(self, status: int | str, reason: str) -> None:
        """One failed request: HTTP status (e.g. 400, 503) and a short, low-cardinality reason."""
        self._emit(SERVE_ERRORS, 1, status=status, reason=reason)
