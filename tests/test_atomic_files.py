"""core.files.atomic_directory: the old directory or the complete new one, never a mix, and the
permissions each caller asks for (the data and checkpoint outputs owner-only, the exported model
shared)."""

import os
import pathlib
import stat

import pytest

from core.files import atomic_directory


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_new_directory_appears_whole_with_nothing_left_beside_it(tmp_path):
    final = tmp_path / "out" / "model"
    with atomic_directory(str(final)) as staging:
        assert not final.exists()
        pathlib.Path(staging, "weights").write_text("new")
    assert (final / "weights").read_text() == "new"
    assert os.listdir(tmp_path / "out") == ["model"]


def test_an_existing_directory_is_replaced_not_merged(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale").write_text("old")
    with atomic_directory(str(final)) as staging:
        pathlib.Path(staging, "weights").write_text("new")
    assert sorted(os.listdir(final)) == ["weights"]
    assert os.listdir(tmp_path) == ["model"]


def test_an_error_keeps_the_old_directory_and_drops_the_staging(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(str(final)) as staging:
            pathlib.Path(staging, "weights").write_text("half")
            raise RuntimeError("crash while writing")
    assert (final / "weights").read_text() == "old"
    assert os.listdir(tmp_path) == ["model"]


def test_owner_only_by_default_and_umask_permissions_when_shared(tmp_path):
    with atomic_directory(str(tmp_path / "private")):
        pass
    with atomic_directory(str(tmp_path / "shared"), shared=True):
        pass
    assert _mode(tmp_path / "private") == 0o700
    assert _mode(tmp_path / "shared") == 0o777 & ~_umask()
    # what os.makedirs gives, as the export wrote before it went through atomic_directory
    os.makedirs(tmp_path / "plain")
    assert _mode(tmp_path / "shared") == _mode(tmp_path / "plain")
