import os

import numpy as np
import pytest

from imgclf.fileio import atomic_dir, atomic_path, save_array, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert os.listdir(tmp_path) == ["out.json"]


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "split"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["split"]


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    save_array(tmp_path / "x.npy", np.arange(3))
    assert (tmp_path / "x.npy").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
