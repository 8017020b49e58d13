"""The gates of `imgclf promote`: pure functions of two `Evidence` records and the `promote`
config group. No MLflow, no files: what they decide can be tested from a table of cases.
"""

import hashlib
import json
from dataclasses import dataclass

from imgclf.config.operations import Config
from imgclf.registry.evidence import Evidence, input_line, quantization_line


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
    gates.append(quantization_gate(challenger, champion))
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
            input_line(challenger.input),
            "" if champion is None else input_line(champion.input),
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


def quantization_gate(challenger: Evidence, champion: Evidence | None) -> Gate:
    """How the file computes; an int8 one must have passed the export's agreement gate against
    its float32 graph (it always has, unless its evidence was made otherwise). n/a for float32."""
    quantization = challenger.quantization
    shown = "" if champion is None else quantization_line(champion.quantization)
    if quantization.get("scheme") != "int8":
        return Gate("quantization", quantization_line(quantization), shown, "", None)
    agreement, floor = quantization.get("agreement"), quantization.get("min_agreement")
    if agreement is None or floor is None:
        return Gate("quantization", "int8, agreement unknown", shown, "agreement with float32", False)
    return Gate(
        "quantization",
        quantization_line(quantization),
        shown,
        f">= {floor:.2%} agreement with float32",
        agreement >= floor,
    )


def passed(gates: list[Gate]) -> bool:
    return all(gate.passed is not False for gate in gates)


def settings_hash(config: Config) -> str:
    """Which gate settings a recorded gate result was reached with."""
    text = json.dumps(config.promote.model_dump(exclude={"lock_timeout_s", "lock_expiry_s"}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
