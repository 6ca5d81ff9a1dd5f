"""A run's output_dir and synthetic data: nothing the user has is replaced unless asked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mergekit_video.config import dump_recipe
from mergekit_video.data import synthetic
from mergekit_video.runners.common import (
    LOCK_FILE,
    OVERWRITTEN_DIR,
    delete_set_aside,
    ensure_synthetic_data,
    prepare_output_dir,
    release_output_dir,
)

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
    (out / "metrics.jsonl").write_text('{"a": 1}\nnot json\n')
    (out / "notes.txt").write_text("the user's notes")
    with pytest.raises(FileExistsError, match=r"no recipe.yaml of an earlier run; .* pass --overwrite to write into it "
                                              r"\(DELETING its metrics.jsonl, results.json, which a run writes\)$"):
        prepare_output_dir(_cfg(out), overwrite=False, main=True)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "notes.txt", "results.json"]  # not even a lock file left
    prepare_output_dir(_cfg(out), overwrite=True, main=True)  # asked: the run replaces (not appends to) files named as its outputs
    delete_set_aside(out)  # the runner's setup passed: what --overwrite set aside goes
    assert (out / "recipe.yaml").read_text() == dump_recipe(_cfg(out))
    assert sorted(p.name for p in out.iterdir()) == [".mergevid.lock", "notes.txt", "recipe.yaml"]


def test_an_evaluation_with_overwrite_deletes_only_what_an_evaluation_writes(tmp_path):
    # a folder that is not a run: --overwrite replaces results, never the user's other files
    out = tmp_path / "eval"
    (out / "weights").mkdir(parents=True)
    (out / "weights" / "model.bin").write_text("the user's model")
    (out / "results.json").write_text("older results")
    cfg = {"runner": "evaluate", "output_dir": str(out)}
    with pytest.raises(FileExistsError, match=r"pass --overwrite to write into it \(DELETING its results.json, which a run writes\)$"):
        prepare_output_dir(cfg, overwrite=False, main=True)
    prepare_output_dir(cfg, overwrite=True, main=True)
    delete_set_aside(out)  # the runner's setup passed: what --overwrite set aside goes
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["recipe.yaml", "weights"]
    assert (out / "weights" / "model.bin").read_text() == "the user's model"


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
    delete_set_aside(out)  # the runner's setup passed: what --overwrite set aside goes
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["notes.txt", "recipe.yaml"]


def test_a_rerun_with_resume_null_does_not_silently_replace_the_earlier_run(tmp_path, caplog):
    # train.resume: null trains from step 1: it would replace the checkpoints and metrics of the run interrupted before
    out = tmp_path / "run"
    cfg = {"runner": "mote", "output_dir": str(out), "train": {"resume": None}}
    prepare_output_dir(cfg, overwrite=False, main=True)
    (out / "checkpoints" / "step_00000008").mkdir(parents=True)
    (out / "checkpoints" / "step_00000008" / "state.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(FileExistsError, match=r"holds an earlier run of this recipe \(metrics.jsonl, checkpoints\), and train.resume is null, "
                                              r"which trains from step 1 and would replace them: set train.resume=auto to continue it"):
        prepare_output_dir(cfg, overwrite=False, main=True)
    assert (out / "checkpoints" / "step_00000008" / "state.json").exists()
    prepare_output_dir({**cfg, "train": {"resume": "auto"}}, overwrite=False, main=True)  # as the message says: it continues
    with pytest.raises(FileExistsError, match="and train.resume is null"):
        prepare_output_dir(cfg, overwrite=False, main=True)
    with caplog.at_level("WARNING", logger="mergekit_video.runners.common"):
        prepare_output_dir({**cfg, "train": {"resume": "auto"}}, overwrite=True, main=True)  # the same run resumes: --overwrite deletes nothing
    assert (out / "metrics.jsonl").exists() and "nothing was deleted" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_video.runners.common"):
        prepare_output_dir(cfg, overwrite=True, main=True)  # asked: train again from step 1
        delete_set_aside(out)  # the runner's setup passed: what --overwrite set aside goes
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["recipe.yaml"]
    assert "--overwrite: deleted the earlier outputs" in caplog.text and "(checkpoints/, metrics.jsonl)" in caplog.text


def test_resume_null_over_a_trained_run_without_checkpoints_or_metrics_is_refused(tmp_path, caplog):
    """train.resume=null over a finished run whose checkpoints/ and metrics.jsonl were deleted (to save disk) replaced
    its model/ and results.json without --overwrite (only checkpoints/ or metrics.jsonl made it a restart), logging
    "resuming the earlier run ..., which do not change what it trains"; with --overwrite it deleted nothing and told
    the user to "set train.resume=null with --overwrite", which they had. A fresh-start word ("never") is null too."""
    out = tmp_path / "run"
    cfg = {"runner": "mote", "output_dir": str(out), "train": {"resume": "auto"}}
    prepare_output_dir(cfg, overwrite=False, main=True)
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    (out / "results.json").write_text('{"summary": {}}')
    for resume in (None, "never"):
        with caplog.at_level("INFO", logger="mergekit_video"), pytest.raises(FileExistsError, match=(
                rf"^output_dir {re.escape(str(out))} holds a trained run of this recipe \(model/, results.json\) but no checkpoint to "
                rf"continue from, and train.resume is null, which trains from step 1 and would replace them. Evaluate the saved model "
                rf"with mergevid eval {re.escape(str(out / 'model'))} \.\.\., use another output_dir, or pass --overwrite to DELETE its "
                rf"model/, results.json and train again from step 1$")):
            prepare_output_dir({**cfg, "train": {"resume": resume}}, overwrite=False, main=True)
    assert "resuming" not in caplog.text
    assert (out / "recipe.yaml").read_text() == dump_recipe(cfg) and (out / "model" / "config.json").exists()
    (out / "checkpoints" / "step_00000006").mkdir(parents=True)
    (out / "checkpoints" / "step_00000006" / "state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="and train.resume is null, which trains from step 1 .* set train.resume=auto to continue it"):
        prepare_output_dir({**cfg, "train": {"resume": "never"}}, overwrite=False, main=True)
    shutil.rmtree(out / "checkpoints")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_video.runners.common"):
        prepare_output_dir({**cfg, "train": {"resume": None}}, overwrite=True, main=True)  # asked: train again from step 1
        delete_set_aside(out)  # the runner's setup passed: what --overwrite set aside goes
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["recipe.yaml"]
    assert "--overwrite: deleted the earlier outputs" in caplog.text and "(model/, results.json)" in caplog.text
    assert "set train.resume=null with --overwrite" not in caplog.text


def test_resuming_an_older_checkpoint_inside_the_run_says_to_train_into_another_folder(tmp_path):
    """output_dir=R train.resume=R/checkpoints/step_N (rolling R back) was refused as "an earlier run of a different
    recipe (train.resume: 'auto' -> ...)" with --overwrite as the way out, and with --overwrite refused again
    ("--overwrite would delete R/checkpoints, which holds train.resume"): it says what continuing there would replace
    and the way that works, output_dir=NEW train.resume=R/checkpoints/step_N."""
    out = tmp_path / "run"
    cfg = {"runner": "mote", "output_dir": str(out), "train": {"resume": "auto"}}
    prepare_output_dir(cfg, overwrite=False, main=True)
    older = out / "checkpoints" / "step_00000006"
    for step in (older, out / "checkpoints" / "step_00000012"):
        step.mkdir(parents=True)
        (step / "state.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    rollback = {**cfg, "train": {"resume": str(older)}}
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=(
                rf"^train.resume={re.escape(str(older))} is inside output_dir {re.escape(str(out))}, which holds the run it belongs "
                rf"to: in its own folder a run continues only from its latest checkpoint \(train.resume=auto\), and continuing from "
                rf"another one there would replace the checkpoints, metrics and model saved after it \(--overwrite or not: .*\)\. To "
                rf"continue from that checkpoint, train into another folder: output_dir=NEW train.resume={re.escape(str(older))} ")):
            prepare_output_dir(rollback, overwrite=overwrite, main=True)
    assert (out / "recipe.yaml").read_text() == dump_recipe(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000012"]
    new = {**rollback, "output_dir": str(tmp_path / "new")}  # the way the refusal names
    assert prepare_output_dir(new, overwrite=False, main=True) == tmp_path / "new"


def test_results_neutral_changes_resume_and_are_recorded(tmp_path, caplog):
    """data.num_workers, eval.num_workers, train.log_every, train.tensorboard, train.keep_last,
    train.save_every_steps, train.export_dense, dist_timeout_s: a rerun
    that changes only these keeps the earlier run's outputs (it resumes), with or without --overwrite."""
    out = tmp_path / "run"
    first = {"runner": "mote", "output_dir": str(out), "data": {"num_workers": 8}, "train": {"log_every": 10, "keep_last": 2}}
    prepare_output_dir(first, overwrite=False, main=True)
    (out / "checkpoints").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    changed = {**first, "data": {"num_workers": 0}, "train": {"log_every": 1, "keep_last": 2, "tensorboard": True,
               "save_every_steps": 50, "export_dense": False}, "eval": {"num_workers": 1}, "dist_timeout_s": 600.0}
    with caplog.at_level("INFO", logger="mergekit_video"):
        prepare_output_dir(changed, overwrite=False, main=True)
    assert (out / "recipe.yaml").read_text() == dump_recipe(changed)
    assert ("data.num_workers: 8 -> 0; train.log_every: 10 -> 1; train.tensorboard: (absent) -> True; "
            "train.save_every_steps: (absent) -> 50; train.export_dense: (absent) -> False; eval.num_workers: (absent) -> 1; "
            "dist_timeout_s: (absent) -> 600.0") in caplog.text
    prepare_output_dir({**changed, "data": {"num_workers": 2}}, overwrite=True, main=True)  # --overwrite deletes nothing here
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["checkpoints", "metrics.jsonl", "recipe.yaml"]
    assert "num_workers: 2" in (out / "recipe.yaml").read_text()


