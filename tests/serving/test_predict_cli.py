"""`imgclf predict` as a user runs it: tables, JSON lines, folders, bad files, bad models, and an
inference path that imports neither torch nor lightning."""

import json
import re
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from imgclf.card import InputSpec
from tests.conftest import REPO, tool_env
from tests.data.test_images import png_header_only
from tests.serving.conftest import grey_png, reference_answer, wide_digits


def imgclf(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["imgclf", *args], cwd=cwd, env=tool_env(REPO), capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def image_folder(tmp_path, digits_splits):
    """digits/{a,b}/ with PNGs of test digits, a note and a broken 'PNG' among them."""
    images, labels = digits_splits["test"]
    for i in range(4):
        sub = tmp_path / "digits" / ("a" if i < 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}-label{labels[i]}.png").write_bytes(grey_png(images[i]))
    (tmp_path / "digits" / "README.txt").write_text("not walked: not an image extension")
    (tmp_path / "digits" / "b" / "broken.PNG").write_text("text named .PNG")
    return tmp_path / "digits"


def test_table_walks_folders_sorted_and_reports_a_bad_file_on_its_own_line(
    model_path, image_folder, digits_splits
):
    done = imgclf("predict", "--model", str(model_path), "digits", cwd=image_folder.parent)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["FILE", "LABEL", "PROBABILITY"]
    labels = digits_splits["test"][1]
    assert [line.split()[0] for line in lines[1:]] == [
        f"digits/a/0-label{labels[0]}.png",
        f"digits/a/1-label{labels[1]}.png",
        f"digits/b/2-label{labels[2]}.png",
        f"digits/b/3-label{labels[3]}.png",
        "digits/b/broken.PNG",
    ]
    assert "error: not an image" in lines[-1]
    for line in lines[1:-1]:
        assert 0 < float(line.split()[2]) <= 1
    # Each column starts at the same offset on every line (the error line too): an aligned table.
    starts = {tuple(m.start() for m in re.finditer(r"\S+", line))[1] for line in lines}
    assert len(starts) == 1
    assert done.stderr.strip() == "imgclf: error: 1 of 5 files could not be classified"


def test_json_lines_with_top_k(model_path, image_folder, digits_splits):
    files = sorted(str(p) for p in image_folder.rglob("*.png"))
    done = imgclf("predict", "--model", str(model_path), "--json", "--top-k", "3", *files)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["file"] for r in records] == files
    for record in records:
        assert set(record) == {"file", "label", "index", "probabilities"}
        probabilities = list(record["probabilities"].values())
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert record["label"] == next(iter(record["probabilities"]))
        assert record["label"] == digits_splits["card"].classes[record["index"]]
    correct = sum(r["label"] == r["file"].split("label")[1][0] for r in records)
    assert correct >= 3


def test_json_reports_missing_and_bad_files_and_still_predicts_the_rest(model_path, tmp_path, digits_splits):
    good = tmp_path / "good.png"
    good.write_bytes(grey_png(digits_splits["test"][0][0]))
    text = tmp_path / "notes.png"
    text.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(text), str(tmp_path / "missing.png"), str(good), str(empty)]
    done = imgclf("predict", "--model", str(model_path), "--json", *args)
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["file"] for r in records] == args
    assert records[0]["error"].startswith("not an image in a supported format")
    assert "No such file" in records[1]["error"]
    assert len(records[2]["probabilities"]) == 10 and "error" not in records[2]
    assert "no image files" in records[3]["error"]
    assert "3 of 4 files" in done.stderr


def test_folders_are_walked_for_every_image_suffix(tmp_path):
    from imgclf.serving.predict import image_files

    for name in ("a.jfif", "b.PBM", "c.pnm", "d.webp", "notes.txt", "e.jpg.bak"):
        (tmp_path / name).write_bytes(b"bytes")
    found = [name for name, _ in image_files([str(tmp_path)])]
    assert found == [str(tmp_path / name) for name in ("a.jfif", "b.PBM", "c.pnm", "d.webp")]


