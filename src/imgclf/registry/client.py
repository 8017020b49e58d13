"""The MLflow Model Registry as imgclf uses it: one version per ONNX file, three aliases, every
move recorded.

MLflow keeps no history of aliases: each move is a run in the experiment `<name> registry` (the
MLflow UI lists them) and tags on the version it moved to. MLflow's alias writes are not atomic
either, so every write here goes through `fence`: while a `RegistryLock` (lock.py) is held, it
checks before each write that the lock is still this process's, and stops the write otherwise.

Reads go through serving's `registry_reader`: an `mlflow server` is read over its REST API, so
that `imgclf models` and `imgclf promote --dry-run` never import mlflow (seconds); writes, and
every access to a sqlite store, use MLflow's client, imported on first use.
"""

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from imgclf.config.operations import Config
from imgclf.errors import ImgclfError
from imgclf.serving.registry_reader import RegistryReadError, VersionRecord, registry_reader
from imgclf.tracking import client as tracking
from imgclf.tracking.store import prepare_store

ALIASES = ("champion", "challenger", "previous")
TAG = "imgclf."  # the prefix of every tag imgclf sets on a version
HISTORY_SUFFIX = " registry"  # the experiment that holds the history: "<name> registry"


class RegistryError(ImgclfError):
    """A version or alias that does not exist, or a model that was not registered: fix the command."""

    exit_code = 2


class RegistryConflict(ImgclfError):
    """Another promotion holds the lock, or the champion moved meanwhile: run again."""

    exit_code = 3