def test_a_different_recipe_is_refused_naming_the_changes_and_what_overwrite_deletes(tmp_path):
    out = tmp_path / "run"
    cfg = {"runner": "mote", "output_dir": str(out), "data": {"num_workers": 8}, "schedule": {"epochs": 5}}
    prepare_output_dir(cfg, overwrite=False, main=True)
    for name in ("checkpoints", "model"):
        (out / name).mkdir()
        (out / name / "weights").write_text("w")
    (out / "metrics.jsonl").write_text("{}\n")
    longer = {**cfg, "data": {"num_workers": 0}, "schedule": {"epochs": 6}}
    with pytest.raises(FileExistsError) as info:
        prepare_output_dir(longer, overwrite=False, main=True)
    assert str(info.value) == (
        f"output_dir {out} holds an earlier run of a different recipe (schedule.epochs: 5 -> 6). "  # not the worker count, allowed to change
        "A run resumes only with the same recipe (it may differ in data.num_workers, eval.num_workers, train.log_every, "
        "train.tensorboard, train.keep_last, train.save_every_steps, train.export_dense, dist_timeout_s; until it has results, also in the eval.* keys of the final evaluation but "
        "eval.batch_size, eval.precision, eval.test_offsets). "
        f"To evaluate its model otherwise: mergevid eval {out / 'model'} --list LIST --classes CSV. Or use another output_dir, or pass --overwrite "
        "to DELETE the earlier run's metrics.jsonl, checkpoints/, model/ and train again from step 1"
    )
    assert (out / "recipe.yaml").read_text() == dump_recipe(cfg)
    release_output_dir(out)
    shutil.rmtree(out / "model")  # interrupted before it saved its model: none is offered for evaluation
    with pytest.raises(FileExistsError) as info:
        prepare_output_dir(longer, overwrite=False, main=True)
    assert "It saved no model yet (interrupted: rerun its own recipe.yaml to continue it). Or use another" in str(info.value)
    assert "mergevid eval" not in str(info.value)
    prepare_output_dir(longer, overwrite=True, main=True)
    delete_set_aside(out)  # the runner's setup passed: what --overwrite set aside goes
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["recipe.yaml"]


