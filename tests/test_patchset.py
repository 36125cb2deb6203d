"""common/patchset.py: the patch-set contract and its file mode."""

import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.errors import UserError
from common.patchset import PatchSet, PatchSetWriter, read_patch_set, write_patch_set
from common.steps import atomic_path


def make(n: int, seed: int = 0) -> PatchSet:
    rng = np.random.default_rng(seed)
    return PatchSet(rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8), rng.integers(0, 2, n).astype(np.uint8),
                    np.array([f"slide_{i % 3}" for i in range(n)]), rng.integers(0, 10**6, (n, 2)),
                    {"source": "pcam", "split": "train", "mpp": 0.972, "provenance": {"step": "test"}})


def test_round_trip_and_layout(tmp_path: Path):
    ps = make(70)
    write_patch_set(tmp_path / "a.h5", ps)
    back = read_patch_set(tmp_path / "a.h5")
    np.testing.assert_array_equal(back.x, ps.x)
    np.testing.assert_array_equal(back.y, ps.y)
    np.testing.assert_array_equal(back.group, ps.group)
    np.testing.assert_array_equal(back.coords, ps.coords)
    assert back.attrs["source"] == "pcam" and back.attrs["mpp"] == pytest.approx(0.972)
    assert back.attrs["provenance"] == {"step": "test"} and back.attrs["patch_size"] == 96
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["x"].dtype == np.uint8 and f["x"].shape == (70, 96, 96, 3) and f["x"].chunks is not None
        assert f["y"].dtype == np.uint8 and f["coords"].shape == (70, 2)


def test_chunked_writer_appends_in_order(tmp_path: Path):
    ps = make(50, seed=1)
    with PatchSetWriter(tmp_path / "b.h5", source="dlbcl", split="all", mpp=1.0, provenance={}) as w:
        for start in range(0, 50, 16):
            w.append(ps.x[start:start + 16], ps.y[start:start + 16], ps.group[start:start + 16])
    back = read_patch_set(tmp_path / "b.h5")
    np.testing.assert_array_equal(back.x, ps.x)
    assert (back.coords == -1).all()


def test_failed_write_leaves_nothing(tmp_path: Path):
    target = tmp_path / "c.h5"
    write_patch_set(target, make(5))
    before = target.read_bytes()
    with pytest.raises(RuntimeError), PatchSetWriter(target, source="x", split="x", mpp=1, provenance={}) as w:
        w.append(make(3).x, make(3).y, make(3).group)
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == before  # the old file is untouched
    assert list(tmp_path.iterdir()) == [target]  # no temporary left behind
    with pytest.raises(ValueError), atomic_path(tmp_path / "d.txt") as tmp:
        tmp.write_text("partial")
        raise ValueError
    assert not (tmp_path / "d.txt").exists()


def test_read_errors_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        read_patch_set(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "wrong.h5", "w") as f:
        f["x"] = np.zeros((1, 96, 96, 3), np.uint8)
    with pytest.raises(UserError, match="missing dataset"):
        read_patch_set(tmp_path / "wrong.h5")


def test_written_files_get_the_umask_mode_not_owner_only(tmp_path: Path):
    old = os.umask(0o022)
    try:
        write_patch_set(tmp_path / "a.h5", make(2))
        with atomic_path(tmp_path / "b.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    for name in ("a.h5", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
