"""The exit code of every kind of data error, as the stages report it (errors.run_or_exit).

2: a usage or configuration error, which the user fixes in params.yaml or on the command line.
1: the work failed on its merits: the mirrors, the archive or the images let it down.
"""

from pathlib import Path

import pytest
from PIL import Image

from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.data.download import download
from imgclf.data.normalize import normalize
from imgclf.errors import run_or_exit
from tests.conftest import REPO, data_config

MNIST_FILE = "train-images-idx3-ubyte.gz"


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/<i>.png, `counts[class]` distinct tiny images per class."""
    for label, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (label * 100, i * 10, 0)).save(root / name / f"{i}.png")
    return root


def imagefolder(tmp_path: Path, **keys):
    return data_config("imagefolder", image_size=[8, 8], workers=1, cache_dir=str(tmp_path / "cache"), **keys)


def run_stages(config, tmp_path: Path) -> None:
    raw = download(config, tmp_path / "raw" / config.name)
    normalize(config, 0, raw, tmp_path / "normalized")


def mnist(tmp_path: Path, mirrors: list[str]) -> None:
    download(data_config("mnist", mirrors=mirrors, cache_dir=str(tmp_path / "cache")), tmp_path / "raw")


def bad_value(tmp_path, mirror):
    validate(compose(["data.val_fraction=0.7"], REPO / "conf"))


def missing_folder(tmp_path, mirror):
    run_stages(imagefolder(tmp_path, path=str(tmp_path / "no-such-folder")), tmp_path)


def no_mirrors(tmp_path, mirror):
    mnist(tmp_path, [])


def mirror_of_unsupported_scheme(tmp_path, mirror):
    mnist(tmp_path, [mirror.mirror(), "ftp://example.invalid/mnist/"])


def every_mirror_fails(tmp_path, mirror):
    mnist(tmp_path, [mirror.mirror("missing"), (tmp_path / "nowhere").as_uri() + "/"])


def checksum_mismatch(tmp_path, mirror):
    mirror.files[MNIST_FILE] = b"not the published file"
    mnist(tmp_path, [mirror.mirror()])


def corrupt_archive(tmp_path, mirror):
    mirror.files["pets.zip"] = b"PK\x03\x04 not really a zip"
    run_stages(imagefolder(tmp_path, url=mirror.mirror() + "pets.zip"), tmp_path)


def one_class(tmp_path, mirror):
    run_stages(imagefolder(tmp_path, path=str(image_folder(tmp_path / "pets", {"cats": 10}))), tmp_path)


def too_few_to_split(tmp_path, mirror):
    pets = image_folder(tmp_path / "pets", {"cats": 1, "dogs": 1})
    run_stages(imagefolder(tmp_path, path=str(pets)), tmp_path)


def too_few_in_a_class(tmp_path, mirror):
    pets = image_folder(tmp_path / "pets", {"cats": 10, "dogs": 10})
    run_stages(imagefolder(tmp_path, path=str(pets), min_class_count=5), tmp_path)


def bad_image_with_fail(tmp_path, mirror):
    pets = image_folder(tmp_path / "pets", {"cats": 10, "dogs": 10})
    (pets / "dogs" / "text.png").write_text("not an image")
    run_stages(imagefolder(tmp_path, path=str(pets), on_bad_image="fail"), tmp_path)


def missing_extra_folder(tmp_path, mirror):
    config = validate(compose([f"data.extra_train=[{tmp_path / 'labelled'}]"], REPO / "conf"))
    run_stages(config.data, tmp_path)


def extra_folder_of_unknown_class(tmp_path, mirror):
    image_folder(tmp_path / "labelled", {"3": 1, "cat": 1})
    config = validate(compose([f"data.extra_train=[{tmp_path / 'labelled'}]"], REPO / "conf"))
    run_stages(config.data, tmp_path)


@pytest.mark.parametrize(
    ("cause", "code", "named"),
    [
        (bad_value, 2, "data.val_fraction=0.7"),
        (missing_folder, 2, "no such folder"),
        (no_mirrors, 2, "data.mirrors=[]"),
        (mirror_of_unsupported_scheme, 2, "data.mirrors: 'ftp://example.invalid/mnist/'"),
        (every_mirror_fails, 1, f"could not fetch {MNIST_FILE} from any mirror"),
        (checksum_mismatch, 1, "checksum mismatch"),
        (corrupt_archive, 1, "pets.zip"),
        (one_class, 1, "need at least 2"),
        (too_few_to_split, 1, "cannot split 2 images"),
        (too_few_in_a_class, 1, "data.min_class_count=5"),
        (bad_image_with_fail, 1, "data.on_bad_image=fail"),
        (missing_extra_folder, 2, "labelled': no such folder"),
        (extra_folder_of_unknown_class, 2, "['cat'] are not classes of data 'digits'"),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_config_errors_exit_2_and_failed_work_exits_1(cause, code, named, tmp_path, http_mirror, capsys):
    with pytest.raises(SystemExit) as exit:
        run_or_exit(lambda: cause(tmp_path, http_mirror))
    assert exit.value.code == code
    last = capsys.readouterr().err.splitlines()[-1]  # progress and failover lines may come before
    assert last.startswith("imgclf: error:") and named in last
