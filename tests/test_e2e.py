"""End to end: the quickstart through the CLI, exact resume, DDP with 2 processes, evaluators, benchmarks.

Everything runs offline on the CPU with the tiny random-weight CLIP and small synthetic mp4 sets.
One short quickstart run (module fixture) is shared by the output / eval / overwrite tests; the
in-process training runs share one synthetic dataset.
"""

from __future__ import annotations

import contextlib
import copy
import io
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from mergekit_video.cli.commands import _load_validated
from mergekit_video.cli.main import main as cli_main
from mergekit_video.config import dump_recipe
from mergekit_video.evaluation.evaluator import EvalResult, Variant, VariantResult, build_variants, evaluate
from mergekit_video.evaluation.report import results_table, summarize
from mergekit_video.runners.common import LOCK_FILE
from mergekit_video.training.metrics import read_metrics
from mergekit_video.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

#: the quickstart's dataset, made small: 6 classes × 4 training videos, 2 val / novel videos per class, 16 frames at 32 px
SMALL_DATA = dict(num_classes=6, videos_per_class=4, val_per_class=2, num_novel_classes=4, frames=16, size=(32, 32), seed=0)
SMALL_DATA_OVERRIDES = [
    "data.synthetic.videos_per_class=4", "data.synthetic.val_per_class=2", "data.synthetic.frames=16", "data.synthetic.size=[32,32]",
]
#: 24 training videos, batch 6 → 4 optimizer steps per epoch (2 with accumulation 2 ... per 4 micro-batches)
TRAIN_OVERRIDES = [
    *SMALL_DATA_OVERRIDES, "data.batch_size=6", "schedule.epochs=2", "schedule.warmup_epochs=1", "train.log_every=1", "train.save_every_steps=3",
    "train.keep_last=5", "train.export_dense=false", "eval.num_workers=0", "eval.datasets=[]", "~eval.summary",
]
STEPS = 8  # 2 epochs × 4 steps


def _mergevid_cmd() -> list[str]:
    script = Path(sys.executable).parent / "mergevid"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mergekit_video"]


def _load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {f"clip.{k}": v for k, v in load_file(str(model_dir / "clip.safetensors")).items()}
    out.update({f"head.{k}": v for k, v in load_file(str(model_dir / "head.safetensors")).items()})
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel())


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _val_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/top1" in r]


# ---------------------------------------------------------------------------------------------
# shared data and runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    from mergekit_video.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic_dataset(root, **SMALL_DATA)
    return root


def _new_run_dir(path: Path, data: Path) -> Path:
    path.mkdir(parents=True)
    (path / "data").symlink_to(data, target_is_directory=True)  # the runner finds data/train.txt and writes nothing
    return path


def _run_in_process(out: Path, overrides: list[str], console: object = None) -> object:
    """``mergevid run recipes/quickstart.yaml output_dir=out ...`` in this process; returns the runner."""
    from mergekit_video.runners import run_recipe

    cfg = _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, *overrides])
    runner = run_recipe(cfg, console=console)
    return runner


@pytest.fixture(scope="module")
def reference_runs(synthetic_data, tmp_path_factory):
    """Uninterrupted runs, one per (num_workers, grad_accumulation), made on first use."""
    runs: dict[tuple[int, int], Path] = {}

    def get(workers: int, accum: int) -> Path:
        if (workers, accum) not in runs:
            out = _new_run_dir(tmp_path_factory.mktemp("reference") / "run", synthetic_data)
            _run_in_process(out, [f"data.num_workers={workers}", f"train.grad_accumulation={accum}"])
            runs[workers, accum] = out
        return runs[workers, accum]

    return get


QUICK_OVERRIDES = [*SMALL_DATA_OVERRIDES, "data.batch_size=6", "schedule.epochs=5", "schedule.warmup_epochs=1", "train.log_every=1", "train.keep_last=2"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A short quickstart through the real command line (writes its own synthetic data)."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    res = subprocess.run(
        [*_mergevid_cmd(), "run", str(QUICKSTART), f"output_dir={out}", *QUICK_OVERRIDES],
        capture_output=True, text=True, timeout=600, cwd=tmp_path_factory.getbasetemp(),
    )
    assert res.returncode == 0, f"quickstart failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return out, res


# ---------------------------------------------------------------------------------------------
# the quickstart through the CLI
# ---------------------------------------------------------------------------------------------
VARIANTS = ["merged", "temperature_softmax(tau=0.6)", "temperature_softmax(tau=-0.6)", "ensemble",
            "expert_0", "expert_1", "expert_2", "expert_3", "logit_ensemble"]


def test_quickstart_writes_everything_under_output_dir(quick_run):
    out, res = quick_run
    for name in ("recipe.yaml", "metrics.jsonl", "results.json", "tradeoff.png", "data/train.txt", "data/val.txt", "data/novel.txt"):
        assert (out / name).is_file(), name
    for name in ("checkpoints", "model", "model_dense", "cache"):
        assert (out / name).is_dir(), name
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved recipe is the resolved, validated one
    saved = _load_validated(out / "recipe.yaml", [])
    assert saved == _load_validated(QUICKSTART, [f"output_dir={out}", *QUICK_OVERRIDES])
    # the runner wrote the synthetic set it was asked for: 6 × 4 train, 6 × 2 val, 4 × 2 novel
    assert [len((out / "data" / f).read_text().splitlines()) for f in ("train.txt", "val.txt", "novel.txt")] == [24, 12, 8]
    # checkpoints at every epoch end (steps 4, 8, ..., 20): the last k=2 kept; the best (validated
    # at the last epoch only: eval_every_epochs=10) is the last one
    from mergekit_video.training.checkpoint import CheckpointManager

    manager = CheckpointManager(directory=out / "checkpoints", best_metric="top1")
    assert [p.name for p in manager.checkpoints()] == ["step_00000016", "step_00000020"]
    assert manager.latest().name == "step_00000020" and manager.best().name == "step_00000020"
    for c in manager.checkpoints():
        assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= {p.name for p in c.iterdir()}
    last = manager.load(manager.latest())
    assert (last.step, last.epoch, last.extra["batches_in_epoch"]) == (20, 5, 0)
    assert {"python", "numpy", "torch"} <= set(last.rng)  # global RNGs, plus every generator the step draws from:
    assert sorted(last.rng["generators"]) == ["objective:wmr", "router:head.transformer.resblocks.0.mlp", "router:head.transformer.resblocks.1.mlp"]
    # the console shows the results table and the plot
    assert "mote results" in res.stdout and "tradeoff.png" in res.stdout.replace("\n", "")
    # the best checkpoint is the last one here: the final evaluation scored its weights, no other to name
    assert "evaluate those weights" not in res.stdout


def test_the_run_names_a_best_checkpoint_other_than_the_last(tmp_path, capsys, monkeypatch):
    """The final evaluation scores the last weights; a best checkpoint before them is named with the command that scores it."""
    from mergekit_video.training.checkpoint import CheckpointManager

    monkeypatch.setattr(CheckpointManager, "best", lambda self: (self.checkpoints() or [None])[0])  # the oldest one kept
    scores = {"step_00000004": 90.0, "step_00000020": 50.0}
    monkeypatch.setattr(CheckpointManager, "metric_of", lambda self, c: scores.get(c.name))
    out = tmp_path / "run"
    assert cli_main(["run", str(QUICKSTART), f"output_dir={out}", *QUICK_OVERRIDES, "eval.compare.merges=[]",
                     "eval.compare.experts=false", "eval.compare.logit_ensemble=false", "eval.modulation=[false]"]) == 0
    said = "".join(capsys.readouterr().out.split())  # rich may fold a long path: compare without any whitespace
    # the first checkpoint (step 4), kept by pruning as the "best" one, with a command ready to run on the val data
    data = out / "data"
    assert (f"bestvaltop-1{90.0:.2f}atstep_00000004(last:{50.0:.2f}):evaluatethoseweightswithmergevideval"
            f"{out / 'checkpoints' / 'step_00000004'}--list{data / 'val.txt'}--classes{data / 'classes.csv'}--root{data}"
            "--frames8--views1x1eval.datasets.0.on_error=skip") in said  # the validation's frames, views, error policy
    # a tie with the last checkpoint names nothing: the final evaluation scored weights as good
    scores["step_00000004"] = 50.0
    runner_hint = "evaluatethoseweights"
    assert cli_main(["run", str(QUICKSTART), f"output_dir={out}", *QUICK_OVERRIDES, "eval.compare.merges=[]",
                     "eval.compare.experts=false", "eval.compare.logit_ensemble=false", "eval.modulation=[false]"]) == 0
    said = "".join(capsys.readouterr().out.split())
    assert runner_hint not in said and "20steps,finishedbefore(nothinglefttotrain)" in said


def test_quickstart_metrics(quick_run):
    out, _ = quick_run
    train = _train_records(out)
    assert [r["step"] for r in train] == list(range(1, 21))  # log_every=1, each step once
    for r in train:
        assert {"loss", "te", "wmr", "mse", "lr", "clips_per_s", "epoch"} <= set(r)
        assert math.isfinite(r["loss"]) and r["clips_per_s"] > 0
        # Eq. 10: loss = TE + λ·WMR + η·MSE with λ = 0.5, η = 0.1
        assert r["loss"] == pytest.approx(r["te"] + 0.5 * r["wmr"] + 0.1 * r["mse"], rel=1e-5)
    losses = [r["loss"] for r in train]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1  # training makes progress
    # the lr each step used for the new parameters: 4 warm-up steps towards 1e-3, then cosine (reaching 0 after step 20)
    lrs = [r["lr"] for r in train]
    assert lrs[:5] == pytest.approx([1e-3 * (i + 1) / 5 for i in range(4)] + [1e-3])
    assert lrs[12] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16))) and lrs[-1] > 0
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    val = _val_records(out)
    assert val and val[-1]["step"] == 20 and 0 <= val[-1]["val/top1"] <= 100


def test_quickstart_results(quick_run):
    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    expected = [v + sfx for sfx in ("", "+tfm") for v in VARIANTS]
    assert sorted(res["summary"]) == sorted(expected)
    assert res["failed_videos"] == 0
    val, novel = res["datasets"]["val"][0], res["datasets"]["novel"][0]
    assert (val["num_videos"], val["views"], novel["num_videos"], novel["views"]) == (12, [2, 1], 8, [3, 1])
    assert sorted(val["variants"]) == sorted(expected)
    for name, row in res["summary"].items():
        assert row["val"]["top1"] == val["variants"][name]["top1"]
        assert round(row["val"]["top1"] * 12 / 100, 6).is_integer()  # a whole number of the 12 videos
        assert row["HM_ZS"] == row["novel"]["top1"]  # one zero-shot dataset
        a, b = row["val"]["top1"], row["HM_ZS"]
        assert row["trade_off"] == pytest.approx(0.0 if min(a, b) == 0 else 2 * a * b / (a + b))


def test_eval_output_dir_is_folded_like_a_recipes(quick_run, tmp_path):
    """--output-dir missing/../ev names ev (as output_dir=... in a recipe): no stray missing/ is made."""
    out, _ = quick_run
    data = out / "data"
    args = ["eval", str(out / "model"), "--list", str(data / "val.txt"), "--classes", str(data / "classes.csv"), "--root", str(data)]
    assert cli_main([*args, "--output-dir", str(tmp_path / "missing" / ".." / "ev")]) == 0
    assert (tmp_path / "ev" / "results.json").is_file() and not (tmp_path / "missing").exists()


def test_a_run_that_fails_at_start_leaves_no_folder_even_with_its_text_cache_inside(synthetic_data, tmp_path, capsys):
    """The quickstart keeps its text features under output_dir/cache: a start that fails after writing them
    (a class CSV that does not fit the list) still removes the folder it made."""
    from mergekit_video.cli.main import main as cli_main

    few = tmp_path / "two_classes.csv"
    few.write_text("id,name\n0,a\n1,b\n")
    args = ["run", str(QUICKSTART), f"output_dir={tmp_path / 'new'}", "data.synthetic=null", f"data.root={synthetic_data}",
            f"data.train_list={synthetic_data / 'train.txt'}", f"data.val_list={synthetic_data / 'val.txt'}",
            f"data.class_csv={few}", "eval.datasets=[]", "~eval.compare", "~eval.summary"]
    assert cli_main(args) == 1
    assert "but there are only 2 class names" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "new").exists()


def test_rerunning_a_finished_run_whose_checkpoints_were_deleted_is_refused_not_retrained(quick_run, tmp_path, capsys):
    """With checkpoints/ deleted (to save space) resume: auto found nothing and trained from step 1,
    replacing model/ and results.json and dropping the metrics history, without a word."""
    from mergekit_video.cli.main import main as cli_main

    out, _ = quick_run
    moved = tmp_path / "copy"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(LOCK_FILE, "checkpoints"))
    metrics = (moved / "metrics.jsonl").read_text()
    assert cli_main(["run", str(QUICKSTART), f"output_dir={moved}", *QUICK_OVERRIDES]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"output_dir {moved} holds a trained run of this recipe (model/, model_dense/, results.json) but no checkpoint to resume from" in err
    assert "pass --overwrite to train again" in err
    assert (moved / "metrics.jsonl").read_text() == metrics and not (moved / "checkpoints").exists()


def test_rerunning_a_finished_run_says_its_final_evaluation_runs_again(quick_run, tmp_path, capsys, monkeypatch):
    """The same command on a finished run resumes at its last step, trains nothing and evaluates again
    (hours at paper scale): it says so before the evaluation starts, naming results.json."""
    from mergekit_video.cli.main import main as cli_main
    from mergekit_video.runners.mote import MoTERunner

    out, _ = quick_run
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns(LOCK_FILE))

    def stop(self):  # the message is all this test needs: no second evaluation
        raise RuntimeError("evaluation reached")

    monkeypatch.setattr(MoTERunner, "evaluate", stop)
    assert cli_main(["run", str(QUICKSTART), f"output_dir={again}", *QUICK_OVERRIDES]) == 1
    captured = capsys.readouterr()
    said = " ".join(captured.out.split())
    assert "finished before (nothing left to train)" in said
    assert (f"this run was finished before: its final evaluation runs again and replaces {again / 'results.json'} "
            f"(to evaluate the model otherwise: mergevid eval {again / 'model'} --list LIST --classes CSV)") in said
    assert "evaluation reached" in captured.err


