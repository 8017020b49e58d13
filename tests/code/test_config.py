import itertools
import shutil
import subprocess
import sys

import pytest
import yaml

from imgclf.config import compose, flatten, params_drift, validate
from imgclf.errors import ConfigError
from tests.conftest import REPO


def test_defaults_compose_and_validate():
    config = validate(compose([], REPO / "conf"))
    assert config.data.name == "digits"
    assert config.model.name == "mlp"
    assert config.trainer.name == "cpu"


@pytest.mark.parametrize(
    ("data", "model", "trainer"),
    list(itertools.product(["digits"], ["mlp", "cnn"], ["cpu", "auto", "ddp"])),
)
def test_every_group_choice_validates(data, model, trainer):
    overrides = [f"data={data}", f"model={model}", f"trainer={trainer}"]
    config = validate(compose(overrides, REPO / "conf"))
    assert (config.data.name, config.model.name, config.trainer.name) == (data, model, trainer)


def test_flatten_expands_lists_and_keeps_every_key():
    flat = flatten(validate(compose(["model.hidden=[64,32,16]"], REPO / "conf")))
    assert flat["model.hidden.0"] == 64
    assert flat["model.hidden.2"] == 16
    assert "model.hidden" not in flat
    assert flat["tracking.uri"] is None
    assert flat["train.lr"] == 0.002


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=abc", "train.lr='abc'"),
        ("train.lr=-1", "train.lr=-1"),
        ("model=transformer", "Available options in 'model': cnn mlp"),
        ("train.nope=1", "train.nope"),
        ("+train.nope=1", "unknown key 'train.nope'; allowed here: max_epochs"),
        ("+model.depth=3", "unknown key 'model.depth'; allowed here: name, hidden"),
        ("model.activation=gelu", "'relu', 'sigmoid' or 'tanh'"),
        ("trainer.devices=0", "trainer.devices=0"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose([override], REPO / "conf"))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)
    assert error.value.exit_code == 2


def test_committed_params_yaml_is_the_composition_of_conf():
    assert params_drift(REPO / "conf", REPO / "params.yaml") == []


@pytest.fixture
def workspace(tmp_path):
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    return tmp_path


def imgclf(cwd, *args):
    code = "from imgclf.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True)


def test_params_command_writes_overrides_and_check_detects_drift(workspace):
    done = imgclf(workspace, "params", "model=cnn", "train.lr=0.01")
    assert done.returncode == 0, done.stderr
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    assert params["model"]["name"] == "cnn"
    assert params["train"]["lr"] == 0.01
    assert imgclf(workspace, "params", "--check").returncode == 0

    text = (workspace / "params.yaml").read_text().replace("lr: 0.01", "lr: 0.5")
    (workspace / "params.yaml").write_text(text)
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 2
    assert "train.lr" in done.stderr


def test_bad_override_exits_2_and_leaves_params_yaml_alone(workspace):
    assert imgclf(workspace, "params").returncode == 0
    before = (workspace / "params.yaml").read_bytes()
    for bad in ("train.batch_size=lots", "model=transformer", "+seed2=1"):
        done = imgclf(workspace, "params", bad)
        assert done.returncode == 2, bad
        assert done.stderr.startswith("imgclf: error:")
        assert len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr
    assert (workspace / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in workspace.iterdir()) == ["conf", "params.yaml"]