def test_overwrite_never_deletes_an_input_of_the_run(tmp_path):
    out = tmp_path / "run"
    cfg = {"runner": "mote", "output_dir": str(out), "schedule": {"epochs": 5}}
    prepare_output_dir(cfg, overwrite=False, main=True)
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    evaluate = {"runner": "evaluate", "output_dir": str(out), "checkpoint": str(out / "model")}
    for overwrite in (False, True):  # an evaluation never writes into a training run's folder
        with pytest.raises(FileExistsError, match=r"holds a training run \(model\); an evaluation would replace its recipe.yaml and results.json"):
            prepare_output_dir(evaluate, overwrite=overwrite, main=True)
    assert (out / "recipe.yaml").read_text() == dump_recipe(cfg)
    assert (out / "model" / "config.json").read_text() == "{}"  # untouched
    resume = {**cfg, "schedule": {"epochs": 6}, "train": {"resume": str(out / "model")}}
    with pytest.raises(FileExistsError, match=r"^train.resume=.*/model is inside output_dir .*\(--overwrite or not: it would delete"):
        prepare_output_dir(resume, overwrite=True, main=True)
    assert (out / "model" / "config.json").read_text() == "{}"
    prepare_output_dir({**cfg, "schedule": {"epochs": 6}, "train": {"resume": "auto"}}, overwrite=True, main=True)
    assert not (out / "model").exists()  # no input inside: --overwrite deletes as asked


def test_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("the user's file")
    with pytest.raises(FileExistsError, match=r"^output_dir .*afile is a file, not a folder; set output_dir to a folder"):
        prepare_output_dir(_cfg(tmp_path / "afile"), overwrite=True, main=True)
    assert (tmp_path / "afile").read_text() == "the user's file"


def test_synthetic_data_is_reused_only_with_the_recipe_settings(tmp_path, caplog):
    out = tmp_path / "run"
    syn = {k: (list(v) if k == "size" else v) for k, v in TINY.items()}
    data_cfg = ensure_synthetic_data({"synthetic": syn}, out)
    train_list = out / "data" / "train.txt"
    first = train_list.stat().st_mtime_ns
    assert ensure_synthetic_data({"synthetic": syn}, out) == data_cfg and train_list.stat().st_mtime_ns == first
    more = {**syn, "videos_per_class": 3}
    with pytest.raises(FileExistsError, match="other data.synthetic settings"):
        ensure_synthetic_data({"synthetic": more}, out)
    with caplog.at_level("WARNING", logger="mergekit_video.runners.common"):
        ensure_synthetic_data({"synthetic": more}, out, overwrite=True)
    assert len(train_list.read_text().splitlines()) == 2 * 3
    assert f"--overwrite: rewriting {out / 'data'} with the recipe's data.synthetic settings" in caplog.text  # said, as deletions are


def test_recipe_changes_name_the_list_item_that_changed():
    from mergekit_video.runners.common import recipe_changes

    old = {"eval": {"datasets": [{"name": "ucf", "list": "a.txt"}, {"name": "hmdb", "list": "b.txt"}], "views": [4, 3]}}
    new = {"eval": {"datasets": [{"name": "ucf", "list": "a.txt"}, {"name": "hmdb", "list": "c.txt"}], "views": [4, 3, 1]}}
    assert recipe_changes(old, new) == [("eval.datasets.1.list", "b.txt", "c.txt"), ("eval.views", [4, 3], [4, 3, 1])]


def test_a_run_that_wrote_only_empty_outputs_takes_a_corrected_recipe(tmp_path):
    """A run that crashed at its first step left an empty metrics.jsonl and checkpoints/: no outputs."""
    out = tmp_path / "run"
    prepare_output_dir(_cfg(out, lr=1), overwrite=False, main=True)
    (out / "metrics.jsonl").write_text("")
    (out / "checkpoints").mkdir()
    prepare_output_dir(_cfg(out, lr=2), overwrite=False, main=True)
    assert "lr: 2" in (out / "recipe.yaml").read_text()


