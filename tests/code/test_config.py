import itertools
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml

from imgclf.config.compose import compose, params_drift
from imgclf.config.operations import Config, validate
from imgclf.config.pipeline import flatten
from imgclf.errors import ConfigError
from tests.conftest import REPO


def test_defaults_compose_and_validate():
    config = validate(compose([], REPO / "conf"))
    assert config.data.name == "digits"
    assert config.model.name == "mlp"
    assert config.trainer.name == "cpu"
    assert config.train.augment.invert  # the default digits model reads dark ink on paper too
    photos = validate(compose(["data=imagefolder", "data.path=/photos"], REPO / "conf"))
    assert not photos.train.augment.invert  # a negative photo is no photo: digits alone turn it on
    assert validate(compose(["train.augment.invert=false"], REPO / "conf")).train.augment.invert is False


def choices(group: str) -> list[str]:
    """The options of a config group: the files in conf/<group>/."""
    return sorted(path.stem for path in (REPO / "conf" / group).glob("*.yaml"))


GROUPS = ", ".join(sorted(path.name for path in (REPO / "conf").iterdir() if path.is_dir()))
KEYS = ", ".join(Config.model_fields)

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
        ("train.nope=1", "train.nope=1: no key 'train.nope'; keys in train: max_epochs, batch_size"),
        ("model.depth=3", "model.depth=3: no key 'model.depth'; keys in model: name, hidden, activation"),
        ("modle=cnn", f"modle=cnn: no key or group 'modle'; groups: {GROUPS}; keys: {KEYS}"),
        ("modle.depth=3", f"modle.depth=3: no key or group 'modle'; groups: {GROUPS}; keys: {KEYS}"),
        ("+train.nope=1", "unknown key 'train.nope'; allowed here: max_epochs"),
        ("+model.depth=3", "unknown key 'model.depth'; allowed here: name, hidden"),
        ("model.activation=gelu", "'relu', 'sigmoid' or 'tanh'"),
        ("trainer.devices=0", "trainer.devices=0"),
        ("train.augment.crop_padding=-1", "train.augment.crop_padding=-1"),
        (
            "+train.augment.vflip=true",
            "unknown key 'train.augment.vflip'; allowed here: crop_padding, hflip, invert",
        ),
        ("+experiment=mnist_cnn", "Multiple values for experiment"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose([override], REPO / "conf"))
    assert expected in str(error.value)
    assert "use +" not in str(error.value)  # Hydra's advice, which the schema refuses
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


def test_help_says_what_imgclf_is_its_commands_and_where_to_read_more(tmp_path):
    done = imgclf(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "imgclf trains image classifiers" in text
    for command in ("params", "predict", "serve"):
        assert re.search(rf"^ +{command} +\w", done.stdout, re.MULTILINE), command  # its summary
    assert "README.md" in text
    assert "imported inside their handlers" not in text  # an implementation note, not for users


def test_version_is_the_package_version_without_the_training_stack(tmp_path):
    code = (
        "import sys\nfrom imgclf.cli import main\ntry:\n    main(['--version'])\nfinally:\n"
        "    print(*sorted({'torch', 'lightning', 'hydra', 'mlflow'} & set(sys.modules)), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"imgclf {version('imgclf')}\n"
    assert done.stderr.strip() == ""  # none of them imported


def test_params_help_lists_conf_groups_and_choices_and_shows_examples(workspace, tmp_path_factory):
    (workspace / "conf" / "model" / "vit.yaml").write_text("name: vit\n")  # read at help time
    done = imgclf(workspace, "params", "--help")
    assert done.returncode == 0, done.stderr
    groups = sorted(path for path in (workspace / "conf").iterdir() if path.is_dir())
    assert "model" in [group.name for group in groups]
    for group in groups:
        listed = " ".join(sorted(path.stem for path in group.glob("*.yaml")))
        assert re.search(rf"^ +{group.name} +{listed}$", done.stdout, re.MULTILINE), group.name
    assert " vit" in done.stdout
    for example in ("model=cnn train.lr=0.01", "experiment=mnist_cnn", "--check"):
        assert f"imgclf params {example}" in done.stdout

    done = imgclf(tmp_path_factory.mktemp("elsewhere"), "params", "--help")
    assert done.returncode == 0, done.stderr
    assert "no conf/ folder in" in done.stdout  # said in the help, not a failure
    assert "imgclf params experiment=mnist_cnn" in done.stdout


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
    for bad in ("train.batch_size=lots", "model=transformer", "+seed2=1", "modle=cnn"):
        done = imgclf(workspace, "params", bad)
        assert done.returncode == 2, bad
        assert done.stderr.startswith("imgclf: error:")
        assert len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr
        assert "use +" not in done.stderr  # Hydra's advice to add a key, which the schema refuses
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
    assert config.train.augment.invert == (config.data.name == "mnist")  # digits in either ink; photos not


def test_command_line_overrides_win_over_a_recipe():
    config = validate(
        compose(["experiment=mnist_cnn", "train.max_epochs=1", "model.channels=[8]"], REPO / "conf")
    )
    assert (config.train.max_epochs, config.model.channels) == (1, [8])
    assert config.train.lr == 0.01  # the rest of the recipe stays


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
    recipe.write_text(recipe.read_text().replace("max_epochs: 3", "max_epochs: 6"))
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 2
    assert "train.max_epochs" in done.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=cnn", "train.max_epochs=3"],
        ["experiment=mnist_cnn", "train.lr=0.01"],
        ["data=imagefolder", "data.path='/photos/my pets'", "data.image_size=[32,48]", "tracking.uri=null"],
    ],
)
def test_a_params_yaml_that_dvc_wrote_passes_check_and_its_overrides_reproduce_it(workspace, overrides):
    # `dvc exp run -S` and `dvc exp apply` write the composition without imgclf's header.
    composed = compose(overrides, workspace / "conf")
    (workspace / "params.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 0, done.stderr
    assert "written by DVC" in done.stdout
    again = shlex.split(done.stdout.split("`")[1])
    assert again[:2] == ["imgclf", "params"]
    assert imgclf(workspace, *again[1:]).returncode == 0  # the advice rewrites params.yaml...
    assert yaml.safe_load((workspace / "params.yaml").read_text()) == composed  # ...to the same values
    assert imgclf(workspace, "params", "--check").returncode == 0


def test_drift_advice_keeps_the_recorded_overrides(workspace):
    assert imgclf(workspace, "params", "model=cnn", "train.max_epochs=3").returncode == 0
    recipe = workspace / "conf" / "model" / "cnn.yaml"
    recipe.write_text(recipe.read_text().replace("hidden: 128", "hidden: 96"))  # conf/ moved on
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 2
    assert "model.hidden: params.yaml has 128, conf/ gives 96" in done.stderr
    assert "Run `imgclf params model=cnn train.max_epochs=3` to recompose it" in done.stderr


@pytest.mark.parametrize(
    "path", ["a\\b", "a\\", "it's", "x${y}", "~/.cache", "a b", "", "1e-3", "true", "a=b,c"]
)
def test_inferred_overrides_give_back_any_string(path):
    from imgclf.config.compose import inferred_overrides

    params = compose(["data=imagefolder", "data.path=/x"], REPO / "conf")
    params["data"]["path"] = path
    assert compose(inferred_overrides(params, REPO / "conf"), REPO / "conf")["data"]["path"] == path
