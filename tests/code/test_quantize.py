"""int8 export: a static QDQ graph with per-channel weights, the same bytes every time, recorded in
the card, gated on agreeing with the float32 graph, and shown by `imgclf promote`.

The models are the project's own: networks built by imgclf.models, exported by the export stage's
`to_onnx`, on the digits splits the real download and normalize stages produce.
"""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
import yaml

from imgclf.card import NO_QUANTIZATION, ModelCard, Quantization
from imgclf.config.pipeline import validate_pipeline
from imgclf.data.normalized import load_split
from imgclf.drift.reference import build_reference, read_reference
from imgclf.errors import ConfigError
from imgclf.models import build_model, checkpoint_record
from imgclf.registry.evidence import Evidence
from imgclf.registry.gates import evaluate_gates
from imgclf.registry.report import gate_table, version_description
from imgclf.runtime import inference_session, predict_probabilities
from imgclf.stages import quantize
from imgclf.stages.export import CARD_METADATA, Probabilities, ship_int8, to_onnx
from tests.conftest import REPO, compose_config, make_card, tool_env
from tests.registry.test_gates import CHAMPION

INT8 = compose_config("export.quantize=int8")
TINY_CNN = compose_config("model=cnn", "model.channels=[4,8]", "model.hidden=16").model


def float32_graph(model: Probabilities, card: ModelCard) -> onnx.ModelProto:
    """What the export stage quantizes: the float32 graph, its card saying so."""
    example = torch.zeros((2, *card.input.shape), dtype=torch.uint8)
    return to_onnx(model, example, replace(card, quantization=NO_QUANTIZATION))


