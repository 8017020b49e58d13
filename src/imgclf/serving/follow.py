"""Serving follows an alias: `imgclf serve --model models:/<name>@<alias> --refresh SECONDS`.

A daemon thread asks the registry every SECONDS which version the alias names (one cheap call,
`get_model_version_by_alias`) and downloads and loads a version only when the answer changes. The
swap is one reference assignment: each request reads `LiveModel.model` once, when it starts, so a
request in flight finishes on the model it began with, and no lock is needed.

A new version is refused, and the old one keeps serving, when it cannot be loaded or when its
input differs from the served one's (`input_contract`). A refused version is remembered and not
loaded again (a registered version never changes, so it would fail again); the next different
version the alias names is tried. A store that does not answer is logged once, until it answers
again, and asked again at every interval.

The registry can also say at once that the alias moved: a signed MLflow webhook
(serving.webhook) calls `wake`, and the same thread polls at once instead of at the end of its
interval. Polls stay on that one thread, so a delivery and the timer never swap at the same time.
"""

import logging
import threading

from imgclf.images import MAX_PIXELS
from imgclf.serving.model import REGISTRY_URI, ModelError, Registry, RegistryUnavailable, ServedModel

log = logging.getLogger("imgclf.serving")
STOP_WAIT_S = 10.0  # at shutdown, a poll stuck on a slow store is not waited for longer (daemon)


def input_contract(model: ServedModel) -> dict:
    """What a client may rely on across versions: colour mode, size, dtype and layout of the input.

    Not `resize`: the server fits each upload to the input with the `resize` of the model that
    answers the request, so a new version may fit images differently without a client having
    to change anything, as a retrained version may answer differently.
    """
    spec = model.card.input.to_json()
    del spec["resize"]
    return spec


class LiveModel:
    """The model served now; for an alias URI with refresh > 0, also the thread that keeps it the
    alias's version. A fixed model is a LiveModel that never changes."""

    def __init__(
        self,
        model: ServedModel,
        registry: Registry | None = None,
        refresh: float = 0.0,
        threads: int = 1,
        max_pixels: int = MAX_PIXELS,
        webhook_secret: str | None = None,
    ):
        self.model = model  # each request reads it once; only the poller assigns it
        self.registry = registry
        self.refresh = refresh
        # MLflow signs its webhook deliveries with it (serving.webhook); None: polling only.
        self.webhook_secret = webhook_secret or None
        self.threads, self.max_pixels = threads, max_pixels
        self.swaps = 0
        self.refused: dict[str, str] = {}  # version -> why; never loaded again
        self.poll_failures = 0
        self._store_error: str | None = None  # the last poll's failure, logged once
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: poll now, without waiting for the interval's end
        self._thread: threading.Thread | None = None

    @classmethod
    def load(
        cls,
        uri: str,
        refresh: float,
        threads: int = 1,
        max_pixels: int = MAX_PIXELS,
        webhook_secret: str | None = None,
    ) -> "LiveModel":
        """Load MODEL (ModelError if it cannot be served); follow it if it is an alias and refresh > 0,
        also woken by MLflow's webhooks when webhook_secret is set."""
        match = REGISTRY_URI.fullmatch(uri)
        if not (match and match["alias"] and refresh > 0):
            return cls(ServedModel.load(uri, threads, max_pixels))
        registry = Registry(uri)
        model = registry.load(registry.resolve(), threads, max_pixels)
        return cls(model, registry, refresh, threads, max_pixels, webhook_secret)

    @property
    def following(self) -> bool:
        return self.registry is not None and self.registry.alias is not None and self.refresh > 0

    def start(self) -> None:
        if self.following and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imgclf-follow", daemon=True)
            self._thread.start()

    def wake(self) -> bool:
        """Poll now rather than at the end of the interval (the registry said the alias moved).

        Only sets a flag: the poller thread does the poll, so a caller on the event loop never
        waits for a download. A wake during a poll makes one more poll right after it, which
        sees the newest move. False if nothing follows the alias (no thread to wake).
        """
        if self._thread is None:
            return False
        self._wake.set()
        return True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            self._thread = None

    def __enter__(self) -> "LiveModel":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.refresh)  # the interval's end, or a wake (a webhook, or stop)
            if self._stop.is_set():
                return
            self._wake.clear()  # before the poll: a wake during it is not lost
            try:
                self.poll()
            except Exception:  # a bug: log it with its traceback, but keep following
                log.exception("following %s: unexpected error in a poll", self.registry.uri)

    def poll(self) -> None:
        """Ask the registry once; serve the alias's version if it is new, loadable and compatible."""
        served = self.model
        try:
            version = self.registry.resolve()
            if version == served.version or version in self.refused:
                self._store_answered()
                return
            candidate = self.registry.load(version, self.threads, self.max_pixels)
        except RegistryUnavailable as error:  # the store, not the version: ask again next time
            self._store_failed(str(error), served)
            return
        except ModelError as error:
            self._store_answered()
            self._refuse(version, served, str(error))
            return
        self._store_answered()
        new, old = input_contract(candidate), input_contract(served)
        if new != old:
            why = f"its input ({_spec_text(new)}) differs from the served one's ({_spec_text(old)})"
            self._refuse(version, served, f"{why}; a new input needs a restart")
            return
        self.model = candidate  # the swap: requests that start from now on get the new version
        self.swaps += 1
        log.info("now serving version %s of %s (was version %s)", version, self.registry.uri, served.version)

    def _refuse(self, version: str, served: ServedModel, why: str) -> None:
        self.refused[version] = why
        log.warning(
            "refused version %s of %s, still serving version %s: %s",
            version,
            self.registry.uri,
            served.version,
            why,
        )

    def _store_failed(self, error: str, served: ServedModel) -> None:
        self.poll_failures += 1
        if error != self._store_error:
            log.warning("cannot poll the registry, still serving version %s: %s", served.version, error)
        self._store_error = error

    def _store_answered(self) -> None:
        if self._store_error is not None:
            log.info("the registry answers again: %s", self.registry.uri)
        self._store_error = None


def _spec_text(contract: dict) -> str:
    shape = ", ".join(str(d) for d in contract["shape"])
    return f"{contract['mode']} {contract['dtype']} {contract['layout']} [{shape}]"
