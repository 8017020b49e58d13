"""Promotion: register the evaluated model, gate it against the champion, move the aliases.

`register` makes models/model.onnx, as `dvc repro` last evaluated it, a version of
`registry.model_name`, once per file (by SHA-256). What the gates need is written on the version
as tags (`Evidence`), so a later job, on another machine without the pipeline's outputs, can gate
and approve it. `promote` compares a version with the champion on the same test split (scoring the
champion's ONNX file there when it was evaluated on another one), prints the gate table, and on a
pass moves the aliases under the registry's lock. `rollback` points `champion` back.
"""

import hashlib
import json
import shlex
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from imgclf.card import ModelCard
from imgclf.config.operations import Config
from imgclf.data.watch import dvc_md5
from imgclf.errors import ImgclfError
from imgclf.fileio import read_json
from imgclf.registry.client import TAG, Move, Registry, RegistryConflict, RegistryError, now_iso
from imgclf.tracking import client as tracking


class GateFailed(ImgclfError):
    """The version failed one or more gates: nothing moved."""

    exit_code = 1


class NotEvaluated(ImgclfError):
    """models/model.onnx is missing, or not the file the evaluate stage measured: run dvc repro."""

    exit_code = 2


# --- what a version says about itself -------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """The evaluate stage's inputs and outputs, named by its `cmd:` line in dvc.yaml."""

    onnx: Path
    sidecar: Path
    data: Path
    metrics: Path
    per_class: Path

    @classmethod
    def of_pipeline(cls, root: Path, check: bool = True) -> "Outputs":
        """The files `dvc repro` evaluated last; NotEvaluated (with `check`) unless dvc.lock says
        these are the files the evaluate stage measured."""
        stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
        words = shlex.split(stages["evaluate"]["cmd"])
        flag = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
        outputs = cls(
            onnx=root / flag["--onnx"],
            sidecar=root / flag["--sidecar"],
            data=root / flag["--data"],
            metrics=root / flag["--metrics"],
            per_class=root / flag["--plots"] / "per_class.csv",
        )
        if check:
            outputs.check_evaluated(root)
        return outputs

    def check_evaluated(self, root: Path) -> None:
        """The ONNX file and metrics are those of the evaluate stage's last run in dvc.lock."""
        for path in (self.onnx, self.sidecar, self.metrics, self.per_class, self.data):
            if not path.exists():
                raise NotEvaluated(
                    f"{path.relative_to(root)} is missing: run `dvc repro` (or `make run`) first"
                )
        lock_path = root / "dvc.lock"
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else {}
        stage = (lock or {}).get("stages", {}).get("evaluate", {})
        recorded = {
            entry["path"]: entry.get("md5") for entry in stage.get("deps", []) + stage.get("outs", [])
        }
        for path in (self.onnx, self.metrics):
            name = path.relative_to(root).as_posix()
            if recorded.get(name) != dvc_md5(path):
                raise NotEvaluated(
                    f"{name} is not what the evaluate stage last measured (dvc.lock): run `dvc repro` first"
                )


