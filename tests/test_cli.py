"""``mergevid``: fast help, version, one-line errors (``--debug`` for the traceback), convert → export → open_clip."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
import torch.nn.functional as F

import mergekit_video
from mergekit_video.cli.main import main as cli_main
from official_reference import official_checkpoint as _official_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
HEAVY = ("torch", "open_clip", "decord", "av", "matplotlib", "timm", "numpy", "safetensors", "einops")


def _mergevid(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script's entry point in a fresh interpreter."""
    code = "import sys; from mergekit_video.cli.main import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})}, cwd=cwd or REPO,
    )


# ---------------------------------------------------------------------------------------------
# help and version stay light
# ---------------------------------------------------------------------------------------------
def test_help_imports_nothing_heavy():
    """Building the app and rendering every command's help imports no torch / open_clip / decord / av."""
    code = f"""
import sys, click, typer.main
from mergekit_video.cli.main import app
cmd = typer.main.get_command(app)
ctx = click.Context(cmd, info_name="mergevid")
text = cmd.get_help(ctx)
names = sorted(cmd.list_commands(ctx))
for name in names:
    sub = cmd.get_command(ctx, name)
    sub.get_help(click.Context(sub, info_name=name, parent=ctx))
    if isinstance(sub, click.Group):
        for leaf in sub.list_commands(ctx):
            c = sub.get_command(ctx, leaf)
            c.get_help(click.Context(c, info_name=leaf, parent=ctx))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(",".join(names))
print("HEAVY:" + ",".join(heavy))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    names, heavy = res.stdout.strip().splitlines()[-2:]
    assert heavy == "HEAVY:", f"--help imported heavy modules: {heavy}"
    assert {"run", "eval", "validate", "ls", "convert", "export", "bench", "data"} <= set(names.split(","))


def test_help_and_version_from_the_command_line():
    res = _mergevid("--help")
    assert res.returncode == 0 and "Usage" in res.stdout and "run" in res.stdout and "bench" in res.stdout
    res = _mergevid("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"mergevid {mergekit_video.__version__}"
    res = _mergevid("bench", "--help")
    assert res.returncode == 0 and "head" in res.stdout and "train" in res.stdout


# ---------------------------------------------------------------------------------------------
# errors: one clear message, exit code 1, no traceback unless --debug
# ---------------------------------------------------------------------------------------------
def _assert_one_message(res: subprocess.CompletedProcess, message: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith(f"error: {message}"), res.stderr
    assert "--debug" in res.stderr


def test_missing_recipe_is_one_line_and_debug_shows_the_traceback(tmp_path):
    _assert_one_message(_mergevid("run", "no_such_recipe.yaml", cwd=tmp_path), "recipe no_such_recipe.yaml does not exist")
    res = _mergevid("--debug", "run", "no_such_recipe.yaml", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "FileNotFoundError: recipe no_such_recipe.yaml does not exist"
    # MERGEVID_DEBUG=1 does the same
    res = _mergevid("validate", "no_such_recipe.yaml", env={"MERGEVID_DEBUG": "1"}, cwd=tmp_path)
    assert "Traceback (most recent call last)" in res.stderr


def test_debug_is_a_global_flag_anywhere_on_the_command_line(monkeypatch, tmp_path):
    """``--debug`` after the overrides is not an override: the real error's traceback is shown."""
    import logging

    from mergekit_video.config import ValidationError

    monkeypatch.setenv("MERGEVID_DEBUG", "0")  # --debug sets it; restored after this test
    try:
        for command in ("run", "validate"):
            with pytest.raises(ValidationError, match="precision: 'fp8' is not one of"):
                cli_main([command, str(QUICKSTART), f"output_dir={tmp_path}", "precision=fp8", "--debug"])
        with pytest.raises(FileNotFoundError, match="recipe no_such.yaml does not exist"):
            cli_main(["validate", "--debug", "no_such.yaml"])
    finally:
        logging.getLogger("mergekit_video").setLevel(logging.INFO)
    assert not (tmp_path / "recipe.yaml").exists()


def test_eval_views_take_one_or_three_crops(tmp_path, capsys):
    args = ["eval", str(tmp_path), "--list", str(tmp_path / "v.txt"), "--classes", str(tmp_path / "c.csv"), "--output-dir", str(tmp_path / "out")]
    assert cli_main([*args, "--views", "2x2"]) == 1
    assert "error: --views 2x2: CLIPSxCROPS takes clips >= 1 and crops 1 or 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_registry_in_ls():
    _assert_one_message(_mergevid("ls", "routerz"), "unknown registry 'routerz'; did you mean 'routers'? (known: routers, merges, regularizers, runners")
    res = _mergevid("ls", "runners")
    assert res.returncode == 0 and all(r in res.stdout for r in ("mote", "evaluate", "compare"))


def test_usage_errors_are_clicks_message_with_exit_code_2():
    res = _mergevid("convert", "foo", "a", "b")
    assert res.returncode == 2
    assert "Invalid value for 'fmt'" in res.stderr and "'foo' is not one of 'mote-official'" in res.stderr
    assert "Traceback" not in res.stderr and "BadParameter" not in res.stderr
    res = _mergevid("run")
    assert res.returncode == 2 and "Missing argument 'recipe'" in res.stderr


def test_invalid_recipe_lists_problems_without_traceback(capsys):
    rc = cli_main(["validate", str(QUICKSTART), "precision=fp8", "train.log_evry=1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = [ln.strip() for ln in err.strip().splitlines()]
    assert lines[0] == f"error: recipe {QUICKSTART} is invalid (2 problems):"
    assert "- precision: 'fp8' is not one of: 'auto', 'bf16', 'fp16', 'fp32'" in lines
    assert any(ln.startswith("- train.log_evry: unknown key; did you mean 'log_every'?") for ln in lines)
    # a bad override is named too
    rc = cli_main(["validate", str(QUICKSTART), "train"])
    assert rc == 1 and "override 'train' is neither 'key=value' nor '~key'" in capsys.readouterr().err


def test_validate_checks_the_clip_architecture_and_pretrained_tag_offline(capsys):
    # both used to pass validation and fail seconds into the run, after data/ was written
    assert cli_main(["validate", str(QUICKSTART), "model.clip_name=ViT-B-61"]) == 1
    err = capsys.readouterr().err
    assert "- model.clip_name: unknown open_clip model 'ViT-B-61'; did you mean 'ViT-B-16'" in err
    vitl14 = QUICKSTART.parent / "mote_vitl14.yaml"
    assert cli_main(["validate", str(vitl14), "model.pretrained=opneai"]) == 1
    err = capsys.readouterr().err
    assert "- model.pretrained: 'opneai' is neither an open_clip pretrained tag for ViT-L-14 nor a file; did you mean 'openai'?" in err
    # a tag, a file path (checked by --check-paths) and random weights pass
    for value in ("openai", "/weights/ViT-L-14.pt", "null"):
        assert cli_main(["validate", str(vitl14), f"model.pretrained={value}"]) == 0, value
    capsys.readouterr()


def test_cli_renders_library_warnings_once(capsys, monkeypatch):
    import logging

    monkeypatch.setenv("MERGEVID_DEBUG", "0")  # --debug below sets it; restored after this test

    logger = logging.getLogger("mergekit_video")
    assert cli_main(["ls", "merges"]) == 0 and cli_main(["ls", "routers"]) == 0
    ours = [h for h in logger.handlers if getattr(h, "_mergevid", False)]
    assert len(ours) == 1 and logger.level == logging.INFO and logger.propagate  # one handler however often main runs
    assert cli_main(["--debug", "ls", "merges"]) == 0 and logger.level == logging.DEBUG
    logger.setLevel(logging.INFO)
    logging.getLogger("mergekit_video.data").warning("bad video (resample): /x.mp4: truncated")
    assert "bad video (resample): /x.mp4: truncated" in capsys.readouterr().err


def test_cross_key_problems_are_named_before_anything_runs(capsys):
    rc = cli_main(["validate", str(QUICKSTART), "model.num_experts=0"])
    err = capsys.readouterr().err
    assert rc == 1 and f"error: recipe {QUICKSTART} is invalid (1 problem):" in err
    assert "- objective.wmr_weight: the weight-merging regularizer needs experts, but model.num_experts is 0" in err
    assert cli_main(["validate", str(QUICKSTART), "model.num_experts=0", "objective.wmr_weight=0"]) == 0  # the baseline
    # task-arithmetic merges need a base model, which MoTE experts do not have
    rc = cli_main(["validate", str(QUICKSTART), "model.merge=ties", "eval.compare.merges=[{name: mean}, {name: dare, drop_rate: 0.5}]"])
    err = capsys.readouterr().err
    assert rc == 1 and "(2 problems)" in err
    assert "- model.merge: 'ties' merges relative to a base model, and the experts of a MoTE model have none" in err
    assert "- eval.compare.merges.1.name: 'dare' merges relative to a base model" in err


def test_missing_data_paths_are_named_by_key_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    recipe = REPO / "recipes" / "mote_vitb16.yaml"
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("a.mp4 0\n")
    over = [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path}", f"data.train_list={lists / 'train.txt'}", f"data.val_list={lists}", "model.pretrained=null"]
    # validate passes (the shipped recipes name datasets of the user's machine) unless asked to check paths
    assert cli_main(["validate", str(recipe), *over]) == 0
    capsys.readouterr()
    assert cli_main(["validate", "--check-paths", str(recipe), *over]) == 1
    err = capsys.readouterr().err
    assert f"recipe {recipe} is invalid (4 problems)" in err
    assert f"- data.val_list: {lists} is a folder; a file is expected here" in err
    assert f"- data.class_csv: file not found: {lists / 'kinetics_400_labels.csv'}" in err  # ${data.root}/lists/...
    assert "data.root" not in err and "data.train_list" not in err
    # a run fails the same way, before the ViT-B/16 is built
    import mergekit_video.models.video_clip as video_clip

    def no_build(**kw):
        raise AssertionError("the model was built before the paths were checked")

    monkeypatch.setattr(video_clip, "build_video_clip", no_build)
    assert cli_main(["run", str(recipe), *over]) == 1
    err = capsys.readouterr().err
    assert f"recipe {recipe} is invalid (4 problems)" in err and "- data.val_list: " in err and "is a folder; a file is expected here" in " ".join(err.split())
    assert not (tmp_path / "run").exists()  # a run that could not start leaves no folder behind
    (tmp_path / "run").mkdir()
    assert cli_main(["run", str(recipe), *over]) == 1
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())  # the user's folder stays, as it was
    # synthetic data is written by the run: its paths (data.*, eval lists under output_dir/data) are not checked up front
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), f"output_dir={tmp_path / 'q'}"]) == 0
    out = capsys.readouterr().out
    assert "data.synthetic is set" in out and "warning" not in out
    # the user's own lists beside data.synthetic (a copied quickstart) would be replaced: said, naming them
    mine = f"data.train_list={tmp_path / 'mine.txt'}"
    assert cli_main(["validate", str(QUICKSTART), f"output_dir={tmp_path / 'q'}", mine]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"in place of {mine}; to use those files, remove data.synthetic (override ~data.synthetic)" in out
    # ... but every other path is
    other_list = f"eval.datasets.1.list={tmp_path / 'k600_split1.txt'}"
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), f"output_dir={tmp_path / 'q'}", "model.pretrained=/nope.pt",
                     f"train.resume={tmp_path / 'ckpt'}", other_list]) == 1
    err = capsys.readouterr().err
    assert f"recipe {QUICKSTART} is invalid (3 problems)" in err
    assert "- model.pretrained: weights file not found: /nope.pt" in err and f"- train.resume: checkpoint not found: {tmp_path / 'ckpt'}" in err
    assert f"- eval.datasets.1.list: file not found: {tmp_path / 'k600_split1.txt'}" in err


