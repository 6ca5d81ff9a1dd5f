"""A run's output_dir and synthetic data: nothing the user has is replaced unless asked."""

from __future__ import annotations

import pytest

from mergekit_video.config import dump_recipe
from mergekit_video.data import synthetic
from mergekit_video.runners.common import ensure_synthetic_data, prepare_output_dir

TINY = dict(num_classes=2, videos_per_class=2, val_per_class=1, num_novel_classes=1, frames=8, size=(32, 32), seed=0)


def _cfg(out, **extra):
    return {"runner": "mote", "output_dir": str(out), "train": {"epochs": 1, **extra}}


def test_interrupted_synthetic_write_leaves_no_half_dataset(tmp_path, monkeypatch):
    root = tmp_path / "data"
    real_write, calls = synthetic._write_one, []

    def dies_on_third(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(job)

    monkeypatch.setattr(synthetic, "_write_one", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_dataset(root, **TINY)
    assert not root.exists()  # the half-written files are in the hidden staging folder only
    monkeypatch.setattr(synthetic, "_write_one", real_write)
    ds = synthetic.write_synthetic_dataset(root, **TINY)  # a rerun needs no --overwrite
    assert ds.train_list.is_file() and len(ds.class_names) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert synthetic.synthetic_settings(root)["videos_per_class"] == 2


def test_output_dir_with_foreign_files_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("the user's results")
    with pytest.raises(FileExistsError, match="no recipe.yaml"):
        prepare_output_dir(_cfg(out), overwrite=False, main=True)
    assert not (out / "recipe.yaml").exists()
    prepare_output_dir(_cfg(out), overwrite=True, main=True)  # asked: the run replaces its own outputs
    assert (out / "recipe.yaml").read_text() == dump_recipe(_cfg(out))


def test_changed_recipe_needs_overwrite_only_when_the_earlier_run_left_outputs(tmp_path):
    out = tmp_path / "run"
    prepare_output_dir(_cfg(out), overwrite=False, main=True)
    # the earlier run failed at start-up (no outputs): a corrected recipe just replaces recipe.yaml
    prepare_output_dir(_cfg(out, lr=1), overwrite=False, main=True)
    assert "lr: 1" in (out / "recipe.yaml").read_text()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step_1").write_text("ckpt")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("the user's notes")
    with pytest.raises(FileExistsError, match="different recipe"):
        prepare_output_dir(_cfg(out, lr=2), overwrite=False, main=True)
    prepare_output_dir(_cfg(out, lr=1), overwrite=True, main=True)  # the same recipe: a resume keeps everything
    assert (out / "checkpoints" / "step_1").exists()
    prepare_output_dir(_cfg(out, lr=2), overwrite=True, main=True)  # another run: start clean, no resume or append
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "recipe.yaml"]


def test_synthetic_data_is_reused_only_with_the_recipe_settings(tmp_path):
    out = tmp_path / "run"
    syn = {k: (list(v) if k == "size" else v) for k, v in TINY.items()}
    data_cfg = ensure_synthetic_data({"synthetic": syn}, out)
    train_list = out / "data" / "train.txt"
    first = train_list.stat().st_mtime_ns
    assert ensure_synthetic_data({"synthetic": syn}, out) == data_cfg and train_list.stat().st_mtime_ns == first
    more = {**syn, "videos_per_class": 3}
    with pytest.raises(FileExistsError, match="other data.synthetic settings"):
        ensure_synthetic_data({"synthetic": more}, out)
    ensure_synthetic_data({"synthetic": more}, out, overwrite=True)
    assert len(train_list.read_text().splitlines()) == 2 * 3
