"""The commands that write the registry: `register`, `promote` and `rollback`.

`register` makes models/model.onnx, as `dvc repro` last evaluated it, a version of
`registry.model_name`, once per file (by SHA-256), with its `Evidence` as tags. `promote` compares
a version with the champion on the same test split, prints the gate table, and on a pass moves the
aliases. `rollback` points `champion` back.

Each does its slow work first, without the registry lock: reading, gating, downloading and scoring
the champion, logging a model again. Then, holding the lock (lock.py) for a few requests, it checks
that what it computed against still holds (the champion has not moved, the file is still not
registered) and writes: the aliases, the version's tags, the history.
"""

from dataclasses import dataclass
from pathlib import Path

from imgclf.config.operations import Config
from imgclf.errors import ImgclfError
from imgclf.fileio import read_json
from imgclf.registry.client import TAG, Move, Registry, RegistryConflict, RegistryError, now_iso
from imgclf.registry.evidence import Evidence, Outputs, file_sha256
from imgclf.registry.gates import evaluate_gates, passed, settings_hash
from imgclf.registry.lock import RegistryLock
from imgclf.registry.report import gate_markdown, gate_table, model_description, version_description
from imgclf.registry.scoring import challenger_evidence, champion_evidence
from imgclf.tracking import client as tracking

GATING_ROUNDS = 3  # a promotion without --expect-champion gates again when the champion moved meanwhile


class GateFailed(ImgclfError):
    """The version failed one or more gates: nothing moved."""

    exit_code = 1


# --- register -------------------------------------------------------------------------------


def register(config: Config, root: Path) -> tuple[str, bool]:
    """(version, created): the evaluated model as a version, made only if its file is new."""
    outputs = Outputs.of_pipeline(root)
    evidence = challenger_evidence(config, outputs)
    registry = Registry(config)
    registry.require_shared_store()
    existing = registry.find(evidence.sha256)
    if existing is not None:
        return str(existing.version), False
    run_id = tracking.model_run(config, evidence.run_id, evidence.sha256)  # restored by DVC: by its hash
    run_id, model_id = _logged_model(config, run_id, outputs)  # may upload: before the lock
    sidecar = read_json(outputs.sidecar)
    with RegistryLock(registry, "register"):
        existing = registry.find(evidence.sha256)  # registered by another process meanwhile
        if existing is not None:
            return str(existing.version), False
        registry.ensure_model(model_description(config, sidecar, evidence))
        version = registry.create_version(
            source=f"models:/{model_id}",
            run_id=run_id,
            model_id=model_id,
            tags=evidence.to_tags(),
            description=version_description(config, sidecar, evidence),
        )
        return str(version.version), True


def _logged_model(config: Config, run_id: str, outputs: Outputs) -> tuple[str, str]:
    """(run id, logged model id) of the ONNX model the export stage logged in the pipeline's run.

    When this store does not have that run (the pipeline tracked into another store, or DVC
    restored its outputs from a cache), the model is logged once more, in a new run here:
    registering never needs a retrain.
    """
    from mlflow.exceptions import MlflowException

    client = tracking.client(config)
    if run_id and tracking.existing_run(config, run_id):
        run = client.get_run(run_id)
        for output in run.outputs.model_outputs if run.outputs else []:
            try:
                logged = client.get_logged_model(output.model_id)
            except MlflowException:
                continue
            if logged.name == "model":
                return run_id, logged.model_id
    return _log_again(config, outputs)


def _log_again(config: Config, outputs: Outputs) -> tuple[str, str]:
    import mlflow
    import mlflow.onnx
    import onnx

    lineage = outputs.lineage()
    tags = {key: str(value) for key, value in lineage.items() if key.startswith(("git.", "data."))}
    tags["imgclf.logged_by"] = "imgclf register"
    new_run = tracking.start_run(config, tags)
    metrics = {f"test_{key}": value for key, value in read_json(outputs.metrics).items()}
    tracking.log_metrics(config, new_run, metrics)
    tracking.use_store(config)
    with mlflow.start_run(run_id=new_run):
        info = mlflow.onnx.log_model(onnx.load(outputs.onnx), name="model", save_as_external_data=False)
        mlflow.log_artifact(str(outputs.sidecar))
    print(
        f"imgclf: run {lineage.get('mlflow_run_id', '(unknown)')} is not in {tracking.tracking_uri(config)}: "
        f"logged the model in run {new_run}"
    )
    return new_run, info.model_id


