"""The MLflow Model Registry as imgclf uses it: one version per ONNX file, aliases moved under a
lock, every move recorded.

MLflow's alias writes are not atomic: two processes that each read `champion`, set `previous` and
set `champion` lose one champion, and may crash on the alias table's unique key. What the store
does make atomic is creating a registered model: of processes racing to create one name, exactly
one wins. So the lock is a registered model, `<name>.lock`, created to take it and deleted to give
it back; its tags say who holds it and until when, so that a lock left by a killed process
expires. MLflow keeps no history of aliases either: each move is a run in the experiment
`<name> registry` (the MLflow UI lists them) and tags on the version it moved to.
"""

import contextlib
import getpass
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from imgclf.config.operations import Config
from imgclf.errors import ImgclfError
from imgclf.tracking import client as tracking

ALIASES = ("champion", "challenger", "previous")
TAG = "imgclf."  # the prefix of every tag imgclf sets on a version
HISTORY_SUFFIX = " registry"  # the experiment that holds the history: "<name> registry"
LOCK_SUFFIX = ".lock"


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
        from mlflow.exceptions import MlflowException

        # Each history entry is a run: MLflow would print a "View run" link for each on a server.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.config = config
        self.name = config.registry.model_name
        self.uri = tracking.tracking_uri(config)
        self.client = tracking.client(config)
        self.MlflowException = MlflowException

    def require_shared_store(self) -> None:
        """Refuse to write a registry that dies with a CI runner: its own sqlite file."""
        if os.environ.get("GITHUB_ACTIONS") == "true" and self.uri.startswith("sqlite:"):
            raise RegistryError(
                f"the store is {self.uri}, a file on this runner, gone when the job ends: set the "
                "repository variable MLFLOW_TRACKING_URI to the team's MLflow server (README, Promoting)"
            )

    # --- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        return self._registered_model(self.name) is not None

    def aliases(self) -> dict[str, str]:
        """alias -> version; empty when nothing is registered yet."""
        model = self._registered_model(self.name)
        return {alias: str(version) for alias, version in (model.aliases if model else {}).items()}

    def versions(self) -> list:
        """Every version, oldest first."""
        if not self.exists():
            return []
        found = self.client.search_model_versions(f"name = '{self._quoted()}'")
        return sorted(found, key=lambda version: int(version.version))

    def version(self, number: str):
        """Version `number`; RegistryError naming the versions there are if it does not exist."""
        if not str(number).isdigit():
            raise RegistryError(f"version {number!r}: expected a version number such as 3")
        try:
            return self.client.get_model_version(self.name, str(number))
        except self.MlflowException:
            there = ", ".join(v.version for v in self.versions()) or "none"
            raise RegistryError(
                f"model {self.name!r} has no version {number} in {self.uri} (versions: {there})"
            ) from None

    def find(self, sha256: str):
        """The version registered from the ONNX file with this SHA-256, if any."""
        if not self.exists():
            return None
        query = f"name = '{self._quoted()}' and tags.`{TAG}sha256` = '{sha256}'"
        found = self.client.search_model_versions(query)
        return min(found, key=lambda version: int(version.version)) if found else None

    def download_onnx(self, version: str, folder: Path) -> Path:
        """Version `version`'s ONNX file, downloaded into `folder`."""
        import mlflow.artifacts

        # Resolved here rather than as models:/<name>/<version>: MLflow resolves that form against
        # the process-wide registry URI, not the one it is given.
        uri = self.client.get_model_version_download_uri(self.name, version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(folder), tracking_uri=self.uri
        )
        found = sorted(Path(local).rglob("*.onnx")) if Path(local).is_dir() else [Path(local)]
        if not found or found[0].suffix != ".onnx":
            raise RegistryError(f"version {version} of {self.name!r} holds no .onnx file")
        return found[0]

    def history(self) -> list[dict]:
        """Every recorded move, oldest first."""
        experiment = self.client.get_experiment_by_name(self.name + HISTORY_SUFFIX)
        if experiment is None:
            return []
        runs = self.client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=50000
        )
        keys = ("action", "alias", "version", "replaced", "moved", "actor", "reason", "ci_run", "at")
        return [{key: run.data.tags.get(TAG + key, "") for key in keys} for run in runs]

    # --- writing ---------------------------------------------------------------------------

    def ensure_model(self, description: str) -> None:
        """Create the registered model on first use (by whichever process comes first)."""
        if self.exists():
            self.client.update_registered_model(self.name, description=description)
            return
        try:
            self.client.create_registered_model(self.name, description=description)
        except self.MlflowException:
            if not self.exists():  # not a lost race: a real error
                raise

    def create_version(self, source: str, run_id: str, model_id: str | None, tags: dict, description: str):
        return self.client.create_model_version(
            self.name, source, run_id=run_id, tags=tags, description=description, model_id=model_id
        )

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def set_alias(self, alias: str, version: str | None) -> None:
        """Point `alias` at `version`, or remove it (None)."""
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
        run = self.client.create_run(experiment, tags=tags, run_name=f"{move.action}: {arrow}")
        self.client.set_terminated(run.info.run_id, "FINISHED" if move.moved else "FAILED")

    @contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """Hold the registry lock for the block; RegistryConflict after promote.lock_timeout_s."""
        settings = self.config.promote
        name, token = self.name + LOCK_SUFFIX, uuid.uuid4().hex
        deadline = time.monotonic() + settings.lock_timeout_s
        while True:
            expires = time.time() + settings.lock_expiry_s
            tags = {"holder": token, "actor": actor(), "purpose": purpose, "since": now_iso()}
            tags["expires"] = f"{expires:.0f}"
            description = (
                f"The lock of `{self.name}`'s aliases: {tags['actor']} is running `imgclf {purpose}` "
                f"(since {tags['since']}). It goes away when that is done, or expires after "
                f"{settings.lock_expiry_s:g} s."
            )
            try:
                self.client.create_registered_model(name, tags=tags, description=description)
                break
            except self.MlflowException:
                pass  # taken, or a racing create failed: read who holds it
            held = self._registered_model(name)
            if held is None:
                continue  # released meanwhile
            holder = held.tags
            if float(holder.get("expires") or 0) < time.time():
                print(
                    f"imgclf: taking over the registry lock that {holder.get('actor', '?')} left "
                    f"({holder.get('purpose', '?')}, since {holder.get('since', '?')}); it has expired"
                )
                self._delete_lock(name, holder.get("holder"))
                continue
            if time.monotonic() > deadline:
                raise RegistryConflict(
                    f"the registry lock {name!r} is held by {holder.get('actor', '?')} "
                    f"(imgclf {holder.get('purpose', '?')}, since {holder.get('since', '?')}); waited "
                    f"{settings.lock_timeout_s:g} s: run again when that is done"
                )
            time.sleep(0.1 + random.random() * 0.3)  # jitter: waiting processes do not retry in step
        try:
            yield
        finally:
            self._delete_lock(name, token)

    # --- internals -------------------------------------------------------------------------

    def _delete_lock(self, name: str, holder: str | None) -> None:
        """Delete the lock if `holder` still holds it (an expired lock may have been taken over)."""
        held = self._registered_model(name)
        if held is None or held.tags.get("holder") != holder:
            return
        # Another process may have taken over an expired lock and deleted it first.
        with contextlib.suppress(self.MlflowException):
            self.client.delete_registered_model(name)

    def _registered_model(self, name: str):
        try:
            return self.client.get_registered_model(name)
        except self.MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _quoted(self) -> str:
        return self.name.replace("'", "\\'")