@dataclass(frozen=True)
class Evidence:
    """The facts the gates read about one model, kept as tags on its registered version."""

    sha256: str
    commit: str
    dirty: str  # true, false or unknown
    data_name: str
    data_sha256: str  # the normalized data set (all splits)
    test_sha256: str  # the test split alone: what the metrics were measured on
    duplicates: int  # images in both the train and the test split
    classes: tuple[str, ...]
    input: dict  # the card's input spec (imgclf.card.InputSpec.to_json)
    metrics: dict  # accuracy, macro_f1, latency_ms_p50_b1, latency_ms_p99_b1 (metrics/eval.json)
    recall: tuple[float, ...]  # per class, in class order
    parity_max_abs_diff: float
    parity_argmax_mismatches: int
    run_id: str

    def to_tags(self) -> dict[str, str]:
        fields = asdict(self)
        fields["classes"], fields["recall"] = list(self.classes), list(self.recall)
        tags = {
            f"{TAG}{key}": value if isinstance(value, str) else json.dumps(value)
            for key, value in fields.items()
        }
        # The headline numbers once more, one tag each, to read at a glance in the MLflow UI.
        tags |= {f"{TAG}metric.{key}": str(value) for key, value in self.metrics.items()}
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str], version: str) -> "Evidence":
        fields = {}
        for name, kind in cls.__annotations__.items():
            text = tags.get(TAG + name)
            try:
                fields[name] = text if kind is str else json.loads(text)
            except (TypeError, ValueError):
                raise RegistryError(
                    f"version {version} was not registered by `imgclf register` (tag {TAG}{name} is "
                    f"{'missing' if text is None else 'unreadable'}): it cannot be gated"
                ) from None
        fields["classes"], fields["recall"] = tuple(fields["classes"]), tuple(fields["recall"])
        return cls(**fields)

    @classmethod
    def from_outputs(cls, outputs: Outputs) -> "Evidence":
        sidecar = read_json(outputs.sidecar)
        lineage, export = sidecar["lineage"], sidecar["export"]
        card = ModelCard.from_json(sidecar)
        metrics = read_json(outputs.metrics)
        report = read_json(outputs.data / "report.json")
        return cls(
            sha256=_sha256(outputs.onnx),
            commit=lineage.get("git.commit", "unknown"),
            dirty=lineage.get("git.dirty", "unknown"),
            data_name=lineage.get("data.name", "unknown"),
            data_sha256=lineage.get("data.normalized_sha256", "unknown"),
            test_sha256=test_split_sha256(outputs.data),
            duplicates=int(report["duplicates_across_splits"].get("train-test", 0)),
            classes=tuple(card.classes),
            input=card.input.to_json(),
            metrics={key: metrics[key] for key in HEADLINE if key in metrics},
            recall=tuple(_recalls(outputs.per_class, card.classes)),
            parity_max_abs_diff=float(export["parity_max_abs_diff"]),
            parity_argmax_mismatches=int(export["parity_argmax_mismatches"]),
            run_id=lineage.get("mlflow_run_id", ""),
        )


HEADLINE = ("accuracy", "macro_f1", "latency_ms_p50_b1", "latency_ms_p99_b1")


def test_split_sha256(data_dir: Path) -> str:
    """SHA-256 of the test split's image and label files: same hash, same test."""
    digest = hashlib.sha256()
    for name in ("images.npy", "labels.npy"):
        digest.update((data_dir / "test" / name).read_bytes())
    return digest.hexdigest()


def _recalls(per_class_csv: Path, classes: tuple[str, ...]) -> list[float]:
    import csv

    with per_class_csv.open(newline="", encoding="utf-8") as f:
        rows = {row["class"]: float(row["recall"]) for row in csv.DictReader(f)}
    return [rows[name] for name in classes]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- register -------------------------------------------------------------------------------


def register(config: Config, root: Path) -> tuple[str, bool]:
    """(version, created): the evaluated model as a version, made only if its file is new."""
    outputs = Outputs.of_pipeline(root)
    evidence = Evidence.from_outputs(outputs)
    registry = Registry(config)
    registry.require_shared_store()
    with registry.lock("register"):
        existing = registry.find(evidence.sha256)
        if existing is not None:
            return str(existing.version), False
        run_id, model_id = _logged_model(config, evidence.run_id, outputs)
        sidecar = read_json(outputs.sidecar)
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

    sidecar = read_json(outputs.sidecar)
    tags = {key: str(value) for key, value in sidecar["lineage"].items() if key.startswith(("git.", "data."))}
    tags["imgclf.logged_by"] = "imgclf register"
    new_run = tracking.start_run(config, tags)
    metrics = {f"test_{key}": value for key, value in read_json(outputs.metrics).items()}
    tracking.log_metrics(config, new_run, metrics)
    tracking.use_store(config)
    with mlflow.start_run(run_id=new_run):
        info = mlflow.onnx.log_model(onnx.load(outputs.onnx), name="model", save_as_external_data=False)
        mlflow.log_artifact(str(outputs.sidecar))
    print(
        f"imgclf: run {sidecar['lineage'].get('mlflow_run_id')} is not in {tracking.tracking_uri(config)}: "
        f"logged the model in run {new_run}"
    )
    return new_run, info.model_id