# --- promote --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromoteRequest:
    """What `imgclf promote` was asked to do."""

    version: str | None = None  # None: the version registered from the evaluated models/model.onnx
    to: str = "champion"  # or challenger
    expect_champion: str | None = None  # a version, or "none": exit 3 if the champion is another
    dry_run: bool = False  # gate only: change nothing
    reason: str = "promoted"
    report: Path | None = None  # append the gate table (markdown) here


@dataclass(frozen=True)
class Candidate:
    version: str | None  # None: the work tree's model, not registered (a dry run on a pull request)
    evidence: Evidence
    tags: dict

    @property
    def label(self) -> str:
        return f"version {self.version}" if self.version else "models/model.onnx (not registered)"


@dataclass(frozen=True)
class Verdict:
    """The gates' decision on a candidate, against one champion."""

    candidate: Candidate
    champion: str | None  # the champion it was gated against
    report: str  # the gate table, markdown
    passed: bool


@dataclass(frozen=True)
class Outcome:
    version: str | None
    champion: str | None  # the champion the version was gated against
    passed: bool
    moved: bool
    message: str

    awaiting_approval: bool = False  # the version is `challenger` now, and not the champion

    def outputs(self) -> str:
        """GitHub Actions step outputs (`name=value` lines for $GITHUB_OUTPUT)."""
        return (
            f"version={self.version or ''}\nchampion={self.champion or 'none'}\n"
            f"passed={str(self.passed).lower()}\napprove={str(self.awaiting_approval).lower()}\n"
        )


def promote(config: Config, root: Path, request: PromoteRequest) -> Outcome:
    """Gate a version against the champion; on a pass (and not a dry run) point `request.to` at it.

    The gates, and the champion's download and scoring, run before the lock is taken. Holding it,
    the champion is checked again: if it moved meanwhile, an --expect-champion promotion exits 3,
    and any other gates again against the new champion."""
    registry = Registry(config)
    if not request.dry_run:
        registry.require_shared_store()
    for _ in range(GATING_ROUNDS):
        chosen = candidate(registry, request.version, root, request.dry_run)
        aliases = registry.aliases()
        champion = aliases.get("champion")
        _expect(request, chosen, champion)
        done = _already(chosen, aliases, request.to)
        if done is not None:
            return done
        verdict = gate(registry, root, chosen, champion)
        if request.dry_run:
            _append(request.report, verdict.report)
            return Outcome(chosen.version, champion, verdict.passed, False, "dry run: nothing changed")
        with RegistryLock(registry, f"promote --to {request.to}"):
            aliases = registry.aliases()
            if aliases.get("champion") == champion:
                _append(request.report, verdict.report)
                return _apply(registry, request, verdict, aliases)
        _expect(request, chosen, aliases.get("champion"))
        print(
            f"imgclf: the champion moved to {_v(aliases.get('champion') or 'none')} while {chosen.label} "
            "was gated: gating it again"
        )
    raise RegistryConflict(
        f"the champion moved {GATING_ROUNDS} times while {chosen.label} was gated: run `imgclf promote` again"
    )


def candidate(registry: Registry, version: str | None, root: Path, dry_run: bool) -> Candidate:
    """`version`, else the version registered from the evaluated models/model.onnx."""
    if version is not None:
        found = registry.version(version)
        return Candidate(str(found.version), Evidence.from_tags(found.tags, str(found.version)), found.tags)
    outputs = Outputs.of_pipeline(root)
    sha256 = file_sha256(outputs.onnx)
    found = registry.find(sha256)
    if found is not None:
        return Candidate(str(found.version), Evidence.from_tags(found.tags, str(found.version)), found.tags)
    if dry_run:
        return Candidate(None, challenger_evidence(registry.config, outputs), {})
    raise RegistryError(
        f"models/model.onnx (sha256 {sha256[:12]}) is not registered in {registry.uri}: "
        "run `imgclf register` first, or pass --version N"
    )


def gate(registry: Registry, root: Path, chosen: Candidate, champion: str | None) -> Verdict:
    """The gates of `chosen` against `champion`, printed: a pass recorded against this same
    champion with these same settings, else evaluated now (scoring the champion if need be)."""
    recorded = recorded_gates(registry.config, chosen, champion)
    if recorded is not None:
        print(
            f"{chosen.label} passed its gates against the champion ({_v(champion or 'none')}), recorded at "
            f"{chosen.tags.get(TAG + 'gate.at')}; the champion has not moved since"
        )
        return Verdict(chosen, champion, recorded, True)
    against = None if champion is None else champion_evidence(registry, champion, chosen.evidence, root)
    gates = evaluate_gates(registry.config, chosen.evidence, against)
    title = f"Gates: {chosen.label} of {registry.name} against the champion ({_v(champion or 'none')})"
    print(title)
    print(gate_table(gates))
    return Verdict(chosen, champion, gate_markdown(title, gates), passed(gates))