def test_run_refuses_to_record_over_a_hand_written_recipe_in_its_output_dir(tmp_path, capsys):
    from mergekit_video.cli.commands import _load_validated, _refuse_recording_over_the_recipe
    from mergekit_video.config import dump_recipe

    out = tmp_path / "exp"
    out.mkdir()
    mine = out / "recipe.yaml"
    text = "# my notes\n" + QUICKSTART.read_text().replace("output_dir: runs/quickstart", f"output_dir: {out}")
    mine.write_text(text)
    assert cli_main(["run", str(mine), "train.max_steps=1"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{mine} is where this run records its resolved recipe" in err and f"mv {mine} {tmp_path / 'exp.yaml'}" in err
    assert mine.read_text() == text and sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]  # nothing touched
    # a recipe a run recorded there (machine-written) reruns: a resume
    cfg = _load_validated(mine, [])
    mine.write_text(dump_recipe(cfg))
    _refuse_recording_over_the_recipe(mine, _load_validated(mine, []))
    # the same recipe elsewhere is not concerned
    (tmp_path / "exp.yaml").write_text(text)
    _refuse_recording_over_the_recipe(tmp_path / "exp.yaml", cfg)


def test_run_never_rewrites_a_recorded_recipe_it_is_given_with_other_settings(tmp_path, capsys):
    """A recipe.yaml that a run recorded, run in place with overrides (mergevid run OUT/recipe.yaml schedule.epochs=1),
    was rewritten with them: the user's file said epochs 50, then 1. Any other setting (a results-neutral one,
    with --overwrite too) is refused naming the file and the change; an identical rerun stays a resume."""
    from mergekit_video.cli.commands import _load_validated, _refuse_recording_over_the_recipe
    from mergekit_video.config import dump_recipe

    out = tmp_path / "exp"
    out.mkdir()
    mine = out / "recipe.yaml"
    mine.write_text(dump_recipe(_load_validated(QUICKSTART, [f"output_dir={out}"])))
    text = mine.read_text()
    for args, change in ((["schedule.epochs=1"], "schedule.epochs: 50 -> 1"), (["--overwrite", "train.log_every=7"], "train.log_every: ")):
        assert cli_main(["run", *args[:-1], str(mine), args[-1]]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert (f"{mine} is the recipe.yaml that the run in output_dir {out} recorded, and this run would rewrite it with other "
                f"settings ({change}") in err
        assert f"--overwrite or not. To run with them, copy it and run the copy (cp {mine} {tmp_path / 'exp.yaml'};" in err
        assert mine.read_text() == text and sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]  # nothing touched
    _refuse_recording_over_the_recipe(mine, _load_validated(mine, []))  # the same settings: a resume


def test_convert_rejects_non_mote_files(tmp_path, capsys):
    assert cli_main(["convert", "mote-official", str(tmp_path), str(tmp_path.parent / f"{tmp_path.name}_out")]) == 1
    assert f"{tmp_path} is a folder; pass the official checkpoint file in it" in " ".join(capsys.readouterr().err.split())
    foreign = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    assert cli_main(["convert", "mote-official", str(foreign), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {foreign} is not an official MoTE checkpoint (expected model_state_dict and fusion_model_state_dict; found ['state_dict'])")
    garbage = tmp_path / "notes.pt"
    garbage.write_text("hello")
    assert cli_main(["convert", "mote-official", str(garbage), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {garbage} is not a PyTorch checkpoint file (KeyError")
    assert cli_main(["convert", "mote-official", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"error: official checkpoint {tmp_path / 'missing.pt'} does not exist")
    assert cli_main(["export", str(foreign), str(tmp_path / "out")]) == 1
    assert "is not a mergekit_video model directory or checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# convert an official checkpoint, export it dense, load the export into plain open_clip
# ---------------------------------------------------------------------------------------------
def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_convert_export_dense_and_load_into_open_clip(tmp_path, capsys):
    import open_clip
    from safetensors.torch import load_file

    from mergekit_video.models import build_video_clip, load
    from mergekit_video.models.clip import register_bundled_model_configs

    ckpt, ref_clip, ref_head = _official_checkpoint()
    src = tmp_path / "mote_official.pt"
    torch.save(ckpt, src)
    converted, dense = tmp_path / "converted", tmp_path / "dense"

    assert cli_main(["convert", "mote-official", str(src), str(converted)]) == 0
    out = capsys.readouterr().out
    # rich wraps at the console width (long tmp paths) and keeps a space before the break: compare words
    assert "mergevid-tiny-vit + 2-layer head, 4 experts, 7 source classes" in " ".join(out.split())
    model = load(converted)
    torch.manual_seed(1)
    frames = torch.randn(2, 8, 3, 32, 32)
    cls = F.normalize(torch.randn(5, 64), dim=-1)
    with torch.no_grad():
        ref_logits = ref_head(ref_clip.encode_image(frames), cls, modulation=True)
        ours = model(frames, cls, modulation=True)
    assert (ours - ref_logits).abs().max() < 1e-4

    # refusing to overwrite: the existing output stays byte-identical
    before = _digest(converted)
    assert cli_main(["convert", "mote-official", str(src), str(converted)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {converted} exists; pass --overwrite to replace it")
    assert _digest(converted) == before
    assert cli_main(["convert", "mote-official", str(src), str(converted), "--overwrite"]) == 0
    capsys.readouterr()

    # task-arithmetic merges need a base, which MoTE experts do not have: one line, nothing written
    for args, said in (
        (["--strategy", "ties"], "error: --strategy ties: 'ties' merges relative to a base model, and the experts of a MoTE model have none"),
        (["--strategy", "ties", "--merge-arg", f"base={converted}"], "error: --strategy ties: 'ties' merges relative to a base model"),
        (["--strategy", "mean", "--merge-arg", f"base={converted}"], "error: --merge-arg base: the experts of a MoTE model have no base model"),
    ):
        assert cli_main(["export", str(converted), str(dense), "--dense", *args]) == 1
        assert capsys.readouterr().err.startswith(said)
        assert not dense.exists()

    # dense export: the baseline's structure and keys, the merged model's outputs
    assert cli_main(["export", str(converted), str(dense), "--dense"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "exported dense" in said and "plain open_clip loads its CLIP part with open_clip.create_model('local-dir:" in said
    assert "load_state_dict" not in said  # plain open_clip has no config named mergevid-tiny-vit
    assert cli_main(["export", str(converted), str(dense), "--dense"]) == 1  # the flag, not the library's argument
    assert capsys.readouterr().err.startswith(f"error: {dense} exists; pass --overwrite to replace it")
    dense_model = load(dense)
    assert dense_model.config["head"]["num_experts"] == 0
    assert dense_model.config["exported_from"] == {"num_experts": 4, "merge": "mean"}
    baseline = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=2, num_experts=0)
    head_sd = load_file(str(dense / "head.safetensors"))
    base_sd = {k: v for k, v in baseline.head.state_dict().items()}
    assert set(head_sd) - {"source_class_features"} == set(base_sd) - {"source_class_features"}
    assert all(head_sd[k].shape == base_sd[k].shape for k in base_sd if k != "source_class_features")
    with torch.no_grad():
        for tfm in (False, True):
            merged = model(frames, cls, modulation=tfm)
            assert (dense_model(frames, cls, modulation=tfm) - merged).abs().max() < 1e-5

    # plain open_clip rebuilds the CLIP part from the folder alone (open_clip_config.json: architecture, QuickGELU)
    oc_dir = open_clip.create_model(f"local-dir:{dense}").eval()
    with torch.no_grad():
        assert (oc_dir.encode_image(frames.flatten(0, 1)).view(2, 8, -1) - dense_model.encode_frames(frames)).abs().max() < 1e-5
    # clip.safetensors loads strictly into plain open_clip and encodes frames as our model does
    register_bundled_model_configs()
    oc = open_clip.create_model(dense_model.model_name, pretrained=None)
    oc.load_state_dict(load_file(str(dense / "clip.safetensors")), strict=True)
    oc.eval()
    with torch.no_grad():
        e_oc = oc.encode_image(frames.flatten(0, 1)).view(2, 8, -1)
        assert (e_oc - dense_model.encode_frames(frames)).abs().max() < 1e-5
        assert (e_oc - ref_clip.encode_image(frames)).abs().max() < 1e-4

    before = _digest(dense)
    assert cli_main(["export", str(converted), str(dense), "--dense"]) == 1
    assert "exists" in capsys.readouterr().err and _digest(dense) == before
    assert cli_main(["export", str(converted), str(dense), "--dense", "--overwrite"]) == 0
    # another weight merge and its arguments; an output-space "merge" is refused before anything is written
    tau = tmp_path / "dense_tau"
    assert cli_main(["export", str(converted), str(tau), "--dense", "--strategy", "temperature_softmax", "--merge-arg", "tau=0.6"]) == 0
    capsys.readouterr()
    from mergekit_video.experts import use_merge

    with torch.no_grad(), use_merge(model, "temperature_softmax", tau=0.6):
        assert (load(tau)(frames, cls) - model(frames, cls)).abs().max() < 1e-5
    for args, message in (
        (["--strategy", "ensemble"], "error: a dense export needs a weight merge, but 'ensemble' combines expert outputs"),
        (["--strategy", "temperature_softmax"], "missing a required argument: 'tau'"),
        (["--merge-arg", "tau"], "error: --merge-arg 'tau': expected KEY=VALUE, such as tau=0.6"),
        (["--merge-arg", "tau=0.6"], "error: --merge-arg is an argument of --strategy: name the strategy too"),
        (["--strategy", "temperature_softmax", "--merge-arg", "tau=0.6", "--merge-arg", "tau=0.7"], "error: --merge-arg 'tau=0.7': tau is given twice"),
        # a typo is named with what the export accepts (never base, which it refuses)
        (["--strategy", "weighted", "--merge-arg", "weight=[1,2,3,4]"],
         "error: --merge-arg: merge strategy 'weighted': got an unexpected argument 'weight' (did you mean 'weights'?; accepted: weights, normalize)"),
    ):
        assert cli_main(["export", str(converted), str(tmp_path / "refused"), "--dense", *args]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
    assert cli_main(["export", str(converted), str(tmp_path / "refused"), "--strategy", "mean"]) == 1
    assert "add --dense" in capsys.readouterr().err
    # a plain (non-dense) export keeps the experts
    assert cli_main(["export", str(converted), str(tmp_path / "copy")]) == 0
    assert load(tmp_path / "copy").config["head"]["num_experts"] == 4
    # exporting onto the input (or a folder holding it) would destroy it, --overwrite or not
    before = _digest(converted)
    for target in (converted, converted.parent):
        assert cli_main(["export", str(converted), str(target), "--overwrite"]) == 1
        assert "is or contains the input" in capsys.readouterr().err
    # ... and exporting into it would write into what the user gave
    assert cli_main(["export", str(converted), str(converted / "dense"), "--dense"]) == 1
    assert f"{converted / 'dense'} is inside the input folder {converted}" in " ".join(capsys.readouterr().err.split())
    assert _digest(converted) == before and not (converted / "dense").exists()


class _UnreadableItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise FileNotFoundError(f"videos/clip_{i}.mp4: no such file")


def test_worker_errors_are_one_line_without_the_worker_traceback():
    from mergekit_video.cli.errors import without_worker_traceback

    loader = torch.utils.data.DataLoader(_UnreadableItems(), batch_size=1, num_workers=1)
    try:
        next(iter(loader))
    except FileNotFoundError as err:
        raw = str(err)
    assert "Original Traceback" in raw  # what torch re-raises with
    assert without_worker_traceback(raw) == "videos/clip_0.mp4: no such file (in DataLoader worker process 0)"
    assert without_worker_traceback("plain message") == "plain message"


# ---------------------------------------------------------------------------------------------
# mergevid eval / the evaluate and compare runners
# ---------------------------------------------------------------------------------------------
def test_compare_runner_defaults_do_not_depend_on_which_keys_the_recipe_sets():
    """The compare runner's default merges (temperature_softmax τ = ±0.6, ensemble) stay when a recipe sets other
    eval.compare keys (they vanished: the schema filled ``merges: []``); an explicit ``merges: []`` compares none."""
    from mergekit_video.cli.commands import _validated
    from mergekit_video.runners.schema import DEFAULT_COMPARE_MERGES

    base = {"runner": "compare", "output_dir": "out", "checkpoint": "model"}
    merges = [{"name": "temperature_softmax", "tau": 0.6}, {"name": "temperature_softmax", "tau": -0.6}, {"name": "ensemble"}]
    assert [dict(m) for m in DEFAULT_COMPARE_MERGES] == merges
    for extra in ({}, {"eval": {}}, {"eval": {"compare": {}}}, {"eval": {"compare": {"experts": True}}}, {"eval": {"compare": {"logit_ensemble": True}}}):
        assert _validated({**base, **extra}, source="t")["eval"]["compare"] == {"merges": merges, "experts": True, "logit_ensemble": True, "random_routing": False}, extra
    chosen = _validated({**base, "eval": {"compare": {"merges": [], "logit_ensemble": False}}}, source="t")["eval"]["compare"]
    assert chosen == {"merges": [], "experts": True, "logit_ensemble": False, "random_routing": False}
    assert "compare" not in _validated({**base, "runner": "evaluate"}, source="t")["eval"]  # evaluate compares nothing unasked


def test_eval_refuses_a_training_recipe(tmp_path, capsys):
    """``mergevid eval`` with a ``runner: mote`` recipe trained from scratch; it now says what to run instead."""
    out = tmp_path / "run"
    assert cli_main(["eval", str(QUICKSTART), f"output_dir={out}"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: {QUICKSTART} has runner 'mote', which trains a model; mergevid eval takes an evaluate or compare recipe" in err
    assert f"'mergevid eval {out / 'model'} --list LIST --classes CSV'" in err and f"'mergevid run {QUICKSTART}'" in err
    assert not out.exists()  # nothing written, nothing trained


def test_eval_of_a_recipe_refuses_the_options_of_a_model_directory_naming_the_keys(capsys):
    """They only build the recipe for a model directory; with a recipe they were silently ignored."""
    recipe = REPO / "recipes" / "zeroshot_ucf101.yaml"
    cases = {
        ("--frames", "32"): "eval.datasets.N.num_frames=32",
        ("--views", "4x3"): "eval.datasets.N.num_clips=4 eval.datasets.N.num_crops=3",
        ("--input-size", "336"): "eval.datasets.N.input_size=336",
        ("--short-side", "256"): "eval.datasets.N.short_side=256",
        ("--output-dir", "elsewhere"): "output_dir=elsewhere",
        ("--compare",): "runner=compare",
        ("--list", "a.txt"): "eval.datasets.N.list=LIST",
    }
    for args, key in cases.items():
        assert cli_main(["eval", str(recipe), *args]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: {args[0]} describes the evaluation of a model directory; {recipe} is a recipe" in err
        assert f"(e.g. mergevid eval {recipe} {key})" in err
    assert cli_main(["eval", str(recipe), "--frames", "8"]) == 1  # given, even at its default
    assert "--frames describes" in capsys.readouterr().err


def test_eval_output_folder_is_named_per_run_and_its_refusal_speaks_of_evaluation(tmp_path, capsys, monkeypatch):
    """Every run saves ``model/``: the default ``runs/eval/<name>`` sent all their evaluations to ``runs/eval/model``."""
    from mergekit_video.cli.commands import default_eval_dir
    from mergekit_video.runners.common import prepare_output_dir

    monkeypatch.setenv("COLUMNS", "1000")  # paths under a long --basetemp would be folded inside a word

    from mergekit_video.models import build_video_clip

    config = json.dumps(build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2).config)
    a, b, ckpt = tmp_path / "mote_a" / "model", tmp_path / "mote_b" / "model", tmp_path / "mote_a" / "checkpoints" / "step_00000020"
    for p in (a, b, ckpt):
        p.mkdir(parents=True)
        (p / "config.json").write_text(config)  # a model's config without its tensors
    assert [default_eval_dir(p) for p in (a, b, ckpt)] == [
        Path("runs/eval/mote_a_model"), Path("runs/eval/mote_b_model"), Path("runs/eval/mote_a_checkpoints_step_00000020")]
    assert default_eval_dir(a, tmp_path / "ucf" / "val.txt") == Path("runs/eval/mote_a_model_ucf_val")  # one folder per list
    assert default_eval_dir(a, tmp_path / "hmdb" / "val.txt") == Path("runs/eval/mote_a_model_hmdb_val")
    # the recipes' layout, <dataset>/lists/<list>: "lists" alone would not tell ucf101's from hmdb51's
    assert default_eval_dir(a, tmp_path / "ucf101" / "lists" / "testlist01.txt") == Path("runs/eval/mote_a_model_ucf101_lists_testlist01")
    # another protocol gets its own folder (it would otherwise be refused as another recipe)
    assert default_eval_dir(a, tmp_path / "ucf" / "val.txt", views="4x3", frames=16) == Path("runs/eval/mote_a_model_ucf_val_4x3_f16")
    assert default_eval_dir(a, tmp_path / "ucf" / "val.txt", zero_shot=True, compare=True) == Path("runs/eval/mote_a_model_ucf_val_zs_compare")
    assert default_eval_dir(a, tmp_path / "ucf" / "val.txt", views="4x3", short_side=256) == Path("runs/eval/mote_a_model_ucf_val_4x3_s256")
    # through the command: a missing list is named with the recipe, and the folder made for it is removed again
    monkeypatch.chdir(tmp_path)
    assert cli_main(["eval", str(a), "--list", "v.txt", "--classes", str(tmp_path / "c.csv")]) == 1
    err = capsys.readouterr().err
    assert f"recipe for {a} is invalid (2 problems)" in err and "eval.datasets.0.list: file not found" in err
    assert not (tmp_path / "runs" / "eval" / f"mote_a_model_{tmp_path.name}_v").exists()
    for name in ("v.txt", "w.txt", "s1.txt", "s2.txt", "c.csv"):
        (tmp_path / name).write_text("")
    from mergekit_video import runners
    from mergekit_video.runners.common import release_output_dir

    def recorded_only(cfg, *, overwrite=False, console=None):  # the recipe each command builds, recorded as a run does
        prepare_output_dir(cfg, overwrite=overwrite, main=True)
        release_output_dir(cfg["output_dir"])
        raise ValueError("stopped after recording the recipe")

    monkeypatch.setattr(runners, "run_recipe", recorded_only)
    # with the files there, the run starts (recipe.yaml) and fails on the model (no tensor files)
    assert cli_main(["eval", str(a), "--list", "v.txt", "--classes", str(tmp_path / "c.csv")]) == 1
    capsys.readouterr()
    saved = (tmp_path / "runs" / "eval" / f"mote_a_model_{tmp_path.name}_v" / "recipe.yaml").read_text()
    assert f"checkpoint: {a}" in saved and f"list: {tmp_path / 'v.txt'}" in saved  # absolute: the same recipe from any folder
    # a run's output_dir means its model; a folder that holds no model is named before anything is written
    assert cli_main(["eval", str(a.parent), "--list", "w.txt", "--classes", "c.csv"]) == 1
    captured = capsys.readouterr()
    assert f"evaluating its trained model, {a}" in " ".join(captured.out.split())
    assert f"checkpoint: {a}" in (tmp_path / "runs" / "eval" / f"mote_a_model_{tmp_path.name}_w" / "recipe.yaml").read_text()
    (tmp_path / "empty").mkdir()
    assert cli_main(["eval", "empty", "--list", "x.txt", "--classes", "c.csv"]) == 1
    assert "empty is not a mergekit_video model directory or checkpoint (no config.json)" in capsys.readouterr().err
    # an unfinished run (checkpoints, no model/ yet), or its checkpoints/ folder: the newest checkpoint is named
    for n in (4, 8):
        (tmp_path / "unfinished" / "checkpoints" / f"step_{n:08d}").mkdir(parents=True)
        (tmp_path / "unfinished" / "checkpoints" / f"step_{n:08d}" / "state.json").write_text("{}")
    (tmp_path / "finished" / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "finished" / "model").mkdir()
    (tmp_path / "finished" / "model" / "config.json").write_text("{}")
    assert cli_main(["eval", "finished/checkpoints", "--list", "x.txt", "--classes", "c.csv"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "it is a run's checkpoints folder: load one of its step_* folders, or the trained model, finished/model" in err, err
    for target in ("unfinished", "unfinished/checkpoints"):
        assert cli_main(["eval", target, "--list", "x.txt", "--classes", "c.csv"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "no trained model/ (training did not finish): load one, such as the newest," in err
        assert "checkpoints/step_00000008" in err.replace(" ", "")
    # no --root: the list's paths are read beside it; none there is refused naming --root
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "val.txt").write_text("clips/a.mp4 0\nclips/b.mp4 1\n")
    assert cli_main(["eval", str(a), "--list", "lists/val.txt", "--classes", "c.csv"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"--root not given, so the paths of lists/val.txt are read relative to its folder {tmp_path / 'lists'}" in err
    assert "pass --root FOLDER" in err
    # a root given as an override, and a frame-folder list whose folders are beside it, are not refused
    assert cli_main(["eval", str(a), "--list", "lists/val.txt", "--classes", "c.csv", f"eval.datasets.0.root={tmp_path}"]) == 1
    assert "--root not given" not in capsys.readouterr().err  # it went on (to the stubbed run)
    (tmp_path / "lists" / "frames" / "v1").mkdir(parents=True)
    (tmp_path / "lists" / "frames.txt").write_text("frames/v1 8 0\n")
    assert cli_main(["eval", str(a), "--list", "lists/frames.txt", "--classes", "c.csv", "eval.datasets.0.list_format=frames"]) == 1
    assert "--root not given" not in capsys.readouterr().err
    # without list_format=frames such a list is not blamed on --root: the override it needs is named
    assert cli_main(["eval", str(a), "--list", "lists/frames.txt", "--classes", "c.csv"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (f"error: lists/frames.txt looks like a frame-folder list ('folder num_frames label': {tmp_path / 'lists' / 'frames' / 'v1'} "
            "is a folder): evaluate it with the override eval.datasets.0.list_format=frames") in err, err
    assert cli_main(["eval", str(a), "--list", "lists/frames.txt", "--classes", "c.csv", "--root", "lists"]) == 1  # with --root too
    assert "looks like a frame-folder list" in capsys.readouterr().err
    # a config.json that is no model config is named before an output folder is made
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text('{"format": "mergekit_video/video_clip", "format_version": 1}')
    assert cli_main(["eval", "notmodel", "--list", "x.txt", "--classes", "c.csv"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "config.json is not a valid mergekit_video model config" in err and "notmodel" in err
    assert not list((tmp_path / "runs" / "eval").glob("notmodel*"))
    assert not list((tmp_path / "runs" / "eval").glob("empty*"))  # nothing written for it
    # zero-shot: the lists are the splits of one dataset
    assert cli_main(["eval", str(a), "--list", "s1.txt", "--list", "s2.txt", "--classes", "c.csv"]) == 1
    assert "several --list files are the splits of one zero-shot dataset: add --zero-shot" in capsys.readouterr().err
    assert cli_main(["eval", str(a), "--zero-shot", "--list", "s1.txt", "--list", "s2.txt", "--classes", "c.csv"]) == 1
    capsys.readouterr()
    # named after the dataset's folder, not after its first split
    saved = yaml.safe_load((tmp_path / "runs" / "eval" / f"mote_a_model_{tmp_path.name}_2splits_zs" / "recipe.yaml").read_text())
    dataset = tmp_path.name
    assert saved["eval"]["datasets"][0]["kind"] == "zero_shot" and saved["eval"]["summary"] == {"zero_shot": [dataset]}
    assert saved["eval"]["datasets"][0]["name"] == dataset
    assert [s["list"] for s in saved["eval"]["datasets"][0]["splits"]] == [str(tmp_path / "s1.txt"), str(tmp_path / "s2.txt")]
    assert saved["eval"]["datasets"][0]["class_csv"] == str(tmp_path / "c.csv")  # one CSV: every split's
    # one class CSV per split (K600's three 160-class splits), matched to the lists in order
    assert cli_main(["eval", str(a), "--zero-shot", "--list", "s1.txt", "--list", "s2.txt", "--classes", "c1.csv",
                     "--classes", "c2.csv", "--output-dir", "per_split"]) == 1
    capsys.readouterr()
    entry = yaml.safe_load((tmp_path / "per_split" / "recipe.yaml").read_text())["eval"]["datasets"][0]
    assert "class_csv" not in entry and [(s["list"], s["class_csv"]) for s in entry["splits"]] == [
        (str(tmp_path / "s1.txt"), str(tmp_path / "c1.csv")), (str(tmp_path / "s2.txt"), str(tmp_path / "c2.csv"))]
    assert cli_main(["eval", str(a), "--zero-shot", "--list", "s1.txt", "--list", "s2.txt", "--list", "s3.txt",
                     "--classes", "c1.csv", "--classes", "c2.csv"]) == 1
    assert "2 --classes files for 3 --list files: give one class CSV for every split, or one per --list" in capsys.readouterr().err
    # a folder holding another recipe's evaluation: the refusal speaks of evaluating, not of training and resuming
    out = tmp_path / "ev"
    cfg = {"runner": "evaluate", "output_dir": str(out), "checkpoint": str(a)}
    prepare_output_dir(cfg, overwrite=False, main=True)
    (out / "results.json").write_text("{}")
    with pytest.raises(FileExistsError) as refused:
        prepare_output_dir({**cfg, "checkpoint": str(b)}, overwrite=False, main=True)
    msg = str(refused.value)
    assert msg.startswith(f"output_dir {out} holds the outputs of a different recipe (checkpoint: ")
    assert msg.endswith("Use another output_dir (output_dir=DIR; for a model folder, mergevid eval --output-dir DIR), "
                        "or pass --overwrite to DELETE its results.json and evaluate into it")


def test_misspelt_options_and_unwritable_outputs_are_named_before_any_work(tmp_path, capsys):
    """Commands that take overrides read unknown options as overrides; bench outputs are checked up front."""
    out = tmp_path / "run"
    assert cli_main(["run", str(QUICKSTART), f"output_dir={out}", "--overwrit"]) == 2  # a usage error, as click's own
    assert "error: no such option: --overwrit; did you mean --overwrite?" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path), "--lst", "v.txt"]) == 2
    assert "no such option: --lst; did you mean --list?" in capsys.readouterr().err
    assert cli_main(["bench", "train", str(QUICKSTART), "--step", "3"]) == 2
    assert "no such option: --step; did you mean --steps?" in capsys.readouterr().err
    # before the recipe, where it was read as the recipe's path ("recipe --overwrit does not exist")
    for args, said in ((["run", "--overwrit", str(QUICKSTART)], "error: no such option: --overwrit; did you mean --overwrite? (options: --help, --overwrite)"),
                       (["run", "-h", str(QUICKSTART)], "error: no such option: -h; did you mean --help?"),
                       (["eval", "--lsit", "x.txt", str(tmp_path)], "error: no such option: --lsit; did you mean --list?"),
                       (["bench", "train", "--stps", "3", str(QUICKSTART)], "error: no such option: --stps; did you mean --steps?"),
                       (["run", str(QUICKSTART), "--", "--overwrite"], "error: --overwrite came after '--', which makes what follows it "
                                                                        "arguments: put --overwrite before '--'"),
                       (["validate", str(QUICKSTART), "--", "--check-paths"], "error: --check-paths came after '--'")):
        assert cli_main(args) == 2
        assert capsys.readouterr().err.startswith(said), args
    assert not out.exists()
    zero_shot = QUICKSTART.parent / "zeroshot_ucf101.yaml"
    assert cli_main(["bench", "train", str(zero_shot), "--output", str(tmp_path / "b.json")]) == 1
    assert "has runner 'evaluate'; mergevid bench train times the training step of a mote recipe" in capsys.readouterr().err
    for output, needle in [(tmp_path, "is a folder; name the file to write"),
                           (tmp_path / "missing" / "b.json", "folder " + str(tmp_path / "missing") + " does not exist")]:
        assert cli_main(["bench", "head", "--shape", "64x1", "--steps", "1", "--output", str(output)]) == 1
        assert needle in capsys.readouterr().err
    assert cli_main(["bench", "head", "--steps", "0"]) != 0  # typer's range check
    # no warm-up put the first, allocating call of MoTE's variant into its timing (a "167x" overhead)
    assert cli_main(["bench", "head", "--warmup", "0", "--output", str(tmp_path / "w.json")]) == 2
    assert not (tmp_path / "w.json").exists()
    assert cli_main(["validate", str(tmp_path)]) == 1
    assert f"recipe {tmp_path} is a folder, not a YAML file" in capsys.readouterr().err


def test_bench_markdown_onto_its_json_output_and_bench_train_without_warmup_are_refused(tmp_path, capsys, monkeypatch):
    """--markdown same.json appended the table into the JSON just written; bench train --warmup 0 timed the first,
    allocating step of MoTE (a meaningless MoTE/baseline ratio)."""
    from mergekit_video.training import benchmark

    monkeypatch.setattr(benchmark, "bench_head", lambda **kw: pytest.fail("benchmarked before the refusal"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for output, markdown in (("same.json", "same.json"), ("same.json", str(tmp_path / "same.json")), ("same.json", "sub/../same.json")):
        assert cli_main(["bench", "head", "--steps", "1", "--output", output, "--markdown", markdown]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert err.startswith(f"error: --markdown {markdown} is the --output file; give the markdown table a file of its own"), err
    assert not (tmp_path / "same.json").exists()
    assert cli_main(["bench", "train", str(QUICKSTART), "--warmup", "0", "--output", str(tmp_path / "t.json")]) == 2
    assert "Invalid value for '--warmup': Input should be greater than or equal to 1" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_eval_into_the_model_folder_is_refused(tmp_path, capsys, monkeypatch):
    """eval MODEL --output-dir MODEL --overwrite wrote recipe.yaml and results.json into the saved model's folder."""
    from mergekit_video.models import build_video_clip

    monkeypatch.setenv("COLUMNS", "1000")
    model = tmp_path / "saved"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2).config))
    (tmp_path / "v.txt").write_text("")
    (tmp_path / "c.csv").write_text("id,name\n0,a\n")
    for out in (model, tmp_path):
        assert cli_main(["eval", str(model), "--list", str(tmp_path / "v.txt"), "--classes", str(tmp_path / "c.csv"),
                         "--output-dir", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: output_dir {out} {'is' if out == model else 'holds'} the checkpoint {model} that this "
                              "evaluation reads; it would write its recipe.yaml and results.json there"), err
        assert "--overwrite" not in err
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "saved", "v.txt"]


def test_eval_help_fits_80_columns(capsys, monkeypatch):
    """The --output-dir example was one word too long to fold ("runs/eval/mote_vitl14_k400_mode…")."""
    monkeypatch.setenv("COLUMNS", "80")
    assert cli_main(["eval", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "…" not in shown and "runs/eval/mote_model_ucf_val" in shown
    assert max(len(line) for line in shown.splitlines()) <= 80


def test_validate_check_paths_names_an_output_dir_the_run_would_refuse(tmp_path, capsys, monkeypatch):
    """validate --check-paths said ok of an output_dir that is a file, under a file, or in a folder that cannot be
    written, which the run refuses at once; it creates nothing."""
    monkeypatch.setenv("COLUMNS", "1000")
    afile, locked = tmp_path / "afile", tmp_path / "locked"
    afile.write_text("mine")
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))  # (root writes anywhere)
    for out, said in ((afile, f"output_dir {afile} is a file, not a folder; set output_dir to a folder (new or of an earlier run)"),
                      (afile / "run", f"output_dir={afile / 'run'}: cannot create or write it (Not a directory: {afile} is a file); "
                                      "set output_dir to a folder you can write"),
                      (locked / "a" / "b", f"output_dir={locked / 'a' / 'b'}: cannot create or write it (Permission denied: folder "
                                           f"{locked} is not writable); set output_dir to a folder you can write")):
        for command in (["validate", "--check-paths"], ["run"]):  # the same words, before anything is created
            assert cli_main([*command, str(QUICKSTART), f"output_dir={out}"]) == 1
            err = capsys.readouterr().err
            assert f"error: {said}\n" in err, (command, err)
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), f"output_dir={tmp_path / 'new' / 'run'}"]) == 0
    assert "ok " in capsys.readouterr().out
    assert cli_main(["validate", str(QUICKSTART), f"output_dir={afile}"]) == 0  # without --check-paths: the recipe alone
    capsys.readouterr()
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "locked"] and not any(locked.iterdir())


def test_folder_arguments_naming_a_file_are_named_with_the_option(tmp_path, capsys):
    """A file given where a folder is written gave mkdir's bare "[Errno 17] File exists"."""
    afile, lst, out = tmp_path / "afile", tmp_path / "list.txt", tmp_path / "bench.json"
    afile.write_text("mine")
    lst.write_text("a.mp4 0\n")
    for args, message in (
        (["data", "prepare", str(lst), str(afile)], f"error: OUT_DIR {afile} is a file, not a folder"),
        (["data", "prepare", str(lst), str(afile / "sub")], f"error: OUT_DIR {afile / 'sub'}: {afile} is a file, not a folder"),
        (["bench", "data", "--work-dir", str(afile), "--output", str(out)], f"error: --work-dir {afile} is a file, not a folder"),
        (["bench", "data", "--root", str(tmp_path), "--output", str(out)], "error: --root is the folder of --list's videos; without --list"),
    ):
        assert cli_main(args) == 1
        assert capsys.readouterr().err.startswith(message)
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "list.txt"]


def test_bench_head_device_is_checked_naming_the_option_and_its_values(tmp_path, capsys, monkeypatch):
    """torch's own parser error ("Expected one of cpu, cuda, ipu, xpu, ...") named neither the option nor what it takes."""
    out = tmp_path / "head.json"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (
        ("gpu", "--device 'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
        ("cuda:x", "--device 'cuda:x' is not a device: use auto, cpu, cuda, cuda:N or mps"),
        ("meta", "--device 'meta' is not a device: use auto, cpu, cuda, cuda:N or mps"),
        ("cuda", "--device cuda: CUDA is not available on this machine (use auto or cpu)"),
    ):
        assert cli_main(["bench", "head", "--device", device, "--steps", "1", "--output", str(out)]) == 1
        assert capsys.readouterr().err.startswith(f"error: {message}\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli_main(["bench", "head", "--device", "cuda:2", "--steps", "1", "--output", str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: --device cuda:2: this machine has 2 CUDA devices (cuda:0 to cuda:1)\n")
    assert not out.exists()


def test_eval_model_options_out_of_range_are_named(tmp_path, capsys):
    """--input-size 0 was dropped silently; --frames 0 was named by its recipe key eval.datasets.0.num_frames."""
    args = ["eval", str(tmp_path), "--list", str(tmp_path / "v.txt"), "--classes", str(tmp_path / "c.csv"), "--output-dir", str(tmp_path / "out")]
    for extra, code, message in (
        (["--input-size", "0"], 2, "Error: Invalid value for '--input-size': Input should be greater than or equal to 8"),
        (["--short-side", "0"], 2, "Error: Invalid value for '--short-side': Input should be greater than or equal to 8"),
        (["--frames", "0"], 2, "Error: Invalid value for '--frames': Input should be greater than or equal to 1"),
        (["--frames", "78"], 2, "Error: Invalid value for '--frames': Input should be less than or equal to 77"),
        (["--views", "4"], 1, "error: --views must look like 1x1 or 4x3, got '4'"),
        (["--views", "0x3"], 1, "error: --views 0x3: CLIPSxCROPS takes clips >= 1 and crops 1 or 3"),
    ):
        assert cli_main([*args, *extra]) == code
        assert message in capsys.readouterr().err.splitlines()
    assert not (tmp_path / "out").exists()


def test_eval_short_side_sets_the_datasets_test_resize_and_is_checked_against_the_frame_size(tmp_path, capsys, monkeypatch):
    """``--short-side 256 --views 1x1`` on a 224 model is "resize 256, centre-crop 224"; below the frame size: refused up front."""
    from mergekit_video.cli import commands
    from mergekit_video.models import build_video_clip

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2).config))
    (tmp_path / "v.mp4").write_bytes(b"")
    (tmp_path / "v.txt").write_text("v.mp4 0\n")
    (tmp_path / "c.csv").write_text("id,name\n0,a\n")
    ran = []
    monkeypatch.setattr(commands, "_run_validated", lambda cfg, **kw: ran.append(cfg))
    monkeypatch.chdir(tmp_path)
    args = ["eval", str(model), "--list", str(tmp_path / "v.txt"), "--classes", str(tmp_path / "c.csv")]
    assert cli_main([*args, "--short-side", "40"]) == 0
    assert ran[0]["eval"]["datasets"][0]["short_side"] == 40 and ran[0]["output_dir"].endswith("_v_s40")
    assert cli_main(args) == 0
    assert "short_side" not in ran[1]["eval"]["datasets"][0] and ran[1]["output_dir"].endswith("_v")  # default: the frame size
    for extra, where in ((["--short-side", "24"], "the model's visual tower"), (["--short-side", "24", "--input-size", "32"], "--input-size")):
        assert cli_main([*args, *extra]) == 1
        assert capsys.readouterr().err.splitlines()[0] == (
            f"error: --short-side 24 is smaller than the frame size 32 ({where}): the test views resize the short side, then "
            "crop 32x32; pass --short-side 32 or more, or leave it out")
    assert len(ran) == 2 and not (tmp_path / "runs").exists()


def test_bench_data_counts_out_of_range_are_named_before_any_work(tmp_path, capsys):
    for option, low in (("--workers", 0), ("--videos", 1), ("--num-frames", 1), ("--batch-size", 1), ("--repeats", 1)):
        args = ["bench", "data", option, str(low - 1), "--work-dir", str(tmp_path / "w"), "--output", str(tmp_path / "o.json")]
        assert cli_main(args) == 2
        assert f"Error: Invalid value for '{option}': Input should be greater than or equal to {low}" in capsys.readouterr().err.splitlines()
    assert not (tmp_path / "w").exists() and not (tmp_path / "o.json").exists()


def test_recipe_that_is_not_utf8_is_named(tmp_path, capsys):
    """A latin-1 or UTF-16 recipe gave only "'utf-8' codec can't decode byte 0xe9 in position 28"."""
    latin1, utf16 = tmp_path / "latin1.yaml", tmp_path / "utf16.yaml"
    latin1.write_bytes("runner: mote\noutput_dir: café\n".encode("latin-1"))
    utf16.write_bytes("runner: mote\n".encode("utf-16"))  # starts with the BOM ff fe
    for recipe, where in ((latin1, "byte 0xe9 on line 2"), (utf16, "byte 0xff on line 1")):
        for command in ("validate", "run"):
            assert cli_main([command, str(recipe)]) == 1
            assert capsys.readouterr().err.startswith(f"error: recipe {recipe} is not UTF-8 text ({where}); save it with UTF-8 encoding\n")


def test_data_synth_defaults_are_the_recipe_and_library_defaults():
    """--val-per-class defaulted to 2 while data.synthetic.val_per_class defaults to 4."""
    import inspect

    import click
    import typer.main

    from mergekit_video.cli.main import app
    from mergekit_video.data.synthetic import write_synthetic_dataset
    from mergekit_video.runners.schema import SYNTHETIC

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    synth = group.get_command(ctx, "data").get_command(ctx, "synth")
    cli = {p.name: p.default for p in synth.params}
    cli["size"] = [int(v) for v in cli["size"].split("x")]
    key_of = {"classes": "num_classes", "videos_per_class": "videos_per_class", "val_per_class": "val_per_class",
              "novel_classes": "num_novel_classes", "frames": "frames", "size": "size", "seed": "seed"}
    assert sorted(key_of.values()) == sorted(SYNTHETIC.fields)  # every recipe key has its option
    assert {o: cli[o] for o in key_of} == {o: SYNTHETIC.fields[k].default for o, k in key_of.items()}
    library = {k: p.default for k, p in inspect.signature(write_synthetic_dataset).parameters.items()}
    library["size"] = list(library["size"])
    key_of.update({o: o for o in ("fps", "gop", "texture", "noise", "workers", "overwrite")})  # options with no recipe key
    assert {o: cli[o] for o in key_of} == {o: library[k] for o, k in key_of.items()}


def test_a_library_logging_at_module_level_does_not_double_our_log_lines():
    """open_clip's get_tokenizer calls logging.info(): with no root handler that ran basicConfig, and
    every mergekit_video record then printed twice (rich and plain)."""
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from mergekit_video.cli.main import configure_logging\n"
        "configure_logging()\n"
        "logging.info('module-level info of a library')\n"
        "logging.getLogger('mergekit_video.data').warning('bad video: ours')\n"
        "logging.getLogger('somelib').warning('a warning of theirs')\n"
        "logging.getLogger('somelib').info('an info of theirs')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"}).stderr
    assert err.count("bad video: ours") == 1 and err.count("a warning of theirs") == 1
    assert "module-level info" not in err and "an info of theirs" not in err


def test_the_per_epoch_validation_runs_at_train_val_precision_and_the_final_evaluation_at_eval_precision(tmp_path, monkeypatch):
    """The paper recipes evaluate in fp32 (the official test code); their per-epoch validation, which only picks
    checkpoints, ran in fp32 too (on CUDA several times slower than bf16). train.val_precision sets it apart."""
    import mergekit_video.evaluation.evaluator as evaluator

    seen = []
    real = evaluator.evaluate

    def spy(*args, **kwargs):
        seen.append((kwargs.get("dataset_name"), kwargs.get("precision")))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator, "evaluate", spy)
    tiny = ["data.synthetic.videos_per_class=2", "data.synthetic.val_per_class=1", "data.synthetic.num_novel_classes=0",
            "data.synthetic.frames=8", "data.synthetic.size=[32,32]", "~eval.summary", "eval.compare=null", "device=cpu",
            "data.batch_size=6", "schedule.epochs=1", "train.eval_every_epochs=1", "eval.datasets=[{name: v, kind: close_set, list: '${output_dir}/data/val.txt', class_csv: '${output_dir}/data/classes.csv'}]",
            "eval.modulation=[false]", "train.export_dense=false"]
    assert cli_main(["run", str(QUICKSTART), *tiny, "train.val_precision=bf16", "eval.precision=fp32", f"output_dir={tmp_path / 'a'}"]) == 0
    assert seen[0] == ("val", "bf16") and seen[-1][1] == "fp32" and seen[-1][0] != "val"
    seen.clear()
    assert cli_main(["run", str(QUICKSTART), *tiny, "eval.precision=fp32", f"output_dir={tmp_path / 'b'}"]) == 0
    assert seen[0] == ("val", "fp32")  # unset: as the evaluation


def test_a_run_refuses_an_eval_precision_the_device_lacks_and_a_batch_larger_than_the_data(tmp_path, capsys):
    """eval.precision=fp16 on a CPU failed only at the first validation, after an epoch of training (and the
    corrected rerun was then refused as another recipe); a batch the list cannot fill trained 0 steps and saved
    the random init."""
    out = tmp_path / "run"
    for key in ("eval.precision", "precision", "train.val_precision"):
        assert cli_main(["run", str(QUICKSTART), f"{key}=fp16", f"output_dir={out}", "device=cpu"]) == 1
        assert f"error: {key}=fp16: precision 'fp16' needs a CUDA device, got cpu; use 'fp32' or 'bf16'" in capsys.readouterr().err
        assert not out.exists()
    tiny = ["data.synthetic.videos_per_class=2", "data.synthetic.val_per_class=1", "data.synthetic.num_novel_classes=0",
            "data.synthetic.frames=8", "data.synthetic.size=[32,32]", "eval.datasets=[]", "~eval.summary", "device=cpu"]
    assert cli_main(["run", str(QUICKSTART), *tiny, "data.batch_size=24", "train.grad_accumulation=2", f"output_dir={out}"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert ("the training list has 12 videos, fewer than one optimizer step's batch: data.batch_size=24 "
            "(train.grad_accumulation=2 micro-batches of 12); lower data.batch_size") in err
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


def test_under_torchrun_each_rank_labels_its_error(capsys, monkeypatch, tmp_path):
    # every rank prints its own error: the label says whose, and a peer's disconnect points at the other rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli_main(["validate", str(tmp_path / "none.yaml")]) == 1
    assert capsys.readouterr().err.startswith(f"[rank 1] error: recipe {tmp_path / 'none.yaml'} does not exist")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli_main(["validate", str(tmp_path / "none.yaml")]) == 1
    assert capsys.readouterr().err.startswith("error: recipe")


def test_export_onto_a_symlinked_folder_is_refused_before_the_model_is_read(tmp_path, capsys):
    target = tmp_path / "users_folder"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    for extra in ([], ["--overwrite"]):  # the model path does not even exist: refused before it is read
        assert cli_main(["export", str(tmp_path / "no_model"), str(link), "--dense", *extra]) == 1
        assert capsys.readouterr().err.startswith(f"error: {link} is a symbolic link (to {target}); give the folder itself")
    assert link.is_symlink() and (target / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".out*"))


def test_export_and_convert_overwrite_only_a_model_folder(tmp_path, capsys):
    """--overwrite replaced any folder as a whole: a user's folder, a whole training run, the working folder."""
    from mergekit_video.models import build_video_clip, save_model

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    src = save_model(model, tmp_path / "model")
    users = tmp_path / "users_folder"
    (users / "sub").mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    (users / "config.json").write_text('{"name": "my project"}')  # a config.json, but not a saved model's
    for command in (["export", str(src), str(users), "--dense", "--overwrite"],
                    ["convert", "mote-official", str(tmp_path / "official.pt"), str(users), "--overwrite"]):
        assert cli_main(command) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: {users} holds config.json, notes.txt, sub but is not a saved model folder (no mergekit_video config.json)" in err, err
        assert (users / "notes.txt").read_text() == "mine" and (users / "sub").is_dir()
    # an earlier export's folder is replaced; so is an empty one
    assert cli_main(["export", str(src), str(tmp_path / "dense"), "--dense"]) == 0
    assert cli_main(["export", str(src), str(tmp_path / "dense"), "--dense", "--overwrite"]) == 0
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(src), str(tmp_path / "empty"), "--dense", "--overwrite"]) == 0
    with pytest.raises(FileExistsError, match="is not a saved model folder"):
        save_model(model, users, overwrite=True)  # the library refuses it too
    # a run's own model/ is replaced whatever an earlier, damaged save left there (its config.json removed)
    (tmp_path / "dense" / "config.json").unlink()
    save_model(model, tmp_path / "dense", overwrite=True, own_folder=True)
    assert (tmp_path / "dense" / "config.json").is_file()


def test_overwrite_with_a_mistyped_path_keeps_the_earlier_run(tmp_path, capsys):
    """--overwrite deleted the earlier run's outputs, then failed on the recipe's missing class CSV: both lost."""
    from mergekit_video.cli.commands import _load_validated
    from mergekit_video.runners.common import prepare_output_dir, release_output_dir

    out = tmp_path / "run"
    prepare_output_dir(_load_validated(QUICKSTART, [f"output_dir={out}"]), overwrite=False, main=True)
    release_output_dir(out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cli_main(["run", str(QUICKSTART), f"output_dir={out}", "seed=1", f"eval.datasets.0.class_csv={tmp_path / 'nope.csv'}",
                     "--overwrite"]) == 1
    assert f"- eval.datasets.0.class_csv: file not found: {tmp_path / 'nope.csv'}" in " ".join(capsys.readouterr().err.split())
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing deleted


def test_sigterm_outside_the_training_loop_is_an_interrupt_that_says_what_was_kept(tmp_path):
    """SIGTERM during setup, the model save or the final evaluation killed the process without a word;
    during a command it is raised as Ctrl-C is (the runner then says what was kept), and the handler is put back."""
    import os
    import signal
    import time

    from mergekit_video.cli.errors import Interrupted, reraise_interrupts

    def preempted() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted long before this ends
        raise AssertionError("not interrupted")

    before = signal.getsignal(signal.SIGTERM)
    start = time.monotonic()
    with pytest.raises(Interrupted) as info:
        reraise_interrupts(preempted)
    assert info.value.exit_code == 143  # 128 + SIGTERM, as the shell reports a process it ended
    assert time.monotonic() - start < 4 and signal.getsignal(signal.SIGTERM) is before
    # a DDP rank keeps the default: blocked in a collective on a dead peer, it would never run a Python handler
    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "2")
        assert reraise_interrupts(lambda: signal.getsignal(signal.SIGTERM)) is before


def test_log_records_to_a_file_or_pipe_are_one_unwrapped_line_each(capsys):
    """rich hard-wrapped warnings at 80 columns when stderr was a file: a path cut in two was not found by grep."""
    import logging

    from mergekit_video.cli.main import configure_logging

    configure_logging()
    path = "/datasets/kinetics400/videos/" + "long_folder_name/" * 6 + "red_circle_moving_right_0000.mp4"
    logging.getLogger("mergekit_video.data").warning("%s: no such file", path)
    assert f"WARNING  {path}: no such file\n" in capsys.readouterr().err


def test_eval_expands_tilde_in_option_values_and_takes_any_recipe_file(tmp_path, monkeypatch, capsys):
    """--list=~/x reaches the command with its ~ (the shell expands only a word of its own); a recipe named zs.YAML
    (or with no suffix) was taken for a model folder."""
    import shutil

    from mergekit_video.cli.main import main as cli_main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli_main(["eval", str(tmp_path / "nomodel"), "--list=~/d/val.txt", "--classes=~/d/c.csv"]) == 1
    assert f"{tmp_path / 'nomodel'} does not exist" in capsys.readouterr().err
    recipe = tmp_path / "zs.YAML"
    shutil.copy(QUICKSTART.parent / "zeroshot_ucf101.yaml", recipe)
    for name in ("zs.YAML", "zs"):
        path = recipe.rename(tmp_path / name)
        assert cli_main(["validate", str(path)]) == 0
        capsys.readouterr()
        assert cli_main(["eval", str(path), "--list", "x.txt"]) == 1  # a recipe: --list is refused as such, not asked for --classes
        assert "--list describes the evaluation of a model directory" in capsys.readouterr().err
        recipe = path


def test_eval_of_a_tensor_file_is_not_taken_for_a_recipe_and_ls_shows_brackets(tmp_path, capsys):
    """Any existing file was taken for a recipe (head.safetensors: '--list describes ... is a recipe'); rich read
    '[j]' in a docstring as markup and dropped it."""
    from mergekit_video.cli.main import main as cli_main

    weights = tmp_path / "head.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert cli_main(["eval", str(weights), "--list", "l.txt", "--classes", "c.csv"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "is a recipe" not in err and "is not a mergekit_video model directory" in err
    from mergekit_video.merging import MERGES

    @MERGES.register("test_bracket_doc", override=True)
    def bracketed(tensors, *, base=None):
        """θ[j] = median_i θ_i[j]."""
        return tensors[0]

    try:
        assert cli_main(["ls", "merges"]) == 0
        assert "θ[j] = median_i θ_i[j]." in capsys.readouterr().out
    finally:
        MERGES._entries.pop("test_bracket_doc", None)
        MERGES._owners.pop("test_bracket_doc", None)


def test_check_paths_reads_the_lists_and_class_csvs_naming_their_keys(tmp_path, capsys):
    """An official split file where our list is expected is named by its key before the run, as the run would refuse it."""
    data = tmp_path / "data"
    (data / "ApplyEyeMakeup").mkdir(parents=True)
    official = data / "testlist01.txt"
    official.write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\n")
    class_index = data / "classInd.txt"
    class_index.write_text("1 ApplyEyeMakeup\r\n")
    ours, csv = data / "train.txt", data / "classes.csv"
    ours.write_text("ApplyEyeMakeup/a.avi 0\n")
    csv.write_text("id,name\n0,apply eye makeup\n")
    base = [f"output_dir={tmp_path / 'out'}", "~data.synthetic", f"data.root={data}", f"data.train_list={ours}", f"data.val_list={ours}",
            "eval.datasets=[]", "~eval.summary"]
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), *base, f"data.class_csv={csv}"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), *base, f"data.class_csv={class_index}",
                     f"eval.datasets=[{{name: ucf, kind: zero_shot, root: {data}, class_csv: {csv}, splits: [{{list: {official}}}]}}]"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "(2 problems)" in err
    assert f"- data.class_csv: {class_index}: expected a header 'id,name', got '1 ApplyEyeMakeup'; this looks like UCF-101's classInd.txt" in err
    assert (f"- eval.datasets.0.splits.0.list: {official}:1: expected 'relative/path.mp4 label', got "
            "'ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi'; official UCF-101 test lists have no labels") in err
    # a K-shot subset needs K videos in each class of the training list (found at run time, after the model was built)
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), *base, f"data.class_csv={csv}", "data.few_shot={shots: 2}"]) == 1
    assert f"- data.few_shot.shots: 2 shots, but class 0 of {ours} has 1 video" in " ".join(capsys.readouterr().err.split())
    # a missing file elsewhere hid the unreadable class CSV until it was fixed: both in one pass now
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), *base, f"data.class_csv={class_index}",
                     f"eval.datasets=[{{name: ucf, kind: zero_shot, root: {data}, class_csv: {csv}, splits: [{{list: {data / 'nope.txt'}}}]}}]"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "(2 problems)" in err and "this looks like UCF-101's classInd.txt" in err and "nope.txt" in err


def test_a_list_paired_with_a_class_csv_of_fewer_classes_is_refused_before_training(tmp_path, capsys):
    """Defect: an eval list whose labels go past its class CSV passed validate --check-paths and the run's start-up, and
    failed only after training ("labels go up to 4, but there are only 4 class names"): on the paper's recipe, epochs lost
    to one key. validate --check-paths pairs each list with its class CSV; the run refuses at setup, naming the key."""
    data = tmp_path / "data"
    data.mkdir()
    listed, two, three = data / "list.txt", data / "two.csv", data / "three.csv"
    listed.write_text("a.mp4 0\nb.mp4 2\nc.mp4 2\n")
    two.write_text("id,name\n0,a\n1,b\n")
    three.write_text("id,name\n0,a\n1,b\n2,c\n")
    base = [f"output_dir={tmp_path / 'out'}", "~data.synthetic", f"data.root={data}", f"data.train_list={listed}",
            f"data.val_list={listed}", f"data.class_csv={three}", "~eval.summary"]
    ok = f"eval.datasets=[{{name: v, kind: close_set, root: {data}, list: {listed}, class_csv: {three}}}]"
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), *base, ok]) == 0, capsys.readouterr().err
    capsys.readouterr()
    said = (f"{listed}: labels go up to 2, but there are only 2 class names (ids 0..1, from the class CSV {two}); 2 of 3 videos "
            f"have a label >= 2 (first: 'b.mp4' with label 2). Wrong class CSV for this list? Give the class CSV that belongs "
            f"to list.txt.")
    wrong = f"eval.datasets=[{{name: z, kind: zero_shot, root: {data}, class_csv: {three}, splits: [{{list: {listed}, class_csv: {two}}}]}}]"
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), *base, wrong]) == 1
    assert f"- eval.datasets.0.splits.0.list: {said} (its class CSV: eval.datasets.0.splits.0.class_csv)" in " ".join(capsys.readouterr().err.split())
    assert cli_main(["validate", "--check-paths", str(QUICKSTART), *base[:-2], f"data.class_csv={two}", "~eval.summary", ok]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "(2 problems)" in err  # the training list and the validation list
    assert (f"- data.train_list: {said} More than 1% of the list is refused under on_error=resample too. "
            "(its class CSV: data.class_csv)") in err
    assert f"- data.val_list: {said} More than 1% of the list is refused under on_error=skip too. (its class CSV: data.class_csv)" in err
    # the run refuses at setup, before training (the videos do not exist: nothing is read before the refusal)
    assert cli_main(["run", str(QUICKSTART), *base, wrong, "schedule.epochs=1"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"eval.datasets.0.splits.0.list: {said}" in err
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_a_mote_recipe_without_training_data_is_refused_by_validate_naming_each_key(capsys, tmp_path):
    """data.synthetic=null with no data paths passed validate; the run then died with a bare KeyError ('class_csv',
    then 'train_list', then 'root' after the model was built)."""
    over = [f"output_dir={tmp_path / 'o'}", "data.synthetic=null", "eval.datasets=[]", "~eval.summary"]
    assert cli_main(["validate", str(QUICKSTART), *over]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "(3 problems)" in err
    for key in ("data.train_list", "data.class_csv", "data.root"):
        assert f"- {key}: required: " in err and "unless data.synthetic writes a dataset" in err
    assert cli_main(["run", str(QUICKSTART), *over, "data.train_list=/x/train.txt"]) == 1  # refused before anything runs
    assert "(2 problems)" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o").exists()


def test_a_key_given_in_the_wrong_section_is_pointed_to_where_it_belongs(capsys, tmp_path):
    """``keep_last=2`` at the top level said only "unknown key" (suggestions came from the same level alone)."""
    for given, hint in (("keep_last=2", "keep_last: unknown key; did you mean 'train.keep_last'?"),
                        ("+data.lr=2e-3", "data.lr: unknown key; did you mean 'optimizer.lr'?"),
                        ("+train.epochs=3", "train.epochs: unknown key; did you mean 'schedule.epochs'?"),
                        ("+data.shots=2", "data.shots: unknown key; did you mean 'data.few_shot.shots'?")):
        assert cli_main(["validate", str(QUICKSTART), f"output_dir={tmp_path / 'o'}", given]) == 1
        assert hint in " ".join(capsys.readouterr().err.split()), given
    assert cli_main(["validate", str(QUICKSTART), f"output_dir={tmp_path / 'o'}", "+data.nonsense=2"]) == 1
    assert "data.nonsense: unknown key (known keys here:" in " ".join(capsys.readouterr().err.split())  # nothing alike: no guess


def test_a_few_shot_subset_larger_than_a_class_names_data_few_shot_shots(tmp_path, capsys):
    """With data.synthetic the training list is written by the run, so only the run can count a class's videos:
    it said 'few_shot_subset: class 0 has 2 videos, fewer than shots=16', naming no recipe key."""
    out = tmp_path / "run"
    assert cli_main(["run", str(QUICKSTART), f"output_dir={out}", "schedule.epochs=1", "data.synthetic.videos_per_class=2",
                     "data.synthetic.val_per_class=1", "data.synthetic.frames=8", "data.num_workers=0", "data.few_shot={shots: 16}"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (f"error: data.few_shot.shots=16: class 0 has 2 videos, fewer than shots=16 (training list {out / 'data' / 'train.txt'}); "
            "lower data.few_shot.shots (each class needs that many videos)") in err