def test_a_finished_run_started_from_another_runs_checkpoint_is_not_retrained_from_it(quick_run, tmp_path, capsys):
    """A run started with train.resume=<another run's checkpoint>, finished, its checkpoints/ deleted to save space:
    rerunning the same command trained again from that checkpoint over its model/ and results.json, without a word
    (the check for a finished run without checkpoints ran only when no checkpoint at all was found)."""
    from mergekit_video.cli.commands import _load_validated
    from mergekit_video.cli.main import main as cli_main
    from mergekit_video.config import dump_recipe

    out, _ = quick_run
    start = sorted((out / "checkpoints").glob("step_*"))[0]
    started = tmp_path / "started"
    shutil.copytree(out, started, ignore=shutil.ignore_patterns(LOCK_FILE, "checkpoints"))
    args = [f"output_dir={started}", *QUICK_OVERRIDES, f"train.resume={start}"]
    (started / "recipe.yaml").write_text(dump_recipe(_load_validated(QUICKSTART, args)))  # as if it had been started so
    results = (started / "results.json").read_text()
    assert cli_main(["run", str(QUICKSTART), *args]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (f"output_dir {started} holds a trained run of this recipe (model/, model_dense/, results.json) but no checkpoint to resume "
            f"from ({started / 'checkpoints'} is gone): training again from train.resume's checkpoint {start} would replace them") in err
    assert (started / "results.json").read_text() == results and not (started / "checkpoints").exists()


def test_a_mistyped_path_is_named_before_a_recipe_mismatch_of_the_output_folder(quick_run, tmp_path, capsys):
    """The second evaluation into one folder with a missing class CSV was refused as "a different recipe ... pass
    --overwrite to DELETE its results.json"; only with --overwrite did it name the missing file."""
    from mergekit_video.cli.main import main as cli_main

    out, _ = quick_run
    data = out / "data"
    args = ["eval", str(out / "model"), "--list", str(data / "val.txt"), "--root", str(data), "--output-dir", str(tmp_path / "ev")]
    assert cli_main([*args, "--classes", str(data / "classes.csv")]) == 0
    capsys.readouterr()
    assert cli_main([*args, "--classes", str(tmp_path / "nope.csv")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "file not found" in err and "nope.csv" in err and "different recipe" not in err


def test_a_custom_model_components_compare_merges_and_checkpointing_are_checked_before_training(synthetic_data, tmp_path, capsys, monkeypatch):
    """Validation checks compare merges only for build_video_clip models (their expert count is in the recipe):
    a component of one's own got a bad entry refused only after training, and grad checkpointing of a tower
    with stochastic experts failed in the first backward; so did per-expert evaluation over containers of other
    counts, and a tower merge relative to a base (which the saved model cannot hold) failed at the save."""
    (tmp_path / "vismoe_component.py").write_text(
        "from mergekit_video import add_experts\n"
        "from mergekit_video.models import build_video_clip\n"
        "def build(*, visual_experts=3, visual_merge='mean', visual_merge_kwargs=None, **kw):\n"
        "    model = build_video_clip(**{**kw, 'num_experts': 3})\n"
        "    add_experts(model.clip.visual, 'transformer.resblocks.0.mlp', visual_experts, init='copy_noise', merge=visual_merge,\n"
        "                merge_kwargs=visual_merge_kwargs)\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["run", str(QUICKSTART), "model._component_=vismoe_component.build", *QUICK_OVERRIDES]
    for i, (extra, said) in enumerate((
        (["eval.compare.merges=[{name: weighted, weights: [1, 2]}]"], "error: eval.compare.merges.0: 'weighted' with {'weights': [1, 2]} "
                                                                      "cannot merge 3 experts: merge strategy 'weighted': 2 weights for 3 experts"),
        (["train.grad_checkpointing=true"], "error: train.grad_checkpointing=true, but the CLIP tower holds experts with stochastic or "
                                            "stateful routers (visual.transformer.resblocks.0.mlp)"),
        (["+model.grad_checkpointing=true"], "error: model.grad_checkpointing=true (the model component turned the CLIP tower's "
                                             "checkpointing on), but the CLIP tower holds experts with stochastic or stateful routers"),
        (["+model.visual_experts=2"], "error: eval.compare.experts / eval.compare.logit_ensemble: per-expert evaluation runs expert i in "
                                      "every container, but clip.visual.transformer.resblocks.0.mlp has 2 experts and head.transformer.resblocks.0.mlp 3"),
        (["+model.visual_merge=ties", "+model.visual_merge_kwargs={density: 0.5}"],
         "error: clip.visual.transformer.resblocks.0.mlp merges its experts with 'ties', relative to a base model that a saved model does not store"),
    )):
        out = _new_run_dir(tmp_path / f"run{i}", synthetic_data)
        # the component turns checkpointing on before its surgery: add_experts warns at once, the run refuses
        surgery_warns = extra == ["+model.grad_checkpointing=true"]
        with pytest.warns(UserWarning, match="gradient checkpointing on") if surgery_warns else contextlib.nullcontext():
            assert cli_main([*base, f"output_dir={out}", *extra]) == 1
        assert said in " ".join(capsys.readouterr().err.split()), extra
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_topk_experts_in_the_clip_tower_train_their_gate_and_are_compared_beside_a_plain_head(synthetic_data, tmp_path, monkeypatch):
    """A component putting topk experts in the tower under a plain head: their load-balancing loss was dropped
    (only the head's routers were read) and the comparison called the model expert-free."""
    (tmp_path / "vistopk_component.py").write_text(
        "from mergekit_video import add_experts\n"
        "from mergekit_video.models import build_video_clip\n"
        "def build(**kw):\n"
        "    model = build_video_clip(**{**kw, 'num_experts': 0})\n"
        "    add_experts(model.clip.visual, 'transformer.resblocks.*.mlp', 3, router='topk', init='copy_noise', k=2)\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    shown = io.StringIO()
    _run_in_process(out, ["model._component_=vistopk_component.build", "objective.wmr_weight=0", "objective.mse_weight=0",
                          "train.export_dense=false", "eval.num_workers=0", "data.num_workers=0",
                          "eval.datasets=[{name: val, kind: close_set, list: " + str(out / "data" / "val.txt") + ", class_csv: "
                          + str(out / "data" / "classes.csv") + ", root: " + str(out / "data") + ", num_clips: 1, num_crops: 1}]",
                          "eval.compare.merges=[]"], console=Console(file=shown, width=300))
    assert "2-layer head (0 experts), 2 expert layers in the CLIP tower," in shown.getvalue()  # the banner said "0 experts"
    aux = [r["aux"] for r in _train_records(out)]
    assert len(aux) == STEPS and all(a > 0 for a in aux)
    variants = set(json.loads((out / "results.json").read_text())["summary"])
    assert {"merged", "expert_0", "expert_2", "logit_ensemble"} <= variants  # not "model": experts are there


def test_an_evaluation_that_fails_leaves_no_folder_it_made(quick_run, tmp_path, capsys):
    # a class CSV that does not fit the list: refused once the dataset is built, after recipe.yaml was written
    out, _ = quick_run
    wrong = tmp_path / "one_class.csv"
    wrong.write_text("id,name\n0,a\n")
    args = ["eval", str(out / "model"), "--list", str(out / "data" / "val.txt"), "--classes", str(wrong), "--root", str(out / "data")]
    assert cli_main([*args, "--output-dir", str(tmp_path / "new")]) == 1
    assert "Wrong class CSV for this list?" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays, as it was
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    assert cli_main([*args, "--output-dir", str(tmp_path / "mine"), "--overwrite"]) == 1
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_an_evaluation_that_fails_at_a_later_split_keeps_the_results_of_those_before(quick_run, tmp_path, capsys, caplog):
    """results.partial.json holds each split as it is done; a failure at the next keeps and names it."""
    out, _ = quick_run
    data = out / "data"
    bad = tmp_path / "split2.txt"
    bad.write_text("val/missing.mp4 0\n")
    ev = tmp_path / "ev"
    args = ["eval", str(out / "model"), "--zero-shot", "--list", str(data / "val.txt"), "--list", str(bad),
            "--classes", str(data / "classes.csv"), "--root", str(data), "--output-dir", str(ev)]
    with caplog.at_level("WARNING", logger="mergekit_video.runners.common"):
        assert cli_main(args) == 1
    assert "missing.mp4" in capsys.readouterr().err
    partial = json.loads((ev / "results.partial.json").read_text())
    assert partial["complete"] is False and [r["dataset"] for r in partial["datasets"][data.name]] == [f"{data.name}/split1"]
    assert set(partial["datasets"][data.name][0]["variants"]) == {"merged", "merged+tfm"}
    assert not (ev / "results.json").exists()
    assert f"the evaluation stopped after {data.name}/split1; their results are in {ev / 'results.partial.json'}" in caplog.text
    # the same command with the split readable: one results.json, no partial file left, nor the temp files of
    # writes an earlier evaluation's kill cut short (their writer, a finished process, is gone)
    import subprocess

    from mergekit_video.utils.io import _host_tag

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    for name in ("results.json", "results.partial.json", "tradeoff.png"):
        (ev / f".{name}.{dead}-{_host_tag()}.abcd1234.tmp").write_bytes(b"half")
    bad.write_text((data / "val.txt").read_text())
    assert cli_main(args) == 0, capsys.readouterr().err
    assert not (ev / "results.partial.json").exists() and len(json.loads((ev / "results.json").read_text())["datasets"][data.name]) == 2
    assert not list(ev.glob(".*.tmp"))


def test_dense_export_has_the_baselines_keys_and_accuracy(quick_run, tmp_path, capsys):
    from mergekit_video.models import build_video_clip, load

    out, _ = quick_run
    dense = load(out / "model_dense")
    baseline = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=2, num_experts=0)
    assert set(dense.state_dict()) == set(baseline.state_dict())
    assert {k: tuple(v.shape) for k, v in load_file(str(out / "model_dense" / "head.safetensors")).items() if k != "source_class_features"} == {
        k: tuple(v.shape) for k, v in baseline.head.state_dict().items() if k != "source_class_features"}
    # `mergevid eval <model dir> --list --classes` on the val set, with the run's views: the dense
    # export scores exactly what the merged MoTE model scored in the run (TFM off and on)
    run_res = json.loads((out / "results.json").read_text())["datasets"]["val"][0]["variants"]
    data = out / "data"
    for model_dir in ("model_dense", "model"):  # the dense export's rows are named as the merged model's
        ev_out = tmp_path / f"eval_{model_dir}"
        size = ["--input-size", "32"] if model_dir == "model_dense" else []  # default: the model's own frame size
        rc = cli_main(["eval", str(out / model_dir), "--list", str(data / "val.txt"), "--classes", str(data / "classes.csv"),
                       "--root", str(data), "--views", "2x1", "--frames", "8", *size, "--output-dir", str(ev_out)])
        assert rc == 0, capsys.readouterr().err
        ev = json.loads((ev_out / "results.json").read_text())["datasets"]["val"][0]
        assert ev["num_videos"] == 12 and ev["views"] == [2, 1]
        for name in ("merged", "merged+tfm"):
            assert ev["variants"][name]["top1"] == run_res[name]["top1"]
            assert ev["variants"][name]["top5"] == run_res[name]["top5"]
    assert "evaluate results" in capsys.readouterr().out
    # a frame size the ViT cannot take is named before anything runs
    rc = cli_main(["eval", str(out / "model"), "--list", str(data / "val.txt"), "--classes", str(data / "classes.csv"),
                   "--root", str(data), "--input-size", "224", "--output-dir", str(tmp_path / "eval_224")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: --input-size 224, but the model's visual tower takes 32x32 frames: leave --input-size out (or pass 32)" in err
    assert not (tmp_path / "eval_224").exists()  # said before any output folder is made


def test_input_size_defaults_to_the_models_and_mismatches_name_the_key():
    from mergekit_video.runners.common import eval_suite, resolve_input_size

    assert resolve_input_size("data.input_size", None, 336) == 336
    assert resolve_input_size("data.input_size", None, None) == 224
    assert resolve_input_size("data.input_size", 224, 224) == 224
    with pytest.raises(ValueError, match=r"^data.input_size=224, but the model's visual tower takes 32x32 frames \(set data.input_size=32 or leave it unset\)$"):
        resolve_input_size("data.input_size", 224, 32)
    ds = {"name": "v", "kind": "close_set", "root": "/r", "list": "/r/v.txt", "class_csv": "/r/c.csv"}
    assert eval_suite({"datasets": [ds]}, {}, model_input_size=32)[0].input_size == 32
    assert eval_suite({"datasets": [ds]}, {"input_size": 32}, model_input_size=32)[0].input_size == 32
    with pytest.raises(ValueError, match=r"^eval.datasets.0.input_size=64, but"):
        eval_suite({"datasets": [{**ds, "input_size": 64}]}, {}, model_input_size=32)
    # frame counts past the head's position table, and missing class lists, name their key
    with pytest.raises(ValueError, match=r"^data.num_frames=16, but the model's temporal head has 8 frame position embeddings"):
        eval_suite({"datasets": [ds]}, {"num_frames": 16}, model_num_positions=8)
    with pytest.raises(ValueError, match=r"^eval.datasets.0.num_frames=16, but"):
        eval_suite({"datasets": [{**ds, "num_frames": 16}]}, {}, model_num_positions=8)
    with pytest.raises(ValueError, match=r"^eval.datasets.0.class_csv is not set: no class names for /r/v.txt$"):
        eval_suite({"datasets": [{**ds, "class_csv": None}]}, {})
    with pytest.raises(ValueError, match=r"^eval.datasets.0.splits.1.class_csv is not set \(nor eval.datasets.0.class_csv\)"):
        eval_suite({"datasets": [{**ds, "class_csv": None, "list": None, "splits": [{"list": "a", "class_csv": "c"}, {"list": "b"}]}]}, {})
    with pytest.raises(ValueError, match=r"^eval.datasets.0 \(v\) needs 'list' \(one annotation list\) or 'splits'"):
        eval_suite({"datasets": [{**ds, "list": None}]}, {})


def test_compare_merge_arguments_are_dry_run_for_the_checkpoints_expert_count(quick_run, tmp_path, capsys):
    """Validation reads the checkpoint's expert count from its config.json; the compare runner's setup checks the
    merges with the loaded model's count too (a recipe dict run from Python is not validated)."""
    import yaml

    out, _ = quick_run
    data = out / "data"
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(yaml.safe_dump({
        "runner": "compare", "output_dir": str(tmp_path / "cmp"), "checkpoint": str(out / "model"),
        "eval": {"num_workers": 0, "datasets": [{"name": "val", "kind": "close_set", "root": str(data), "list": str(data / "val.txt"),
                                                "class_csv": str(data / "classes.csv")}],
                 "compare": {"merges": [{"name": "mean"}, {"name": "weighted", "weights": [1, 2]}]}},
    }))
    said = "eval.compare.merges.1: 'weighted' with {'weights': [1, 2]} cannot merge 4 experts: merge strategy 'weighted': 2 weights for 4 experts"
    assert cli_main(["validate", str(recipe)]) == 1
    assert said in " ".join(capsys.readouterr().err.split())
    assert cli_main(["eval", str(recipe)]) == 1
    assert said in " ".join(capsys.readouterr().err.split())
    import re

    from mergekit_video.runners.evaluate import CompareRunner

    cfg = yaml.safe_load(recipe.read_text())
    with pytest.raises(ValueError, match=re.escape(said)):
        CompareRunner(cfg=cfg).setup()
    assert not (tmp_path / "cmp" / "results.json").exists()


def test_evaluation_settings_that_cannot_run_stop_the_run_before_training(tmp_path, capsys):
    """An eval dataset's size that does not fit the model is found at setup, not after training (nothing is trained)."""
    out = tmp_path / "run"
    rc = cli_main(["run", str(QUICKSTART), f"output_dir={out}", *QUICK_OVERRIDES, "eval.datasets.0.input_size=16"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1 and ("- eval.datasets.0.input_size: 16, but mergevid-tiny-vit's visual tower takes 32x32 frames (set "
                        "eval.datasets.0.input_size=32 or leave it unset)") in err  # validation: before anything is written
    assert not out.exists()
    # an output_dir that cannot be a folder is said with its key, not as an OSError from deep inside
    (tmp_path / "afile").write_text("x")
    rc = cli_main(["run", str(QUICKSTART), f"output_dir={tmp_path / 'afile' / 'run'}", *QUICK_OVERRIDES])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1 and f"error: output_dir={tmp_path / 'afile' / 'run'}: cannot create or write it (Not a directory" in err


def test_an_output_dir_on_a_read_only_mount_is_said_with_its_key(tmp_path, capsys, monkeypatch):
    """A read-only file system raises a plain OSError (EROFS), which came out as "OSError: [Errno 30] ..." without the key."""
    import errno

    import mergekit_video.runners.common as common

    def read_only(cfg, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(cfg["output_dir"]))

    monkeypatch.setattr(common, "prepare_output_dir", read_only)
    rc = cli_main(["run", str(QUICKSTART), f"output_dir={tmp_path / 'ro'}", *QUICK_OVERRIDES])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1 and f"error: output_dir={tmp_path / 'ro'}: cannot create or write it (Read-only file system" in err


def test_rerun_with_a_different_recipe_refuses_without_overwrite(quick_run, capsys):
    out, _ = quick_run
    before = (out / "recipe.yaml").read_bytes()
    rc = cli_main(["run", str(QUICKSTART), f"output_dir={out}", *QUICK_OVERRIDES, "schedule.epochs=6"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    err = " ".join(err.split())
    assert f"error: output_dir {out} holds an earlier run of a different recipe (schedule.epochs: 5 -> 6)." in err
    assert "pass --overwrite to DELETE the earlier run's metrics.jsonl, checkpoints/, model/, model_dense/, results.json, tradeoff.png and train again from step 1" in err
    assert (out / "recipe.yaml").read_bytes() == before
    assert [r["step"] for r in _train_records(out)] == list(range(1, 21))  # nothing trained or appended


def test_eval_suite_zero_shot_splits_mean_and_std(quick_run, tmp_path):
    """Zero-shot over 2 splits through the runners' evaluation: mean ± population std of the splits."""
    from mergekit_video.models import load
    from mergekit_video.runners.common import run_eval_suite

    out, _ = quick_run
    data = out / "data"
    novel = (data / "novel.txt").read_text().splitlines()
    (tmp_path / "s1.txt").write_text("\n".join(novel[:4]) + "\n")  # 2 split lists over the 4 novel classes
    (tmp_path / "s2.txt").write_text("\n".join(novel[4:]) + "\n")
    cfg = {
        "seed": 0, "text": {"templates": "mote", "cache_dir": str(tmp_path / "cache")},
        "eval": {
            "batch_size": 4, "num_workers": 0, "modulation": [False], "plot": False,
            "datasets": [
                {"name": "val", "kind": "close_set", "root": str(data), "list": str(data / "val.txt"), "class_csv": str(data / "classes.csv")},
                {"name": "novel", "kind": "zero_shot", "root": str(data), "class_csv": str(data / "novel_classes.csv"), "num_clips": 3,
                 "splits": [{"list": str(tmp_path / "s1.txt")}, {"list": str(tmp_path / "s2.txt")}]},
            ],
            "summary": {"close_set": "val", "zero_shot": ["novel"]},
        },
    }
    payload = run_eval_suite(load(out / "model"), cfg=cfg, data_cfg={"num_frames": 8, "input_size": 32}, device=torch.device("cpu"),
                             dist=None, output_dir=tmp_path)
    splits = payload["datasets"]["novel"]
    assert [s["dataset"] for s in splits] == ["novel/split1", "novel/split2"]
    assert [s["num_videos"] for s in splits] == [4, 4]
    s1, s2 = (s["variants"]["merged"]["top1"] for s in splits)
    row = payload["summary"]["merged"]
    assert row["novel"]["splits"] == [s1, s2]
    assert row["novel"]["top1"] == pytest.approx((s1 + s2) / 2)
    assert row["novel"]["top1_std"] == pytest.approx(abs(s1 - s2) / 2)
    assert row["HM_ZS"] == pytest.approx(row["novel"]["top1"])
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == json.loads(json.dumps(payload["summary"]))


def test_eval_suite_summary_keys_turn_scores_off_and_sampling_follows_the_data(quick_run, tmp_path):
    """``eval.summary.zero_shot: null`` / ``close_set: null`` leave HM_ZS / Trade-off out (absent keys, and
    ``zero_shot: []`` as recipes recorded it before, pick datasets by kind); ``data.sampling: dense`` reaches
    the evaluation's datasets unless one sets its own."""
    from mergekit_video.models import load
    from mergekit_video.runners.common import build_eval_loader, eval_suite, run_eval_suite

    out, _ = quick_run
    data = out / "data"
    datasets = [
        {"name": "val", "kind": "close_set", "root": str(data), "list": str(data / "val.txt"), "class_csv": str(data / "classes.csv")},
        {"name": "novel", "kind": "zero_shot", "root": str(data), "list": str(data / "novel.txt"),
         "class_csv": str(data / "novel_classes.csv"), "sampling": "segment"},
    ]
    data_cfg = {"num_frames": 8, "input_size": 32, "sampling": "dense", "stride": 2}
    entries = eval_suite({"datasets": datasets}, data_cfg, model_input_size=32)
    assert [(e.sampling, e.stride) for e in entries] == [("dense", 2), ("segment", 2)]
    ds = build_eval_loader(entries[0], entries[0].splits[0], eval_cfg={"num_workers": 0}, data_cfg=data_cfg, normalize=False,
                           dist=None, seed=0).dataset
    assert (ds.sampling, ds.stride, ds.clip_len) == ("dense", 2, 8)
    model = load(out / "model")
    rows = {}
    for summary in ({}, {"zero_shot": []}, {"zero_shot": None}, {"close_set": None}):
        cfg = {"seed": 0, "text": {"templates": "mote", "cache_dir": str(tmp_path / "cache")},
               "eval": {"batch_size": 4, "num_workers": 0, "modulation": [False], "plot": False, "datasets": datasets, "summary": summary}}
        payload = run_eval_suite(model, cfg=cfg, data_cfg=data_cfg, device=torch.device("cpu"), dist=None, output_dir=tmp_path)
        rows[str(summary)] = payload["summary"]["merged"]
    assert {"HM_ZS", "trade_off"} <= set(rows["{}"]) and {"HM_ZS", "trade_off"} <= set(rows["{'zero_shot': []}"])
    assert not {"HM_ZS", "trade_off"} & set(rows["{'zero_shot': None}"])
    assert "HM_ZS" in rows["{'close_set': None}"] and "trade_off" not in rows["{'close_set': None}"]


# ---------------------------------------------------------------------------------------------
# exact resume (issue 5 §3)
# ---------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """Stands for the process being killed."""


def _die_after_checkpoint(monkeypatch, step: int) -> None:
    original = Trainer.save_checkpoint

    def save_then_die(self, metrics=None):
        path = original(self, metrics)
        if self.state.step == step:
            raise Interrupted
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)


def _die_during_step(monkeypatch, step: int) -> None:
    original = Trainer._optimizer_step

    def crash(self):
        if self.state.step == step - 1:  # optimizer step `step` never completes
            raise Interrupted
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash)


def _resume_to_the_end(out: Path, overrides: list[str]) -> tuple[int, int, int]:
    """A fresh runner on ``out`` (resume: auto) runs to the end; returns the (step, epoch, batches) it resumed at."""
    from mergekit_video.runners import build_runner

    runner = build_runner(_load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, *overrides]))
    try:
        runner.setup()
        st = runner.trainer.state
        resumed_at = (st.step, st.epoch, st.batches_in_epoch)
        runner.train()
        runner.save()
        runner.evaluate()
    finally:
        runner.cleanup()
    return resumed_at


def _assert_same_run(reference: Path, out: Path) -> None:
    """Per-step losses, lr, validation scores and final weights of ``out`` equal the uninterrupted ``reference``."""
    ref, got = _train_records(reference), _train_records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # the lines after the checkpoint were replaced, not duplicated
    for a, b in zip(ref, got):
        for key in ("loss", "te", "wmr", "mse", "lr"):
            assert abs(a[key] - b[key]) <= 1e-6, f"step {a['step']}: {key} {a[key]} (uninterrupted) != {b[key]} (resumed)"
        assert a["epoch"] == b["epoch"]
    assert [(r["step"], r["val/top1"]) for r in _val_records(reference)] == [(r["step"], r["val/top1"]) for r in _val_records(out)]
    assert _max_diff(_load_state(reference / "model"), _load_state(out / "model")) <= 1e-6


RESUME_CASES = [
    # workers, accumulation, how the first run dies, resume point (step, epoch, micro-batches of the epoch consumed)
    pytest.param(0, 1, ("after_checkpoint", 3), (3, 0, 3), id="workers0-accum1-killed-after-mid-epoch-checkpoint"),
    pytest.param(2, 2, ("during_step", 8), (6, 1, 4), id="workers2-accum2-killed-two-steps-after-mid-epoch-checkpoint"),
]


@pytest.mark.parametrize("workers,accum,death,resume_at", RESUME_CASES)
def test_resume_reproduces_the_uninterrupted_run(workers, accum, death, resume_at, reference_runs, synthetic_data, tmp_path, monkeypatch):
    reference = reference_runs(workers, accum)
    overrides = [f"data.num_workers={workers}", f"train.grad_accumulation={accum}"]
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    if tensorboard:  # the resumed run must also replace, not duplicate, its TensorBoard events
        overrides.append("train.tensorboard=true")
    out = _new_run_dir(tmp_path / "run", synthetic_data)

    kind, step = death
    (_die_after_checkpoint if kind == "after_checkpoint" else _die_during_step)(monkeypatch, step)
    with pytest.raises(Interrupted):
        _run_in_process(out, overrides)
    monkeypatch.undo()
    logged = [r["step"] for r in _train_records(out)]
    assert logged == list(range(1, step + 1 if kind == "after_checkpoint" else step))
    assert not (out / "model").exists()

    # a fresh runner on the same output_dir resumes from the last checkpoint (resume: auto)
    assert _resume_to_the_end(out, overrides) == resume_at
    _assert_same_run(reference, out)
    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        tb_loss = [(e.step, e.value) for e in events.Scalars("loss")]
        assert [s for s, _ in tb_loss] == list(range(1, STEPS + 1))
        assert all(abs(v - r["loss"]) <= 1e-6 * max(1.0, abs(v)) for (_, v), r in zip(tb_loss, _train_records(out)))


def test_rerun_with_only_results_neutral_settings_changed_resumes(reference_runs, synthetic_data, tmp_path, monkeypatch):
    """Killed after the step-3 checkpoint, rerun with another train.keep_last: it resumes (it used to be
    refused, and --overwrite deleted the checkpoints) and records the new recipe."""
    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    _die_after_checkpoint(monkeypatch, 3)
    with pytest.raises(Interrupted):
        _run_in_process(out, ["data.num_workers=0"])  # keep_last=5
    monkeypatch.undo()
    assert _resume_to_the_end(out, ["data.num_workers=0", "train.keep_last=1"]) == (3, 0, 3)
    _assert_same_run(reference, out)
    resumed = _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", "train.keep_last=1"])
    assert (out / "recipe.yaml").read_text() == dump_recipe(resumed)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000008"]  # keep_last=1 (the best is the last)


def test_resume_inside_a_logging_window_logs_the_same_averages(reference_runs, synthetic_data, tmp_path, monkeypatch):
    """log_every=2 and a checkpoint at step 3: the step-4 line after the resume still averages steps 3 and 4."""
    reference = {r["step"]: r for r in _train_records(reference_runs(0, 1))}  # logged every step
    overrides = ["data.num_workers=0", "train.log_every=2"]
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    _die_after_checkpoint(monkeypatch, 3)
    with pytest.raises(Interrupted):
        _run_in_process(out, overrides)
    monkeypatch.undo()
    assert [r["step"] for r in _train_records(out)] == [2]
    assert _resume_to_the_end(out, overrides) == (3, 0, 3)
    got = _train_records(out)
    assert [r["step"] for r in got] == [2, 4, 6, 8]
    for r in got:
        for key in ("loss", "te", "wmr", "mse"):
            expected = (reference[r["step"] - 1][key] + reference[r["step"]][key]) / 2
            assert abs(r[key] - expected) <= 1e-6, f"step {r['step']}: {key} {r[key]} != {expected}"


def test_a_resume_with_another_log_every_logs_the_carried_steps_on_their_own(reference_runs, synthetic_data, tmp_path, monkeypatch):
    """log_every=2, a checkpoint at step 3, resumed with log_every=1: step 3 (carried in the checkpoint,
    not yet logged) gets its own line, and step 4's is step 4 alone (it averaged steps 3 and 4); the
    losses are the uninterrupted run's."""
    reference = {r["step"]: r for r in _train_records(reference_runs(0, 1))}  # logged every step
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    _die_after_checkpoint(monkeypatch, 3)
    with pytest.raises(Interrupted):
        _run_in_process(out, ["data.num_workers=0", "train.log_every=2"])
    monkeypatch.undo()
    # with a checkpoint every 2 steps (was 3) and another DDP timeout too: neither changes a result
    assert _resume_to_the_end(out, ["data.num_workers=0", "train.log_every=1", "train.save_every_steps=2", "dist_timeout_s=600"]) == (3, 0, 3)
    got = _train_records(out)
    assert [r["step"] for r in got] == [2, 3, 4, 5, 6, 7, 8]
    assert abs(got[0]["loss"] - (reference[1]["loss"] + reference[2]["loss"]) / 2) <= 1e-6
    for r in got[1:]:
        for key in ("loss", "te", "wmr", "mse"):
            assert abs(r[key] - reference[r["step"]][key]) <= 1e-6, f"step {r['step']}: {key} {r[key]} != {reference[r['step']][key]}"


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_stops_after_the_step_and_the_rerun_resumes_exactly(workers, reference_runs, synthetic_data, tmp_path, monkeypatch):
    """A scheduler's SIGTERM (or Ctrl-C) mid-step: the step finishes, its checkpoint is written, the rerun continues exactly."""
    import signal

    from mergekit_video.training.trainer import TrainingInterrupted

    reference = reference_runs(workers, 1)
    overrides = [f"data.num_workers={workers}"]
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    original = Trainer._optimizer_step

    def signal_during_step_5(self):
        if self.state.step == 4:  # optimizer step 5 is under way
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", signal_during_step_5)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        _run_in_process(out, overrides)
    monkeypatch.undo()
    assert (info.value.step, info.value.signal_name) == (5, "SIGTERM")
    assert str(info.value).startswith("stopped by SIGTERM after step 5; checkpoint saved in ")
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer's handler is removed again
    assert (out / "checkpoints" / "step_00000005").is_dir() and not (out / "model").exists()
    assert [r["step"] for r in _train_records(out)] == [1, 2, 3, 4, 5]

    assert _resume_to_the_end(out, overrides) == (5, 1, 1)  # 4 steps per epoch
    _assert_same_run(reference, out)


def _spy_checkpoint_writes(monkeypatch) -> list[tuple[str, int]]:
    """(``save`` or ``update_state``, step) for every checkpoint write of the runs that follow."""
    from mergekit_video.training.checkpoint import CheckpointManager

    writes: list[tuple[str, int]] = []
    save, update = CheckpointManager.save, CheckpointManager.update_state
    monkeypatch.setattr(CheckpointManager, "save", lambda self, **kw: (writes.append(("save", kw["step"])), save(self, **kw))[1])
    monkeypatch.setattr(CheckpointManager, "update_state", lambda self, step, **kw: (writes.append(("update_state", step)), update(self, step, **kw))[1])
    return writes


def test_stop_after_the_last_step_of_an_epoch_validates_it_on_resume(reference_runs, synthetic_data, tmp_path, monkeypatch):
    """SIGTERM during step 8 (the last of the last epoch): the stop checkpoint is taken before that
    epoch's validation, and the resumed run validates it (it used to skip to the next epoch)."""
    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    original = Trainer._optimizer_step

    def signal_during_step_8(self):
        if self.state.step == 7:
            self._stop_signal = 15  # what the SIGTERM handler sets
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", signal_during_step_8)
    from mergekit_video.training.trainer import TrainingInterrupted

    writes = _spy_checkpoint_writes(monkeypatch)
    with pytest.raises(TrainingInterrupted):
        _run_in_process(out, ["data.num_workers=0"])
    assert writes == [("save", 3), ("save", 4), ("save", 6), ("save", 8)] and _val_records(out) == []
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    writes.clear()
    assert _resume_to_the_end(out, ["data.num_workers=0"]) == (8, 1, 4)  # all 4 steps of epoch 1 done, its end pending
    assert writes == [("update_state", 8)]  # the validation's metrics join the step-8 checkpoint; no tensors rewritten
    _assert_same_run(reference, out)
    state = json.loads((out / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert (state["epoch"], state["extra"]["batches_in_epoch"]) == (2, 0)
    assert state["metrics"]["top1"] == _val_records(reference)[-1]["val/top1"]


def test_a_failed_validation_keeps_the_trained_epoch_and_the_rerun_validates_it(reference_runs, synthetic_data, tmp_path, monkeypatch):
    """The epoch-end checkpoint is written before validation: a validation error loses no training."""
    from mergekit_video.runners.mote import MoTERunner

    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    monkeypatch.setattr(MoTERunner, "_validate", lambda self, epoch: (_ for _ in ()).throw(ValueError("a corrupt val video")))
    with pytest.raises(ValueError, match="a corrupt val video"):
        _run_in_process(out, ["data.num_workers=0"])
    monkeypatch.undo()
    ckpt = out / "checkpoints" / "step_00000008"
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["step"], state["epoch"], state["extra"]["batches_in_epoch"], state["metrics"]) == (8, 1, 4, {})
    tensors = (ckpt / "model.safetensors").stat()
    assert _resume_to_the_end(out, ["data.num_workers=0"]) == (8, 1, 4)
    _assert_same_run(reference, out)
    after = (ckpt / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (tensors.st_ino, tensors.st_mtime_ns)  # only state.json was rewritten
    assert json.loads((ckpt / "state.json").read_text())["metrics"]["top1"] == _val_records(reference)[-1]["val/top1"]


def test_the_latest_pointer_of_a_checkpoints_folder_loads_the_checkpoint_it_names(reference_runs, tmp_path):
    """``mergevid eval run/checkpoints/latest`` said only "is not a mergekit_video model directory or checkpoint
    (no config.json)"; train.resume took the pointer, loading did not."""
    from mergekit_video.models import load
    from mergekit_video.models.checkpoint import read_model_config

    ckpts = reference_runs(0, 1) / "checkpoints"
    named = ckpts / (ckpts / "latest").read_text().strip()
    assert named.name == "step_00000008"
    a, b = load(ckpts / "latest"), load(named)
    assert read_model_config(ckpts / "latest") == read_model_config(named)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    from mergekit_video.config.schema import holds_saved_model

    assert holds_saved_model(ckpts / "latest")  # an evaluate recipe's checkpoint: key passes --check-paths
    stray = tmp_path / "checkpoints"
    stray.mkdir()
    (stray / "latest").write_text("step_00000003\n")
    with pytest.raises(FileNotFoundError, match=f"^{stray / 'latest'} is a checkpoints folder's 'latest' pointer, but {stray} holds no complete checkpoint$"):
        load(stray / "latest")
    assert not holds_saved_model(stray / "latest")


def test_resume_from_a_checkpoint_with_another_schedule_length_is_refused(reference_runs, synthetic_data, tmp_path):
    """train.resume=<a 2-epoch run> with schedule.epochs=3: the checkpoint's 8-step cosine would be
    restored over the recipe's 12 steps (lr 0 from step 9), so the resume is refused, naming both."""
    from mergekit_video.runners import run_recipe

    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "longer", synthetic_data)
    for changed, what in (("schedule.epochs=3", "length (schedule.epochs x steps per epoch, capped by train.max_steps): 8 steps in the checkpoint, 12 steps now"),
                          ("optimizer.lr=2e-3", "base lr per parameter group (optimizer.lr, optimizer.clip_lr): [0.0003, 0.001] in the checkpoint, [0.0003, 0.002] now")):
        cfg = _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", changed, f"train.resume={reference / 'checkpoints'}"])
        with pytest.raises(ValueError) as info:
            run_recipe(cfg)
        assert str(info.value).startswith(f"train.resume: checkpoint {reference / 'checkpoints' / 'step_00000008'} was trained with another lr schedule ({what}).")
        assert "schedule.epochs, train.max_steps" in str(info.value) and "train.resume=null" in str(info.value)
    # a batch of 12 at the epoch-end checkpoint: 2 steps per epoch, so 4 steps; the message says why the length moved
    cfg = _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", "data.batch_size=12", f"train.resume={reference / 'checkpoints'}"])
    with pytest.raises(ValueError) as info:
        run_recipe(cfg)
    assert "8 steps in the checkpoint, 4 steps now; warm-up (schedule.warmup_epochs): 4 steps in the checkpoint, 2 steps now). " \
           "The training data is counted otherwise (videos per micro-batch 6 -> 12), which changes the steps per epoch." in str(info.value)
    assert "optimizer.lr, data.batch_size, train.grad_accumulation, the training list: see its run's recipe.yaml" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["data"]  # nothing trained: the folder is as it was (its text cache gone too)


def test_a_crash_before_the_first_checkpoint_then_a_fresh_start_logs_each_step_once(reference_runs, synthetic_data, tmp_path, monkeypatch):
    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    _die_during_step(monkeypatch, 3)  # steps 1-2 logged, no checkpoint yet (every 3 steps)
    with pytest.raises(Interrupted):
        _run_in_process(out, ["data.num_workers=0"])
    monkeypatch.undo()
    assert [r["step"] for r in _train_records(out)] == [1, 2]
    assert _resume_to_the_end(out, ["data.num_workers=0"]) == (0, 0, 0)
    _assert_same_run(reference, out)  # steps 1..8 once: the crashed attempt's lines were dropped


def test_explicit_resume_refuses_other_data_units_and_models_and_yields_to_own_checkpoints(reference_runs, synthetic_data, tmp_path, monkeypatch):
    """train.resume=<another run's mid-epoch checkpoint>: with another grad_accumulation the epoch's
    micro-batches would count other videos; another architecture is named; once this run has its
    own checkpoints, rerunning the same command continues from them."""
    from mergekit_video.runners import run_recipe

    reference = reference_runs(0, 1)
    start = reference / "checkpoints" / "step_00000003"  # mid-epoch: 3 of 4 steps
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    for changed, message in (
        ("train.grad_accumulation=2", r"stopped inside an epoch, counting or ordering its data otherwise \(grad_accumulation 1 -> 2; micro_batch 6 -> 3\)"),
        ("seed=5", r"stopped inside an epoch, counting or ordering its data otherwise \(seed \(the epoch's order\) 0 -> 5\)"),
        ("model.num_experts=2", r"holds another model than this recipe builds \(it has 16 unexpected tensors \('head.transformer.resblocks.0.mlp.experts.2.c_fc.bias', "
                                r"[^()]* \(and 13 more\)\)\); resume with the model settings"),
    ):
        cfg = _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", changed, f"train.resume={start}"])
        with pytest.raises(ValueError, match=rf"^train.resume: checkpoint {start} " + message):
            run_recipe(cfg)
    out = _new_run_dir(tmp_path / "continued", synthetic_data)
    _die_after_checkpoint(monkeypatch, 6)
    with pytest.raises(Interrupted):
        _run_in_process(out, ["data.num_workers=0", f"train.resume={start}"])
    monkeypatch.undo()
    assert _resume_to_the_end(out, ["data.num_workers=0", f"train.resume={start}"]) == (6, 1, 2)  # its own step 6, not step 3
    got, ref = _train_records(out), {r["step"]: r for r in _train_records(reference)}
    assert [r["step"] for r in got] == list(range(4, STEPS + 1))  # continued from the reference's step 3, each step once
    assert all(abs(r["loss"] - ref[r["step"]]["loss"]) <= 1e-6 for r in got)
    assert _max_diff(_load_state(reference / "model"), _load_state(out / "model")) <= 1e-6


def test_explicit_resume_with_other_model_or_objective_settings_names_them(reference_runs, synthetic_data, tmp_path, caplog):
    reference = reference_runs(0, 1)
    start = reference / "checkpoints" / "step_00000003"
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    with caplog.at_level("WARNING", logger="mergekit_video.runners.mote"):
        _run_in_process(out, ["data.num_workers=0", f"train.resume={start}", "model.router=random", "objective.wmr_weight=0.0"])
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.resume: checkpoint")]
    assert warned == [f"train.resume: checkpoint {start} was trained with other settings (model.router: 'multinomial' -> 'random'; "
                      "objective.wmr_weight: 0.5 -> 0.0); this run continues it with this recipe's"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_video.runners.mote"):  # the same settings: nothing to say
        _run_in_process(_new_run_dir(tmp_path / "same", synthetic_data), ["data.num_workers=0", f"train.resume={start}"])
    assert not [r for r in caplog.records if r.getMessage().startswith("train.resume: checkpoint")]


def test_a_kill_between_the_epoch_checkpoint_update_and_its_metrics_line_loses_no_validation(reference_runs, synthetic_data, tmp_path, monkeypatch):
    from mergekit_video.training.checkpoint import CheckpointManager

    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    original = CheckpointManager.update_state

    def update_then_die(self, step, **kw):
        original(self, step, **kw)
        if step == STEPS:  # the quickstart validates at its last epoch (eval_every_epochs: 10)
            raise Interrupted

    monkeypatch.setattr(CheckpointManager, "update_state", update_then_die)
    with pytest.raises(Interrupted):
        _run_in_process(out, ["data.num_workers=0"])
    monkeypatch.undo()
    assert _val_records(out) == []  # the epoch's validation is in the checkpoint's history only
    assert _resume_to_the_end(out, ["data.num_workers=0"]) == (STEPS, 2, 0)
    _assert_same_run(reference, out)  # its val/top1 line is written on resume, once


def test_an_epoch_whose_validation_videos_all_fail_has_no_val_accuracy_and_training_goes_on(reference_runs, synthetic_data, tmp_path, caplog):
    """A validation never stops training: all val videos unreadable → a warning, no val/top1 for the
    epoch (never a 0 % that could rank checkpoints), and the same trained weights as the reference."""
    reference = reference_runs(0, 1)
    missing = tmp_path / "val_missing.txt"
    missing.write_text("".join(f"gone/v{i}.mp4 {i % 6}\n" for i in range(4)))
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    data = [f"data.{k}={synthetic_data / f}" for k, f in (("train_list", "train.txt"), ("class_csv", "classes.csv"))]
    with caplog.at_level("WARNING", logger="mergekit_video.runners.mote"):
        runner = _run_in_process(out, ["data.num_workers=0", "~data.synthetic", f"data.root={synthetic_data}", *data, f"data.val_list={missing}"])
    validations = len(_val_records(reference))
    warned = [r.getMessage() for r in caplog.records if "no validation accuracy for this epoch" in r.getMessage()]
    assert validations >= 1 and len(warned) == validations and "all 4 failed to load" in warned[0]
    assert _val_records(out) == []
    assert [r["val/failed"] for r in read_metrics(out / "metrics.jsonl") if "val/failed" in r] == [4.0] * validations
    assert runner.trainer.state.best_metric is None
    assert _max_diff(_load_state(reference / "model"), _load_state(out / "model")) == 0.0


def test_a_val_list_past_the_training_classes_is_refused_before_training(synthetic_data, tmp_path):
    from mergekit_video.runners import run_recipe

    names = (synthetic_data / "classes.csv").read_text().splitlines()[1:]
    wrong = tmp_path / "val_other_classes.txt"
    first = (synthetic_data / "val.txt").read_text().splitlines()[0].split()[0]
    wrong.write_text(f"{first} {len(names) + 2}\n")  # a label of another, larger class list
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    data = ["~data.synthetic", f"data.root={synthetic_data}", f"data.train_list={synthetic_data / 'train.txt'}",
            f"data.class_csv={synthetic_data / 'classes.csv'}", f"data.val_list={wrong}"]
    cfg = _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", *data])
    with pytest.raises(ValueError, match=rf"labels go up to {len(names) + 2}, but there are only {len(names)} class names"):
        run_recipe(cfg)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()  # nothing trained


def test_clip_blend_without_pretrained_weights_is_refused_before_training(synthetic_data, tmp_path):
    from mergekit_video.runners import run_recipe

    from mergekit_video.config import ValidationError

    out = _new_run_dir(tmp_path / "run", synthetic_data)
    with pytest.raises(ValidationError, match=r"eval.clip_blend: blends the fine-tuned CLIP with the pretrained weights it "
                                              r"started from, but model.pretrained is null"):
        _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", "eval.clip_blend=0.99"])
    cfg = _load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0"])
    cfg["eval"]["clip_blend"] = 0.99  # a recipe built in Python, not validated: the runner's setup refuses it
    with pytest.raises(ValueError, match=r"^eval.clip_blend blends the fine-tuned CLIP with the pretrained weights"):
        run_recipe(cfg)
    assert not (out / "checkpoints").exists() and not (out / "model").exists()  # nothing trained


def test_a_failing_final_evaluation_keeps_the_trained_model(reference_runs, synthetic_data, tmp_path):
    """model/ is saved before the final evaluation: a corrupt video (on_error: raise) no longer loses it."""
    reference = reference_runs(0, 1)
    odd, bad = _eval_list_with_a_corrupt_video(synthetic_data, tmp_path / "evalroot")
    dataset = f"[{{name: odd, kind: close_set, root: {odd.parent}, list: {odd}, class_csv: {synthetic_data / 'classes.csv'}, on_error: raise}}]"
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    from mergekit_video.data.readers import VideoReadError

    with pytest.raises(VideoReadError, match="bad.mp4") as failure:
        _run_in_process(out, ["data.num_workers=0", f"eval.datasets={dataset}", "eval.batch_size=4"])
    # the error says which key lets the evaluation go on past the bad video (and count it)
    assert "eval.datasets.0.on_error=skip evaluates the others and reports how many failed" in str(failure.value)
    assert not (out / "results.json").exists()
    assert _max_diff(_load_state(reference / "model"), _load_state(out / "model")) == 0.0
    # the rerun that skips bad videos keeps the trained run (eval.* settings change only the final evaluation)
    _run_in_process(out, ["data.num_workers=0", f"eval.datasets={dataset.replace('on_error: raise', 'on_error: skip')}", "eval.batch_size=4"])
    results = json.loads((out / "results.json").read_text())
    assert results["datasets"]["odd"][0]["num_failed"] == 1
    assert [r["step"] for r in _train_records(out)] == list(range(1, STEPS + 1))  # nothing trained again
    assert _max_diff(_load_state(reference / "model"), _load_state(out / "model")) == 0.0


def test_cli_reports_an_interrupted_run_with_the_shells_exit_code_of_its_signal(capsys):
    """Exit 130 for Ctrl-C and 143 (128 + SIGTERM) for a scheduler's SIGTERM; SIGTERM exited 130 too."""
    import typer

    from mergekit_video.cli.errors import reraise_interrupts, run_app
    from mergekit_video.training.trainer import TrainingInterrupted

    def train(name: str) -> None:
        raise TrainingInterrupted(f"stopped by {name} after step 5; checkpoint saved in runs/x/checkpoints. Rerun the same command to resume.", step=5, signal_name=name)

    app = typer.Typer()
    app.command("run")(lambda: reraise_interrupts(train, "SIGTERM"))
    app.command("stop")(lambda: reraise_interrupts(train, "SIGINT"))
    app.command("other")(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert run_app(app, ["run"]) == 143
    assert capsys.readouterr().err.strip() == (
        "Interrupted: stopped by SIGTERM after step 5; checkpoint saved in runs/x/checkpoints. Rerun the same command to resume."
    )
    assert run_app(app, ["stop"]) == 130 and "stopped by SIGINT after step 5" in capsys.readouterr().err
    assert run_app(app, ["other"]) == 130 and capsys.readouterr().err.strip() == "Interrupted."  # was exit code 0


def test_cli_turns_out_of_memory_into_what_to_change(capsys):
    import typer

    from mergekit_video.cli.errors import run_app

    def train() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.20 GiB is free. Including non-PyTorch memory, this process has 78 GiB in use")

    app = typer.Typer()
    app.command("run")(train)
    app.command("other")(lambda: None)
    assert run_app(app, ["run"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "error: the device ran out of memory. Lower the per-device batch (data.batch_size is the total over processes;" in err
    assert "set train.grad_checkpointing=true. (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.20 GiB is free)" in err


def test_grad_clipping_logs_the_pre_clip_norm(synthetic_data, tmp_path):
    out = _new_run_dir(tmp_path / "clip", synthetic_data)
    _run_in_process(out, ["data.num_workers=0", "train.clip_grad_norm=0.5", "train.max_steps=3"])
    norms = [r["grad_norm"] for r in _train_records(out)]
    assert len(norms) == 3 and all(isinstance(n, float) and math.isfinite(n) and n > 0 for n in norms)


def test_compiled_visual_tower_trains_like_eager(reference_runs, synthetic_data, tmp_path):
    """``train.compile=true`` (torch.compile of the visual tower): same losses, same checkpoint keys."""
    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "compiled", synthetic_data)
    _run_in_process(out, ["data.num_workers=0", "train.compile=true"])
    ref, got = _train_records(reference), _train_records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (a, b)
    compiled, eager = _load_state(out / "model"), _load_state(reference / "model")
    assert sorted(compiled) == sorted(eager)  # no '_orig_mod.' prefixes: the model reloads uncompiled
    assert _max_diff(compiled, eager) <= 1e-3  # Adam turns ~1e-7 gradient differences into lr-sized steps


# ---------------------------------------------------------------------------------------------
# DDP: 2 processes with gloo through torchrun
# ---------------------------------------------------------------------------------------------
def _eval_list_with_a_corrupt_video(data: Path, root: Path) -> tuple[Path, Path]:
    """9 entries (8 good val videos and one corrupt mp4) under ``root``: an odd count, so DDP pads a shard."""
    root.mkdir()
    (root / "videos").symlink_to(data / "videos", target_is_directory=True)
    bad = root / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(512))
    lines = (data / "val.txt").read_text().splitlines()[:8]
    lines.insert(4, "bad.mp4 0")
    (root / "odd.txt").write_text("\n".join(lines) + "\n")
    return root / "odd.txt", bad


def test_training_names_its_unreadable_videos_when_it_ends(synthetic_data, tmp_path):
    """A bad training video was only counted in metrics.jsonl: the run now says how many were met and what became of them."""
    odd, bad = _eval_list_with_a_corrupt_video(synthetic_data, tmp_path / "trainroot")
    out = _new_run_dir(tmp_path / "run", synthetic_data)
    data = ["~data.synthetic", f"data.root={odd.parent}", f"data.train_list={odd}", f"data.class_csv={synthetic_data / 'classes.csv'}",
            "data.num_workers=0", "schedule.epochs=1"]
    from rich.console import Console

    from mergekit_video.runners import run_recipe

    console = Console(record=True, width=300)
    run_recipe(_load_validated(QUICKSTART, [f"output_dir={out}", *TRAIN_OVERRIDES, *data]), console=console)
    said = " ".join(console.export_text().split())
    assert f"1 training video could not be read and was replaced by other videos of the list (data.on_error); the first: {bad};" in said, said

def test_ddp_two_processes_agree_and_count_every_video_once(reference_runs, synthetic_data, tmp_path):
    from mergekit_video.models import load
    from mergekit_video.runners.common import class_features
    from mergekit_video.runners.mote import DUMP_RANK_STATE_ENV

    reference = reference_runs(0, 1)  # the same recipe in one process (batch 6 = 2 ranks × 3)
    out = _new_run_dir(tmp_path / "ddp", synthetic_data)
    odd, bad = _eval_list_with_a_corrupt_video(synthetic_data, tmp_path / "evalroot")
    dump = tmp_path / "rank_states"
    dataset = (f"[{{name: odd, kind: close_set, root: {odd.parent}, list: {odd}, class_csv: {synthetic_data / 'classes.csv'}, "
               f"num_clips: 2, num_crops: 1, on_error: skip}}]")
    overrides = [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", f"eval.datasets={dataset}", "eval.summary={close_set: odd}"]
    env = {**os.environ, DUMP_RANK_STATE_ENV: str(dump), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun's torchelastic_* folder too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mergekit_video", "run", str(QUICKSTART), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"
    assert res.stderr.count("No pretrained weights loaded") == 1  # open_clip's note from rank 0 only (was one per rank)

    # the ranks hold bit-identical weights, and rank 0 saved exactly those
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = _load_state(out / "model")
    assert all(torch.equal(saved[k], r0[k]) for k in saved)
    # ... and trained what one process trains on the whole batch (all-reduced gradients and metrics)
    got, ref = _train_records(out), _train_records(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # rank 0 alone writes metrics
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["lr"] == b["lr"]
    assert _max_diff(_load_state(reference / "model"), saved) <= 2e-3

    # evaluation under DDP counts every video once: 8 decoded (one shard padded), 1 failed
    results = json.loads((out / "results.json").read_text())
    odd_res = results["datasets"]["odd"][0]
    assert (odd_res["num_videos"], odd_res["num_failed"], odd_res["failed"], results["failed_videos"]) == (8, 1, [str(bad)], 1)
    # ... with the accuracies one process gets on the same list
    from mergekit_video.data import VideoDataset, build_loader, read_class_names

    model = load(out / "model")
    names = read_class_names(synthetic_data / "classes.csv")
    ds = VideoDataset(list_file=odd, root=odd.parent, num_frames=8, train=False, class_names=names, num_clips=2, num_crops=1,
                      input_size=32, on_error="skip")
    loader = build_loader(ds, batch_size=4, num_workers=0, shuffle=False, seed=0, drop_last=False)
    single = evaluate(model, loader, class_features(model, names, {"templates": "mote"}), variants=build_variants(model.head, modulation=(False, True)))
    assert single.num_videos == 8 and single.failed == [str(bad)]
    for name, v in single.variants.items():
        assert (v.top1, v.top5) == (odd_res["variants"][name]["top1"], odd_res["variants"][name]["top5"]), name


# ---------------------------------------------------------------------------------------------
# evaluator
# ---------------------------------------------------------------------------------------------
class _LogitsHead(torch.nn.Module):
    def forward(self, e: torch.Tensor, cls: torch.Tensor, modulation: bool = False) -> torch.Tensor:
        return e.mean(1)  # [N, T, C] → [N, C]: the "features" are the logits themselves


class _LogitsModel(torch.nn.Module):
    """A stand-in VideoCLIP: frames ``[N, T, C, 1, 1]`` are per-frame class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.head = _LogitsHead()

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.flatten(2)  # [N, T, C]


_SIGTERM_RANK1_AT_STEP_5 = """
import os, signal
if os.environ.get("LOCAL_RANK") == "1":  # torchrun's rank-1 process only (not the agent)
    from mergekit_video.training.trainer import Trainer
    _original = Trainer._optimizer_step
    def _signal_during_step_5(self):
        if self.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return _original(self)
    Trainer._optimizer_step = _signal_during_step_5
"""


def test_ddp_sigterm_on_one_rank_stops_both_at_the_same_step_and_resumes(reference_runs, synthetic_data, tmp_path):
    reference = reference_runs(0, 1)
    out = _new_run_dir(tmp_path / "ddp", synthetic_data)
    inject = tmp_path / "inject"  # a sitecustomize that signals rank 1 during step 5 (test-only fault injection)
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_SIGTERM_RANK1_AT_STEP_5)
    overrides = [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", "eval.datasets=[]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mergekit_video", "run", str(QUICKSTART), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode != 0  # an interrupted job reports failure, so a scheduler can requeue it
    assert "Interrupted: stopped by SIGTERM after step 5; checkpoint saved in" in res.stderr, res.stderr[-3000:]
    assert "Interrupted: stopped by a signal on another rank after step 5" in res.stderr  # rank 0 stopped at the same step
    assert (out / "checkpoints" / "step_00000005").is_dir() and not (out / "model").exists()

    env.pop("PYTHONPATH")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, f"resumed torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "step_00000005 (step 5)" in res.stdout.replace("\n", "")  # "resumed from .../step_00000005 (step 5)", wrapped by rich
    got, ref = _train_records(out), _train_records(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["lr"] == b["lr"]
    assert _max_diff(_load_state(reference / "model"), _load_state(out / "model")) <= 2e-3


def test_ddp_per_rank_routing_draws_differ_across_ranks_and_resume_exactly(reference_runs, synthetic_data, tmp_path):
    from mergekit_video.runners.mote import DUMP_RANK_STATE_ENV
    from mergekit_video.training.checkpoint import load_checkpoint

    reference = reference_runs(0, 1)  # one process: the draws every rank makes under routing_draws=global
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_SIGTERM_RANK1_AT_STEP_5)
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}

    def torchrun(out: Path, env: dict) -> subprocess.CompletedProcess:
        overrides = [f"output_dir={out}", *TRAIN_OVERRIDES, "data.num_workers=0", "eval.datasets=[]", "train.routing_draws=per_rank"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mergekit_video", "run", str(QUICKSTART), *overrides]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)

    whole = _new_run_dir(tmp_path / "whole", synthetic_data)
    dump = tmp_path / "rank_states"
    res = torchrun(whole, {**base_env, DUMP_RANK_STATE_ENV: str(dump)})
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # each rank trained other experts; DDP kept the weights equal
    # the ranks' routing streams differ, and the checkpoint holds both
    rank_streams = load_checkpoint(whole / "checkpoints" / "step_00000006").rng["rank_generators"]
    assert len(rank_streams) == 2 and set(rank_streams[0]) == set(rank_streams[1])
    assert any(not torch.equal(torch.as_tensor(rank_streams[0][k]), torch.as_tensor(rank_streams[1][k])) for k in rank_streams[0])
    # rank 1's sub-batches were routed differently from the shared draws: the losses depart from them
    got, ref = _train_records(whole), _train_records(reference)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)) > 1e-3

    # stopped on SIGTERM after step 5 and resumed: the same later losses and weights
    parted = _new_run_dir(tmp_path / "parted", synthetic_data)
    res = torchrun(parted, {**base_env, "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])})
    assert "stopped by SIGTERM after step 5" in res.stderr, res.stderr[-3000:]
    res = torchrun(parted, base_env)
    assert res.returncode == 0, f"resumed torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    resumed = _train_records(parted)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(got, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert _max_diff(_load_state(whole / "model"), _load_state(parted / "model")) <= 1e-6


def test_multi_view_averages_softmax_probabilities_and_counts_each_video_once():
    # video 0 (label 0): view A is sure of class 0, view B hesitates between 1 and 2
    #   mean of probabilities: p0 = (0.98670 + 0.00275) / 2 = 0.4947 > p1 = 0.2526 → class 0 (hit)
    #   mean of logits: [2.5, 2.6, 2.6] → class 1 or 2 (miss)
    # video 1 (label 2): both views say class 2
    views = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.2, 5.2]], [[0.0, 0.0, 4.0], [0.0, 1.0, 4.0]]])  # [B=2, V=2, C=3]
    frames = views[:, :, None, :, None, None]  # [B, V, T=1, C, 1, 1]
    batch = {"frames": frames, "label": torch.tensor([0, 2]), "index": torch.tensor([0, 1]), "failed": []}
    # the same video again (a padded DDP shard repeats indices) and a failed one
    again = {"frames": frames[1:], "label": torch.tensor([2]), "index": torch.tensor([1]), "failed": ["/x/bad.mp4"]}
    cls = torch.zeros(3, 1)
    soft = evaluate(_LogitsModel(), [batch, again], cls, view_reduce="softmax_mean", views=(2, 1))
    logit = evaluate(_LogitsModel(), [batch, again], cls, view_reduce="logit_mean", views=(2, 1))
    assert list(soft.variants) == ["model"]
    assert (soft.variants["model"].top1, soft.variants["model"].top5) == (100.0, None)  # no top-5 over 3 classes
    assert (logit.variants["model"].top1, logit.variants["model"].top5) == (50.0, None)
    assert (soft.num_videos, soft.num_failed, soft.failed, soft.views) == (2, 1, ["/x/bad.mp4"], (2, 1))
    with pytest.raises(ValueError, match="view_reduce must be one of"):
        evaluate(_LogitsModel(), [batch], cls, view_reduce="max")
    # a dense export is its experts' merge: named so without variants, as the runners and CLI name it
    exported = _LogitsModel()
    exported.config = {"exported_from": {"num_experts": 4, "merge": "mean"}}
    assert list(evaluate(exported, [batch], cls, views=(2, 1)).variants) == ["merged"]


def test_failed_videos_are_counted_per_list_line_not_per_path():
    frames = torch.tensor([[[[5.0, 0.0, 0.0]]]])[:, :, :, :, None, None]  # [B=1, V=1, T=1, C=3, 1, 1]
    good = {"frames": frames, "label": torch.tensor([0]), "index": torch.tensor([1]), "failed": ["/d/zero.mp4"], "failed_index": [0]}
    # the list names zero.mp4 on lines 0 and 3: two videos that failed; line 0 again (DDP padding) is the same one
    again = {"frames": frames[:0], "label": torch.tensor([], dtype=torch.long), "index": torch.tensor([], dtype=torch.long),
             "failed": ["/d/zero.mp4", "/d/zero.mp4"], "failed_index": [3, 0]}
    res = evaluate(_LogitsModel(), [good, again], torch.zeros(3, 1))
    assert (res.num_videos, res.num_failed, res.failed) == (1, 2, ["/d/zero.mp4"])
    assert res.variants["model"].top1 == 100.0


def test_an_evaluation_of_no_video_is_an_error_not_zero_percent():
    empty = {"frames": torch.empty(0, 1, 1, 3, 1, 1), "label": torch.empty(0, dtype=torch.long),
             "index": torch.empty(0, dtype=torch.long), "failed": ["/d/b.mp4", "/d/a.mp4"]}
    with pytest.raises(ValueError, match=r"no video of dataset 'ucf101' was evaluated: all 2 failed to load \(first: /d/a.mp4\)"):
        evaluate(_LogitsModel(), [empty], torch.zeros(3, 1), dataset_name="ucf101")
    with pytest.raises(ValueError, match="no video of the evaluation was evaluated: its video list is empty"):
        evaluate(_LogitsModel(), [], torch.zeros(3, 1))


def test_nan_class_scores_are_an_error_naming_the_variant_and_the_cause_not_a_plausible_accuracy():
    """topk ranks NaN arbitrarily: a video whose scores are not finite stops the evaluation, naming
    the variant, how many videos, and a non-finite weight when there is one (else the precision)."""
    frames = torch.tensor([[0.1, 0.9, 0.0], [float("nan"), 0.0, 1.0], [0.0, 0.0, float("inf")]]).view(3, 1, 1, 3, 1, 1)
    batch = {"frames": frames, "label": torch.tensor([1, 2, 2]), "index": torch.arange(3)}
    with pytest.raises(ValueError, match=r"^dataset 'val': NaN or infinite class scores from 'model' \(2 of 3 videos\): "
                                         r"the weights are finite, so the forward overflowed: evaluate with eval.precision=fp32"):
        evaluate(_LogitsModel(), [batch], torch.zeros(3, 1), dataset_name="val")
    model = _LogitsModel()
    model.register_buffer("scale", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"from 'model' \(2 of 3 videos\): the model's 'scale' holds NaN or infinite values"):
        evaluate(model, [batch], torch.zeros(3, 1))
    res = evaluate(_LogitsModel(), [{**batch, "frames": frames.nan_to_num(0.0, 5.0)}], torch.zeros(3, 1))
    assert res.variants["model"].top1 == 100.0


def test_tfm_without_source_class_features_fails_before_decoding():
    from mergekit_video.models import build_video_clip

    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    assert model.head.source_class_features.numel() == 0

    def batches():
        raise AssertionError("decoded a batch")
        yield  # pragma: no cover

    variants = build_variants(model.head, modulation=(False, True))
    with pytest.raises(ValueError, match=r"needs the source \(fine-tuning\) class features.*eval.modulation: \[false\]"):
        evaluate(model, batches(), torch.zeros(3, 64), variants=variants)


def _collapsed(model, strategy: str, **kw):
    from mergekit_video.surgery import collapse_experts

    dense = copy.deepcopy(model)
    collapse_experts(dense.head, strategy, **kw)
    return dense.eval()


def _model_with_distinct_experts():
    """The tiny CLIP with a 2-layer, 4-expert head whose experts are far apart (their predictions differ), 6 source
    classes for TFM, in eval mode."""
    from mergekit_video.models import build_video_clip

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=2, num_experts=4)
    with torch.no_grad():
        for n, p in model.head.named_parameters():
            if ".experts." in n and p.dim() == 2:
                p.mul_(25.0)
    model.head.set_source_class_features(F.normalize(torch.randn(6, 64), dim=-1))
    return model.eval()


def test_variants_equal_the_collapsed_models_and_the_ensemble_of_their_logits():
    """Each variant's predictions are those of an independent dense model: the mean merge, each
    expert alone, another merge; the logit ensemble averages the experts' logits per view (Table 2c)."""
    model = _model_with_distinct_experts()
    n_videos, n_classes = 16, 10
    frames = torch.randn(n_videos, 2, 8, 3, 32, 32)  # 2 views per video
    cls = F.normalize(torch.randn(n_classes, 64), dim=-1)
    variants = build_variants(model.head, modulation=(False, True), merges=[{"name": "temperature_softmax", "tau": 0.6}], experts=True, logit_ensemble=True)
    assert [v.name for v in variants][:8] == ["merged", "temperature_softmax(tau=0.6)", "expert_0", "expert_1", "expert_2", "expert_3", "logit_ensemble", "merged+tfm"]

    @torch.no_grad()
    def probs(m, tfm):  # view-averaged softmax of a dense model, [N, C]
        return torch.stack([m(frames[:, v], cls, modulation=tfm).softmax(-1) for v in range(2)]).mean(0)

    @torch.no_grad()
    def logit_ensemble(members, tfm):  # Table 2c: per view the mean of the experts' logits, then softmax, view mean
        return torch.stack([torch.stack([m(frames[:, v], cls, modulation=tfm) for m in members]).mean(0).softmax(-1)
                            for v in range(2)]).mean(0)

    refs = {}
    for tfm, sfx in ((False, ""), (True, "+tfm")):
        refs["merged" + sfx] = probs(_collapsed(model, "mean"), tfm)
        refs["temperature_softmax(tau=0.6)" + sfx] = probs(_collapsed(model, "temperature_softmax", tau=0.6), tfm)
        experts = [_collapsed(model, "weighted", weights=[float(i == j) for j in range(4)]) for i in range(4)]
        for i in range(4):
            refs[f"expert_{i}" + sfx] = probs(experts[i], tfm)
        refs["logit_ensemble" + sfx] = logit_ensemble(experts, tfm)
        prob_ensemble = torch.stack([refs[f"expert_{i}" + sfx] for i in range(4)]).mean(0)
        if not tfm:  # (random source classes: ρ ≈ 0 with TFM, so there the experts agree)
            assert (refs["logit_ensemble"] - prob_ensemble).abs().max() > 1e-5  # the two ensembles differ
    assert len({tuple(p.argmax(-1).tolist()) for p in refs.values()}) >= 4  # the variants disagree somewhere

    def loader(labels):
        return [{"frames": frames[i:i + 4], "label": labels[i:i + 4], "index": torch.arange(i, i + 4), "failed": []} for i in range(0, n_videos, 4)]

    for name, ref in refs.items():
        # labels = the reference's own top-1: the variant must score 100 %, the others what the reference predicts of them
        res = evaluate(model, loader(ref.argmax(-1)), cls, variants=variants)
        assert res.variants[name].top1 == 100.0, name
        for other, o in refs.items():
            expected = 100.0 * (o.argmax(-1) == ref.argmax(-1)).float().mean().item()
            assert res.variants[other].top1 == pytest.approx(expected), (name, other)
        top5 = ref.topk(5, -1).indices[:, -1]  # labels ranked 5th by the reference: top-5 hits, top-1 misses
        res = evaluate(model, loader(top5), cls, variants=variants)
        assert (res.variants[name].top1, res.variants[name].top5) == (0.0, 100.0), name
    rho_calls = []
    rho = model.head.modulation_weights
    model.head.modulation_weights = lambda e, c: rho_calls.append(e.shape[0]) or rho(e, c)
    res2 = evaluate(model, loader(refs["merged+tfm"].argmax(-1)), cls, variants=variants)
    del model.head.modulation_weights
    assert rho_calls == [8] * 4  # ρ once per batch of 4 videos x 2 views, shared by the 7 TFM variants
    assert res2.variants["merged+tfm"].top1 == 100.0  # the shared ρ is the one each variant computed for itself
    # the logit ensemble without eval.compare.experts: the experts run for it but are not reported
    hidden = build_variants(model.head, modulation=(False,), experts=False, logit_ensemble=True)
    labels = refs["logit_ensemble"].argmax(-1)
    res = evaluate(model, loader(labels), cls, variants=hidden)
    assert list(res.variants) == ["merged", "logit_ensemble"] and res.variants["logit_ensemble"].top1 == 100.0


def test_random_routing_variant_runs_each_video_through_its_own_drawn_experts():
    """Table 2c "Random routing": each view of each video runs one uniformly drawn expert per layer,
    drawn from (seed, dataset index): the same whatever the batch size, and shared by TFM off and on."""
    from mergekit_video.evaluation.evaluator import random_routing_draws
    from mergekit_video.experts import find_containers, routing_plan

    model = _model_with_distinct_experts()
    n_videos, views = 12, 2
    frames = torch.randn(n_videos, views, 8, 3, 32, 32)
    cls = F.normalize(torch.randn(10, 64), dim=-1)
    names = [n for n, _ in find_containers(model.head)]
    variants = build_variants(model.head, modulation=(False, True), random_routing=True, seed=7)
    assert [v.name for v in variants] == ["merged", "random_routing", "merged+tfm", "random_routing+tfm"]

    refs = {}
    drawn = []
    with torch.no_grad():
        for tfm, sfx in ((False, ""), (True, "+tfm")):
            rows = []
            for i in range(n_videos):
                draws = random_routing_draws(i, [4, 4], views=views, seed=7)  # [V, L]
                drawn.append(draws)
                per_view = []
                for v in range(views):
                    with routing_plan(model.head, {name: int(draws[v, l]) for l, name in enumerate(names)}):
                        per_view.append(model(frames[i:i + 1, v], cls, modulation=tfm).softmax(-1))
                rows.append(torch.stack(per_view).mean(0))
            refs["random_routing" + sfx] = torch.cat(rows)
    assert len({tuple(d.flatten().tolist()) for d in drawn}) > 6  # the videos' draws differ
    merged = torch.stack([model(frames[:, v], cls).softmax(-1) for v in range(views)]).mean(0)
    assert (merged.argmax(-1) != refs["random_routing"].argmax(-1)).any()  # not the merged model

    def loader(labels, size):
        return [{"frames": frames[i:i + size], "label": labels[i:i + size], "index": torch.arange(i, min(i + size, n_videos)), "failed": []}
                for i in range(0, n_videos, size)]

    for name, ref in refs.items():
        for size in (4, 5):  # batches of 4 and of 5 (a last batch of 2): the draws follow the videos
            res = evaluate(model, loader(ref.argmax(-1), size), cls, variants=variants)
            assert res.variants[name].top1 == 100.0, (name, size)
    other = evaluate(model, loader(refs["random_routing"].argmax(-1), 4), cls,
                     variants=build_variants(model.head, modulation=(False,), random_routing=True, seed=8))
    assert other.variants["random_routing"].top1 < 100.0  # another seed, other draws

def test_random_routing_covers_the_visual_towers_experts_frame_by_frame():
    """With experts in the CLIP tower, random routing sends every frame of a video through that video's
    drawn expert of each tower layer (the tower sees [B*V*T] frames) as well as of the head."""
    from mergekit_video.evaluation.evaluator import random_routing_draws
    from mergekit_video.experts import find_containers, routing_plan
    from mergekit_video.models import build_video_clip
    from mergekit_video.surgery import add_experts

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    add_experts(model.clip.visual, "transformer.resblocks.*.mlp", 3, init="normal")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n and p.dim() == 2:
                p.mul_(20.0)
    model.eval()
    names = [n for n, _ in find_containers(model)]
    counts = [c.num_experts for _, c in find_containers(model)]
    assert names[-1].startswith("head.") and counts == [3, 3, 2]
    frames, cls = torch.randn(6, 1, 4, 3, 32, 32), F.normalize(torch.randn(8, 64), dim=-1)
    with torch.no_grad():
        ref = []
        for i in range(6):
            draws = random_routing_draws(i, counts, views=1, seed=0)[0]
            with routing_plan(model, {n: int(d) for n, d in zip(names, draws)}):
                ref.append(model(frames[i:i + 1, 0], cls).argmax(-1))
        ref = torch.cat(ref)
        assert (ref != model(frames[:, 0], cls).argmax(-1)).any()  # the draws matter (not the merged model)
    variants = build_variants(model.head, modulation=(False,), random_routing=True)
    for size in (2, 4):
        batches = [{"frames": frames[i:i + size], "label": ref[i:i + size], "index": torch.arange(i, min(i + size, 6)), "failed": []}
                   for i in range(0, 6, size)]
        assert evaluate(model, batches, cls, variants=variants).variants["random_routing"].top1 == 100.0

def test_failed_videos_are_counted_and_skipped(synthetic_data, tmp_path):
    from mergekit_video.data import VideoDataset, build_loader, read_class_names
    from mergekit_video.data.readers import VideoReadError

    odd, bad = _eval_list_with_a_corrupt_video(synthetic_data, tmp_path / "evalroot")
    names = read_class_names(synthetic_data / "classes.csv")
    model = _LogitsModelFromFrames(len(names))

    def run(on_error):
        ds = VideoDataset(list_file=odd, root=odd.parent, num_frames=4, train=False, class_names=names, num_clips=1, input_size=16, on_error=on_error)
        return evaluate(model, build_loader(ds, batch_size=3, num_workers=0, shuffle=False, seed=0, drop_last=False), torch.zeros(len(names), 1))

    res = run("skip")
    assert (res.num_videos, res.num_failed, res.failed) == (8, 1, [str(bad)])
    assert res.variants["model"].num_videos == 8
    with pytest.raises(VideoReadError, match="bad.mp4"):
        run("raise")


class _LogitsModelFromFrames(torch.nn.Module):
    """Any frames → constant logits (the failed-video bookkeeping does not depend on the model)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = _LogitsHead()

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.zeros(frames.shape[0], frames.shape[1], self.num_classes)


def _res(dataset: str, **top1: float) -> EvalResult:
    return EvalResult(dataset=dataset, variants={k: VariantResult(top1=v, top5=min(100.0, v + 10), num_videos=100) for k, v in top1.items()}, num_videos=100)


def test_summary_scores_by_hand():
    """HM_ZS = 3 / (1/72 + 1/52 + 1/61) = 60.5900...; Trade-off = 2 / (1/80 + 1/60.590) = 68.9551...."""
    results = {
        "k400": [_res("k400", A=80.0, B=90.0)],
        "ucf": [_res("ucf/split1", A=70.0, B=0.0), _res("ucf/split2", A=72.0, B=0.0), _res("ucf/split3", A=74.0, B=0.0)],
        "hmdb": [_res(f"hmdb/split{i}", A=v, B=40.0) for i, v in enumerate((50.0, 52.0, 54.0), 1)],
        "k600": [_res(f"k600/split{i}", A=v, B=40.0) for i, v in enumerate((60.0, 61.0, 62.0), 1)],
    }
    s = summarize(results, close_set="k400", zero_shot=["ucf", "hmdb", "k600"])
    a = s["A"]
    assert (a["ucf"]["top1"], a["hmdb"]["top1"], a["k600"]["top1"]) == (72.0, 52.0, 61.0)
    assert a["ucf"]["top1_std"] == pytest.approx(1.6329932)  # population std of 70, 72, 74: sqrt(8/3)
    assert a["k600"]["top1_std"] == pytest.approx(0.8164966)  # sqrt(2/3)
    assert a["ucf"]["splits"] == [70.0, 72.0, 74.0] and a["ucf"]["top5"] == 82.0
    assert a["HM_ZS"] == pytest.approx(60.59004, abs=1e-4)
    assert a["trade_off"] == pytest.approx(68.95513, abs=1e-4)
    # a zero on one zero-shot dataset makes the harmonic means 0
    assert (s["B"]["HM_ZS"], s["B"]["trade_off"]) == (0.0, 0.0)
    # without a close-set dataset there is no Trade-off; with a zero-shot dataset missing, no HM_ZS
    assert "trade_off" not in summarize(results, close_set=None, zero_shot=["ucf"])["A"]
    assert "HM_ZS" not in summarize({"k400": results["k400"]}, close_set="k400", zero_shot=["ucf"])["A"]
    # the rich table shows mean ± std over splits
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(results_table(s, datasets=list(results)))
    text = console.export_text()
    assert "72.0 ± 1.6" in text and "60.6" in text and "69.0" in text
    assert "k400 top-5" not in text
    console = Console(record=True, width=200)
    console.print(results_table(s, datasets=list(results), close_set="k400"))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "variant" in line)
    assert [c.strip() for c in header.split("┃")[1:4]] == ["variant", "k400 top-1", "k400 top-5"]
    row_a = next(line for line in lines if line.split("│")[1:2] == [" A "] or line.startswith("│ A "))
    assert [c.strip() for c in row_a.split("│")[2:4]] == [f"{a['k400']['top1']:.1f}", f"{a['k400']['top5']:.1f}"]
    # 5 classes or fewer: no top-5 (None, "-" in the table, null in JSON)
    small = {"k400": [EvalResult(dataset="k400", variants={"A": VariantResult(top1=60.0, top5=None, num_videos=4)}, num_videos=4)]}
    assert summarize(small, close_set="k400", zero_shot=[])["A"]["k400"]["top5"] is None
    console = Console(record=True, width=200)
    console.print(results_table(summarize(small, close_set="k400", zero_shot=[]), datasets=["k400"], close_set="k400"))
    row = next(line for line in console.export_text().splitlines() if line.startswith("│ A "))
    assert [c.strip() for c in row.split("│")[2:4]] == ["60.0", "-"]
    # over one zero-shot dataset HM_ZS is its top-1: the table leaves the column out (Trade-off stays)
    one = summarize(results, close_set="k400", zero_shot=["ucf"])
    assert one["A"]["HM_ZS"] == 72.0
    for zero_shot, shown in ((["ucf"], False), (["ucf", "hmdb", "k600"], True)):
        console = Console(record=True, width=200)
        console.print(results_table(summarize(results, close_set="k400", zero_shot=zero_shot), datasets=list(results),
                                    close_set="k400", zero_shot=zero_shot))
        text = console.export_text()
        assert ("HM_ZS" in text) is shown and "Trade-off" in text


def test_variant_labels_and_plain_models(caplog):
    from mergekit_video.models import build_video_clip

    plain = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=0)
    with caplog.at_level("WARNING", logger="mergekit_video.evaluation.evaluator"):
        assert [v.name for v in build_variants(plain.head, merges=[{"name": "mean"}], experts=True)] == ["model", "model+tfm"]
    assert "the model has no experts" in caplog.text  # a comparison that has nothing to compare says so
    assert Variant(name="x").kind == "merged"


def test_a_dense_exports_variant_is_merged_as_its_models(tmp_path):
    """``mergevid eval run/model_dense`` labelled its rows ``model`` / ``model+tfm`` where ``run/model`` gives ``merged`` /
    ``merged+tfm`` with the same numbers, so results compared by key found nothing in common."""
    from mergekit_video.models import build_video_clip, export_dense, load

    mote = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=3)
    dense = load(export_dense(mote, tmp_path / "dense"))
    assert [v.name for v in build_variants(mote)] == ["merged", "merged+tfm"]
    assert [v.name for v in build_variants(dense)] == ["merged", "merged+tfm"]
    plain = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=0)
    assert [v.name for v in build_variants(load(export_dense(plain, tmp_path / "plain")))] == ["model", "model+tfm"]  # no merge


def test_variants_route_the_visual_towers_experts_too():
    """With experts in the CLIP tower as well, expert_i / a merge / the logit ensemble are the whole model
    under that routing (frames encoded once per routing, shared by TFM off/on), not the head alone on the
    default-merged tower (expert_0 scored 12.5 % against the model run on expert 0)."""
    from mergekit_video.experts import find_containers, use_expert, use_merge
    from mergekit_video.models import build_video_clip
    from mergekit_video.surgery import add_experts

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    add_experts(model.clip.visual, "transformer.resblocks.*.mlp", 2, init="normal")
    with torch.no_grad():  # experts far apart, so that the routings disagree
        for n, p in model.named_parameters():
            if ".experts." in n and p.dim() == 2:
                p.mul_(20.0)
    model.head.set_source_class_features(F.normalize(torch.randn(4, 64), dim=-1))
    model.eval()
    assert len(find_containers(model)) == 3 and len(find_containers(model.head)) == 1
    frames = torch.randn(8, 8, 3, 32, 32)
    with torch.no_grad():  # class features orthogonal to the tiny tower's dominant direction, so that routings matter
        u = F.normalize(model.encode_frames(frames).mean((0, 1)), dim=0)
    r = torch.randn(6, 64)
    cls = F.normalize(r - (r @ u)[:, None] * u, dim=-1)
    refs = {}
    with torch.no_grad():
        for tfm, sfx in ((False, ""), (True, "+tfm")):
            refs["merged" + sfx] = model(frames, cls, modulation=tfm).argmax(-1)
            for i in range(2):
                with use_expert(model, i):
                    refs[f"expert_{i}" + sfx] = model(frames, cls, modulation=tfm).argmax(-1)
            with use_merge(model, "temperature_softmax", tau=0.6):
                refs["temperature_softmax(tau=0.6)" + sfx] = model(frames, cls, modulation=tfm).argmax(-1)
        with use_expert(model.head, 1):  # what expert_1 used to be: the head's expert 1 on the default-merged tower
            head_only = model(frames, cls).argmax(-1)
    assert refs["expert_0"].tolist() == [5, 1, 1, 5, 1, 1, 5, 1] and refs["expert_1"].tolist() == [5] * 8 and head_only.tolist() == [2] * 8
    variants = build_variants(model.head, modulation=(False, True), merges=[{"name": "temperature_softmax", "tau": 0.6}], experts=True)
    calls = []
    encode = model.encode_frames
    model.encode_frames = lambda x: calls.append(x.shape[0]) or encode(x)
    for name in ("expert_0", "expert_1+tfm"):  # labels = one variant's predictions: each variant scores its agreement with them
        ref = refs[name]
        res = evaluate(model, [{"frames": frames, "label": ref, "index": torch.arange(8), "failed": []}], cls, variants=variants)
        assert res.variants[name].top1 == 100.0
        for other, o in refs.items():
            assert res.variants[other].top1 == 100.0 * (o == ref).float().mean().item(), (name, other)
    assert len(calls) == 2 * 4  # 4 routings per batch (merged, one merge, 2 experts), each shared by TFM off and on
    rho_calls = []
    rho = model.head.modulation_weights
    model.head.modulation_weights = lambda e, c: rho_calls.append(e.shape[0]) or rho(e, c)
    evaluate(model, [{"frames": frames, "label": refs["merged"], "index": torch.arange(8), "failed": []}], cls, variants=variants)
    del model.head.modulation_weights
    assert rho_calls == [8] * 4  # ρ once per routing of the tower: its frame features differ

    def failing_loader():  # a decode error after one batch: the model's train/eval mode is restored all the same
        yield {"frames": frames, "label": refs["merged"], "index": torch.arange(8), "failed": []}
        raise RuntimeError("bad video")

    model.train()
    with pytest.raises(RuntimeError, match="bad video"):
        evaluate(model, failing_loader(), cls, variants=variants)
    assert model.training
    # expert i of every container needs one expert count: 2 in the tower, 3 in the head is refused
    other = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=3)
    add_experts(other.clip.visual, "transformer.resblocks.*.mlp", 2, init="normal")
    with pytest.raises(ValueError, match="containers have 2 and 3 experts"):
        evaluate(other, [], cls, variants=build_variants(other.head, experts=True))


class _FeatureTableModel(torch.nn.Module):
    """A stand-in VideoCLIP whose "frames" ``[N, T, 1, 1, 1]`` hold the index of a row of precomputed features."""

    def __init__(self, features: torch.Tensor, head: torch.nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, head  # [N, T, D]

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.features[frames[:, 0, 0, 0, 0].long()]


def test_bf16_autocast_leaves_the_heads_similarities_and_tfm_in_fp32():
    """Under bf16 autocast (CUDA's ``auto`` precision, simulated on the CPU) the cosine logits and ρ of
    Eq. 11 are fp32 and equal to the computation without autocast, as in the official test code. In bf16,
    CLIP-like class features (sharing one direction, cosines ~0.3) made the best two classes of 20 of these
    256 videos tie exactly and left 37 distinct values of ρ, 15x off at worst."""
    from mergekit_video.models import TemporalHead, cosine_logits, semantic_association

    g = torch.Generator().manual_seed(0)
    n, t, d, c = 256, 4, 512, 200
    common = F.normalize(torch.randn(d, generator=g), dim=0)
    cls = F.normalize(0.5 * common + 0.85 * F.normalize(torch.randn(c, d, generator=g), dim=-1), dim=-1)
    src = F.normalize(cls + 0.3 * F.normalize(torch.randn(c, d, generator=g), dim=-1), dim=-1)  # source classes near the targets
    labels = torch.randint(0, c, (n,), generator=g)
    e = (0.45 * common + 0.1 * cls[labels] + 0.9 * F.normalize(torch.randn(n, d, generator=g), dim=-1))[:, None].expand(n, t, d).contiguous()
    ref_logits, ref_rho = cosine_logits(e, cls), semantic_association(e, cls, src)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, rho = cosine_logits(e, cls), semantic_association(e, cls, src)
        logits_b, rho_b = cosine_logits(e.bfloat16(), cls), semantic_association(e.bfloat16(), cls, src)  # bf16 inputs: fp32 math
    assert logits.dtype == rho.dtype == logits_b.dtype == rho_b.dtype == torch.float32
    assert torch.equal(logits, ref_logits) and torch.equal(rho, ref_rho)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] > top2[:, 1]).all() and rho.unique().numel() == n
    assert (logits_b - ref_logits).abs().max() < 1e-2  # only the inputs' rounding remains
    # the evaluator at precision bf16 (autocast around the visual tower and the head) scores what fp32 scores:
    # a head whose blocks output zero makes h(e) = e + position embedding exactly, in either precision
    head = TemporalHead(width=d, layers=1, num_experts=0)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if ".ln_" not in name:
                p.zero_()
        head.frame_position_embeddings.weight[:t] = 0.3 * F.normalize(torch.randn(t, d, generator=g), dim=-1)
    head.set_source_class_features(src)
    model = _FeatureTableModel(e, head)
    idx = torch.arange(n, dtype=torch.float32)[:, None, None, None, None].expand(n, t, 1, 1, 1)
    loader = [{"frames": idx[i:i + 64], "label": labels[i:i + 64], "index": torch.arange(i, i + 64), "failed": []} for i in range(0, n, 64)]
    variants = build_variants(head)
    fp32, bf16 = (evaluate(model, loader, cls, variants=variants, precision=p) for p in ("fp32", "bf16"))
    assert {k: (v.top1, v.top5) for k, v in fp32.variants.items()} == {k: (v.top1, v.top5) for k, v in bf16.variants.items()}
    assert fp32.variants["model"].top1 != fp32.variants["model+tfm"].top1  # ρ matters here (bf16 ρ scored 19.5 / 52.7)


# ---------------------------------------------------------------------------------------------
# benchmarks (JSON with the documented keys; no speed is asserted)
# ---------------------------------------------------------------------------------------------
def test_bench_head_writes_json_and_markdown(tmp_path, capsys):
    """Small head shapes keep this quick on a CPU; the default shapes are the paper's two heads."""
    from mergekit_video.training.benchmark import HEAD_SHAPES, head_shape

    assert HEAD_SHAPES == (("ViT-B/16 head", 512, 4), ("ViT-L/14 head", 768, 6))
    assert head_shape("768x6") == ("ViT-L/14 head", 768, 6) and head_shape("64x2") == ("64x2 head", 64, 2)
    out, md = tmp_path / "head.json", tmp_path / "bench.md"
    md.write_text("# Benchmarks\n")
    args = ["bench", "head", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--device", "cpu", "--shape", "64x2", "--shape", "128x1"]
    assert cli_main([*args, "--output", str(out), "--markdown", str(md)]) == 0
    res = json.loads(out.read_text())
    assert {"device", "batch_size", "frames", "num_experts", "shapes"} <= set(res)
    assert (res["batch_size"], res["frames"], res["num_experts"]) == (2, 8, 4)
    assert list(res["shapes"]) == ["64x2 head", "128x1 head"]
    for name, (width, layers) in (("64x2 head", (64, 2)), ("128x1 head", (128, 1))):
        r = res["shapes"][name]
        assert (r["width"], r["layers"]) == (width, layers)
        assert set(r["train_ms"]) == {"mote_fused", "mote_two_forwards", "plain"}
        assert set(r["eval_ms"]) == {"mote_merged_cached", "plain", "mote_remerge_every_forward"}
        assert all(v > 0 for v in (*r["train_ms"].values(), *r["eval_ms"].values()))
        tm, em = r["train_ms"], r["eval_ms"]
        assert r["train_ratio_mote_vs_plain"] == pytest.approx(tm["mote_fused"] / tm["plain"])
        assert r["train_ratio_two_forwards_vs_plain"] == pytest.approx(tm["mote_two_forwards"] / tm["plain"])
        assert r["eval_ratio_merged_vs_plain"] == pytest.approx(em["mote_merged_cached"] / em["plain"])
        assert r["eval_ratio_remerge_vs_plain"] == pytest.approx(em["mote_remerge_every_forward"] / em["plain"])
    text = md.read_text()
    assert text.startswith("# Benchmarks\n") and "| 64x2 head (D=64, L=2) |" in text and "| 128x1 head (D=128, L=1) |" in text
    # the columns of docs/benchmarks.md's tables: the plain times too, so the ratios can be checked from the table
    assert "| shape | plain train (ms) | MoTE train (ms) | MoTE / plain | two forwards / plain | plain eval (ms) | merged eval (ms) |" in text
    r = res["shapes"]["64x2 head"]
    assert f"| 64x2 head (D=64, L=2) | {r['train_ms']['plain']:.2f} | {r['train_ms']['mote_fused']:.2f} | **{r['train_ratio_mote_vs_plain']:.2f}x** |" in text
    printed = capsys.readouterr().out
    assert "bench head" in printed
    # the console shows the same table, one row per line however narrow the (piped) console
    assert "| shape | plain train (ms) | MoTE train (ms) | MoTE / plain | two forwards / plain | plain eval (ms) | merged eval (ms) |" in printed
    assert f"| 64x2 head (D=64, L=2) | {r['train_ms']['plain']:.2f} | {r['train_ms']['mote_fused']:.2f} |" in printed
    before = out.read_bytes()
    assert cli_main([*args, "--output", str(out)]) == 1  # results are never replaced silently, and nothing ran
    assert f"{out} exists; pass --overwrite to replace it" in capsys.readouterr().err and out.read_bytes() == before
    assert cli_main(["bench", "head", "--shape", "100x2", "--output", str(out), "--overwrite"]) == 1
    assert "head shape '100x2': the width must be a positive multiple of 64" in capsys.readouterr().err


def test_bench_train_writes_json(tmp_path, capsys, monkeypatch):
    from mergekit_video.training import benchmark

    timed: list[list[str]] = []
    original = benchmark.time_interleaved

    def spy(fns, **kw):
        timed.append(list(fns))
        return original(fns, **kw)

    monkeypatch.setattr(benchmark, "time_interleaved", spy)
    out = tmp_path / "train.json"
    assert cli_main(["bench", "train", str(QUICKSTART), "--steps", "1", "--warmup", "1", "--batch-size", "2", "--output", str(out)]) == 0
    assert timed == [["mote", "baseline"]]  # both variants timed in alternation, in one call
    res = json.loads(out.read_text())
    assert {"device", "batch_size", "frames", "input_size", "runs", "overhead_mote_vs_baseline", "compile", "grad_checkpointing"} <= set(res)
    assert (res["precision"], res["model"], res["num_experts"], res["steps"], res["warmup"]) == ("fp32", "mergevid-tiny-vit", 4, 1, 1)
    assert (res["compile"], res["grad_checkpointing"]) == (False, False)  # the quickstart recipe's train settings
    assert (res["batch_size"], res["frames"], res["input_size"]) == (2, 8, 32)
    assert sorted(res["runs"]) == ["baseline", "mote"]
    for r in res["runs"].values():
        assert r["step_s"] > 0 and r["clips_per_s"] == pytest.approx(2 / r["step_s"])
        assert "mfu" not in r  # CPU: no MFU
    assert res["overhead_mote_vs_baseline"] == pytest.approx(res["runs"]["mote"]["step_s"] / res["runs"]["baseline"]["step_s"])
    assert "MoTE step / baseline step" in capsys.readouterr().out
    # --no-baseline times MoTE alone
    assert cli_main(["bench", "train", str(QUICKSTART), "--steps", "1", "--warmup", "1", "--batch-size", "2", "--no-baseline", "--output", str(out)]) == 1
    assert f"{out} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert cli_main(["bench", "train", str(QUICKSTART), "--steps", "1", "--warmup", "1", "--batch-size", "2", "--no-baseline", "--output", str(out), "--overwrite"]) == 0
    res = json.loads(out.read_text())
    assert sorted(res["runs"]) == ["mote"] and "overhead_mote_vs_baseline" not in res
