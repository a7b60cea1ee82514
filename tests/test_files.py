"""files.atomic_write and errors.did_you_mean: the shared helpers every writer and message uses."""

import pytest

from pixeldiffusion.errors import did_you_mean
from pixeldiffusion.files import atomic_write, temp_path_of, write_text_atomic


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"  # the old file survives a failed write
    assert not temp_path_of(target).exists()  # and no temporary file is left behind
    with atomic_write(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_did_you_mean():
    assert did_you_mean("dim", ["ddim", "ddpm", "heun"]) == "did you mean 'ddim'? "
    assert did_you_mean("zzzz", ["ddim", "ddpm"]) == ""
    assert did_you_mean(3, [1, 2, 30]) == "did you mean '30'? "