def test_final_evaluation_settings_change_on_a_trained_run(tmp_path, caplog):
    """eval.* keys (but eval.batch_size, which validation reads) change only the final evaluation of a mote run."""
    out = tmp_path / "run"
    cfg = {"runner": "mote", "output_dir": str(out), "eval": {"batch_size": 16, "datasets": [{"name": "val", "on_error": "raise"}]}}
    prepare_output_dir(cfg, overwrite=False, main=True)
    (out / "model").mkdir()
    (out / "model" / "head.safetensors").write_text("w")
    skip = {**cfg, "eval": {"batch_size": 16, "datasets": [{"name": "val", "on_error": "skip"}]}}
    with caplog.at_level("INFO", logger="mergekit_video"):
        prepare_output_dir(skip, overwrite=False, main=True)
    assert "eval.datasets.0.on_error: 'raise' -> 'skip'" in caplog.text and "the final evaluation runs with them" in caplog.text
    assert (out / "model" / "head.safetensors").exists() and "on_error: skip" in (out / "recipe.yaml").read_text()
    with pytest.raises(FileExistsError, match=r"eval.batch_size: 16 -> 8"):
        prepare_output_dir({**skip, "eval": {**skip["eval"], "batch_size": 8}}, overwrite=False, main=True)
    # once the run has results, other eval settings would replace them: refused
    (out / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"eval.datasets.0.on_error: 'skip' -> 'raise'"):
        prepare_output_dir(cfg, overwrite=False, main=True)
    assert (out / "results.json").read_text() == "{}"
    # an evaluation runner has nothing to resume: other eval settings are another evaluation
    ev = tmp_path / "eval"
    prepare_output_dir({**cfg, "runner": "evaluate", "output_dir": str(ev)}, overwrite=False, main=True)
    (ev / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds the outputs of a different recipe"):
        prepare_output_dir({**skip, "runner": "evaluate", "output_dir": str(ev)}, overwrite=False, main=True)


def test_eval_paths_taken_from_the_data_keys_follow_data_synthetic(tmp_path):
    """A paper recipe tried on synthetic data: its eval list is ${data.val_list}, resolved before data.synthetic."""
    from mergekit_video.cli.commands import _load_validated
    from mergekit_video.runners.common import follow_synthetic_data, start_run

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mote_vitb16.yaml"
    syn = "data.synthetic={num_classes: 2, videos_per_class: 1, val_per_class: 1, num_novel_classes: 1, frames: 8, size: [32, 32]}"
    cfg = _load_validated(recipe, [f"output_dir={tmp_path / 'run'}", syn])
    assert cfg["eval"]["datasets"][0]["list"] == cfg["data"]["val_list"] != str(tmp_path / "run" / "data" / "val.txt")
    ctx = start_run(cfg, overwrite=False)  # the paths check passes: nothing points at the absent dataset
    ds = cfg["eval"]["datasets"][0]
    assert (ds["list"], ds["class_csv"]) == (ctx.data_cfg["val_list"], ctx.data_cfg["class_csv"]) == (
        str(tmp_path / "run" / "data" / "val.txt"), str(tmp_path / "run" / "data" / "classes.csv"))
    # paths of their own are left alone
    own = {"datasets": [{"name": "ucf", "root": "/ucf", "splits": [{"list": "/ucf/1.txt"}, {"list": "/k/val.txt"}]}]}
    moved = follow_synthetic_data(own, {"root": "/k", "val_list": "/k/val.txt"}, {"root": "/syn", "val_list": "/syn/val.txt"})
    assert moved["datasets"][0]["root"] == "/ucf" and [s["list"] for s in moved["datasets"][0]["splits"]] == ["/ucf/1.txt", "/syn/val.txt"]


def test_one_run_per_output_dir_at_a_time(tmp_path):
    """A second process is refused while the first holds the folder; a killed holder leaves no stale lock."""
    from mergekit_video.runners.common import release_output_dir

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from mergekit_video.runners.common import lock_output_dir
            lock_output_dir(Path({str(out)!r}))
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match=rf"^output_dir {out} is in use by another run \(pid {holder.pid}\); wait for it"):
            prepare_output_dir(_cfg(out), overwrite=True, main=True)
        assert not (out / "recipe.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    prepare_output_dir(_cfg(out), overwrite=False, main=True)  # the kernel released the dead holder's lock
    prepare_output_dir(_cfg(out), overwrite=False, main=True)  # this process holds it already: fine
    # a forked child that outlives the release (a lingering loader worker) does not keep the folder locked
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only sleeps
        time.sleep(5)
        os._exit(0)
    try:
        release_output_dir(out)
        probe = subprocess.run(
            [sys.executable, "-c", f"from pathlib import Path; from mergekit_video.runners.common import lock_output_dir; lock_output_dir(Path({str(out)!r}))"],
            capture_output=True, text=True,
        )
        assert probe.returncode == 0, probe.stderr
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    assert (out / "recipe.yaml").exists()


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from mergekit_video.runners.common import release_output_dir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    prepare_output_dir(_cfg(tmp_path / "run"), overwrite=False, main=True)
    assert "cannot be locked (" in caplog.text and "No locks available" in caplog.text
    release_output_dir(tmp_path / "run")


def test_a_lock_file_of_another_user_locks_read_only(tmp_path, monkeypatch):
    """In a shared folder the lock file may belong to someone else (0644): flock needs only a read-only descriptor."""
    import fcntl

    from mergekit_video.runners.common import LOCK_FILE, lock_output_dir, release_output_dir

    out = tmp_path / "shared"
    out.mkdir()
    (out / LOCK_FILE).write_text("4242\n")  # left by another user's earlier run
    real_open, opened = os.open, []

    def open_as_another_user(path, flags, *args):
        if str(path).endswith(LOCK_FILE) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        opened.append(flags)
        return real_open(path, flags, *args)

    locked = []
    real_flock = fcntl.flock
    monkeypatch.setattr(os, "open", open_as_another_user)
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (locked.append(op), real_flock(fd, op)))
    lock_output_dir(out)
    assert opened == [os.O_RDONLY] and locked == [fcntl.LOCK_EX | fcntl.LOCK_NB]
    assert (out / LOCK_FILE).read_text() == "4242\n"  # not ours to write
    release_output_dir(out)
    monkeypatch.setattr(os, "open", lambda path, flags, *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(PermissionError, match=rf"^output_dir {out}: cannot open its lock file {out / LOCK_FILE} \(Permission denied\)$"):
        lock_output_dir(out)


def test_a_setting_added_later_at_its_default_does_not_stop_a_resume(tmp_path):
    """A run saved before eval.test_offsets existed: the key is absent there, 'centre' (its default,
    what the earlier code did) here; another value is a change."""
    from mergekit_video.config import MISSING, schema_default
    from mergekit_video.runners.schema import MOTE_SCHEMA

    assert schema_default(MOTE_SCHEMA, "eval.test_offsets") == "centre"
    assert schema_default(MOTE_SCHEMA, "eval.datasets.0.on_error") == "raise"
    assert schema_default(MOTE_SCHEMA, "eval.nope") is MISSING
    out = tmp_path / "run"
    earlier = {"runner": "mote", "output_dir": str(out), "eval": {"batch_size": 8}}
    prepare_output_dir(earlier, overwrite=False, main=True)
    (out / "metrics.jsonl").write_text("{}\n")
    prepare_output_dir({**earlier, "eval": {"batch_size": 8, "test_offsets": "centre"}}, overwrite=False, main=True)
    with pytest.raises(FileExistsError, match=r"eval.test_offsets: 'centre' -> 'start'"):
        prepare_output_dir({**earlier, "eval": {"batch_size": 8, "test_offsets": "start"}}, overwrite=False, main=True)
    # a section the earlier recipe lacks altogether switches something on, defaults or not
    assert schema_default(MOTE_SCHEMA, "data.synthetic.num_classes") == 6
    with pytest.raises(FileExistsError, match=r"data.synthetic.num_classes: \(absent\) -> 6"):
        prepare_output_dir({**earlier, "eval": {"batch_size": 8, "test_offsets": "centre"}, "data": {"synthetic": {"num_classes": 6}}},
                           overwrite=False, main=True)


def test_resume_values_that_start_fresh_are_never_turned_into_auto():
    from mergekit_video.runners.mote import MoTERunner
    from mergekit_video.training.checkpoint import resume_kind

    assert [resume_kind(v) for v in (None, False, "", " None ", "null", "never", "false", "auto", "AUTO", "runs/x")] == [
        "fresh", "fresh", "fresh", "fresh", "fresh", "fresh", "fresh", "auto", "auto", "path"]

    class Own:  # a run that has checkpoints of its own
        directory = "/runs/this/checkpoints"

        def checkpoints(self):
            return [type("P", (), {"name": "step_00000006"})()]

    runner = MoTERunner.__new__(MoTERunner)
    runner.checkpoints, runner.main = Own(), False
    assert [runner._own_checkpoints_first(v) for v in ("none", "never", "", None, "auto")] == ["none", "never", "", None, "auto"]
    assert runner._own_checkpoints_first("/runs/other/checkpoints/step_00000003") == "auto"
    assert runner._own_checkpoints_first("/runs/this/checkpoints/step_00000002") == "/runs/this/checkpoints/step_00000002"


def test_a_recipe_yaml_no_run_wrote_is_never_replaced(tmp_path):
    """A hand-written (or damaged) recipe.yaml in output_dir is not an earlier run's record: refused, --overwrite or not."""
    out = tmp_path / "run"
    prepare_output_dir(_cfg(out), overwrite=False, main=True)
    (out / "metrics.jsonl").write_text("{}\n")
    for text, said in (("train: [unclosed\n", "a recipe.yaml that is not valid YAML (damaged, or not a run's)"),
                       ("# my experiment\nrunner: mote\noutput_dir: run\n", "a recipe.yaml that no run wrote (a hand-written recipe?)")):
        (out / "recipe.yaml").write_text(text)
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match=re.escape(f"output_dir {out} holds {said}; a run records its resolved recipe there")):
                prepare_output_dir(_cfg(out), overwrite=overwrite, main=True)
            assert (out / "recipe.yaml").read_text() == text and (out / "metrics.jsonl").exists()