def actor() -> str:
    """Who acts: the GitHub user that started the workflow, else the local user."""
    if os.environ.get("GITHUB_ACTOR"):
        return os.environ["GITHUB_ACTOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return "unknown"


def ci_run_url() -> str:
    """The GitHub Actions run this command is part of; empty outside one."""
    parts = [os.environ.get(key, "") for key in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")]
    return f"{parts[0]}/{parts[1]}/actions/runs/{parts[2]}" if all(parts) else ""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Move:
    """One recorded registry action: an alias moved, or a gate that refused to move it."""

    action: str  # promote, rollback or gate (gates failed: nothing moved)
    alias: str
    version: str
    replaced: str | None  # the version the alias pointed at before, if any
    reason: str
    report: str = ""  # the gate table, markdown
    moved: bool = True


class Registry:
    """`registry.model_name` in the config's tracking store."""

    def __init__(self, config: Config):
        # Each history entry is a run: MLflow would print a "View run" link for each on a server.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.config = config
        self.name = config.registry.model_name
        self.uri = tracking.tracking_uri(config)
        prepare_store(self.uri)
        self.reader = registry_reader(self.uri)
        # Called before each write; the registry lock sets it while held (it raises if the lock
        # was lost), so that no write lands after another process took the lock over.
        self.fence: Callable[[], None] = lambda: None

    @cached_property
    def client(self):
        """MLflow's client, for writes (and the lock): mlflow is imported on first use."""
        return tracking.client(self.config)

    @cached_property
    def MlflowException(self) -> type[Exception]:
        from mlflow.exceptions import MlflowException

        return MlflowException

    def require_shared_store(self) -> None:
        """Refuse to write a registry that dies with a CI runner: its own sqlite file."""
        if os.environ.get("GITHUB_ACTIONS") == "true" and self.uri.startswith("sqlite:"):
            raise RegistryError(
                f"the store is {self.uri}, a file on this runner, gone when the job ends: set the "
                "repository variable MLFLOW_TRACKING_URI to the team's MLflow server (README, Promoting)"
            )

    # --- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.reader.aliases(self.name) is not None

    def aliases(self) -> dict[str, str]:
        """alias -> version; empty when nothing is registered yet."""
        return self.reader.aliases(self.name) or {}

    def versions(self) -> list[VersionRecord]:
        """Every version, oldest first (none when nothing is registered yet)."""
        found = self.reader.search_versions(f"name = '{self._quoted()}'")
        return sorted(found, key=lambda version: int(version.version))

    def version(self, number: str) -> VersionRecord:
        """Version `number`; RegistryError naming the versions there are if it does not exist."""
        if not str(number).isdigit():
            raise RegistryError(f"version {number!r}: expected a version number such as 3")
        try:
            return self.reader.version(self.name, str(number))
        except RegistryReadError as error:
            if not error.code:  # no answer: not the version's fault
                raise
            there = ", ".join(v.version for v in self.versions()) or "none"
            raise RegistryError(
                f"model {self.name!r} has no version {number} in {self.uri} (versions: {there})"
            ) from None

    def find(self, sha256: str) -> VersionRecord | None:
        """The version registered from the ONNX file with this SHA-256, if any."""
        query = f"name = '{self._quoted()}' and tags.`{TAG}sha256` = '{sha256}'"
        found = self.reader.search_versions(query)
        return min(found, key=lambda version: int(version.version)) if found else None

    def download_onnx(self, version: str, folder: Path) -> Path:
        """Version `version`'s ONNX file, downloaded into `folder`."""
        local = self.reader.download_version(self.name, version, folder)
        found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
        if not found or found[0].suffix != ".onnx":
            raise RegistryError(f"version {version} of {self.name!r} holds no .onnx file")
        return found[0]

    def history(self) -> list[dict]:
        """Every recorded move, oldest first."""
        experiment = self.reader.experiment_id(self.name + HISTORY_SUFFIX)
        if experiment is None:
            return []
        keys = ("action", "alias", "version", "replaced", "moved", "actor", "reason", "ci_run", "at")
        return [{key: tags.get(TAG + key, "") for key in keys} for tags in self.reader.run_tags(experiment)]

    # --- writing ---------------------------------------------------------------------------

    def ensure_model(self, description: str) -> None:
        """Create the registered model on first use (by whichever process comes first)."""
        self.fence()
        if self.exists():
            self.client.update_registered_model(self.name, description=description)
            return
        try:
            self.client.create_registered_model(self.name, description=description)
        except self.MlflowException:
            if not self.exists():  # not a lost race: a real error
                raise

    def create_version(self, source: str, run_id: str, model_id: str | None, tags: dict, description: str):
        self.fence()
        return self.client.create_model_version(
            self.name, source, run_id=run_id, tags=tags, description=description, model_id=model_id
        )

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        self.fence()
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def set_alias(self, alias: str, version: str | None) -> None:
        """Point `alias` at `version`, or remove it (None)."""
        self.fence()
        if version is None:
            if alias in self.aliases():
                self.client.delete_registered_model_alias(self.name, alias)
        else:
            self.client.set_registered_model_alias(self.name, alias, version)

    def record(self, move: Move) -> None:
        """Tags on the version and one run in `<name> registry`: who, when, why, and the gates."""
        who, at, ci_run = actor(), now_iso(), ci_run_url()
        if move.moved:
            self.set_tags(
                move.version,
                {
                    f"{TAG}{move.alias}.by": who,
                    f"{TAG}{move.alias}.at": at,
                    f"{TAG}{move.alias}.reason": move.reason[:5000],
                    f"{TAG}{move.alias}.ci_run": ci_run,
                },
            )
        fields = {
            "action": move.action,
            "alias": move.alias,
            "version": move.version,
            "replaced": move.replaced or "",
            "moved": str(move.moved).lower(),
            "actor": who,
            "reason": move.reason,
            "ci_run": ci_run,
            "at": at,
        }
        arrow = f"v{move.version} → {move.alias}" if move.moved else f"v{move.version} ✗ {move.alias}"
        note = f"**{move.action}** {arrow} by {who}: {move.reason}\n\n{ci_run}\n\n{move.report}"
        tags = {TAG + key: value[:5000] for key, value in fields.items()}
        tags["mlflow.note.content"] = note[:5000]
        experiment = tracking.experiment_id(self.config, self.name + HISTORY_SUFFIX)
        self.fence()
        run = self.client.create_run(experiment, tags=tags, run_name=f"{move.action}: {arrow}")
        self.client.set_terminated(run.info.run_id, "FINISHED" if move.moved else "FAILED")

    # --- internals -------------------------------------------------------------------------

    def _quoted(self) -> str:
        return self.name.replace("'", "\\'")