def model_description(config: Config, sidecar: dict, evidence: Evidence) -> str:
    """The registered model's page in the MLflow UI: what it is, how aliases work, the latest card."""
    name = config.registry.model_name
    return (
        f"# {name}\n\n"
        f"An image classifier trained by the imgclf pipeline on `{evidence.data_name}`: "
        f"{len(evidence.classes)} classes, {_input_line(evidence.input)}.\n\n"
        "| alias | meaning |\n|---|---|\n"
        f"| `champion` | served: `imgclf serve --model models:/{name}@champion` |\n"
        "| `challenger` | passed the gates, waiting for approval |\n"
        "| `previous` | the champion before the last promotion: `imgclf rollback` goes back to it |\n\n"
        f"Who moved which alias, when and why: the experiment **{name} registry**, "
        "or `imgclf models --history`.\n\n"
        f"## Latest version\n\n{version_description(config, sidecar, evidence)}"
    )


def version_description(config: Config, sidecar: dict, evidence: Evidence) -> str:
    """A short model card, markdown: the version's page in the MLflow UI."""
    m = evidence.metrics
    model = sidecar.get("model", {})
    state = {"false": "clean", "true": "uncommitted changes"}.get(evidence.dirty, "unknown state")
    classes = ", ".join(evidence.classes[:20]) + (" …" if len(evidence.classes) > 20 else "")
    return (
        f"**{model.get('name', 'model')}** on **{evidence.data_name}**, run `{evidence.run_id}`\n\n"
        "| | |\n|---|---|\n"
        f"| test accuracy | {m.get('accuracy', float('nan')):.4f} |\n"
        f"| test macro F1 | {m.get('macro_f1', float('nan')):.4f} |\n"
        f"| batch-1 latency p50 / p99 | {m.get('latency_ms_p50_b1')} / {m.get('latency_ms_p99_b1')} ms |\n"
        f"| classes ({len(evidence.classes)}) | {classes} |\n"
        f"| input | {_input_line(evidence.input)} |\n"
        f"| ONNX parity | max abs diff {evidence.parity_max_abs_diff:.1e}, "
        f"{evidence.parity_argmax_mismatches} argmax mismatches |\n"
        f"| code | `{evidence.commit[:12]}` ({state}) |\n"
        f"| data | normalized `{evidence.data_sha256[:12]}`, test split `{evidence.test_sha256[:12]}` |\n"
        f"| file | sha256 `{evidence.sha256[:16]}` |\n"
    )


def _input_line(spec: dict) -> str:
    size = "x".join(str(n) for n in spec.get("size", []))
    return f"{spec.get('mode')} {size} {spec.get('dtype')} {spec.get('layout')}, {spec.get('resize')}"


# --- gates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    name: str
    value: str
    champion: str
    rule: str
    passed: bool | None  # None: does not apply (no champion to compare with)

    @property
    def result(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]