def _ran(out, cfg):
    """prepare_output_dir(cfg) and leave the outputs of a run there."""
    prepare_output_dir(cfg, overwrite=False, main=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "step_1").write_text("ckpt")
    (out / "metrics.jsonl").write_text("{}\n")


def test_the_same_run_written_otherwise_or_moved_resumes(tmp_path, monkeypatch):
    """output_dir as `run`, `/abs/run/`, `//abs/run`, or a copy of the folder: paths inside output_dir
    compare relative to it, so the rerun resumes; a genuine change is still refused."""
    import shutil

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"

    def recipe(o, lr=1):
        return {"runner": "mote", "output_dir": str(o), "text": {"cache_dir": f"{o}/cache"},
                "data": {"lists": [f"{o}/data/train.csv", "/elsewhere/val.csv"]}, "train": {"lr": lr}}

    _ran(out, recipe(out))
    for written in ("run", f"{out}/", f"/{out}", "./run/"):
        prepare_output_dir(recipe(written), overwrite=False, main=True)
        release_output_dir(written)
        assert (out / "checkpoints" / "step_1").exists()
    shutil.copytree(out, tmp_path / "copy", ignore=shutil.ignore_patterns(LOCK_FILE))
    prepare_output_dir(recipe(tmp_path / "copy"), overwrite=False, main=True)
    assert "copy/cache" in (tmp_path / "copy" / "recipe.yaml").read_text()
    with pytest.raises(FileExistsError, match=r"different recipe \(train.lr: 1 -> 2\)"):
        prepare_output_dir(recipe("run", lr=2), overwrite=False, main=True)
    moved = recipe("run")
    moved["data"]["lists"][1] = f"{out}/other.csv"  # a path outside output_dir that changed, or one moved into it
    with pytest.raises(FileExistsError, match=r"different recipe \(data.lists.1: '/elsewhere/val.csv' -> '/"):
        prepare_output_dir(moved, overwrite=False, main=True)


def test_tilde_in_output_dir_is_expanded(tmp_path, monkeypatch):
    """`output_dir: ~/r` writes under the home folder (where the path checks look), not into `./~/r`."""
    from mergekit_video.config import load_recipe
    from mergekit_video.config.schema import expand_user_paths
    from mergekit_video.runners.schema import SCHEMAS

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (cwd / "r.yaml").write_text("runner: mote\noutput_dir: ~/x\ntext:\n  cache_dir: ${output_dir}/cache\n")
    cfg = load_recipe(cwd / "r.yaml", ["output_dir=~/r"])
    assert cfg["output_dir"] == f"{home}/r" and cfg["text"]["cache_dir"] == f"{home}/r/cache"
    # .. is folded before interpolation too: ${output_dir}/... names the folder the run writes into
    cfg = load_recipe(cwd / "r.yaml", ["output_dir=runs/missing/../r/"])
    assert cfg["output_dir"] == "runs/r" and cfg["text"]["cache_dir"] == "runs/r/cache"
    # a .. after an interpolation belongs to the interpolated path: not folded away with it
    (cwd / "i.yaml").write_text("runner: mote\ndata:\n  root: /d/k400/videos\noutput_dir: ${data.root}/../runs\n")
    assert load_recipe(cwd / "i.yaml")["output_dir"] == "/d/k400/videos/../runs"
    cfg = {"runner": "mote", "output_dir": "~/r", "data": {"train_list": "~/lists/train.csv"}}
    expand_user_paths(cfg, SCHEMAS["mote"])
    assert cfg["output_dir"] == f"{home}/r" and cfg["data"]["train_list"] == f"{home}/lists/train.csv"
    assert prepare_output_dir({"runner": "mote", "output_dir": "~/q"}, overwrite=False, main=True) == home / "q"
    assert (home / "q" / "recipe.yaml").is_file() and not (cwd / "~").exists()


@pytest.mark.parametrize("runner_name, phase, resume, said", [
    ("mote", "evaluate", "auto", "stopped during the final evaluation; the trained model is saved in {out}/model: rerun the same command to evaluate it"),
    ("evaluate", "evaluate", "auto", "stopped during the evaluation; no results.json was written: rerun the same command to evaluate again"),
    ("mote", "train", "auto", "stopped at once (a second signal, or outside a training step); the checkpoints in {out}/checkpoints "
                              "are kept: rerun the same command to resume from the last one"),
    ("mote", "train", None, "stopped at once (a second signal, or outside a training step); the checkpoints in {out}/checkpoints "
                            "are kept: rerun the same command with train.resume=auto to resume"),
    ("mote", "setup-then-train", "auto", "stopped at once (a second signal, or outside a training step), before the first checkpoint"),
])
def test_a_bare_interrupt_says_what_was_kept_and_how_to_go_on(tmp_path, monkeypatch, runner_name, phase, resume, said):
    # a second Ctrl-C (or one during the final evaluation) used to end with a bare "Interrupted."
    from mergekit_video import runners

    out = tmp_path / "run"
    out.mkdir()
    if phase == "train":
        (out / "checkpoints" / "step_00000004").mkdir(parents=True)
    phase = phase.replace("setup-then-", "")

    class Stops:
        main = True

        def setup(self): pass
        def save(self): pass
        def cleanup(self): pass

        def train(self):
            if phase == "train":
                raise KeyboardInterrupt

        def evaluate(self):
            if phase == "evaluate":
                raise KeyboardInterrupt

    monkeypatch.setattr(runners, "build_runner", lambda cfg, **kw: Stops())
    with pytest.raises(KeyboardInterrupt) as info:
        runners.run_recipe({"runner": runner_name, "output_dir": str(out), "train": {"resume": resume}})
    assert str(info.value).startswith(said.format(out=out))
    assert out.is_dir()  # the user's folder stays


