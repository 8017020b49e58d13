"""Prometheus metrics of the HTTP API: requests by route and status, latency, predictions per class
and their top-1 probability, and the served model: its version now, swaps to a new version,
versions refused, failed polls. The drift monitor's are serving.monitoring's DriftCollector.

Each app has its own registry, so apps built side by side (tests) do not share counters. Routes
are labelled by their template ("/v1/predict"), never by the raw path: a scanner probing random
URLs must not create a time series per URL.
"""

import re
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgclf.serving.follow import LiveModel

if TYPE_CHECKING:
    from imgclf.serving.capture import Capture

# Latency buckets for a model that answers in about a millisecond, up to slow uploads.
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
MAX_CACHED_CHILDREN = 256
# Top-1 probability buckets: monitoring/alerts.yml's low-confidence rule reads the 0.6 one.
CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


class Metrics:
    def __init__(self, live: LiveModel):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgclf_http_requests",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imgclf_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "imgclf_predictions", "Predicted images by predicted class", ["label"], registry=self.registry
        )
        self.confidence = Histogram(
            "imgclf_prediction_confidence",
            "Top-1 probability of each classified image",
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(ServedModelCollector(live))
        # The children of the labelled metrics, by label values: `labels()` takes a lock each time.
        self._responses: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._predicted: dict[str, Counter] = {}

    def responded(self, route: str, method: str, status: int, started: float) -> None:
        """One HTTP response: counted by route, method and status, timed from `started` (perf_counter)."""
        children = self._responses.get((route, method, status))
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route))
            if len(self._responses) < MAX_CACHED_CHILDREN:  # methods and statuses come from clients
                self._responses[(route, method, status)] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def predicted(self, label: str) -> None:
        child = self._predicted.get(label)
        if child is None:
            child = self._predicted.setdefault(label, self.predictions.labels(label))
        child.inc()

    def confidences(self, probabilities: np.ndarray) -> None:
        """The top-1 probability of each image of a batch (N, classes)."""
        for value in probabilities.max(axis=1).tolist():
            self.confidence.observe(value)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ServedModelCollector:
    """The served model as it is at each scrape: the poller swaps it without telling anyone."""

    def __init__(self, live: LiveModel):
        self.live = live

    def collect(self) -> Iterator[Metric]:
        model = self.live.model
        info = GaugeMetricFamily(
            "imgclf_model_info", "The model served now (1; one series)", labels=["name", "version"]
        )
        info.add_metric([model.name, model.version], 1)
        yield info
        yield CounterMetricFamily(
            "imgclf_model_swaps", "Times a new version of the alias replaced the served one", self.live.swaps
        )
        yield CounterMetricFamily(
            "imgclf_model_refused_versions",
            "Versions of the alias refused: not loadable, or another input spec",
            len(self.live.refused),
        )
        yield CounterMetricFamily(
            "imgclf_registry_poll_failures",
            "Polls of the alias that the store did not answer",
            self.live.poll_failures,
        )


class CaptureCollector:
    """`imgclf serve --capture DIR`: what was kept, dropped, evicted, labelled, and failed writes."""

    def __init__(self, capture: "Capture"):
        self.capture = capture

    def collect(self) -> Iterator[Metric]:
        capture = self.capture
        yield CounterMetricFamily("imgclf_captured", "Uploads kept for labelling", capture.captured)
        yield CounterMetricFamily(
            "imgclf_capture_errors",
            "Captures that could not be written (a full or read-only disk); requests still answered",
            capture.errors,
        )
        dropped = CounterMetricFamily(
            "imgclf_capture_dropped",
            "Captures not kept: queue_full (the writer fell behind), full (labelled images fill the budget)",
            labels=["reason"],
        )
        for reason, count in capture.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            "imgclf_capture_evicted", "Unlabelled captures deleted to stay within the budget", capture.evicted
        )
        yield CounterMetricFamily(
            "imgclf_capture_labelled", "Labels given through /v1/feedback", capture.labelled_total
        )
        yield GaugeMetricFamily(
            "imgclf_capture_bytes", "Bytes of images under the capture folder", capture.bytes_used()
        )
        yield GaugeMetricFamily(
            "imgclf_capture_waiting", "Captured images awaiting a label", capture.waiting()
        )


class MetricsMiddleware:
    """Outermost ASGI layer: counts and times every HTTP response, whoever produced it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str] = frozenset()):
        self.app = app
        self.metrics = metrics
        self.paths = paths  # the app's route templates, for requests refused before routing
        # Those with parameters ("/v2/models/{name}/infer") as Starlette matches them.
        self.templates = [(compile_path(path)[0], path) for path in sorted(paths) if "{" in path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before it answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            label = route_label(scope, self.paths, self.templates)
            self.metrics.responded(label, scope["method"], status, started)


def route_label(scope: Scope, paths: frozenset[str], templates: Sequence[tuple[re.Pattern, str]] = ()) -> str:
    """The matched route's template (FastAPI leaves the route in the shared scope), else "other"."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    if scope["path"] in paths:  # a template without parameters is the path
        return scope["path"]
    for pattern, template in templates:
        if pattern.match(scope["path"]):
            return template
    if scope["path"].startswith("/static/"):
        return "/static"
    return "other"