@pytest.fixture(scope="module")
def cnn(digits_splits) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A small CNN on the 8x8 digits (batch-norm statistics as after training): float32 and int8."""
    torch.manual_seed(0)
    net = build_model(TINY_CNN, digits_splits["card"])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    fp32 = float32_graph(Probabilities(net).eval(), digits_splits["card"])
    sample = quantize.calibration_sample(digits_splits["train"][0], 512, seed=42)
    return fp32, quantize.quantize_int8(fp32, sample)


@pytest.fixture(scope="module")
def mlp(digits_network) -> onnx.ModelProto:
    """The trained digits MLP of the serving tests, as the float32 graph."""
    model, _, card = digits_network
    return float32_graph(model, card)


def tied_network(digits_network) -> Probabilities:
    """The trained digits MLP with classes 0 and 1 made one class apart by a hair: float32 still
    tells them apart (each wins on about half the images), their int8 weights are identical."""
    model, _, card = digits_network
    net = build_model(compose_config("model.hidden=[64]", "model.dropout=0.0").model, card)
    net.load_state_dict(model.net.state_dict())
    last = net[-1][-1]
    with torch.no_grad():
        signs = torch.sign(torch.randn(last.weight.shape[1], generator=torch.Generator().manual_seed(0)))
        hair = 1e-4 * last.weight[0].abs().max() * signs
        last.weight[1] = last.weight[0] + hair
        last.bias[1] = last.bias[0]
        last.bias[2:] = last.bias[0] - 1e3  # no other class ever wins
    return Probabilities(net).eval()


def initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in proto.graph.initializer}


def producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in proto.graph.node for output in node.output}


# --- the graph ----------------------------------------------------------------------------------


def test_int8_graph_is_qdq_with_per_channel_int8_weights(cnn):
    _, int8 = cnn
    onnx.checker.check_model(int8, full_check=True)
    ops = [node.op_type for node in int8.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights, made_by = initializers(int8), producers(int8)
    layers = [node for node in int8.graph.node if node.op_type in ("Conv", "Gemm")]
    quantized = []
    for layer in layers:
        if layer.input[1] in weights:  # a float32 weight: the convolution over the image alone
            assert layer.op_type == "Conv" and weights[layer.input[1]].dims[1] == 1
            continue
        dequantize = made_by[layer.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        stored, scale = weights[dequantize.input[0]], weights[dequantize.input[1]]
        assert stored.data_type == onnx.TensorProto.INT8
        assert list(scale.dims) == [stored.dims[0]]  # one scale per output channel
        activation = made_by[layer.input[0]]
        assert activation.op_type == "DequantizeLinear"
        assert weights[activation.input[2]].data_type == onnx.TensorProto.UINT8
        quantized.append(layer.op_type)
    assert quantized == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]  # all but the image's own layer
    # The logits stay float32: the last Gemm feeds the softmax directly.
    (softmax,) = [node for node in int8.graph.node if node.op_type == "Softmax"]
    assert made_by[softmax.input[0]].op_type == "Gemm"


def test_int8_graph_runs_like_the_float32_one_at_any_batch_size(cnn, digits_splits):
    fp32, int8 = cnn
    test = digits_splits["test"][0]
    expected = predict_probabilities(inference_session(fp32.SerializeToString()), test)
    for batch in (1, 7, len(test)):
        actual = predict_probabilities(inference_session(int8.SerializeToString()), test, batch=batch)
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual.sum(axis=1), 1.0, rtol=1e-5)
        assert np.abs(actual - expected).max() < 0.05


def test_calibration_sample_is_seeded_and_in_split_order(digits_splits):
    images = digits_splits["train"][0]
    first = quantize.calibration_sample(images, 100, seed=1)
    assert len(first) == 100
    np.testing.assert_array_equal(first, quantize.calibration_sample(images, 100, seed=1))
    assert not np.array_equal(first, quantize.calibration_sample(images, 100, seed=2))
    assert quantize.calibration_sample(images, len(images) + 1, seed=1) is images


def test_the_same_weights_and_seed_give_the_same_bytes(mlp, digits_splits):
    card = ModelCard.from_json(json.loads({p.key: p.value for p in mlp.metadata_props}[CARD_METADATA]))
    train, test = digits_splits["train"][0], digits_splits["test"][0]
    first, _, _ = ship_int8(INT8, mlp, card, train, test)
    again, _, _ = ship_int8(INT8, mlp, card, train, test)
    other_seed, _, _ = ship_int8(INT8.model_copy(update={"seed": 7}), mlp, card, train, test)
    data = first.SerializeToString()
    assert again.SerializeToString() == data
    assert other_seed.SerializeToString() != data  # another sample, other activation ranges
    assert b"/tmp" not in data and b"imgclf-quantize" not in data  # no path of the temporary files


# --- the card -----------------------------------------------------------------------------------


def test_the_card_records_the_quantization(mlp, digits_splits, tmp_path):
    from imgclf.serving.model import ServedModel

    metadata = {p.key: p.value for p in mlp.metadata_props}
    card = ModelCard.from_json(json.loads(metadata[CARD_METADATA]))
    assert card.quantization == NO_QUANTIZATION  # the float32 graph says it is one
    int8, int8_card, _ = ship_int8(INT8, mlp, card, digits_splits["train"][0], digits_splits["test"][0])
    stored = json.loads({p.key: p.value for p in int8.metadata_props}[CARD_METADATA])
    assert stored["quantization"] == {
        "scheme": "int8",
        "weights": "int8 per channel",
        "activations": "uint8",
        "calibration_images": 512,
    }
    assert ModelCard.from_json(stored) == int8_card == replace(card, quantization=int8_card.quantization)
    (tmp_path / "model.onnx").write_bytes(int8.SerializeToString())
    served = ServedModel.load(str(tmp_path / "model.onnx"))  # serving reads the int8 file as any other
    assert served.card.quantization.scheme == "int8"
    assert served.describe()["quantization"] == stored["quantization"]  # GET /v1/model's
    assert served.predict(digits_splits["test"][0][:3]).shape == (3, 10)


def test_a_card_without_quantization_is_the_datas_and_an_inconsistent_one_is_refused():
    card = make_card()
    assert "quantization" not in card.to_json()  # normalize's and train's cards stay as they were
    assert ModelCard.from_json(card.to_json()).quantization is None
    with pytest.raises(ValueError, match="not what scheme 'none' computes with"):
        Quantization("none", "int8 per channel", "uint8", 512)
    with pytest.raises(ValueError, match="not what scheme 'int8' computes with"):
        Quantization("int8", "int8 per channel", "uint8", 0)
    with pytest.raises(ValueError, match="scheme='int4'"):
        Quantization("int4")
    with pytest.raises(ValueError, match="expected keys"):
        ModelCard.from_json({**card.to_json(), "quantization": {"scheme": "none"}})


# --- the agreement gate -------------------------------------------------------------------------


def test_the_agreement_gate_passes_a_trained_model(mlp, digits_splits):
    card = replace(make_card(), quantization=NO_QUANTIZATION)
    test = digits_splits["test"][0]
    int8, _, agreement = ship_int8(INT8, mlp, card, digits_splits["train"][0], test)
    assert len(int8.SerializeToString()) < len(mlp.SerializeToString()) / 2  # int8 weights, not float32
    assert agreement["int8_n"] == len(test)
    assert agreement["int8_agreement"] >= INT8.export.min_agreement
    assert 0 < agreement["int8_mean_abs_diff"] <= agreement["int8_max_abs_diff"] < 0.1


def test_the_agreement_gate_refuses_a_model_int8_cannot_tell_apart(digits_network, digits_splits):
    _, _, card = digits_network
    tied = float32_graph(tied_network(digits_network), card)
    test = digits_splits["test"][0]
    fp32_classes = predict_probabilities(inference_session(tied.SerializeToString()), test).argmax(1)
    assert {0, 1} == set(fp32_classes.tolist())  # float32 tells the two classes apart
    with pytest.raises(quantize.AgreementError) as refused:
        ship_int8(INT8, tied, replace(card, quantization=NO_QUANTIZATION), digits_splits["train"][0], test)
    message = str(refused.value)
    assert "\n" not in message and f"of {len(test)} test images" in message
    assert "below export.min_agreement=0.995" in message and refused.value.exit_code == 1
    # A lower bound lets the same model through: the gate reads the setting.
    lenient = INT8.model_copy(update={"export": INT8.export.model_copy(update={"min_agreement": 0.01})})
    ship_int8(lenient, tied, replace(card, quantization=NO_QUANTIZATION), digits_splits["train"][0], test)


# --- the configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("export.quantize=int4", "export.quantize='int4': Input should be 'none' or 'int8'"),
        ("export.quantize=dynamic", "export.quantize='dynamic'"),
        ("export.min_agreement=1.5", "export.min_agreement=1.5"),
        ("export.min_agreement=0", "export.min_agreement=0"),
        ("export.calibration_images=0", "export.calibration_images=0"),
    ],
)
def test_bad_export_settings_are_one_line_naming_the_value(override, expected):
    from imgclf.config.compose import compose
    from imgclf.config.operations import validate

    with pytest.raises(ConfigError) as error:
        validate(compose([override], REPO / "conf"))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert error.value.exit_code == 2


def test_defaults_follow_the_measurements():
    assert compose_config().export.quantize == "none"  # the digits MLP: slower in int8 at batch 1
    assert compose_config("experiment=mnist_cnn").export.quantize == "int8"  # 1.9x on a VNNI CPU


# --- the export stage, run as DVC runs it: a process with its MLflow worker, 5 s each ------------


def stage_folder(tmp_path, model: Probabilities, card: ModelCard, digits_dirs, *overrides: str):
    """params.yaml and a train-stage checkpoint of `model` in tmp_path; the export stage's arguments."""
    config = compose_config("model.hidden=[64]", "model.dropout=0.0", *overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config.model_dump()))
    state = {f"net.{key}": value for key, value in model.net.state_dict().items()}
    torch.save(
        {"imgclf": checkpoint_record(card, config.model), "state_dict": state}, tmp_path / "model.ckpt"
    )
    raw, normalized = digits_dirs
    names = {
        "params": "params.yaml",
        "checkpoint": "model.ckpt",
        "onnx": "models/model.onnx",
        "sidecar": "models/model.json",
        "run-record": "models/run.json",
        "local-metrics": "local/export.json",
    }
    args = [f"--{flag}={tmp_path / name}" for flag, name in names.items()]
    return [*args, f"--data={normalized}", f"--raw={raw}"]