def test_synthetic_data_never_replaces_files_it_did_not_write(tmp_path):
    """output_dir/data holding someone's dataset (or a link to one) is refused, --overwrite or not."""
    syn = {k: (list(v) if k == "size" else v) for k, v in TINY.items()}
    users = tmp_path / "userdata"
    (users / "videos").mkdir(parents=True)
    (users / "videos" / "mine.mp4").write_bytes(b"user video")
    (users / "train.txt").write_text("videos/mine.mp4 0\n")
    for name, make in (("linked", lambda d: d.symlink_to(users, target_is_directory=True)),
                       ("copied", lambda d: __import__("shutil").copytree(users, d))):
        out = tmp_path / name
        out.mkdir()
        make(out / "data")
        for overwrite in (False, True):
            with pytest.raises(FileExistsError) as err:
                ensure_synthetic_data({"synthetic": syn}, out, overwrite=overwrite)
            said = str(err.value)
            assert ("is a symbolic link" in said) if name == "linked" else ("holds train.txt, videos, which data.synthetic did not write" in said)
        assert (users / "videos" / "mine.mp4").read_bytes() == b"user video" and (out / "data" / "videos" / "mine.mp4").exists()
    # files of other names beside are no obstacle (and stay)
    out = tmp_path / "notes"
    (out / "data").mkdir(parents=True)
    (out / "data" / "README").write_text("mine")
    ensure_synthetic_data({"synthetic": syn}, out)
    assert (out / "data" / "README").read_text() == "mine" and (out / "data" / "train.txt").exists()


def test_a_run_that_cannot_start_removes_only_a_folder_it_created(tmp_path, capsys):
    """`exp/../exp2` with `exp` missing names exp2 (an earlier run's folder): a failed start leaves it whole."""
    from mergekit_video.cli.main import main as cli_main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    earlier = tmp_path / "exp2"
    earlier.mkdir()
    (earlier / "NOTES.txt").write_text("mine")
    bad = ["data.synthetic=null", f"data.root={tmp_path}", f"data.train_list={tmp_path / 'missing.txt'}", "data.val_list=null",
           f"data.class_csv={tmp_path / 'missing.csv'}", "eval.datasets=[]"]
    assert cli_main(["run", str(recipe), f"output_dir={tmp_path / 'exp' / '..' / 'exp2'}", *bad, "--overwrite"]) == 1
    assert "file not found" in capsys.readouterr().err
    assert (earlier / "NOTES.txt").read_text() == "mine" and not (tmp_path / "exp").exists()
    assert cli_main(["run", str(recipe), f"output_dir={tmp_path / 'new'}", *bad]) == 1
    assert not (tmp_path / "new").exists()  # the folder this run made goes again
    # a recipe dict given in Python (no folding): exp/../exp2 with exp missing is still not "made by this run"
    from mergekit_video.runners.common import output_dir_state, prepare_output_dir, release_output_dir

    unfolded = tmp_path / "exp" / ".." / "exp2"
    prepare_output_dir({"runner": "mote", "output_dir": str(unfolded), "train": {}}, overwrite=True, main=True)
    assert output_dir_state(unfolded) == (True, False)
    release_output_dir(unfolded)
    # a folder this process made and still holds (a notebook start never cleaned up): a later start made nothing
    fresh = {"runner": "mote", "output_dir": str(tmp_path / "nb"), "train": {}}
    prepare_output_dir(fresh, overwrite=False, main=True)
    assert output_dir_state(tmp_path / "nb") == (True, True)
    prepare_output_dir(fresh, overwrite=False, main=True)
    assert output_dir_state(tmp_path / "nb") == (True, False)
    release_output_dir(tmp_path / "nb")