def recorded_gates(config: Config, chosen: Candidate, champion: str | None) -> str | None:
    """The gate report of a pass recorded on the version against this same champion, with these
    same gate settings: the approval step of CI reuses it (the champion has not moved, so the
    comparison holds)."""
    tags = chosen.tags
    if chosen.version is None or tags.get(TAG + "gate.result") != "pass":
        return None
    if tags.get(TAG + "gate.against") != (champion or "none"):
        return None
    if tags.get(TAG + "gate.settings") != settings_hash(config):
        return None
    return tags.get(TAG + "gate.report", "")


def _apply(registry: Registry, request: PromoteRequest, verdict: Verdict, aliases: dict) -> Outcome:
    """Under the lock, with the champion as gated against: record the gates, move the aliases."""
    chosen, champion, to = verdict.candidate, verdict.champion, request.to
    done = _already(chosen, aliases, to)  # another process promoted the same version meanwhile
    if done is not None:
        return done
    registry.set_tags(
        chosen.version,
        {
            f"{TAG}gate.result": "pass" if verdict.passed else "fail",
            f"{TAG}gate.against": champion or "none",
            f"{TAG}gate.settings": settings_hash(registry.config),
            f"{TAG}gate.at": now_iso(),
            f"{TAG}gate.report": verdict.report[:5000],
        },
    )
    if not verdict.passed:
        registry.record(
            Move("gate", to, chosen.version, aliases.get(to), request.reason, verdict.report, moved=False)
        )
        return Outcome(chosen.version, champion, False, False, "")
    if to == "champion":
        if champion is not None:
            registry.set_alias("previous", champion)
        registry.set_alias("champion", chosen.version)
        if aliases.get("challenger") == chosen.version:
            registry.set_alias("challenger", None)
    else:
        registry.set_alias(to, chosen.version)
    registry.record(Move("promote", to, chosen.version, aliases.get(to), request.reason, verdict.report))
    was = f" (was {_v(aliases[to])})" if aliases.get(to) else ""
    message = f"{to} is now version {chosen.version}{was}"
    return Outcome(chosen.version, champion, True, True, message, awaiting_approval=to == "challenger")


def _expect(request: PromoteRequest, chosen: Candidate, champion: str | None) -> None:
    """RegistryConflict if --expect-champion names another champion than `champion`."""
    if request.expect_champion is not None and (champion or "none") != request.expect_champion:
        raise RegistryConflict(
            f"the champion moved: expected {_v(request.expect_champion)}, found {_v(champion or 'none')}; "
            f"{chosen.label} must be gated against the new champion: run `imgclf promote` again"
        )


def _already(chosen: Candidate, aliases: dict, to: str) -> Outcome | None:
    """The outcome when `chosen` is the champion already, or `to` already: nothing to do."""
    champion = aliases.get("champion")
    if chosen.version is None or chosen.version not in (champion, aliases.get(to)):
        return None
    already = "champion" if chosen.version == champion else to
    message = f"version {chosen.version} is already {already}: nothing to do"
    return Outcome(chosen.version, champion, True, False, message, awaiting_approval=already == "challenger")


def _append(report: Path | None, markdown: str) -> None:
    if report is not None:
        with report.open("a", encoding="utf-8") as f:
            f.write(markdown + "\n")


# --- rollback -------------------------------------------------------------------------------


def rollback(config: Config, to: str, reason: str) -> str:
    """Point `champion` at `previous` (or version `to`), and `previous` at the old champion."""
    registry = Registry(config)
    registry.require_shared_store()
    with RegistryLock(registry, "rollback"):
        aliases = registry.aliases()
        champion = aliases.get("champion")
        if champion is None:
            raise RegistryError(
                f"model {registry.name!r} has no champion in {registry.uri}: nothing to roll back"
            )
        target = aliases.get("previous") if to == "previous" else str(registry.version(to).version)
        if target is None:
            raise RegistryError(
                f"model {registry.name!r} has no `previous` alias: nothing to roll back to "
                "(give --to VERSION)"
            )
        if target == champion:
            return f"version {target} is already champion: nothing to do"
        registry.set_alias("champion", target)
        registry.set_alias("previous", champion)
        registry.record(Move("rollback", "champion", target, champion, reason))
        return f"champion is now version {target} (was {champion}); previous is {champion}"


def _v(version: str) -> str:
    return version if version == "none" else f"version {version}"