def evaluate_gates(config: Config, challenger: Evidence, champion: Evidence | None) -> list[Gate]:
    """Every gate of the `promote` config group; with no champion, only the absolute ones apply."""
    rules = config.promote
    metric = rules.metric
    value = challenger.metrics[metric]
    best = champion.metrics[metric] if champion else None
    shown = "" if champion is None else f"{best:.4f}"
    gates = [
        Gate(f"{metric} floor", f"{value:.4f}", shown, f">= {rules.min_value:g}", value >= rules.min_value)
    ]
    if champion is None:
        gates.append(Gate("improvement", "", "", f">= {rules.min_improvement:+g}", None))
    else:
        gain = value - best
        gates.append(
            Gate(
                "improvement",
                f"{gain:+.4f}",
                shown,
                f">= {rules.min_improvement:+g}",
                gain >= rules.min_improvement - 1e-12,
            )
        )
    same_classes = champion is None or champion.classes == challenger.classes
    if champion is None or not same_classes:
        why = "" if champion is None else "classes differ"
        gates.append(Gate("class recall drop", why, "", f"<= {rules.max_class_recall_drop:g}", None))
    else:
        drops = [old - new for old, new in zip(champion.recall, challenger.recall, strict=True)]
        worst = max(range(len(drops)), key=drops.__getitem__)
        gates.append(
            Gate(
                "class recall drop",
                f"{max(drops[worst], 0):.4f} ({challenger.classes[worst]})",
                f"{champion.recall[worst]:.4f}",
                f"<= {rules.max_class_recall_drop:g}",
                drops[worst] <= rules.max_class_recall_drop + 1e-12,
            )
        )
    p99 = challenger.metrics["latency_ms_p99_b1"]
    gates.append(
        Gate(
            "latency p99",
            f"{p99:g} ms",
            "" if champion is None else f"{champion.metrics['latency_ms_p99_b1']:g} ms",
            f"<= {rules.max_latency_ms_p99:g} ms",
            p99 <= rules.max_latency_ms_p99,
        )
    )
    gates.append(
        Gate(
            "ONNX parity",
            f"{challenger.parity_max_abs_diff:.1e}, {challenger.parity_argmax_mismatches} mismatches",
            "",
            f"<= {rules.max_parity_diff:g}, 0 mismatches",
            challenger.parity_max_abs_diff <= rules.max_parity_diff
            and challenger.parity_argmax_mismatches == 0,
        )
    )
    gates.append(
        Gate(
            "same classes",
            f"{len(challenger.classes)} classes",
            "" if champion is None else f"{len(champion.classes)} classes",
            "as the champion",
            None if champion is None else same_classes,
        )
    )
    gates.append(
        Gate(
            "same input spec",
            _input_line(challenger.input),
            "" if champion is None else _input_line(champion.input),
            "as the champion",
            None if champion is None else champion.input == challenger.input,
        )
    )
    clean = challenger.dirty == "false"
    gates.append(
        Gate(
            "clean commit",
            f"{challenger.commit[:12]} ({'clean' if clean else 'dirty: ' + challenger.dirty})",
            "",
            "committed code" if rules.require_clean_commit else "not required",
            clean or not rules.require_clean_commit,
        )
    )
    gates.append(
        Gate(
            "train/test duplicates",
            str(challenger.duplicates),
            "",
            "allowed" if rules.allow_duplicates else "0",
            rules.allow_duplicates or challenger.duplicates == 0,
        )
    )
    return gates


def passed(gates: list[Gate]) -> bool:
    return all(gate.passed is not False for gate in gates)