def test_where_no_lock_can_be_taken_a_failed_start_still_removes_the_folder_it_made(tmp_path, monkeypatch, capsys):
    """Windows (no fcntl) or a file system without locks: the run is unlocked, but its start is undone as before."""
    import builtins

    from mergekit_video.cli.main import main as cli_main

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "fcntl"
                        else real_import(name, *a, **k))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    bad = ["data.synthetic=null", f"data.root={tmp_path}", f"data.train_list={tmp_path / 'missing.txt'}", "data.val_list=null",
           f"data.class_csv={tmp_path / 'missing.csv'}", "eval.datasets=[]"]
    assert cli_main(["run", str(recipe), f"output_dir={tmp_path / 'new'}", *bad]) == 1
    assert "file not found" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_run_refused_by_another_runs_lock_undoes_nothing(tmp_path, capsys, monkeypatch):
    """Two runs started together: the one that looked first but lost the lock leaves the winner's recipe.yaml,
    lock file and folder alone (it used to take them for its own start and remove them)."""
    import mergekit_video.runners as runners
    from mergekit_video.cli.main import main as cli_main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    out = tmp_path / "run"
    started = []
    build = runners.build_runner

    def winner_starts_meanwhile(*args, **kwargs):  # after this run saw no folder, before it takes the lock
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import time
                from mergekit_video.runners.common import prepare_output_dir
                prepare_output_dir({{"runner": "mote", "output_dir": {str(out)!r}, "train": {{}}}}, overwrite=False, main=True)
                print("locked", flush=True)
                time.sleep(60)
            """)],
            stdout=subprocess.PIPE, text=True,
        )
        started.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return build(*args, **kwargs)

    monkeypatch.setattr(runners, "build_runner", winner_starts_meanwhile)
    try:
        assert cli_main(["run", str(recipe), f"output_dir={out}"]) == 1
        assert "is in use by another run" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "recipe.yaml"]
    finally:
        for holder in started:
            holder.kill()
            holder.wait()


def test_describe_change_shows_where_long_paths_differ():
    from mergekit_video.runners.common import describe_change

    a, b = "/tmp/someone/mydata/annotations/zs_labels.csv", "/tmp/someone/mydata/annotations/zs_labels_v2.csv"
    assert describe_change("eval.datasets.0.class_csv", a, b) == (
        "eval.datasets.0.class_csv: '.../annotations/zs_labels.csv' -> '.../annotations/zs_labels_v2.csv'"
    )
    assert describe_change("data.val_list", "/d/a.txt", "/d/b.txt") == "data.val_list: '/d/a.txt' -> '/d/b.txt'"
    # the difference late in a long file name: shown from near it
    long_a, long_b = "/data/k400/lists/kinetics400_train_list_videos_full.txt", "/data/k400/lists/kinetics400_train_list_videos_full_fixed.txt"
    assert describe_change("data.train_list", long_a, long_b) == "data.train_list: '..._videos_full.txt' -> '..._videos_full_fixed.txt'"
    assert describe_change("schedule.epochs", 5, 6) == "schedule.epochs: 5 -> 6"


def test_describe_change_of_lists_and_mappings_shows_the_entry_that_differs():
    """Lists of paths were cut to their first 37 characters, so both sides of the refusal printed alike."""
    from mergekit_video.runners.common import describe_change

    novel, val = {"list": "/tmp/someone/run/data/novel.txt"}, {"list": "/tmp/someone/run/data/val.txt", "class_csv": "/c.csv"}
    assert describe_change("eval.datasets.0.splits", [novel, val], [novel]) == (
        "eval.datasets.0.splits: 2 entries -> 1 (eval.datasets.0.splits.1: {'list': '/tmp/someone/run/data/val.t... -> (absent))"
    )
    a = [{"name": "k", "list": "/tmp/someone/mydata/annotations/zs_labels.csv"}]
    b = [{"name": "k", "list": "/tmp/someone/mydata/annotations/zs_labels_v2.csv"}]
    assert describe_change("eval.datasets", a, b) == (
        "eval.datasets.0.list: '.../annotations/zs_labels.csv' -> '.../annotations/zs_labels_v2.csv'"
    )
    assert describe_change("model.router_kwargs", {"temperature": 1.0}, {"temperature": 1.0, "seed": 3}) == "model.router_kwargs.seed: (absent) -> 3"


def test_eval_workers_default_to_the_data_workers():
    from mergekit_video.runners.common import eval_num_workers

    assert eval_num_workers({"num_workers": 3}, {"num_workers": 1}) == 3  # set: used as given
    assert eval_num_workers({"num_workers": None}, {"num_workers": 2}) == 2  # unset: the training loader's count
    assert eval_num_workers({}, None) == min(4, os.cpu_count() or 1)


def test_a_recipe_without_eval_datasets_says_the_final_evaluation_is_skipped(tmp_path):
    from rich.console import Console

    from mergekit_video.runners.common import run_eval_suite

    console = Console(record=True, width=300)
    assert run_eval_suite(object(), cfg={"eval": {"datasets": []}}, data_cfg={}, device=None, dist=None,
                          output_dir=tmp_path, console=console) == {}
    assert f"no eval.datasets in the recipe: no final evaluation; evaluate the saved model with mergevid eval {tmp_path / 'model'}" in console.export_text()


def _process_group_arguments(monkeypatch, recipes: list[dict]) -> list[dict]:
    """The keyword arguments start_run gives init_distributed for each recipe (stopped right there)."""
    from mergekit_video.runners.common import start_run
    from mergekit_video.training import distributed

    asked = []

    def stop(**kwargs):
        asked.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(distributed, "init_distributed", stop)
    for cfg in recipes:
        with pytest.raises(RuntimeError, match="stop here"):
            start_run({"runner": "mote", "output_dir": "unused", **cfg}, overwrite=False)
    return asked


def test_device_cpu_joins_the_process_group_with_gloo(monkeypatch):
    """On a CUDA machine init_distributed picked NCCL even for device: cpu, whose CPU tensors NCCL cannot reduce."""
    asked = _process_group_arguments(monkeypatch, [{"device": device} for device in ("cpu", "auto", "cuda")])
    assert [a["backend"] for a in asked] == ["gloo", None, None]


def test_dist_timeout_s_reaches_the_process_group(monkeypatch):
    """A stalled rank held the others for torch's fixed 1800 s: the recipe had no key for the collective timeout."""
    asked = _process_group_arguments(monkeypatch, [{}, {"dist_timeout_s": 600}])
    assert [a["timeout_s"] for a in asked] == [1800.0, 600.0]


def test_overwrite_never_deletes_a_file_the_new_run_reads(tmp_path):
    """--overwrite deletes an earlier, different run's outputs: any path the recipe reads inside them (not only
    checkpoint, train.resume and model.pretrained) is refused first, naming the key; nothing is deleted."""
    out = tmp_path / "run"
    prepare_output_dir(_cfg(out, lr=1), overwrite=False, main=True)
    (out / "model").mkdir()
    (out / "model" / "clip.safetensors").write_text("weights")
    (out / "metrics.jsonl").write_text("{}\n")
    release_output_dir(out)
    weights = str(out / "model" / "clip.safetensors")
    for extra, key in (({"eval": {"clip_blend": 0.99, "clip_blend_weights": weights}}, "eval.clip_blend_weights"),
                       ({"model": {"pretrained": weights}}, "model.pretrained"),
                       ({"data": {"train_list": weights}}, "data.train_list")):
        cfg = {**_cfg(out, lr=2), **extra}
        with pytest.raises(FileExistsError, match=rf"^--overwrite would delete {re.escape(str(out / 'model'))}, which holds "
                                                  rf"{re.escape(key)}={re.escape(weights)}, an input of this run; choose another output_dir$"):
            prepare_output_dir(cfg, overwrite=True, main=True)
        release_output_dir(out)
        assert (out / "model" / "clip.safetensors").read_text() == "weights" and (out / "metrics.jsonl").exists()


def test_a_failed_evaluations_partial_results_do_not_make_a_corrected_rerun_another_run(tmp_path):
    """results.partial.json (the datasets done before a failure) is replaced by the next evaluation: a rerun with a
    corrected recipe was refused as "a different recipe", whose advice, --overwrite, deleted those results."""
    out = tmp_path / "ev"
    first = {"runner": "evaluate", "output_dir": str(out), "checkpoint": "/m", "eval": {"datasets": [{"name": "x", "list": "/a.txt"}]}}
    prepare_output_dir(first, overwrite=False, main=True)
    release_output_dir(out)
    (out / "results.partial.json").write_text("{}")
    prepare_output_dir({**first, "eval": {"datasets": [{"name": "x", "list": "/b.txt"}]}}, overwrite=False, main=True)
    release_output_dir(out)
    assert "/b.txt" in (out / "recipe.yaml").read_text()


