"""The gates, as pure functions: one row per case, the challenger and champion differing from a
passing pair in one fact, and the gate that must decide it."""

from dataclasses import replace

import pytest

from imgclf.registry.evidence import Evidence
from imgclf.registry.gates import evaluate_gates, passed, settings_hash
from tests.conftest import compose_config, make_card

CLASSES = tuple(str(c) for c in range(3))
CHAMPION = Evidence(
    sha256="a" * 64,
    commit="c" * 40,
    dirty="false",
    data_name="digits",
    data_sha256="d" * 64,
    test_sha256="t" * 64,
    duplicates=0,
    classes=CLASSES,
    input=make_card(n_classes=3).input.to_json(),
    metrics={"accuracy": 0.95, "macro_f1": 0.94, "latency_ms_p50_b1": 1.0, "latency_ms_p99_b1": 2.0},
    recall=(0.95, 0.95, 0.95),
    parity_max_abs_diff=1e-6,
    parity_argmax_mismatches=0,
    run_id="r",
)
CHALLENGER = replace(CHAMPION, sha256="b" * 64, metrics={**CHAMPION.metrics, "accuracy": 0.96})


INT8 = {
    "scheme": "int8",
    "weights": "int8 per channel",
    "activations": "uint8",
    "calibration_images": 512,
    "agreement": 0.999,
    "min_agreement": 0.995,
}


def metrics(**changed) -> dict:
    return {**CHALLENGER.metrics, **changed}


# Without a champion, the gates that compare with one do not apply.
UNCOMPARED = {"improvement": None, "class recall drop": None, "same classes": None, "same input spec": None}

# (case, challenger's change, champion (None: there is none), overrides, {gate: passed}); the
# gates not named must pass.
CASES = [
    ("better: all pass", {}, CHAMPION, [], {}),
    ("no champion: only the absolute gates apply", {}, None, [], UNCOMPARED),
    (
        "below the floor",
        {"metrics": metrics(accuracy=0.89)},
        None,
        [],
        UNCOMPARED | {"accuracy floor": False},
    ),
    ("exactly the floor", {"metrics": metrics(accuracy=0.9)}, None, [], UNCOMPARED),
    ("worse than the champion", {"metrics": metrics(accuracy=0.94)}, CHAMPION, [], {"improvement": False}),
    ("equal to the champion", {"metrics": metrics(accuracy=0.95)}, CHAMPION, [], {}),
    (
        "equal, with a required improvement",
        {"metrics": metrics(accuracy=0.955)},
        CHAMPION,
        ["promote.min_improvement=0.01"],
        {"improvement": False},
    ),
    (
        "a negative improvement allowed",
        {"metrics": metrics(accuracy=0.94)},
        CHAMPION,
        ["promote.min_improvement=-0.02"],
        {},
    ),
    ("one class falls too far", {"recall": (0.99, 0.99, 0.89)}, CHAMPION, [], {"class recall drop": False}),
    ("one class falls within the limit", {"recall": (0.9, 0.99, 0.99)}, CHAMPION, [], {}),
    ("too slow", {"metrics": metrics(latency_ms_p99_b1=25.0)}, CHAMPION, [], {"latency p99": False}),
    ("strict latency", {}, CHAMPION, ["promote=strict"], {"latency p99": True}),
    ("ONNX differs from torch", {"parity_max_abs_diff": 1e-3}, CHAMPION, [], {"ONNX parity": False}),
    ("ONNX predicts another class", {"parity_argmax_mismatches": 1}, CHAMPION, [], {"ONNX parity": False}),
    ("int8, agreeing as the export required", {"quantization": INT8}, CHAMPION, [], {"quantization": True}),
    (
        "int8 below its agreement bound",
        {"quantization": INT8 | {"agreement": 0.99}},
        CHAMPION,
        [],
        {"quantization": False},
    ),
    (
        "other classes",
        {"classes": ("0", "1", "x")},
        CHAMPION,
        [],
        {"same classes": False, "class recall drop": None},
    ),
    (
        "another input size",
        {"input": make_card(shape=(1, 16, 16), n_classes=3).input.to_json()},
        CHAMPION,
        [],
        {"same input spec": False},
    ),
    ("trained from uncommitted code", {"dirty": "true"}, CHAMPION, [], {"clean commit": False}),
    (
        "uncommitted code allowed",
        {"dirty": "true"},
        CHAMPION,
        ["promote.require_clean_commit=false"],
        {},
    ),
    ("test images seen in training", {"duplicates": 3}, CHAMPION, [], {"train/test duplicates": False}),
    (
        "duplicates allowed",
        {"duplicates": 3},
        CHAMPION,
        ["promote.allow_duplicates=true"],
        {},
    ),
]


@pytest.mark.parametrize(
    ("change", "champion", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_gates(change, champion, overrides, expected):
    config = compose_config(*overrides)
    gates = evaluate_gates(config, replace(CHALLENGER, **change), champion)
    results = {gate.name: gate.passed for gate in gates}
    metric_floor = f"{config.promote.metric} floor"
    assert list(results) == [
        metric_floor, "improvement", "class recall drop", "latency p99", "ONNX parity", "quantization",
        "same classes", "same input spec", "clean commit", "train/test duplicates",
    ]  # fmt: skip
    float32 = {"quantization": None}  # no int8 agreement to check
    assert results == {name: True for name in results} | float32 | expected
    assert passed(gates) == (False not in expected.values())


def test_a_failed_gate_names_the_worst_class():
    gates = evaluate_gates(compose_config(), replace(CHALLENGER, recall=(0.99, 0.8, 0.9)), CHAMPION)
    drop = next(gate for gate in gates if gate.name == "class recall drop")
    assert (drop.value, drop.champion, drop.result) == ("0.1500 (1)", "0.9500", "FAIL")


def test_the_settings_hash_ignores_the_lock_settings_only():
    base = settings_hash(compose_config())
    assert settings_hash(compose_config("promote.lock_timeout_s=1", "promote.lock_expiry_s=5")) == base
    assert settings_hash(compose_config("promote.min_value=0.5")) != base
