"""`imgclf serve --capture DIR`: keep the uploads the model is unsure of, for a person to label.

Off by default: users' images are theirs. When on, an upload is kept if its top-1 probability is
below `below`, or if a seeded random draw falls under `sample`. What is kept:

    DIR/<predicted label>/<sha256>.<ext>   the uploaded bytes as received (ext: the detected format)
    DIR/labelled/<true label>/<sha256>.<ext>   moved there by POST /v1/feedback
    DIR/captures.jsonl                     one JSON object per event: captured, evicted, labelled

The request path only decides and queues (a comparison, a random draw, a bounded queue); one
worker thread hashes, writes and evicts. A full queue drops the capture, and a write that fails
(a full or read-only disk) is counted, logged at most once a minute, and never fails the request.

Everything written stays under DIR: a label becomes a folder name only through `folder_name`,
which maps any label to one path component (no separators, no `.` or `..`, no hidden names), and
every path is checked to resolve under DIR before it is used. Captured files are named by the
SHA-256 of their bytes, so a file name never comes from a client.

DIR is bounded by `max_bytes` (the captured and labelled images together): the oldest images not
yet labelled are deleted first. A labelled image is never deleted by the server; when labelled
images alone fill the budget, new captures are dropped (counted) until someone moves them away.
"""

import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import queue
import random
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.images import FORMATS

log = logging.getLogger("imgclf.serving.capture")

MANIFEST = "captures.jsonl"
LABELLED = "labelled"  # DIR/labelled/<true label>/: never a predicted label's folder
INCOMING = ".incoming"  # temporary files, renamed into place when whole
DEFAULT_BELOW = 0.6
DEFAULT_MAX_MB = 1024.0
QUEUE_SIZE = 256  # captures waiting for the worker; more are dropped, never waited for
LOG_EVERY_S = 60.0  # at most one log line per kind of failure this often
SHA256 = re.compile(r"[0-9a-f]{64}")
EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "WEBP": "webp",
    "PPM": "ppm",
}
MEDIA_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "webp": "image/webp",
    "ppm": "image/x-portable-anymap",
}
UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
MAX_FOLDER_CHARS = 80


