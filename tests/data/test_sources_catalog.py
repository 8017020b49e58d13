"""The source catalog agrees with the config schema and conf/data/, and loads no source itself."""

import subprocess
import sys
import typing
from pathlib import Path

import yaml

from imgclf.config.pipeline import ImageFolderData, PublishedData
from imgclf.data.sources import SOURCES, catalog

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"
CATALOG = Path(catalog.__file__)


def schema_names() -> set[str]:
    return {
        name
        for model in (PublishedData, ImageFolderData)
        for name in typing.get_args(model.model_fields["name"].annotation)
    }


def test_registry_schema_and_conf_name_the_same_sources():
    conf = {path.stem: yaml.safe_load(path.read_text()) for path in sorted(CONF_DATA.glob("*.yaml"))}
    # A file in the global package (digits.yaml: it sets a training key too) nests its data keys.
    conf = {stem: keys.get("data", keys) for stem, keys in conf.items()}
    assert set(SOURCES) == schema_names()
    assert set(SOURCES) == set(conf)
    for stem, keys in conf.items():
        assert keys["name"] == stem, f"conf/data/{stem}.yaml has name: {keys['name']}"
    for name, source in SOURCES.items():
        assert source.name == name


def test_the_registry_alone_registers_nothing():
    # `import imgclf.data.sources.catalog` would run the package's __init__, which imports every
    # family: load catalog.py from its file instead, in a fresh interpreter.
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("catalog", {str(CATALOG)!r})
catalog = sys.modules["catalog"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(catalog)
print(len(catalog.SOURCES), sorted(m for m in sys.modules if m.startswith("imgclf.data.sources")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "[]"]
