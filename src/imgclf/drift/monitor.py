"""Windows of N images tested against a reference, one test per signal, Bonferroni-corrected.

Per window: the predicted classes by a chi-square test of homogeneity against the reference's
class counts (classes the reference expects fewer than MIN_EXPECTED times in a window are pooled
into one bin, as the chi-square approximation needs), and top-1 confidence, brightness, contrast,
the intensity centroid (x and y) and the uploads' size and aspect ratio by two-sample
Kolmogorov-Smirnov tests against the reference's values (size and aspect over the window's images
that came as files: a window of tensors only does not test them). A signal alarms when its p-value
is below alpha / (number of signals the reference has): with alpha = ALPHA = 0.01, a window of
traffic like the reference raises any alarm with probability at most 1 % (Bonferroni bounds the
family-wise rate; the KS tests on tied values are conservative, so the rate measured is lower).

Windows do not overlap. `DriftMonitor` is what a server feeds: each request hands over its
decoded images and probabilities, which costs an append (the per-image numbers are computed for
a whole window at once, when it is full), and the tests run once per window, well under a
millisecond.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from imgclf.drift.reference import (
    DECIMALS,
    SIGNALS,
    STATISTIC_PIXELS,
    Reference,
    image_signals,
)
from imgclf.drift.stats import chi2_homogeneity, ks_2samp

ALPHA = 0.01  # the family-wise false-alarm rate per window
MIN_EXPECTED = 5  # a class bin's expected count in a window, below which classes are pooled
HISTORY = 50  # windows kept for /v1/monitor


@dataclass(frozen=True)
class SignalResult:
    statistic: float  # chi-square for `class`, KS distance D for the others
    p_value: float
    alarm: bool

    def to_json(self) -> dict:
        return {
            "statistic": round(self.statistic, 6),
            "p_value": float(f"{self.p_value:.6g}"),
            "alarm": self.alarm,
        }


class WindowTest:
    """The tests of one window of values against a reference, for windows of about `window` images."""

    def __init__(self, reference: Reference, window: int, alpha: float = ALPHA):
        self.reference = reference
        self.window = window
        self.alpha = alpha
        self.signals = reference.signals
        self.signal_alpha = alpha / len(self.signals)
        counts = np.asarray(reference.class_counts, dtype=float)
        expected = window * counts / max(counts.sum(), 1)
        # Classes expected often enough keep a bin each; the others share the last bin.
        kept = np.flatnonzero(expected >= MIN_EXPECTED)
        self.bin_of_class = np.full(len(counts), len(kept), dtype=np.intp)
        self.bin_of_class[kept] = np.arange(len(kept))
        self.n_bins = len(kept) + int(len(kept) < len(counts))
        self.reference_bins = np.bincount(self.bin_of_class, weights=counts, minlength=self.n_bins)

    def test(self, values: dict[str, np.ndarray]) -> dict[str, SignalResult]:
        """Each signal's result for one window's per-image values (image_signals' keys)."""
        classes = np.asarray(values["class"], dtype=np.intp)
        known = classes[(classes >= 0) & (classes < len(self.bin_of_class))]
        observed = np.bincount(self.bin_of_class[known], minlength=self.n_bins)
        results = {"class": self._result(*chi2_homogeneity(self.reference_bins, observed))}
        for name in self.signals[1:]:
            sample = np.asarray(values[name], dtype=float)
            sample = np.round(sample[~np.isnan(sample)], DECIMALS)  # NaN: an upload size unknown
            if len(sample):
                results[name] = self._result(*ks_2samp(self.reference.distributions[name], sample))
        return results

    def _result(self, statistic: float, p_value: float) -> SignalResult:
        return SignalResult(statistic, p_value, p_value < self.signal_alpha)


def _sizes(sizes: np.ndarray | None, n: int) -> np.ndarray:
    """(N, 2) sizes; zeros (unknown) for images that came without."""
    return np.zeros((n, 2)) if sizes is None else np.asarray(sizes, dtype=np.float64).reshape(n, 2)


def concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in SIGNALS}


def take(values: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: array[start:stop] for name, array in values.items()}