def gate_table(gates: list[Gate]) -> str:
    """The gates as a plain-text table for the terminal."""
    rows = [("gate", "value", "champion", "rule", "result")] + [
        (g.name, g.value, g.champion, g.rule, g.result) for g in gates
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def gate_markdown(title: str, gates: list[Gate]) -> str:
    """The gates as a markdown table, for a CI job summary and the MLflow UI."""
    lines = [f"### {title}", "", "| gate | value | champion | rule | result |", "|---|---|---|---|---|"]
    for g in gates:
        result = "**FAIL**" if g.passed is False else g.result
        lines.append(f"| {g.name} | {g.value} | {g.champion} | {g.rule} | {result} |")
    return "\n".join(lines) + "\n"


def settings_hash(config: Config) -> str:
    """Which gate settings a recorded gate result was reached with."""
    text = json.dumps(config.promote.model_dump(exclude={"lock_timeout_s", "lock_expiry_s"}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- promote and rollback -------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    version: str | None  # None: the work tree's model, not registered (a dry run on a pull request)
    evidence: Evidence
    tags: dict

    @property
    def label(self) -> str:
        return f"version {self.version}" if self.version else "models/model.onnx (not registered)"


def candidate(registry: Registry, version: str | None, root: Path, dry_run: bool) -> Candidate:
    """`version`, else the version registered from the evaluated models/model.onnx."""
    if version is not None:
        found = registry.version(version)
        return Candidate(str(found.version), Evidence.from_tags(found.tags, str(found.version)), found.tags)
    outputs = Outputs.of_pipeline(root)
    sha256 = _sha256(outputs.onnx)
    found = registry.find(sha256)
    if found is not None:
        return Candidate(str(found.version), Evidence.from_tags(found.tags, str(found.version)), found.tags)
    if dry_run:
        return Candidate(None, Evidence.from_outputs(outputs), {})
    raise RegistryError(
        f"models/model.onnx (sha256 {sha256[:12]}) is not registered in {registry.uri}: "
        "run `imgclf register` first, or pass --version N"
    )


def champion_evidence(registry: Registry, version: str, challenger: Evidence, root: Path) -> Evidence:
    """The champion's evidence on the challenger's test split: its tags if it was evaluated on
    that split, else its ONNX file scored on data/normalized by the evaluate stage's own code."""
    found = registry.version(version)
    evidence = Evidence.from_tags(found.tags, version)
    if evidence.test_sha256 == challenger.test_sha256:
        return evidence
    data_dir = Outputs.of_pipeline(root, check=False).data
    if not (data_dir / "test").is_dir() or test_split_sha256(data_dir) != challenger.test_sha256:
        raise RegistryError(
            f"the champion (version {version}) was evaluated on another test split than the challenger, "
            "and this work tree does not hold the challenger's split to score it on: run `dvc repro` "
            "(or `dvc pull`) at the challenger's commit first"
        )
    print(
        f"imgclf: the champion (version {version}) was evaluated on another test split: "
        "scoring it on this one"
    )
    scores = _score_registered(registry, version, data_dir)
    classes = evidence.classes
    recall = (
        tuple(row["recall"] for row in scores.per_class) if classes == challenger.classes else evidence.recall
    )
    metrics = {key: scores.metrics[key] for key in HEADLINE}
    return Evidence(**{**asdict(evidence), "metrics": metrics, "recall": recall, "classes": classes})


def _score_registered(registry: Registry, version: str, data_dir: Path):
    from imgclf.stages.evaluation import score

    with tempfile.TemporaryDirectory(prefix="imgclf-champion-") as tmp:
        onnx_file = registry.download_onnx(version, Path(tmp))
        evaluate = registry.config.evaluate
        return score(onnx_file, data_dir, evaluate.latency_runs, evaluate.throughput_batch)


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


def promote(
    config: Config,
    root: Path,
    version: str | None,
    to: str,
    expect_champion: str | None,
    dry_run: bool,
    reason: str,
    report: Path | None,
) -> Outcome:
    """Gate `version` against the champion; on a pass (and not `dry_run`) point `to` at it."""
    registry = Registry(config)
    if dry_run:
        return _promote(registry, root, version, to, expect_champion, True, reason, report)
    registry.require_shared_store()
    with registry.lock(f"promote --to {to}"):
        return _promote(registry, root, version, to, expect_champion, False, reason, report)


def _promote(registry, root, version, to, expect_champion, dry_run, reason, report) -> Outcome:
    config = registry.config
    chosen = candidate(registry, version, root, dry_run)
    aliases = registry.aliases()
    champion = aliases.get("champion")
    if expect_champion is not None and (champion or "none") != expect_champion:
        raise RegistryConflict(
            f"the champion moved: expected {_v(expect_champion)}, found {_v(champion or 'none')}; "
            f"{chosen.label} must be gated against the new champion: run `imgclf promote` again"
        )
    if chosen.version is not None and chosen.version in (champion, aliases.get(to)):
        already = "champion" if chosen.version == champion else to
        message = f"version {chosen.version} is already {already}: nothing to do"
        waiting = already == "challenger"
        return Outcome(chosen.version, champion, True, False, message, awaiting_approval=waiting)
    recorded = _recorded_gates(config, chosen, champion)
    if recorded is not None:
        gates_md, gates_ok = recorded
        print(
            f"{chosen.label} passed its gates against the champion ({_v(champion or 'none')}), recorded at "
            f"{chosen.tags.get(TAG + 'gate.at')}; the champion has not moved since"
        )
    else:
        gates = evaluate_gates(
            config,
            chosen.evidence,
            None if champion is None else champion_evidence(registry, champion, chosen.evidence, root),
        )
        title = f"Gates: {chosen.label} of {registry.name} against the champion ({_v(champion or 'none')})"
        print(title)
        print(gate_table(gates))
        gates_md, gates_ok = gate_markdown(title, gates), passed(gates)
    if report is not None:
        with report.open("a", encoding="utf-8") as f:
            f.write(gates_md + "\n")
    if dry_run:
        return Outcome(chosen.version, champion, gates_ok, False, "dry run: nothing changed")
    registry.set_tags(
        chosen.version,
        {
            f"{TAG}gate.result": "pass" if gates_ok else "fail",
            f"{TAG}gate.against": champion or "none",
            f"{TAG}gate.settings": settings_hash(config),
            f"{TAG}gate.at": now_iso(),
            f"{TAG}gate.report": gates_md[:5000],
        },
    )
    if not gates_ok:
        registry.record(Move("gate", to, chosen.version, aliases.get(to), reason, gates_md, moved=False))
        return Outcome(chosen.version, champion, False, False, "")
    if to == "champion":
        if champion is not None:
            registry.set_alias("previous", champion)
        registry.set_alias("champion", chosen.version)
        if aliases.get("challenger") == chosen.version:
            registry.set_alias("challenger", None)
    else:
        registry.set_alias(to, chosen.version)
    registry.record(Move("promote", to, chosen.version, aliases.get(to), reason, gates_md))
    was = f" (was {_v(aliases[to])})" if aliases.get(to) else ""
    message = f"{to} is now version {chosen.version}{was}"
    return Outcome(chosen.version, champion, True, True, message, awaiting_approval=to == "challenger")


def _recorded_gates(config: Config, chosen: Candidate, champion: str | None) -> tuple[str, bool] | None:
    """A pass recorded on the version against this same champion, with these same gate settings:
    the approval step of CI reuses it (the champion has not moved, so the comparison holds)."""
    tags = chosen.tags
    if chosen.version is None or tags.get(TAG + "gate.result") != "pass":
        return None
    if tags.get(TAG + "gate.against") != (champion or "none"):
        return None
    if tags.get(TAG + "gate.settings") != settings_hash(config):
        return None
    return tags.get(TAG + "gate.report", ""), True


def rollback(config: Config, to: str, reason: str) -> str:
    """Point `champion` at `previous` (or version `to`), and `previous` at the old champion."""
    registry = Registry(config)
    registry.require_shared_store()
    with registry.lock("rollback"):
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


# --- listing --------------------------------------------------------------------------------


def model_rows(config: Config) -> list[dict]:
    """One row per version: aliases, metric, latency, gate result, commit, when registered."""
    registry = Registry(config)
    by_version: dict[str, list[str]] = {}
    for alias, version in registry.aliases().items():
        by_version.setdefault(version, []).append(alias)
    metric = config.promote.metric
    rows = []
    for found in registry.versions():
        tags = found.tags
        rows.append(
            {
                "version": str(found.version),
                "aliases": sorted(by_version.get(str(found.version), [])),
                metric: _number(tags.get(f"{TAG}metric.{metric}")),
                "latency_ms_p99_b1": _number(tags.get(f"{TAG}metric.latency_ms_p99_b1")),
                "gate": tags.get(TAG + "gate.result", ""),
                "commit": tags.get(TAG + "commit", ""),
                "dirty": tags.get(TAG + "dirty", ""),
                "registered": _iso(found.creation_timestamp),
                "run_id": found.run_id or "",
            }
        )
    return rows


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _iso(millis: int | None) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if millis else ""
