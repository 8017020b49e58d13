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


def choices(group: str) -> list[str]:
    """The options of a config group: the files in conf/<group>/."""
    return sorted(path.stem for path in (REPO / "conf" / group).glob("*.yaml"))


# imagefolder needs a folder or an archive to be valid at all
DATA_KEYS = {"imagefolder": ["data.path=/photos"]}


@pytest.mark.parametrize(
    ("data", "model", "trainer"),
    list(itertools.product(choices("data"), choices("model"), choices("trainer"))),
)
def test_every_group_choice_validates(data, model, trainer):
    overrides = [f"data={data}", *DATA_KEYS.get(data, []), f"model={model}", f"trainer={trainer}"]
    config = validate(compose(overrides, REPO / "conf"))
    assert (config.data.name, config.model.name, config.trainer.name) == (data, model, trainer)


@pytest.mark.parametrize("group", ["data", "model", "trainer"])
def test_every_choice_names_itself(group):
    for choice in choices(group):
        raw = compose([f"{group}={choice}", *DATA_KEYS.get(choice, [])], REPO / "conf")
        assert raw[group]["name"] == choice


def test_trainer_files_state_only_what_differs_from_cpu():
    cpu = compose(["trainer=cpu"], REPO / "conf")["trainer"]
    for choice in [c for c in choices("trainer") if c != "cpu"]:
        text = yaml.safe_load((REPO / "conf" / "trainer" / f"{choice}.yaml").read_text())
        own = {k: v for k, v in text.items() if k != "defaults"}
        assert all(cpu.get(key) != value for key, value in own.items() if key != "name"), choice
        assert compose([f"trainer={choice}"], REPO / "conf")["trainer"] == cpu | own


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
        ("train.augment.crop_padding=-1", "train.augment.crop_padding=-1"),
        ("+train.augment.vflip=true", "unknown key 'train.augment.vflip'; allowed here: crop_padding, hflip"),
        ("+experiment=mnist_cnn", "Multiple values for experiment"),
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


@pytest.mark.parametrize("data", [d for d in choices("data") if d not in ("digits", "imagefolder")])
def test_published_data_sets_have_mirrors_and_a_source(data):
    from imgclf.data.sources import get_source

    config = validate(compose([f"data={data}"], REPO / "conf"))
    assert config.data.mirrors and all(m.startswith(("https://", "http://")) for m in config.data.mirrors)
    assert get_source(data).name == data


# --- recipes: conf/experiment/ ------------------------------------------------------------------


def recipe_choices(recipe: str) -> tuple[str, str]:
    """The data set and model a recipe picks, as its own defaults list states them."""
    text = yaml.safe_load((REPO / "conf" / "experiment" / f"{recipe}.yaml").read_text())
    picks = {
        key.removeprefix("override /"): value for entry in text["defaults"] for key, value in entry.items()
    }
    return picks["data"], picks["model"]


RECIPES = {recipe: recipe_choices(recipe) for recipe in choices("experiment")}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_composes_without_plus_and_sets_its_data_model_and_training(recipe):
    raw = compose([f"experiment={recipe}"], REPO / "conf")
    config = validate(raw)
    assert (config.data.name, config.model.name) == RECIPES[recipe]
    assert "experiment" not in raw  # a recipe is a choice of values, not a key of params.yaml
    defaults = validate(compose([], REPO / "conf"))
    assert config.train.max_epochs != defaults.train.max_epochs  # the recipe wins over config.yaml
    assert config.train.augment.crop_padding > 0
    assert config.train.augment.hflip == (config.data.name != "mnist")  # a mirrored digit is no digit


def test_command_line_overrides_win_over_a_recipe():
    config = validate(
        compose(["experiment=mnist_cnn", "train.max_epochs=1", "model.channels=[8]"], REPO / "conf")
    )
    assert (config.train.max_epochs, config.model.channels) == (1, [8])
    assert config.train.lr == 0.003  # the rest of the recipe stays


def test_params_command_records_a_recipe_and_check_follows_it(workspace):
    done = imgclf(workspace, "params", "experiment=mnist_cnn")
    assert done.returncode == 0, done.stderr
    text = (workspace / "params.yaml").read_text()
    assert '# overrides: ["experiment=mnist_cnn"]' in text
    params = yaml.safe_load(text)
    assert "experiment" not in params
    assert (params["data"]["name"], params["model"]["channels"]) == ("mnist", [16, 32])
    assert imgclf(workspace, "params", "--check").returncode == 0

    recipe = workspace / "conf" / "experiment" / "mnist_cnn.yaml"
    recipe.write_text(recipe.read_text().replace("max_epochs: 5", "max_epochs: 6"))
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 2
    assert "train.max_epochs" in done.stderr