def test_a_colour_photo_is_converted_and_resized(model_path, tmp_path, digits_splits, reference_session):
    wide = wide_digits(digits_splits, scale=20)  # 160x480
    photo = tmp_path / "photo.jpg"
    tinted = np.stack([wide, wide // 4 * 3, wide // 2], axis=-1)  # a tint that keeps the digits in grey
    Image.fromarray(tinted).save(photo)
    done = imgclf("predict", "--model", str(model_path), "--json", str(photo))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)["probabilities"]
    # The model's input, as its card says: greyscale 8x8, stretched.
    want = reference_answer(reference_session, photo.read_bytes(), InputSpec("L", (8, 8), "stretch"))
    np.testing.assert_allclose([got[c] for c in digits_splits["card"].classes], want, rtol=0, atol=1e-6)


def test_a_48_megapixel_phone_photo_is_classified_and_bombs_are_not(model_path, tmp_path):
    Image.new("RGB", (8000, 6000), (230, 230, 230)).save(tmp_path / "phone.jpg", quality=90)
    (tmp_path / "over.png").write_bytes(png_header_only(11_000, 11_000))  # just over the default
    (tmp_path / "bomb.png").write_bytes(png_header_only(50_000, 50_000))  # over Pillow's own limit
    done = imgclf(
        "predict", "--model", str(model_path), "--json", "phone.jpg", "over.png", "bomb.png", cwd=tmp_path
    )
    phone, over, bomb = (json.loads(line) for line in done.stdout.splitlines())
    assert "label" in phone, phone
    assert over["error"] == "too many pixels, a decompression bomb: 11000x11000 = 121000000 > 120000000"
    assert "too many pixels" in bomb["error"] and "2500000000" in bomb["error"]
    assert done.returncode == 1
    lower = imgclf(
        "predict", "--model", str(model_path), "--max-megapixels", "40", "--json", "phone.jpg", cwd=tmp_path
    )
    assert json.loads(lower.stdout)["error"].endswith("8000x6000 = 48000000 > 40000000")


def text_file(path):
    path.write_text("not a model")
    return path


def no_metadata_model(path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["probabilities"], to=TensorProto.FLOAT)],
        "bare",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 10])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda tmp: tmp / "absent.onnx", "cannot read it: No such file or directory"),
        (lambda tmp: text_file(tmp / "notes.onnx"), "not an ONNX model"),
        (lambda tmp: no_metadata_model(tmp / "bare.onnx"), "not an imgclf model"),
        (lambda tmp: tmp, "cannot read it"),
    ],
    ids=["missing", "not onnx", "no imgclf metadata", "a folder"],
)
def test_a_bad_model_is_exit_2_with_one_line(tmp_path, digits_splits, make_model, message):
    model = make_model(tmp_path)
    image = tmp_path / "a.png"
    image.write_bytes(grey_png(digits_splits["test"][0][0]))
    done = imgclf("predict", "--model", str(model), str(image))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("imgclf: error: model ")
    assert message in done.stderr and str(model) in done.stderr


def test_a_bad_registry_uri_is_exit_2(tmp_path):
    done = imgclf("predict", "--model", "models:/imgclf", "x.png", cwd=tmp_path)
    assert done.returncode == 2
    assert "expected models:/<name>@<alias> or models:/<name>/<version>" in done.stderr


HEAVY = {"torch", "lightning", "pytorch_lightning", "hydra", "mlflow", "sklearn", "pydantic"}
PROBE = """
import runpy, sys
sys.argv = ["imgclf", "predict", "--model", {model!r}, {image!r}, "--json"]
try:
    runpy.run_module("imgclf.cli", run_name="imgclf_cli")["main"]()
except SystemExit as exit:
    assert not exit.code, exit.code
loaded = lambda: sorted({{m.split(".")[0] for m in sys.modules}} & {heavy!r})
print("predict", loaded())
import imgclf.serving.app, imgclf.serving.server
print("serve", loaded())
"""


def test_the_inference_path_imports_no_torch_nor_lightning(model_path, tmp_path, digits_splits):
    image = tmp_path / "a.png"
    image.write_bytes(grey_png(digits_splits["test"][0][0]))
    code = PROBE.format(model=str(model_path), image=str(image), heavy=HEAVY)
    done = subprocess.run(
        ["python", "-c", code], env=tool_env(REPO), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert json.loads(lines[0])["file"] == str(image)  # the prediction really ran
    assert lines[1] == "predict []"  # nothing of the training stack, nor pydantic
    assert lines[2] == "serve ['pydantic']"  # FastAPI's models; still no torch nor lightning
