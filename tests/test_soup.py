"""bench/soup.py: weight-averaged students (model soups, issue 15)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench_scripts import load
from shrink import artifact
from shrink.errors import ShrinkError
from shrink.manifest import Manifest


def student_copy(teacher, folder, scale: float | None = None, drop: str | None = None):
    """A shrink student folder of the tiny teacher's weights, some scaled or one dropped."""
    with artifact.staged_folder(folder, force=False) as tmp:
        for f in teacher.iterdir():
            shutil.copy2(f, tmp / f.name)
        weights = load_file(tmp / "model.safetensors")
        if scale is not None:
            weights = {k: v * scale if v.dim() == 2 else v for k, v in weights.items()}
        if drop is not None:
            weights.pop(drop)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        artifact.finish(tmp, kind="student", format="hf", source=teacher, settings={"seed": 0}, metrics={})
    return folder


def test_a_soup_is_the_mean_of_its_students_and_names_them(teacher, tmp_path):
    soup = load("soup")
    a, b = student_copy(teacher, tmp_path / "a"), student_copy(teacher, tmp_path / "b", scale=3.0)
    out = soup.average([a, b], tmp_path / "uniform" / "student")  # its parent made too
    got, wa, wb = (load_file(p / "model.safetensors") for p in (out, a, b))
    assert set(got) == set(wa)
    for k in got:
        torch.testing.assert_close(got[k], (wa[k] + wb[k]) / 2)
    assert any(not torch.equal(got[k], wa[k]) for k in got)  # the scaled student moved it
    m = Manifest.read(out)
    assert [i["path"] for i in m.settings["soup"]] == [str(a), str(b)] and m.settings["seed"] == 0
    assert m.settings["soup"][1]["weights_sha256"] == artifact.sha256_file(b / "model.safetensors")
    assert artifact.verify(out) == []

    name = next(iter(wa))
    other = student_copy(teacher, tmp_path / "c", drop=name)
    with pytest.raises(ShrinkError, match="not the same cut"):
        soup.average([a, other], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_the_greedy_soup_keeps_a_student_only_when_dev_does_not_fall():
    soup = load("soup")
    scores = {"s0": 0.86, "s1": 0.88, "s2": 0.87}
    made = {("s1", "s2"): 0.885, ("s1", "s2", "s0"): 0.87}
    chosen, steps = soup.greedy(list(scores), scores, lambda members: made[tuple(members)])
    assert chosen == ["s1", "s2"]  # the best first, s2 added (88.5% >= 88%), s0 left out (87% < 88.5%)
    assert [s["kept"] for s in steps] == [True, False]
