"""The champion on the challenger's test split: its recorded evidence when it was evaluated on
that split, else its ONNX file downloaded and scored there by the evaluate stage's own code.

Slow (a download and a scoring run): promote calls it before it takes the registry lock.
"""

import tempfile
from dataclasses import replace
from pathlib import Path

from imgclf.registry.client import Registry, RegistryError
from imgclf.registry.evidence import HEADLINE, Evidence, Outputs, test_split_sha256


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
    scores = score_registered(registry, version, data_dir)
    same_classes = evidence.classes == challenger.classes
    recall = tuple(row["recall"] for row in scores.per_class) if same_classes else evidence.recall
    return replace(evidence, metrics={key: scores.metrics[key] for key in HEADLINE}, recall=recall)


def score_registered(registry: Registry, version: str, data_dir: Path):
    """Version `version`'s ONNX file scored on `data_dir`'s test split (imgclf.stages.evaluation)."""
    from imgclf.stages.evaluation import score

    with tempfile.TemporaryDirectory(prefix="imgclf-champion-") as tmp:
        onnx_file = registry.download_onnx(version, Path(tmp))
        evaluate = registry.config.evaluate
        return score(onnx_file, data_dir, evaluate.latency_runs, evaluate.throughput_batch)


def challenger_evidence(config, outputs: Outputs) -> Evidence:
    """The evaluated models/model.onnx's evidence. Its latency is this machine's, measured by the
    evaluate stage (metrics/local/eval.json, git-ignored); where the stage did not run here (its
    outputs came from DVC's cache), the file is timed now on its test split, by the same code."""
    speed = outputs.local(outputs.speed)
    if not speed:
        from imgclf.data.normalized import load_split
        from imgclf.runtime import inference_session
        from imgclf.stages.evaluation import SPEED
        from imgclf.stages.evaluation import speed as measure

        print(f"imgclf: no latency measured on this machine for {outputs.onnx.name}: timing it now")
        images, _ = load_split(outputs.data, "test")
        timed = measure(
            inference_session(outputs.onnx),
            images,
            config.evaluate.latency_runs,
            config.evaluate.throughput_batch,
        )
        speed = {key: value for key, value in timed.items() if key.startswith(SPEED)}
    return Evidence.from_outputs(outputs, speed)
