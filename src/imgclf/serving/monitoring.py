"""The drift monitor of `imgclf serve`: GET /v1/monitor and the imgclf_drift_* metrics.

Each model is watched against its own reference (imgclf.drift.reference, in its ONNX metadata):
the first request a new model answers (a swap by serving.follow) starts a new window against the
new model's reference (read then, or by GET /v1/monitor, whichever comes first). A model exported
without one is not watched; the log says so once, and /v1/monitor says why. `--monitor-window 0`
turns the monitor off.
"""

import logging
import threading
from collections.abc import Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from imgclf.drift.monitor import ALPHA, DriftMonitor
from imgclf.drift.reference import SIGNALS, ReferenceError, read_reference
from imgclf.serving.follow import LiveModel
from imgclf.serving.model import ServedModel

DEFAULT_WINDOW = 200  # `imgclf serve --monitor-window`: images per window
log = logging.getLogger("imgclf.serving")


class ServingMonitor:
    def __init__(self, live: LiveModel, window: int = DEFAULT_WINDOW, alpha: float = ALPHA):
        self.live = live
        self.window = window
        self.drift = DriftMonitor(window, alpha) if window > 0 else None
        self.note = "off: --monitor-window 0" if self.drift is None else ""
        self._model: ServedModel | None = None
        self._switching = threading.Lock()

    def observe(
        self,
        model: ServedModel,
        images: np.ndarray,
        probabilities: np.ndarray,
        sizes: np.ndarray | None = None,
    ) -> None:
        """What `model` answered for one request: uint8 images (N, C, H, W), probabilities (N, K),
        and the images' (width, height) as uploaded (N, 2), None for tensors sent as they are."""
        drift = self.drift
        if drift is None:
            return
        if model is not self._model:
            self._switch(model)
        drift.observe(images, probabilities, sizes)

    def _switch(self, model: ServedModel) -> None:
        with self._switching:
            if model is self._model:
                return
            try:
                reference = read_reference(model.session.get_modelmeta().custom_metadata_map)
            except ReferenceError as error:
                reference, why = None, f"its reference cannot be read ({error})"
            else:
                why = "it has no drift reference (exported before imgclf computed one): re-export it"
            if reference is None:
                self.note = f"off for version {model.version}: {why}"
                log.warning("drift monitor %s", self.note)
            else:
                self.note = ""
            self.drift.start(reference, model.version)
            self._model = model

    def state(self) -> dict:
        """GET /v1/monitor's answer."""
        model = self.live.model
        if self.drift is not None and model is not self._model:
            self._switch(model)
        base = {"model": {"name": model.name, "version": model.version} if model else None, "note": self.note}
        if self.drift is None:
            return {**base, "active": False, "status": "off", "window": 0, "windows_total": 0, "windows": []}
        return {**base, **self.drift.state()}

    def signals(self) -> dict:
        """The monitor's state in brief, recorded with each captured image: its status and the
        signals in drift, with since when."""
        state = self.drift.state() if self.drift is not None else {"status": "off", "drift": []}
        return {"status": state["status"], "drift": state["drift"]}


class DriftCollector:
    """imgclf_drift_* as they are at each scrape: the last full window's results."""

    def __init__(self, monitor: ServingMonitor):
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        drift = self.monitor.drift
        alarm = GaugeMetricFamily(
            "imgclf_drift_alarm", "1 if the last window's test of this signal alarmed", labels=["signal"]
        )
        p_value = GaugeMetricFamily(
            "imgclf_drift_p_value", "The last window's p-value for this signal", labels=["signal"]
        )
        statistic = GaugeMetricFamily(
            "imgclf_drift_statistic",
            "The last window's test statistic (chi-square for class, KS distance for the others)",
            labels=["signal"],
        )
        last = drift.last if drift is not None and drift.active else {}
        for name in SIGNALS:
            result = last.get(name)
            alarm.add_metric([name], float(bool(result and result.alarm)))
            if result is not None:
                p_value.add_metric([name], result.p_value)
                statistic.add_metric([name], result.statistic)
        yield alarm
        yield p_value
        yield statistic
        yield CounterMetricFamily(
            "imgclf_drift_windows", "Windows of images tested for drift", drift.windows_total if drift else 0
        )
