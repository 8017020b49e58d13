"""What the registry shows people: the model and version cards (markdown, the MLflow UI's model
pages), the gate table (terminal and markdown, for a CI job summary) and the rows of
`imgclf models`.
"""

from datetime import UTC, datetime

from imgclf.config.operations import Config
from imgclf.registry.client import TAG, Registry
from imgclf.registry.evidence import Evidence, input_line, quantization_line
from imgclf.registry.gates import Gate


def model_description(config: Config, sidecar: dict, evidence: Evidence) -> str:
    """The registered model's page in the MLflow UI: what it is, how aliases work, the latest card."""
    name = config.registry.model_name
    return (
        f"# {name}\n\n"
        f"An image classifier trained by the imgclf pipeline on `{evidence.data_name}`: "
        f"{len(evidence.classes)} classes, {input_line(evidence.input)}.\n\n"
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
        f"| input | {input_line(evidence.input)} |\n"
        f"| ONNX parity | max abs diff {evidence.parity_max_abs_diff:.1e}, "
        f"{evidence.parity_argmax_mismatches} argmax mismatches |\n"
        f"| quantization | {quantization_cell(evidence.quantization)} |\n"
        f"| code | `{evidence.commit[:12]}` ({state}) |\n"
        f"| data | normalized `{evidence.data_sha256[:12]}`, test split `{evidence.test_sha256[:12]}` |\n"
        f"| file | sha256 `{evidence.sha256[:16]}` |\n"
    )


def quantization_cell(quantization: dict) -> str:
    """The quantization with what the export's gate measured: agreement and |Δp| against float32."""
    line = quantization_line(quantization)
    if "max_abs_diff" in quantization:
        line += f", |Δp| max {quantization['max_abs_diff']:.1e} mean {quantization['mean_abs_diff']:.1e}"
    if quantization.get("scheme") == "int8":
        line += f"; {quantization['calibration_images']} calibration images"
    return line


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

    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if millis else ""