def test_overwrite_sets_the_earlier_run_aside_until_the_new_one_has_started(tmp_path, caplog):
    """Defect: --overwrite deleted the earlier run's outputs before the runner's setup, whose checks (the eval lists'
    labels, the frame size a checkpoint's tower takes) then refused the new recipe: the earlier run was lost to a typo. The
    outputs are set aside now, put back (with the earlier recipe.yaml) when the start fails, deleted once it passed; an
    --overwrite run killed before it started is put back by the next run."""
    from mergekit_video.cli.main import main as cli_main

    QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    out = tmp_path / "run"
    tiny = [f"output_dir={out}", "data.synthetic.videos_per_class=2", "data.synthetic.val_per_class=1", "data.synthetic.frames=8",
            "data.synthetic.num_novel_classes=0", "eval.datasets=[]", "~eval.summary", "schedule.epochs=1", "device=cpu",
            "data.batch_size=6", "data.num_workers=0", "train.export_dense=false"]
    assert cli_main(["run", str(QUICKSTART), *tiny]) == 0
    recipe, metrics = (out / "recipe.yaml").read_text(), (out / "metrics.jsonl").read_bytes()
    weights = (out / "model" / "head.safetensors").read_bytes()
    # a start that fails in the runner's setup (after the model is built: an eval list whose labels go past its
    # class CSV, which only --check-paths reads before): everything as it was
    one = tmp_path / "one_class.csv"
    one.write_text("id,name\n0,a\n")
    mismatched = f"eval.datasets=[{{name: v, kind: close_set, list: '${{output_dir}}/data/val.txt', class_csv: {one}}}]"
    assert cli_main(["run", str(QUICKSTART), *tiny, "optimizer.lr=2e-3", mismatched, "--overwrite"]) == 1
    assert (out / "recipe.yaml").read_text() == recipe and (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "model" / "head.safetensors").read_bytes() == weights and not (out / OVERWRITTEN_DIR).exists()
    assert "the run did not start; the earlier outputs in" in caplog.text
    # killed after setting aside, before the start finished: the next run puts them back first
    (out / OVERWRITTEN_DIR).mkdir()
    os.replace(out / "model", out / OVERWRITTEN_DIR / "model")
    (out / OVERWRITTEN_DIR / "recipe.yaml").write_text(recipe)
    (out / "recipe.yaml").write_text(recipe.replace("lr: 0.001", "lr: 0.002"))
    assert cli_main(["run", str(QUICKSTART), *tiny]) == 0  # the same recipe: finished, nothing to train
    assert (out / "recipe.yaml").read_text() == recipe and (out / "model" / "head.safetensors").read_bytes() == weights
    # a start that passes: the earlier outputs are deleted, the new run trains from step 1
    caplog.clear()
    assert cli_main(["run", str(QUICKSTART), *tiny, "optimizer.lr=2e-3", "--overwrite"]) == 0
    assert "--overwrite: deleted the earlier outputs in" in caplog.text and not (out / OVERWRITTEN_DIR).exists()
    assert "lr: 0.002" in (out / "recipe.yaml").read_text() and (out / "model" / "head.safetensors").read_bytes() != weights


def test_an_evaluation_never_writes_into_the_checkpoint_it_reads_nor_beside_its_lists(tmp_path):
    """mergevid eval MODEL --output-dir MODEL --overwrite wrote recipe.yaml and results.json into the saved model's
    folder (and set aside a results.json there); so did an output_dir that is the folder of the lists."""
    model, lists, videos = tmp_path / "m" / "saved", tmp_path / "lists", tmp_path / "videos"  # (a run's model/: "holds a training run")
    for folder in (model, lists, videos):
        folder.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (lists / "v.txt").write_text("a.mp4 0\n")
    (lists / "c.csv").write_text("id,name\n0,a\n")
    (lists / "results.json").write_text("the user's")
    dataset = {"name": "v", "root": str(videos), "list": str(lists / "v.txt"), "class_csv": str(lists / "c.csv")}
    advice = "evaluate into another folder (output_dir=DIR; for a model folder, mergevid eval --output-dir DIR)"
    for out, said in ((model, f"is the checkpoint {model}"), (model.parent, f"holds the checkpoint {model}"),
                      (model / "sub", f"lies inside the checkpoint {model}"),
                      (lists, f"is the folder of eval.datasets.0.list={lists / 'v.txt'}, an input of this evaluation"),
                      (videos, f"is eval.datasets.0.root={videos}, a folder this evaluation reads")):
        for runner in ("evaluate", "compare"):
            cfg = {"runner": runner, "output_dir": str(out), "checkpoint": str(model), "eval": {"datasets": [dataset]}}
            for overwrite in (False, True):
                with pytest.raises(FileExistsError) as refused:
                    prepare_output_dir(cfg, overwrite=overwrite, main=True)
                msg = str(refused.value)
                assert msg.startswith(f"output_dir {out} {said}"), msg
                assert msg.endswith(f"; it would write its recipe.yaml and results.json there: {advice}") and "--overwrite" not in msg
    # nothing was written, set aside or created in any of them
    assert sorted(p.name for p in model.parent.iterdir()) == ["saved"] and sorted(p.name for p in model.iterdir()) == ["config.json"]
    assert sorted(p.name for p in lists.iterdir()) == ["c.csv", "results.json", "v.txt"] and (lists / "results.json").read_text() == "the user's"
    assert not any(videos.iterdir())
    # a folder of its own is fine (beside the model, or holding the lists' folder)
    for out in (tmp_path / "m" / "eval", tmp_path / "ev"):
        prepare_output_dir({"runner": "evaluate", "output_dir": str(out), "checkpoint": str(model), "eval": {"datasets": [dataset]}},
                           overwrite=False, main=True)
        release_output_dir(out)
        assert (out / "recipe.yaml").is_file()


def test_a_training_run_into_a_finished_evaluations_folder_says_it_holds_an_evaluation(tmp_path):
    """It said "It saved no model yet (interrupted: rerun its own recipe.yaml to continue it)" of an evaluation's results."""
    out = tmp_path / "ev"
    for runner in ("evaluate", "compare"):
        if out.exists():
            shutil.rmtree(out)
        prepare_output_dir({"runner": runner, "output_dir": str(out), "checkpoint": str(tmp_path / "gone")}, overwrite=False, main=True)
        release_output_dir(out)
        (out / "results.json").write_text("{}")
        with pytest.raises(FileExistsError) as refused:
            prepare_output_dir(_cfg(out), overwrite=False, main=True)
        assert str(refused.value) == (
            f"output_dir {out} holds the results of an evaluation (its recipe.yaml: runner '{runner}'), not a training run. "
            "Use another output_dir, or pass --overwrite to DELETE its results.json and train into it")
        assert (out / "results.json").read_text() == "{}"
    prepare_output_dir(_cfg(out), overwrite=True, main=True)
    delete_set_aside(out)
    release_output_dir(out)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["recipe.yaml"]
