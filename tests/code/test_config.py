import itertools
import json
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


EXPERIMENTS = ", ".join(choices("experiment"))

# Every kind of override a user can get wrong, and the one line each gets: the override itself
# (or, for a value the schema refuses, its key), what is wrong, and what to write instead.
BAD_OVERRIDES = [
    # a value of the wrong type or out of range: the schema's line
    ("train.lr=abc", "train.lr='abc'"),
    ("train.lr=-1", "train.lr=-1"),
    ("model.activation=gelu", "'relu', 'sigmoid' or 'tanh'"),
    ("trainer.devices=0", "trainer.devices=0"),
    ("train.augment.crop_padding=-1", "train.augment.crop_padding=-1"),
    ("train=5", "train=5: Input should be a valid dictionary"),
    ("model.hidden=abc", "model.hidden='abc': Input should be a valid list"),
    # an unknown group, key or choice
    ("modle=cnn", f"modle=cnn: no key or group 'modle'; groups: {GROUPS}; keys: {KEYS}"),
    ("modle.depth=3", f"modle.depth=3: no key or group 'modle'; groups: {GROUPS}; keys: {KEYS}"),
    ("train.nope=1", "train.nope=1: no key 'train.nope'; keys in train: max_epochs, batch_size"),
    ("model.depth=3", "model.depth=3: no key 'model.depth'; keys in model: name, hidden, activation"),
    ("seed.x=1", "seed.x=1: no key 'seed.x'; keys in seed: none"),
    ("model.hidden.5=1", "model.hidden.5=1: no key 'model.hidden.5'; model.hidden is a list of 2"),
    ("model=transformer", "model=transformer: 'model' has no choice transformer; choices: cnn, mlp, resnet"),
    ("experiment=nope", f"experiment=nope: 'experiment' has no choice nope; choices: {EXPERIMENTS}"),
    ("model=null", "model=null: 'model' has no choice null; choices: cnn, mlp, resnet"),
    # + and ++: a key the schema lacks, or one that is there already
    ("+train.nope=1", "unknown key 'train.nope'; allowed here: max_epochs"),
    ("++train.nope=1", "unknown key 'train.nope'; allowed here: max_epochs"),
    ("+model.depth=3", "unknown key 'model.depth'; allowed here: name, hidden"),
    (
        "+train.augment.vflip=true",
        "unknown key 'train.augment.vflip'; allowed here: crop_padding, hflip, invert",
    ),
    ("+seed=1", "+seed=1: 'seed' already exists; write seed=1, without the +"),
    (
        "+experiment=mnist_cnn",
        "+experiment=mnist_cnn: the group 'experiment' already has a value (default: none); "
        "write experiment=mnist_cnn, without the +",
    ),
    ("+model=cnn", "+model=cnn: the group 'model' already has a value (default: mlp); write model=cnn,"),
    ("++model=cnn", "++model=cnn: the group 'model' already has a value (default: mlp); write model=cnn,"),
    # ~: a key that is not there, a group every configuration needs
    ("~train.nope", "~train.nope: no key 'train.nope'; keys in train: max_epochs"),
    ("~modle", f"~modle: no key or group 'modle'; groups: {GROUPS}"),
    ("~data", "~data: every configuration needs a choice of 'data'; write data=CHOICE instead (cifar10,"),
    ("~model=cnn", "~model=cnn: every configuration needs a choice of 'model'; write model=CHOICE"),
    # not an override at all, or several values
    ("train.lr", "train.lr: not an override (missing EQUAL at '<EOF>'); write KEY=VALUE, GROUP=CHOICE"),
    ("train.lr=[1,", "train.lr=[1,: not an override (no viable alternative at input '[1,')"),
    ("=3", "=3: not an override (no key)"),
    ("train.lr=0.001,0.01", "train.lr=0.001,0.01: several values, a sweep: write one value"),
    ("train.lr=range(1,3)", "train.lr=range(1,3): several values, a sweep"),
    ("train.lr=${nope}", "train.lr=${nope}: Interpolation key 'nope' not found"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_OVERRIDES)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose([override], REPO / "conf"))
    assert expected in str(error.value)
    assert "use +" not in str(error.value)  # Hydra's advice, which the schema refuses
    assert "Multiple values" not in str(error.value)  # Hydra's words for `+group=...`
    assert "\n" not in str(error.value)
    assert error.value.exit_code == 2