class DriftMonitor:
    """Thread-safe windows of what a server classifies, each tested when it is full.

    `start` begins against a reference (None: off until the next start); the windows tested and
    their count run on across starts, each marked with the label it was started with.
    """

    def __init__(self, window: int, alpha: float = ALPHA, history: int = HISTORY):
        self.window = window
        self.alpha = alpha
        self.windows: deque[dict] = deque(maxlen=history)
        self.windows_total = 0
        self.reference: Reference | None = None
        self.label = ""
        self.last: dict[str, SignalResult] = {}
        self.since: dict[str, float] = {}  # signal -> end of the first window of its current alarm
        self._test: WindowTest | None = None
        self._pending: list = []  # (images, probabilities) as handed over, or per-image values
        self._count = 0
        self._lock = threading.Lock()  # the pending list
        self._closing = threading.Lock()  # windows are tested and recorded one at a time, in order

    def start(self, reference: Reference | None, label: str = "") -> None:
        """Test from now on against `reference` (a new model); drop the partial window."""
        with self._closing, self._lock:
            self.reference, self.label = reference, label
            self._test = WindowTest(reference, self.window, self.alpha) if reference else None
            self._pending, self._count = [], 0
            self.last, self.since = {}, {}

    @property
    def active(self) -> bool:
        return self._test is not None

    def observe(self, images: np.ndarray, probabilities: np.ndarray, sizes: np.ndarray | None = None) -> None:
        """One request's uint8 images (N, C, H, W), probabilities (N, classes) and the images'
        (width, height) as uploaded (N, 2), None if they came as tensors."""
        test = self._test
        if test is None:
            return
        # Small images are kept as they are (an append) and measured a window at a time; large
        # ones are measured now, so a window holds numbers rather than megabytes of pixels.
        small = images.shape[-1] * images.shape[-2] <= STATISTIC_PIXELS
        entry = (images, probabilities, sizes) if small else image_signals(images, probabilities, sizes)
        with self._lock:
            if test is not self._test:
                return  # a start() came in between: these belong to the old model
            self._pending.append(entry)
            self._count += len(images)
            if self._count < self.window:
                return
            pending, self._pending, self._count = self._pending, [], 0
        self._close(test, pending)

    def _close(self, test: WindowTest, pending: list) -> None:
        raw = [entry for entry in pending if isinstance(entry, tuple)]
        parts = [entry for entry in pending if isinstance(entry, dict)]
        if raw:
            images = np.concatenate([entry[0] for entry in raw])
            probabilities = np.concatenate([entry[1] for entry in raw])
            sizes = np.concatenate([_sizes(entry[2], len(entry[0])) for entry in raw])
            parts.append(image_signals(images, probabilities, sizes))
        values = concatenate(parts)
        n = len(values["class"])
        full = n // self.window
        with self._closing:
            if test is not self._test:
                return
            for k in range(full):
                self._record(test.test(take(values, k * self.window, (k + 1) * self.window)))
        if n > full * self.window:
            rest = take(values, full * self.window, n)
            with self._lock:
                if test is self._test:
                    self._pending.insert(0, rest)
                    self._count += n - full * self.window

    def _record(self, results: dict[str, SignalResult]) -> None:
        ended = time.time()
        self.windows_total += 1
        for name, result in results.items():
            if not result.alarm:
                self.since.pop(name, None)
            else:
                self.since.setdefault(name, ended)
        self.last = results
        self.windows.append(
            {
                "index": self.windows_total,
                "ended": iso(ended),
                "model": self.label,
                "images": self.window,
                "alarm": any(result.alarm for result in results.values()),
                "signals": {name: result.to_json() for name, result in results.items()},
            }
        )

    def state(self) -> dict:
        """The monitor as /v1/monitor shows it (JSON-ready)."""
        with self._closing:
            last, since = dict(self.last), dict(self.since)
            windows = list(self.windows)
        alarmed = sorted(since, key=lambda name: (since[name], SIGNALS.index(name)))
        if not self.active:
            status = "off"
        elif not last:
            status = "waiting for the first window"
        elif alarmed:
            status = "drift"
        else:
            status = "no drift"
        return {
            "active": self.active,
            "status": status,
            "window": self.window,
            "alpha": self.alpha,
            "signal_alpha": self.alpha / len(self.reference.signals if self.reference else SIGNALS),
            "images_in_window": self._count,
            "windows_total": self.windows_total,
            "signals": {
                name: {**last[name].to_json(), "since": iso(since[name]) if name in since else None}
                for name in SIGNALS
                if name in last
            },
            "drift": [{"signal": name, "since": iso(since[name])} for name in alarmed],
            "reference": self.reference.summary() if self.reference else None,
            "windows": windows[::-1],  # the latest first
        }


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