def export_stage(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    env = tool_env(REPO) | {
        "DVC_ROOT": str(tmp_path),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    command = [sys.executable, str(REPO / "pipelines" / "export.py"), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_the_export_stage_ships_int8_with_its_card_figures_and_reference(
    digits_network, digits_dirs, tmp_path
):
    model, _, card = digits_network
    done = export_stage(tmp_path, stage_folder(tmp_path, model, card, digits_dirs, "export.quantize=int8"))
    assert done.returncode == 0, done.stderr
    assert "int8 agrees with float32 on " in done.stdout and "|Δp| max " in done.stdout
    shipped = onnx.load(tmp_path / "models" / "model.onnx")
    assert "QuantizeLinear" in {node.op_type for node in shipped.graph.node}
    sidecar = json.loads((tmp_path / "models" / "model.json").read_text())
    assert sidecar["quantization"]["scheme"] == "int8"
    n_test = len(load_split(digits_dirs[1], "test")[1])
    assert sidecar["export"]["int8"] == sidecar["export"]["int8"] | {"min_agreement": 0.995, "n": n_test}
    local = json.loads((tmp_path / "local" / "export.json").read_text())
    assert local["int8_agreement"] >= 0.995 and local["int8_max_abs_diff"] > 0
    # The drift reference is the shipped int8 model's: its confidences, not the float32 graph's.
    metadata = {p.key: p.value for p in shipped.metadata_props}
    confidence = read_reference(metadata).distributions["confidence"]
    val = load_split(digits_dirs[1], "val")[0]
    fp32 = float32_graph(model, card)

    def confidences(proto) -> np.ndarray:
        probabilities = predict_probabilities(inference_session(proto.SerializeToString()), val)
        return build_reference(val, probabilities).distributions["confidence"]

    np.testing.assert_array_equal(confidence, confidences(shipped))
    assert not np.array_equal(confidence, confidences(fp32))


def test_the_export_stage_refuses_an_int8_model_that_disagrees(digits_network, digits_dirs, tmp_path):
    _, _, card = digits_network
    args = stage_folder(tmp_path, tied_network(digits_network), card, digits_dirs, "export.quantize=int8")
    done = export_stage(tmp_path, args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("imgclf")]  # MLflow logs too
    assert line.startswith("imgclf: error: the int8 model picks the float32 model's class on ")
    assert "export.min_agreement=0.995" in line
    assert not (tmp_path / "models" / "model.onnx").exists()


def test_the_export_stage_refuses_a_bad_setting_before_any_work(digits_network, digits_dirs, tmp_path):
    model, _, card = digits_network
    args = stage_folder(tmp_path, model, card, digits_dirs)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["export"]["quantize"] = "int4"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = export_stage(tmp_path, args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "imgclf: error: export.quantize='int4': Input should be 'none' or 'int8'"
    ]
    with pytest.raises(ConfigError):
        validate_pipeline(params)


# --- what `imgclf promote` shows ------------------------------------------------------------------

INT8_EVIDENCE = {
    "scheme": "int8",
    "weights": "int8 per channel",
    "activations": "uint8",
    "calibration_images": 512,
    "agreement": 0.9998,
    "min_agreement": 0.995,
    "max_abs_diff": 0.0164,
    "mean_abs_diff": 0.0002,
}


def test_promote_shows_the_quantization_in_its_table():
    challenger = replace(CHAMPION, sha256="b" * 64, quantization=INT8_EVIDENCE)
    gates = evaluate_gates(compose_config(), challenger, CHAMPION)
    table = gate_table(gates)
    (line,) = [line for line in table.splitlines() if line.startswith("quantization")]
    assert "int8, 99.98% agreement" in line and "none (float32)" in line  # the champion's
    assert ">= 99.50% agreement with float32" in line and line.endswith("pass")
    below = replace(challenger, quantization=INT8_EVIDENCE | {"agreement": 0.99})
    (gate,) = [g for g in evaluate_gates(compose_config(), below, CHAMPION) if g.name == "quantization"]
    assert gate.result == "FAIL"
    card = version_description(compose_config(), {"model": {"name": "cnn"}}, challenger)
    assert "| quantization | int8, 99.98% agreement, |Δp| max 1.6e-02" in card


def test_versions_registered_before_quantization_read_as_float32():
    tags = {key: value for key, value in CHAMPION.to_tags().items() if not key.endswith("quantization")}
    assert Evidence.from_tags(tags, "1").quantization == NO_QUANTIZATION.to_json()
    again = replace(CHAMPION, quantization=INT8_EVIDENCE)
    assert Evidence.from_tags(again.to_tags(), "2") == again


@pytest.mark.slow
@pytest.mark.e2e
def test_imgclf_promote_shows_an_int8_pipelines_quantization(evaluated_pipeline, tmp_path):
    """The digits pipeline exported in int8 (export and evaluate re-run, train does not), then
    registered and gated as a user would."""
    import shutil

    from tests.conftest import run

    repo = tmp_path / "repo"
    shutil.copytree(evaluated_pipeline[0], repo, symlinks=True)
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    run(["imgclf", "params", "export.quantize=int8"], repo)
    status = run(["dvc", "status"], repo).stdout
    assert "export:" in status and "train:" not in status
    repro = run(["dvc", "repro"], repo, extra_env=store).stdout
    assert "int8 agrees with float32 on " in repro
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "int8"], repo)
    run(["imgclf", "register"], repo, extra_env=store)
    done = run(["imgclf", "promote", "--dry-run"], repo, extra_env=store, check=False)
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("quantization")]
    assert "int8, " in line and "% agreement" in line and line.split()[-1] == "pass"