def test_the_offending_override_is_named_among_good_ones():
    with pytest.raises(ConfigError) as error:
        compose(["model=cnn", "train.lr=0.01", "+experiment=mnist_cnn", "seed=3"], REPO / "conf")
    assert str(error.value).startswith("+experiment=mnist_cnn: ")
    with pytest.raises(ConfigError) as error:
        compose(["model=cnn", "train.lr=${nope}"], REPO / "conf")
    assert str(error.value).startswith("train.lr=${nope}: ")


def test_overrides_hydra_accepts_still_compose():
    defaults = compose([], REPO / "conf")
    assert compose(["~experiment"], REPO / "conf") == defaults  # a group with no default may go
    assert compose(["++seed=3"], REPO / "conf")["seed"] == 3
    assert compose(["++train.lr=0.01"], REPO / "conf")["train"]["lr"] == 0.01
    assert "lr" not in compose(["~train.lr"], REPO / "conf")["train"]  # the schema then names it


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


CLI_ERRORS = [
    ("+experiment=mnist_cnn", "write experiment=mnist_cnn, without the +"),
    ("++model=cnn", "write model=cnn, without the ++"),
    ("+seed=1", "write seed=1, without the +"),
    ("model=transformer", "choices: cnn, mlp, resnet"),
    ("modle=cnn", "no key or group 'modle'"),
    ("~train.nope", "no key 'train.nope'"),
    ("~data", "write data=CHOICE instead"),
    ("train.lr", "not an override"),
    ("train.lr=0.001,0.01", "several values, a sweep"),
    ("train.batch_size=lots", "Input should be a valid integer"),
    ("+seed2=1", "unknown key 'seed2'"),
]


@pytest.mark.parametrize(("override", "expected"), CLI_ERRORS)
def test_bad_override_exits_2_with_one_line_and_leaves_params_yaml_alone(workspace, override, expected):
    assert imgclf(workspace, "params").returncode == 0
    before = (workspace / "params.yaml").read_bytes()
    done = imgclf(workspace, "params", "model=cnn", override)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("imgclf: error: ")
    assert expected in done.stderr
    assert "use +" not in done.stderr  # Hydra's advice to add a key, which the schema refuses
    assert (workspace / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in workspace.iterdir()) == ["conf", "params.yaml"]


def test_check_takes_no_overrides_and_needs_a_params_yaml(workspace):
    for args in (["--check", "model=cnn"], ["--check"]):
        done = imgclf(workspace, "params", *args)
        assert done.returncode == 2
        assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert "params.yaml not found: run `imgclf params`" in done.stderr


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


def dvc_writes_params(workspace, overrides: list[str]) -> dict:
    """params.yaml as `dvc exp run -S ...` writes it (DVC's own Hydra composition, no header)."""
    from dvc.utils.hydra import compose_and_dump

    path = workspace / "params.yaml"
    compose_and_dump(path, str(workspace / "conf"), None, "config", str(workspace), overrides)
    assert not path.read_text().startswith("#")
    return yaml.safe_load(path.read_text())