class CaptureError(Exception):
    """A labelling request that cannot be done: `status` and a one-line `detail` for the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def folder_name(label: str, reserved: frozenset[str] = frozenset()) -> str:
    """One safe path component for a class label: the label itself when it is one (unicode
    included), else an escaped form with a short hash of the label, so two labels never share a
    folder. Never empty, `.`, `..`, hidden, or containing a separator."""
    name = unicodedata.normalize("NFC", label)
    name = UNSAFE.sub("_", name).strip()
    if name.startswith(".") or name in reserved or not name:
        name = "_" + name
    name = name[:MAX_FOLDER_CHARS]
    if name != label:
        name += "~" + hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return name


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass
class Entry:
    """One kept image: where it is under DIR, and the record the manifest holds for it."""

    sha256: str
    file: str  # relative to DIR, with "/"
    size: int
    record: dict  # the "captured" manifest record, with "true_label" once labelled

    @property
    def labelled(self) -> bool:
        return "true_label" in self.record


@dataclasses.dataclass(frozen=True)
class Offer:
    """What the request path hands the worker."""

    data: bytes
    time: str
    model: dict
    label: str
    probabilities: dict
    reason: str
    signals: dict


class Capture:
    """The capture folder: decisions on the request path, writes on one worker thread."""

    def __init__(
        self,
        root: str | os.PathLike,
        below: float = DEFAULT_BELOW,
        sample: float = 0.0,
        max_bytes: int = int(DEFAULT_MAX_MB * 1024 * 1024),
        seed: int = 0,
        queue_size: int = QUEUE_SIZE,
    ):
        self.root = Path(root).absolute()
        self.below, self.sample, self.max_bytes = below, sample, max_bytes
        # The monitor's signal state, recorded with each capture: a cheap callable returning a dict.
        self.signals: Callable[[], dict] = dict
        self.captured = self.errors = self.evicted = self.labelled_total = 0
        self.dropped = {"queue_full": 0, "full": 0}
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._lock = threading.Lock()  # the index, the byte count and the manifest
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self._manifest_lines = 0
        self._logged: dict[str, float] = {}
        self._queue: queue.Queue[Offer | None] = queue.Queue(queue_size)
        try:
            self._load()
        except OSError as error:
            self.errors += 1
            self._failed("load", f"cannot read {self.root}", error)
        self._thread = threading.Thread(target=self._run, name="imgclf-capture", daemon=True)
        self._thread.start()

    # ---- the request path ------------------------------------------------------------------

    def offer(self, model, uploads, probabilities: np.ndarray) -> None:
        """Queue the uploads worth keeping (model: a ServedModel; one probabilities row per upload)."""
        top = probabilities.max(axis=1)
        for upload, p, row in zip(uploads, top.tolist(), probabilities, strict=True):
            if p < self.below:
                reason = "low_confidence"
            elif self.sample > 0 and self._draw() < self.sample:
                reason = "sample"
            else:
                continue
            classes = model.card.classes
            offer = Offer(
                data=upload.data,
                time=now(),
                model={"name": model.name, "version": model.version},
                label=classes[int(row.argmax())],
                probabilities=dict(zip(classes, row.tolist(), strict=True)),
                reason=reason,
                signals=self._signals(),
            )
            try:
                self._queue.put_nowait(offer)
            except queue.Full:
                self.dropped["queue_full"] += 1
                self._rate_limited("queue", "capture queue full: dropping captures (see /metrics)")

    def _draw(self) -> float:
        with self._random_lock:
            return self._random.random()

    def _signals(self) -> dict:
        try:
            return dict(self.signals())
        except Exception:  # the monitor's state is extra: a bug there must not fail a request
            log.exception("capture: the monitor's signal state could not be read")
            return {}

    # ---- the worker --------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued capture is written (or failed); for tests and shutdown."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            offer = self._queue.get()
            try:
                if offer is None:
                    return
                self._keep(offer)
            except OSError as error:
                self.errors += 1
                self._failed("write", f"cannot write under {self.root}", error)
            except CaptureError as error:  # a folder under DIR made a link to elsewhere
                self.errors += 1
                self._rate_limited("write", f"capture: {error.detail}")
            except Exception:
                self.errors += 1
                log.exception("capture: unexpected error")
            finally:
                self._queue.task_done()

    def _keep(self, offer: Offer) -> None:
        sha = hashlib.sha256(offer.data).hexdigest()
        with self._lock:
            if sha in self._entries:
                return  # the same bytes again: kept once
        ext = detected_extension(offer.data)
        folder = folder_name(offer.label, frozenset({LABELLED}))
        relative = f"{folder}/{sha}.{ext}"
        size = len(offer.data)
        with self._lock:
            if not self._make_room(size):
                self.dropped["full"] += 1
                self._rate_limited(
                    "full",
                    f"capture: {self.root} holds {self._bytes} bytes of labelled images, the "
                    f"limit is {self.max_bytes}: new captures are dropped until they are moved away",
                )
                return
        target = self._inside(relative)
        self._write(target, offer.data)
        record = {
            "event": "captured",
            "time": offer.time,
            "sha256": sha,
            "file": relative,
            "bytes": size,
            "model": offer.model,
            "label": offer.label,
            "probabilities": offer.probabilities,
            "reason": offer.reason,
            "signals": offer.signals,
        }
        with self._lock:
            try:
                self._append(record)
            except OSError:
                target.unlink(missing_ok=True)  # untracked, it would never be evicted
                raise
            self._entries[sha] = Entry(sha, relative, size, record)
            self._bytes += size
            self.captured += 1

    def _make_room(self, size: int) -> bool:
        """Delete the oldest unlabelled images until `size` more bytes fit (holding the lock)."""
        if self._bytes + size <= self.max_bytes:
            return True
        for entry in list(self._entries.values()):
            if self._bytes + size <= self.max_bytes:
                break
            if entry.labelled:
                continue
            self._inside(entry.file).unlink(missing_ok=True)
            del self._entries[entry.sha256]
            self._bytes -= entry.size
            self.evicted += 1
            self._append({"event": "evicted", "time": now(), "sha256": entry.sha256, "file": entry.file})
        return self._bytes + size <= self.max_bytes

    def _write(self, target: Path, data: bytes) -> None:
        """Atomically: a temporary file in DIR/.incoming, renamed into place."""
        incoming = self._inside(INCOMING)
        incoming.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = incoming / f"{target.name}.{threading.get_ident()}.tmp"
        try:
            temporary.write_bytes(data)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    # ---- labelling ---------------------------------------------------------------------------

    def pending(self, limit: int, offset: int = 0) -> tuple[int, list[dict]]:
        """(how many await a label, the `limit` oldest of them after `offset`)."""
        with self._lock:
            waiting = [e for e in self._entries.values() if not e.labelled]
        page = waiting[offset : offset + limit]
        return len(waiting), [summary(e) for e in page]

    def image(self, sha256: str) -> tuple[Path, str]:
        """(path, media type) of a kept image; CaptureError 404 for anything else."""
        entry = self._entry(sha256)
        return self._inside(entry.file), MEDIA_TYPES.get(
            entry.file.rsplit(".", 1)[-1], "application/octet-stream"
        )

    def label(self, sha256: str, true_label: str) -> dict:
        """Move a kept image to DIR/labelled/<true_label>/ and record it; the entry's summary.
        Labelling again moves it to the new label's folder."""
        with self._lock:
            entry = self._entry(sha256)
            name = entry.file.rsplit("/", 1)[-1]
            relative = f"{LABELLED}/{folder_name(true_label)}/{name}"
            source, target = self._inside(entry.file), self._inside(relative)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
            except OSError as error:
                self._failed("label", f"cannot move {entry.file}", error)
                raise CaptureError(503, f"cannot move the image: {error.strerror or error}") from None
            event = {
                "event": "labelled",
                "time": now(),
                "sha256": sha256,
                "file": relative,
                "label": true_label,
            }
            try:
                self._append(event)
            except OSError as error:
                os.replace(target, source)  # as it was: the manifest does not know the move
                raise CaptureError(503, f"cannot record the label: {error.strerror or error}") from None
            entry.file = relative
            entry.record = {
                **entry.record,
                "file": relative,
                "true_label": true_label,
                "labelled_time": event["time"],
            }
            self.labelled_total += 1
            return summary(entry)

    def _entry(self, sha256: str) -> Entry:
        entry = self._entries.get(sha256) if SHA256.fullmatch(sha256) else None
        if entry is None:
            raise CaptureError(404, f"no captured image has sha256 {sha256!r}")
        return entry

    # ---- the manifest ------------------------------------------------------------------------

    def _append(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / MANIFEST, "a", encoding="utf-8") as manifest:
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._manifest_lines += 1
        if self._manifest_lines > 2 * len(self._entries) + 1000:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the manifest as one line per kept image (atomically): evictions and moves are
        folded in, so its size follows the folder's."""
        temporary = self.root / f".{MANIFEST}.tmp"
        with open(temporary, "w", encoding="utf-8") as manifest:
            for entry in self._entries.values():
                manifest.write(json.dumps(entry.record, ensure_ascii=False) + "\n")
        os.replace(temporary, self.root / MANIFEST)
        self._manifest_lines = len(self._entries)

    def _load(self) -> None:
        """The index from the manifest of an earlier run: images still on disk, oldest first."""
        path = self.root / MANIFEST
        if not path.is_file():
            return
        entries: OrderedDict[str, Entry] = OrderedDict()
        lines = 0
        with open(path, encoding="utf-8", errors="replace") as manifest:
            for line in manifest:
                lines += 1
                try:
                    record = json.loads(line)
                    sha, event, file = record["sha256"], record["event"], record["file"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash
                if event == "captured":
                    entries[sha] = Entry(sha, file, int(record.get("bytes", 0)), record)
                elif event == "evicted":
                    entries.pop(sha, None)
                elif event == "labelled" and sha in entries:
                    entry = entries[sha]
                    entry.file = file
                    entry.record = {**entry.record, "file": file, "true_label": record.get("label")}
        for sha, entry in list(entries.items()):
            try:
                if not self._inside(entry.file).is_file():
                    del entries[sha]
            except CaptureError:
                del entries[sha]  # a manifest edited to point outside DIR
        with self._lock:
            self._entries = entries
            self._bytes = sum(e.size for e in entries.values())
            self._manifest_lines = lines
            self._make_room(0)  # a lower --capture-max-mb than last time

    def _inside(self, relative: str) -> Path:
        """DIR/relative, refused unless it resolves inside DIR (symbolic links included)."""
        path = self.root / relative
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root) or path.resolve() == root:
            raise CaptureError(404, f"{relative!r} is not inside the capture folder")
        return path

    # ---- failures ----------------------------------------------------------------------------

    def _failed(self, kind: str, what: str, error: OSError) -> None:
        self._rate_limited(kind, f"capture: {what}: {error.strerror or error} (counted on /metrics)")

    def _rate_limited(self, kind: str, message: str) -> None:
        last = self._logged.get(kind)
        if last is None or time.monotonic() - last >= LOG_EVERY_S:
            self._logged[kind] = time.monotonic()
            log.warning(message)

    def bytes_used(self) -> int:
        return self._bytes

    def waiting(self) -> int:
        with self._lock:
            return sum(not e.labelled for e in self._entries.values())


def summary(entry: Entry) -> dict:
    """What GET /v1/captures lists for one image."""
    record = entry.record
    probabilities = record.get("probabilities") or {}
    return {
        "sha256": entry.sha256,
        "time": record.get("time"),
        "model": record.get("model"),
        "label": record.get("label"),
        "probability": probabilities.get(record.get("label"), None),
        "reason": record.get("reason"),
        "true_label": record.get("true_label"),
    }


def detected_extension(data: bytes) -> str:
    """The file extension of the image's format, from its header ("bin" if Pillow cannot tell)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            return EXTENSIONS.get(image.format or "", "bin")
    except Exception:  # the request's decode already accepted it; a name is all this is for
        return "bin"