def same_values(a, b) -> bool:
    """Equal, and of one type throughout (1, 1.0 and true differ), as JSON tells them apart."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def suggested(text: str) -> list[str]:
    """The arguments of the first `imgclf params ...` command quoted in a line."""
    command = shlex.split(text.split("`")[1])
    assert command[:2] == ["imgclf", "params"]
    return command[2:]


# `dvc exp run -S` overrides, and the shortest that give the same params.yaml: only what differs
# from conf/'s defaults, a recipe where it saves overrides, a value equal to the default never.
DVC_EXPERIMENTS = [
    (["train.lr=0.01", "model=cnn"], ["model=cnn", "train.lr=0.01"]),
    ([], []),
    (["model=mlp", "train.lr=0.002", "data=digits", "trainer=cpu"], []),
    (["model=cnn", "train.max_epochs=3"], ["model=cnn", "train.max_epochs=3"]),
    (["experiment=mnist_cnn", "train.lr=0.01"], ["experiment=mnist_cnn"]),  # the recipe's own lr
    (["experiment=mnist_cnn", "train.max_epochs=5"], ["experiment=mnist_cnn", "train.max_epochs=5"]),
    (["experiment=mnist_cnn", "data=digits"], ["experiment=mnist_cnn", "data=digits"]),
    (["data=mnist", "model=cnn"], ["data=mnist", "model=cnn"]),  # not a recipe: it has its own values
    (
        ["data=imagefolder", "data.path='/photos/my pets'", "data.image_size=[32,48]", "tracking.uri=null"],
        ["data=imagefolder", "data.path='/photos/my pets'", "data.image_size=[32,48]"],
    ),
    (
        ["promote=strict", "model.hidden=[64,32]", "data.mirrors=[file:///srv/digits/]"],
        ["promote=strict", "data.mirrors=[file:///srv/digits/]", "model.hidden=[64,32]"],
    ),
    (
        ["model.activation=tanh", "train.augment.hflip=true"],
        ["train.augment.hflip=true", "model.activation=tanh"],
    ),
    (["trainer=ddp", "trainer.devices=2"], ["trainer=ddp", "trainer.devices=2"]),
    (
        ["sweep=cnn", "sweep.params={train.lr:{low:0.001}}"],
        ["sweep=cnn", "++sweep.params={train.lr:{low:0.001,high:0.03,log:true}}"],
    ),
]


@pytest.mark.parametrize(("overrides", "shortest"), DVC_EXPERIMENTS)
def test_a_params_yaml_that_dvc_wrote_passes_check_and_its_shortest_overrides_reproduce_it(
    workspace, tmp_path_factory, overrides, shortest
):
    written = dvc_writes_params(workspace, overrides)
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and done.stderr == ""
    assert "written by DVC" in done.stdout
    assert suggested(done.stdout) == shortest
    if not shortest:
        assert "no overrides" in done.stdout
    # The advice, followed in a copy, gives back the same values, and records them.
    copy = tmp_path_factory.mktemp("copy")
    shutil.copytree(workspace / "conf", copy / "conf")
    assert imgclf(copy, "params", *shortest).returncode == 0
    assert same_values(yaml.safe_load((copy / "params.yaml").read_text()), written)
    done = imgclf(copy, "params", "--check")
    assert done.returncode == 0, done.stderr
    assert suggested(done.stdout) == shortest


def test_drift_advice_keeps_the_recorded_overrides(workspace):
    assert imgclf(workspace, "params", "model=cnn", "train.max_epochs=3").returncode == 0
    recipe = workspace / "conf" / "model" / "cnn.yaml"
    recipe.write_text(recipe.read_text().replace("hidden: 128", "hidden: 96"))  # conf/ moved on
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 2
    assert "model.hidden: params.yaml has 128, conf/ gives 96" in done.stderr
    assert "Run `imgclf params model=cnn train.max_epochs=3` to recompose it" in done.stderr
    assert (
        "or `imgclf params model=cnn train.max_epochs=3 model.hidden=128` to keep its values" in done.stderr
    )


def test_drift_advice_offers_the_shortest_command_that_keeps_the_values(workspace, tmp_path_factory):
    # `dvc exp run -S train.lr=0.01 -S model=cnn`, had it kept imgclf's header: values, no record.
    assert imgclf(workspace, "params").returncode == 0
    header = "".join((workspace / "params.yaml").read_text().splitlines(keepends=True)[:2])
    edited = compose(["model=cnn", "train.lr=0.01"], workspace / "conf")
    (workspace / "params.yaml").write_text(header + yaml.safe_dump(edited, sort_keys=False))
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert "model.name: params.yaml has 'cnn', conf/ gives 'mlp'" in done.stderr
    assert "train.lr: params.yaml has 0.01, conf/ gives 0.002" in done.stderr
    assert "Run `imgclf params` to recompose it" in done.stderr
    keep = shlex.split(done.stderr.split("`")[3])
    assert keep == ["imgclf", "params", "model=cnn", "train.lr=0.01"]
    copy = tmp_path_factory.mktemp("copy")
    shutil.copytree(workspace / "conf", copy / "conf")
    assert imgclf(copy, *keep[1:]).returncode == 0
    assert same_values(yaml.safe_load((copy / "params.yaml").read_text()), edited)


def test_a_drifted_value_that_the_schema_refuses_gets_no_command_to_keep_it(workspace):
    assert imgclf(workspace, "params").returncode == 0
    text = (workspace / "params.yaml").read_text().replace("lr: 0.002", "lr: fast")
    (workspace / "params.yaml").write_text(text)
    done = imgclf(workspace, "params", "--check")
    assert done.returncode == 2
    assert "train.lr: params.yaml has 'fast', conf/ gives 0.002" in done.stderr
    assert "to keep its values" not in done.stderr


def mutated(change) -> dict:
    params = compose([], REPO / "conf")
    change(params)
    return params


# Any difference a params.yaml can have from conf/: nested keys, lists, types, keys added or gone,
# a section that became a value, keys that a dotted path cannot name. Each gets the shortest override.
DIFFERENCES = [
    (lambda p: p["train"]["augment"].update(crop_padding=2), ["train.augment.crop_padding=2"]),
    (lambda p: p["train"].update(max_epochs=40.0), ["train.max_epochs=40.0"]),  # 40.0 is not 40
    (lambda p: p["train"].update(channels_last=1), ["train.channels_last=1"]),
    (lambda p: p["model"].update(hidden=[]), ["model.hidden=[]"]),
    (lambda p: p["model"]["hidden"].append(64), ["model.hidden=[256,128,64]"]),
    (lambda p: p["data"].update(cache_dir="/srv/cache dir"), ["data.cache_dir='/srv/cache dir'"]),
    (lambda p: p["tracking"].update(uri="sqlite:///x.db"), ["tracking.uri=sqlite:///x.db"]),
    (lambda p: p["tracking"].update(experiment="null"), ["tracking.experiment='null'"]),
    (lambda p: p["evaluate"].pop("latency_runs"), ["~evaluate.latency_runs"]),
    (lambda p: p["train"].update(extra={"a": [1, {"b": None}]}), ["+train.extra={a:[1,{b:null}]}"]),
    (lambda p: p.update(seed={"a": 1}), ["~seed", "+seed={a:1}"]),
    (lambda p: p["sweep"]["params"]["train.lr"].update(low=0.001), None),
    (lambda p: p["sweep"]["params"].pop("model.dropout"), None),
    (lambda p: p["sweep"]["params"].update({"a b:c": {"choices": ["x:y", 1]}}), None),
]


@pytest.mark.parametrize(("change", "shortest"), DIFFERENCES)
def test_inferred_overrides_are_the_shortest_that_give_back_any_difference(change, shortest):
    from imgclf.config.compose import inferred_overrides

    params = mutated(change)
    overrides = inferred_overrides(params, REPO / "conf")
    assert same_values(compose(overrides, REPO / "conf"), params)
    if shortest is not None:
        assert overrides == shortest
    else:
        assert len(overrides) <= 2 and all(o.lstrip("+~").startswith("sweep.params") for o in overrides)


@pytest.mark.parametrize(
    "path",
    [
        *("a\\b", "a\\", "it's", "x${y}", "~/.cache", "a b", "", "1e-3", "true", "a=b,c", "null", "NULL"),
        *("True", "nan", "Inf", "-inf", "info", "a.b", "relu", "-x", "x-y", "file:///srv/x/", "a:b"),
        *("https://e.com/a.zip?x=1", "[a]", "{a}", "1", "0x10", "e5", "a/b", "a b ", " a", "\t", "ü"),
    ],
)
def test_inferred_overrides_give_back_any_string(path):
    from imgclf.config.compose import inferred_overrides

    params = compose(["data=imagefolder", "data.path=/x"], REPO / "conf")
    params["data"]["path"] = path
    params["data"]["mirrors"] = [path, path]
    again = compose(inferred_overrides(params, REPO / "conf"), REPO / "conf")
    assert (again["data"]["path"], again["data"]["mirrors"]) == (path, [path, path])
