"""Shipped recipes: every one validates; overrides work on them; the paper's hyper-parameters are pinned.

Nothing heavy runs here: recipes are loaded and validated, the optimizer / schedule / training
loader are built by the ``mote`` runner on the tiny random-weight CLIP (no downloads).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data_helpers import tiny_synthetic  # noqa: F401

from mergekit_video.cli.commands import _load_validated
from mergekit_video.cli.errors import UserError
from mergekit_video.cli.main import main as cli_main
from mergekit_video.config import ValidationError
from mergekit_video.runners.schema import SCHEMAS

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def _recipe(name: str) -> Path:
    return REPO / "recipes" / name


# ---------------------------------------------------------------------------------------------
# every shipped recipe validates
# ---------------------------------------------------------------------------------------------
def test_all_expected_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    expected = {
        "mote_vitb16.yaml", "mote_vitl14.yaml", "text4vis_baseline_vitl14.yaml", "quickstart.yaml",
        "zeroshot_ucf101.yaml", "zeroshot_hmdb51.yaml", "zeroshot_k600.yaml",
        "fewshot_ucf101.yaml", "fewshot_hmdb51.yaml",
    }
    assert expected <= names, f"missing recipes: {sorted(expected - names)}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    cfg = _load_validated(path, [])
    assert cfg["runner"] in SCHEMAS
    assert isinstance(cfg["output_dir"], str) and cfg["output_dir"]
    # defaults are filled in: validation of the filled recipe still passes (a fixed point)
    from mergekit_video.config import validate_recipe

    validate_recipe(cfg, SCHEMAS[cfg["runner"]], source=str(path))
    # everything a run writes goes under output_dir: the text cache of the quickstart included
    if cfg.get("text", {}).get("cache_dir"):
        assert cfg["text"]["cache_dir"].startswith(cfg["output_dir"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_mergevid_validate_command(path, capsys):
    assert cli_main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and path.name in out.replace("\n", "")


def test_zero_shot_recipes_have_three_splits_and_3x1_views():
    for name, dataset in (("zeroshot_ucf101.yaml", "ucf101"), ("zeroshot_hmdb51.yaml", "hmdb51"), ("zeroshot_k600.yaml", "k600")):
        cfg = _load_validated(_recipe(name), [])
        ds = [d for d in cfg["eval"]["datasets"] if d["kind"] == "zero_shot"]
        assert [d["name"] for d in ds] == [dataset]
        assert len(ds[0]["splits"]) == 3
        assert (ds[0]["num_clips"], ds[0]["num_crops"]) == (3, 1)
    # K600's three splits each have their own 160 class names
    k600 = _load_validated(_recipe("zeroshot_k600.yaml"), [])["eval"]["datasets"][0]
    assert len({s["class_csv"] for s in k600["splits"]}) == 3
    # the trade-off recipe: K400 4x3 + the three zero-shot datasets → HM_ZS and Trade-off
    allcfg = _load_validated(_recipe("zeroshot_all.yaml"), [])
    assert allcfg["eval"]["summary"] == {"close_set": "k400", "zero_shot": ["ucf101", "hmdb51", "k600"]}
    k400 = allcfg["eval"]["datasets"][0]
    assert (k400["num_clips"], k400["num_crops"]) == (4, 3)


def test_few_shot_recipes():
    for name in ("fewshot_ucf101.yaml", "fewshot_hmdb51.yaml"):
        cfg = _load_validated(_recipe(name), [])
        assert cfg["data"]["few_shot"]["shots"] in (2, 4, 8, 16)
        assert all(d["kind"] == "few_shot" and (d["num_clips"], d["num_crops"]) == (1, 1) for d in cfg["eval"]["datasets"])
        # output_dir follows the shot count through interpolation
        cfg8 = _load_validated(_recipe(name), ["data.few_shot.shots=8"])
        assert cfg8["output_dir"].endswith("_k8") and cfg8["data"]["few_shot"]["shots"] == 8


def test_few_shot_facts_of_the_docs():
    """docs/data.md "Few-shot training": the defaults, the UCF-101 split 1 arithmetic, and the summary rule."""
    from mergekit_video.data import VideoRecord, few_shot_subset

    cfg = _load_validated(_recipe("fewshot_ucf101.yaml"), ["~data.few_shot.seed", "~data.few_shot.repeat_to_full"])
    assert cfg["data"]["few_shot"] == {"shots": 2, "seed": 0, "repeat_to_full": True}
    ucf_split1 = [VideoRecord(f"{i % 101}/{i}.avi", i % 101) for i in range(9537)]  # 9,537 videos of 101 classes
    assert len(few_shot_subset(ucf_split1, shots=2, seed=0)) == 202 * 47
    assert len(few_shot_subset(ucf_split1, shots=2, seed=0, repeat_to_full=False)) == 202
    probs, _ = _problems(["eval.summary.zero_shot=[ucf101]"], recipe=_recipe("fewshot_ucf101.yaml"))
    assert probs["eval.summary.zero_shot.0"].startswith("'ucf101' is a few_shot dataset; HM_ZS is over zero_shot datasets")
    assert "## Few-shot training" in (REPO / "docs" / "data.md").read_text()


# ---------------------------------------------------------------------------------------------
# overrides and key removal on real recipes
# ---------------------------------------------------------------------------------------------
def test_overrides_on_real_recipes(tmp_path):
    cfg = _load_validated(
        _recipe("mote_vitb16.yaml"),
        ["optimizer.lr=1e-4", "data.batch_size=72", "eval.datasets.0.num_clips=1", "model.num_experts=2", "~model.tfm_gamma"],
    )
    assert cfg["optimizer"]["lr"] == 1e-4 and isinstance(cfg["optimizer"]["lr"], float)
    assert cfg["data"]["batch_size"] == 72
    assert cfg["eval"]["datasets"][0]["num_clips"] == 1 and cfg["eval"]["datasets"][0]["num_crops"] == 3
    assert cfg["model"]["num_experts"] == 2
    assert "tfm_gamma" not in cfg["model"]  # removed (components get no schema defaults)
    # a removed schema key comes back with its default
    cfg = _load_validated(_recipe("mote_vitl14.yaml"), ["~train.grad_checkpointing", "~eval.datasets"])
    assert cfg["train"]["grad_checkpointing"] is False
    assert cfg["eval"]["datasets"] == []
    # ${output_dir} interpolation follows the override
    q = _load_validated(QUICKSTART, [f"output_dir={tmp_path}/qs"])
    assert q["text"]["cache_dir"] == f"{tmp_path}/qs/cache"
    assert q["eval"]["datasets"][0]["list"] == f"{tmp_path}/qs/data/val.txt"
    # removing the synthetic block and naming real lists
    q = _load_validated(QUICKSTART, ["~data.synthetic", "data.root=/d", "data.train_list=/d/train.txt", "data.class_csv=/d/c.csv"])
    assert "synthetic" not in q["data"] and q["data"]["train_list"] == "/d/train.txt"


# ---------------------------------------------------------------------------------------------
# validation errors name the key and the allowed values
# ---------------------------------------------------------------------------------------------
def _problems(overrides, recipe=QUICKSTART):
    with pytest.raises(ValidationError) as e:
        _load_validated(recipe, overrides)
    return {p.path: p.message for p in e.value.problems}, str(e.value)


def test_bad_runner_names_allowed_values():
    with pytest.raises(UserError, match=r"key 'runner' must be one of mote, evaluate, compare, got 'motee' \(did you mean 'mote'\?\)"):
        _load_validated(QUICKSTART, ["runner=motee"])
    with pytest.raises(UserError, match=r"key 'runner' is missing: set it to one of mote, evaluate, compare \(mote trains and evaluates"):
        _load_validated(QUICKSTART, ["~runner"])  # an empty recipe too: said missing, not "got None"


def test_bad_choice_unknown_key_wrong_type_all_listed():
    probs, text = _problems(["precision=fp8", "train.log_evry=3", "schedule.epochs=abc", "eval.datasets.1.kind=open_set", "data.num_frames=0"])
    assert probs["precision"] == "'fp8' is not one of: 'auto', 'bf16', 'fp16', 'fp32'"
    assert probs["train.log_evry"].startswith("unknown key; did you mean 'log_every'?")
    assert "known keys here: grad_accumulation" in probs["train.log_evry"]
    assert probs["schedule.epochs"] == "expected int, got str ('abc')"
    assert probs["eval.datasets.1.kind"].startswith("'open_set' is not one of: 'close_set', 'zero_shot', 'few_shot'")
    assert probs["data.num_frames"] == "must be >= 1, got 0"
    assert text.splitlines()[0] == f"recipe {QUICKSTART} is invalid (5 problems):"


def test_views_and_optimizer_numbers_are_checked_before_the_run():
    """Values that used to pass validation and fail after the model and data were built."""
    probs, _ = _problems(["train.val_views=[1,2]", "optimizer.betas=[0.9,0.99,1]", "eval.datasets.0.num_crops=2"])
    assert probs == {
        "train.val_views.1": "crops: 2 is not one of: 1, 3",
        "optimizer.betas": "expected a list of 2 ([beta1, beta2]), got 3 items ([0.9, 0.99, 1])",
        "eval.datasets.0.num_crops": "2 is not one of: 1, 3",
    }
    probs, _ = _problems(["train.val_views=[0]", "optimizer.betas=[1.0,0.999]", "optimizer.eps=0", "optimizer.lr=.nan",
                          "optimizer.weight_decay=-0.1", "optimizer.clip_lr=.inf", "schedule.min_lr_ratio=1.5"])
    assert probs == {
        "train.val_views": "expected a list of 2 ([clips, crops]), got 1 item ([0])",
        "optimizer.betas.0": "beta1: must be < 1, got 1.0",
        "optimizer.eps": "must be > 0, got 0",
        "optimizer.lr": "must be a finite number, got nan",
        "optimizer.weight_decay": "must be >= 0, got -0.1",
        "optimizer.clip_lr": "must be a finite number, got inf",
        "schedule.min_lr_ratio": "must be <= 1, got 1.5",
    }
    cfg = _load_validated(QUICKSTART, ["train.val_views=[4,3]", "optimizer.betas=[0,0.5]"])
    assert (cfg["train"]["val_views"], cfg["optimizer"]["betas"]) == ([4, 3], [0, 0.5])


def test_component_argument_choices_come_from_the_registries():
    probs, _ = _problems(["model.router=bogus", "model.merge=avg"])
    # (plugins may register more routers, so the built-ins are checked, not the whole list)
    assert probs["model.router"].startswith("'bogus' is not one of: ")
    assert all(f"'{r}'" in probs["model.router"] for r in ("fixed", "multinomial", "random", "topk"))
    assert probs["model.merge"].startswith("'avg' is not one of: ") and "'mean'" in probs["model.merge"] and "'temperature_softmax'" in probs["model.merge"]
    from mergekit_video.runners.schema import PLUGIN_HINT  # a part a plugin would register: say how to load it

    assert probs["model.router"].endswith(f"; {PLUGIN_HINT}") and probs["model.merge"].endswith(f"; {PLUGIN_HINT}")


def test_missing_required_and_bad_component():
    probs, _ = _problems(["~objective", "model._component_=mergekit_video.models.no_such_builder"])
    assert probs["objective"].startswith("is required")
    assert probs["model._component_"].startswith("'mergekit_video.models' has no attribute 'no_such_builder'")
    probs, _ = _problems(["model.num_expertz=4"])
    assert probs["model.num_expertz"].startswith("unknown argument 'num_expertz' for mergekit_video.models.video_clip.build_video_clip; did you mean 'num_experts'?")


def test_missing_recipe_file():
    with pytest.raises(FileNotFoundError, match="recipe nope.yaml does not exist"):
        _load_validated(Path("nope.yaml"), [])


# ---------------------------------------------------------------------------------------------
# the paper's hyper-parameters (Table 6, §4.1) in the training recipes, and what the runner makes of them
# ---------------------------------------------------------------------------------------------
PAPER = [
    # recipe, CLIP, epochs, temporal layers, experts
    ("mote_vitb16.yaml", "ViT-B-16", 30, 4, 4),
    ("mote_vitl14.yaml", "ViT-L-14", 20, 6, 4),
    ("text4vis_baseline_vitl14.yaml", "ViT-L-14", 20, 6, 0),
]


@pytest.mark.parametrize("name,clip,epochs,layers,experts", PAPER, ids=[p[0].split(".")[0] for p in PAPER])
def test_paper_hyper_parameters_in_recipe(name, clip, epochs, layers, experts):
    cfg = _load_validated(_recipe(name), [])
    o, s, d, m, obj = cfg["optimizer"], cfg["schedule"], cfg["data"], cfg["model"], cfg["objective"]
    assert (o["name"], o["weight_decay"], list(o["betas"])) == ("adamw", 0.2, [0.9, 0.999])
    assert (o["lr"], o["clip_lr"]) == (5e-5, 3e-6)
    assert (s["epochs"], s["warmup_epochs"], s["min_lr_ratio"]) == (epochs, 5, 0.0)
    assert (d["batch_size"], d["num_frames"], d["input_size"], d["sampling"], d["flip"]) == (144, 8, 224, "segment", True)
    assert (m["clip_name"], m["pretrained"], m["temporal_layers"], m["num_experts"]) == (clip, "openai", layers, experts)
    assert (m["tfm_k"], m["tfm_gamma"]) == (5, 0.05)
    assert cfg["train"]["grad_accumulation"] == 1 and cfg["text"]["templates"] == "mote"
    k400 = cfg["eval"]["datasets"][0]
    assert (k400["kind"], k400["num_clips"], k400["num_crops"]) == ("close_set", 4, 3)
    from mergekit_video.config import instantiate

    objective = instantiate(obj, _path="objective")
    if experts:
        assert m["router"] == "multinomial" and m["merge"] == "mean" and m["expert_init"] == "normal"
        assert (objective.wmr_weight, objective.mse_weight) == (0.5, 0.1)  # λ, η (Eq. 10)
        assert objective.wmr.beta == 0.6
        # τ ∈ {±0.6, ±1.2, ±2.4, ±4.8, ±9.6, ∞}
        assert objective.wmr.candidates() == pytest.approx([-9.6, -4.8, -2.4, -1.2, -0.6, 0.6, 1.2, 2.4, 4.8, 9.6, math.inf])
        assert cfg["eval"]["modulation"] == [False, True]
    else:
        assert (objective.wmr_weight, objective.mse_weight) == (0.0, 0.0)


def _tiny_model(experts: int):
    from mergekit_video.models import build_video_clip

    torch.manual_seed(0)
    return build_video_clip(clip_name="mergevid-tiny-vit", pretrained=None, temporal_layers=2, num_experts=experts)


@pytest.mark.parametrize("name,clip,epochs,layers,experts", PAPER, ids=[p[0].split(".")[0] for p in PAPER])
def test_runner_optimizer_and_schedule_follow_the_recipe(name, clip, epochs, layers, experts):
    """AdamW with CLIP at 3e-6 and new parameters at 5e-5, wd 0.2; 5 warm-up epochs, cosine to 0 at the end."""
    from mergekit_video.runners.mote import MoTERunner

    cfg = _load_validated(_recipe(name), [])
    runner = MoTERunner(cfg=cfg)
    runner.model = _tiny_model(experts)  # the recipe's optimizer on a small model (no download)
    runner.train_loader = [None] * 10  # 10 batches per epoch
    opt, sched = runner._optimizer()
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["clip"]["initial_lr"] == 3e-6 and groups["default"]["initial_lr"] == 5e-5
    assert all(g["weight_decay"] == 0.2 and tuple(g["betas"]) == (0.9, 0.999) for g in opt.param_groups)
    clip_names = set(groups["clip"]["param_names"])
    assert clip_names and all(n.startswith("clip.") for n in clip_names)
    assert all(n.startswith("head.") for n in groups["default"]["param_names"])
    # every trainable parameter is optimised exactly once
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in runner.model.parameters() if p.requires_grad)
    lam = sched.lr_lambdas[0]
    assert (lam.warmup_steps, lam.total_steps) == (50, 10 * epochs)
    assert lam(0) == pytest.approx(1 / 51) and lam(50) == 1.0 and lam(10 * epochs) == 0.0
    assert lam(50 + (10 * epochs - 50) // 2) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name", ["mote_vitb16.yaml", "mote_vitl14.yaml"])
def test_runner_training_loader_has_the_paper_augmentations(name, tmp_path):
    """RandomResizedCrop area [0.08, 1], ratio [3/4, 4/3] to 224, flip 0.5, grayscale 0.2; 8 frames; batch 144."""
    from mergekit_video.runners.mote import MoTERunner
    from mergekit_video.training.distributed import DistInfo

    (tmp_path / "train.txt").write_text("".join(f"v{i}.mp4 {i % 400}\n" for i in range(300)))
    cfg = _load_validated(_recipe(name), [f"data.root={tmp_path}", f"data.train_list={tmp_path}/train.txt", "data.num_workers=0"])
    runner = MoTERunner(cfg=cfg)
    runner.dist = DistInfo(0, 1, 0, torch.device("cpu"), None)
    runner.device = torch.device("cpu")
    runner.data_cfg = cfg["data"]
    runner.input_size = cfg["data"]["input_size"]
    runner.train_class_names = [f"c{i}" for i in range(400)]
    loader = runner._train_loader()
    ds, tf = loader.dataset, loader.dataset.transform
    assert (loader.batch_size, loader.drop_last, len(loader)) == (144, True, 2)
    assert (ds.train, ds.num_frames, ds.sampling, ds.on_error) == (True, 8, "segment", "resample")
    assert (tf.size, tf.scale, tf.ratio, tf.flip_p, tf.grayscale_p) == (224, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.2)
    # the total batch is split over processes × accumulation steps
    runner.dist = DistInfo(1, 3, 1, torch.device("cpu"), "gloo")
    assert runner._train_loader().batch_size == 48
    runner.cfg = {**cfg, "train": {**cfg["train"], "grad_accumulation": 5}}
    with pytest.raises(ValueError, match=r"data.batch_size=144 is the total batch; it must be divisible by processes \(3\) × train.grad_accumulation \(5\)"):
        runner._train_loader()


@pytest.mark.parametrize("name", [p.name for p in RECIPES if p.name != "quickstart.yaml"])
def test_paper_recipes_evaluate_as_the_official_test_code(name):
    """fp32 and the official test frames (segment starts), for validation and every eval dataset."""
    from mergekit_video.runners.common import eval_precision, eval_suite

    cfg = _load_validated(_recipe(name), [])
    assert eval_precision(cfg) == "fp32" and cfg["eval"]["test_offsets"] == "start"
    entries = eval_suite(cfg["eval"], cfg.get("data"), model_input_size=224)
    assert entries and all(e.test_offsets == "start" for e in entries)
    assert cfg["eval"].get("clip_blend") is None  # the official test.py blend is opt-in
    assert _load_validated(_recipe(name), ["eval.clip_blend=0.99"])["eval"]["clip_blend"] == 0.99


def test_quickstart_recipe_is_offline_and_small():
    cfg = _load_validated(QUICKSTART, [])
    assert cfg["model"]["clip_name"] == "mergevid-tiny-vit" and cfg["model"]["pretrained"] is None
    assert cfg["data"]["synthetic"] and cfg["runner"] == "mote"
    syn = cfg["data"]["synthetic"]
    per_epoch = syn["num_classes"] * syn["videos_per_class"] // cfg["data"]["batch_size"]
    assert 200 <= per_epoch * cfg["schedule"]["epochs"] <= 400  # "a few hundred steps"
    assert cfg["eval"]["modulation"] == [False, True]
    merges = [m["name"] for m in cfg["eval"]["compare"]["merges"]]
    assert "temperature_softmax" in merges and "ensemble" in merges
    assert cfg["eval"]["compare"]["experts"] and cfg["eval"]["compare"]["logit_ensemble"]
    assert {d["kind"] for d in cfg["eval"]["datasets"]} == {"close_set", "zero_shot"}


@pytest.mark.parametrize(
    ("overrides", "key", "said"),
    [
        (["model.merge=ensemble"], "model.merge", "'ensemble' combines expert outputs and has no merged weights, so the dense export"),
        (["eval.compare.merges=[{name: temperature_softmax, tau: abc}]"], "eval.compare.merges.0",
         "'temperature_softmax' with {'tau': 'abc'} cannot merge 4 experts: could not convert string to float"),
        (["eval.compare.merges=[{name: slerp}]"], "eval.compare.merges.0", "'slerp' with its defaults cannot merge 4 experts"),
        (["eval.compare.merges=[{name: weighted, weights: [1, 2]}]"], "eval.compare.merges.0", "merge strategy 'weighted': 2 weights for 4 experts"),
        (["model.merge=temperature_softmax"], "model.merge", "missing required argument 'tau'"),
        (["model.merge=slerp"], "model.merge", "merge strategy 'slerp' merges exactly 2 experts, not 4"),
        (["model.router=topk", "model.router_kwargs={k: 10}"], "model.router_kwargs", "topk router k=10 must be in [1, 4]"),
        (["model.router_kwargs=3"], "model.router_kwargs", "expected mapping, got int (3)"),
        (["model.num_positions=4"], "data.num_frames", "8 frames, but model.num_positions=4 frame position embeddings"),
        (["eval.datasets.0.num_frames=16", "model.num_positions=8"], "eval.datasets.0.num_frames", "16 frames, but model.num_positions=8"),
        (["text.templates=[1, 2]"], "text.templates.0", "expected str, got int (1)"),
        (["text.templates=bogus"], "text.templates", "'bogus' is not a template set (mote, single)"),
        (["text.templates=[a video]"], "text.templates.0", "'a video' has no '{}' placeholder"),
        (["seed=99999999999999999999"], "seed", "must be <= 4294967295"),
        (["seed=-1"], "seed", "must be >= 0, got -1"),
        (["data.synthetic.seed=-1"], "data.synthetic.seed", "must be >= 0"),
        (["train.grad_accumulation=7"], "train.grad_accumulation", "7 does not divide data.batch_size=12"),
        (["eval.summary.close_set=novel"], "eval.summary.close_set", "'novel' is a zero_shot dataset"),
        (["eval.summary.zero_shot=[val]"], "eval.summary.zero_shot.0", "'val' is a close_set dataset; HM_ZS is over zero_shot datasets"),
        (["eval.modulation=[]"], "eval.modulation", "needs at least 1 item, got []"),  # evaluated nothing it was asked for
        (["eval.modulation=[true, false, true]"], "eval.modulation", "lists True more than once"),
    ],
)
def test_values_that_would_fail_in_the_run_are_named_by_validation(overrides, key, said):
    """Each of these passed validation once and failed later: in the first training step, or after training."""
    probs, _ = _problems(overrides)
    assert said in probs[key], probs


def test_an_evaluation_recipe_without_checkpoint_or_model_is_refused():
    probs, _ = _problems(["checkpoint=null"], recipe=REPO / "recipes" / "zeroshot_k600.yaml")
    assert probs["checkpoint"].startswith("nothing to evaluate: set checkpoint")


def test_cross_key_problems_are_found_before_the_run():
    probs, _ = _problems(["eval.compare.merges=[{tau: 1}]"])
    assert probs["eval.compare.merges.0.name"] == "is required"
    probs, _ = _problems([  # checked once every key is valid on its own
        "eval.compare.merges=[{name: mean}, {name: temperature_softmax, tauu: 1}, {name: temperature_softmax}]",
        "eval.summary.close_set=nope", "device=tpu", "data.synthetic.size=[63,64]",
    ])
    assert probs["eval.compare.merges.1.tauu"].startswith("unknown argument 'tauu' for mergekit_video.merging.temperature_softmax; did you mean 'tau'?")
    assert probs["eval.compare.merges.2"].startswith("missing required argument 'tau'")
    assert probs["eval.summary.close_set"].startswith("'nope' is not an evaluated dataset (eval.datasets has 'val'")
    assert probs["device"] == "'tpu' is not a device: use auto, cpu, cuda, cuda:N or mps"
    assert probs["data.synthetic.size"] == "must be [height, width], both even, got [63, 64]"
    probs, _ = _problems(["data.synthetic.size=[64]"])
    assert "data.synthetic.size" in probs
    probs, _ = _problems(["eval.datasets.1.name=val"])  # two evaluations under one name would be merged as "splits"
    assert probs["eval.datasets.1.name"].startswith("'val' is the name of eval.datasets.0 too: results are keyed by name")
    probs, _ = _problems(["data.flip_label_pairs=[[1, 1], [2, 3], [3, 4]]"])
    assert probs["data.flip_label_pairs.0"] == "needs two distinct class ids, got [1, 1]"
    assert probs["data.flip_label_pairs.2"] == "class id 3 is in data.flip_label_pairs.1 too"
    probs, _ = _problems(["data.flip_label_pairs=[[0, 1]]", "data.flip=false"])
    assert probs["data.flip_label_pairs"].startswith("swaps the labels of flipped clips, but data.flip is false")
    cfg = _load_validated(QUICKSTART, ["data.flip_label_pairs=[[0, 1]]", "eval.summary.zero_shot=null", "eval.summary.close_set=null",
                                       "data.sampling=dense", "data.stride=2", "eval.datasets.0.sampling=segment"])
    assert cfg["eval"]["summary"] == {"zero_shot": None, "close_set": None}  # explicit: HM_ZS and Trade-off off



def test_merge_dry_runs_apply_the_strategys_argument_ranges_plugins_included():
    """merge_argument_problem ran the function only, so a plugin merge's argument_ranges (checked by
    check_merge_arguments) passed validation and failed at model build or after training."""
    from mergekit_video.merging import MERGES
    from mergekit_video.runners.schema import merge_argument_problem

    @MERGES.register("test_scaled_mean_ranges", override=True)
    def scaled_mean(tensors, *, base=None, scale: float = 1.0):
        """Mean times ``scale``."""
        return sum(tensors) / len(tensors) * scale

    scaled_mean.argument_ranges = {"scale": (0.0, 2.0, True, False)}
    try:
        assert merge_argument_problem("test_scaled_mean_ranges", {"scale": 1.5}, 4) is None
        assert "scale must be in (0, 2], got 5" in merge_argument_problem("test_scaled_mean_ranges", {"scale": 5}, 4)
        assert "density must be in (0, 1], got 2.0" in merge_argument_problem("ties", {"density": 2.0}, 4)  # base-relative too
        assert merge_argument_problem("ties", {"density": 0.5}, 4) is None
    finally:
        MERGES._entries.pop("test_scaled_mean_ranges", None)
        MERGES._owners.pop("test_scaled_mean_ranges", None)


def test_recipes_name_the_official_kinetics_csvs():
    """The official Kinetics-400 files are train.csv / validate.csv / test.csv (there is no val.csv)."""
    for recipe in RECIPES:
        for line in recipe.read_text().splitlines():
            if "mergevid data lists kinetics" in line:
                assert "train.csv validate.csv" in line, (recipe.name, line)


def test_compare_merges_of_a_checkpoint_are_dry_run_for_its_expert_count(tmp_path):
    """eval.compare.merges of an evaluate/compare recipe with ``checkpoint:`` were not checked by validate (the
    run failed after loading): they are dry-run for the expert count in the checkpoint's config.json, and with
    the checks that need no count where the checkpoint cannot be read."""
    import json

    from mergekit_video.cli.commands import _validated

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"format": "mergekit_video/video_clip", "head": {"num_experts": 3}}))

    def problems(cfg):
        with pytest.raises(ValidationError) as e:
            _validated(cfg, source="t")
        return {p.path: p.message for p in e.value.problems}

    for runner in ("compare", "evaluate"):
        base = {"runner": runner, "output_dir": str(tmp_path / "out"), "checkpoint": str(model)}
        bad = {"eval": {"compare": {"merges": [{"name": "temperature_softmax", "tau": "bogus"}]}}}
        assert problems({**base, **bad}) == {"eval.compare.merges.0": "'temperature_softmax' with {'tau': 'bogus'} cannot merge "
                                                                      "3 experts: could not convert string to float: 'bogus'"}
        weights = {"eval": {"compare": {"merges": [{"name": "weighted", "weights": [1, 2]}]}}}
        assert problems({**base, **weights}) == {"eval.compare.merges.0": "'weighted' with {'weights': [1, 2]} cannot merge 3 "
                                                                          "experts: merge strategy 'weighted': 2 weights for 3 experts"}
        gone = {**base, "checkpoint": str(tmp_path / "gone")}  # no expert count: the type checks still run
        assert problems({**gone, **bad}) == {"eval.compare.merges.0": "'temperature_softmax' with {'tau': 'bogus'} cannot merge "
                                                                      "experts: could not convert string to float: 'bogus'"}
        _validated({**gone, **weights}, source="t")  # the length needs the count
        _validated({**base, "eval": {"compare": {"merges": [{"name": "weighted", "weights": [1, 2, 3]}]}}}, source="t")
        typo = problems({**base, "eval": {"compare": {"merges": [{"name": "temperature_softmax", "tau": 1, "taux": 1}]}}})
        assert list(typo) == ["eval.compare.merges.0.taux"]  # told once, under the argument


def test_an_evaluation_recipe_with_both_checkpoint_and_model_is_refused(tmp_path):
    """The run loaded the checkpoint and silently ignored model."""
    from mergekit_video.cli.commands import _validated

    cfg = {"runner": "evaluate", "output_dir": str(tmp_path / "out"), "checkpoint": str(tmp_path / "model"),
           "model": {"_component_": "mergekit_video.models.build_video_clip", "clip_name": "mergevid-tiny-vit"}}
    with pytest.raises(ValidationError) as e:
        _validated(cfg, source="t")
    assert {p.path: p.message for p in e.value.problems}["checkpoint"] == (
        "set either checkpoint (a saved model to load) or model (a _component_ that builds one), not both: the run "
        "would load checkpoint and ignore model")


def test_an_eval_dataset_with_both_list_and_splits_is_refused():
    """splits won silently over list (at validation, and in eval_suite for a recipe dict run from Python)."""
    import re

    from mergekit_video.runners.common import eval_suite

    said = "sets both list (one annotation list) and splits (several, each {list, class_csv}): set one of them"
    probs, _ = _problems(["eval.datasets.0.splits=[{list: a.txt}]"])
    assert probs == {"eval.datasets.0": said}
    with pytest.raises(ValueError, match=re.escape(f"eval.datasets.0: {said}")):
        eval_suite({"datasets": [{"name": "v", "root": "r", "list": "l.txt", "class_csv": "c.csv", "splits": [{"list": "a.txt"}]}]}, {})


def test_the_synthetic_novel_split_is_refused_when_num_novel_classes_is_0(tmp_path):
    """The run failed after writing the dataset, with 'eval.datasets.1.list: file not found: .../novel.txt'."""
    probs, _ = _problems([f"output_dir={tmp_path}", "data.synthetic.num_novel_classes=0"])
    assert probs == {"eval.datasets.1.list": f"{tmp_path}/data/novel.txt is the synthetic novel split, but "
                                             "data.synthetic.num_novel_classes=0 writes none: set data.synthetic.num_novel_classes>0 "
                                             "or remove this dataset (and its eval.summary entry)"}
    _load_validated(QUICKSTART, [f"output_dir={tmp_path}", "data.synthetic.num_novel_classes=1"])


# ---------------------------------------------------------------------------------------------
# the test resize: data.short_side, eval.datasets.N.short_side (issue 4 §3)
# ---------------------------------------------------------------------------------------------
def _short_side_recipe(syn, tmp_path, *overrides):
    """The quickstart on the tiny synthetic dataset (48x64 videos; frames of 32, 4 per clip)."""
    return _load_validated(QUICKSTART, [
        f"output_dir={tmp_path}", "~data.synthetic", f"data.root={syn.root}", f"data.train_list={syn.train_list}",
        f"data.val_list={syn.val_list}", f"data.class_csv={syn.class_csv}", "data.num_frames=4", "data.num_workers=0",
        "eval.num_workers=0", "eval.datasets.0.num_clips=1", "eval.datasets.0.num_crops=3",
        *[f"eval.datasets.{i}.{k}={v}" for i, lst, csv in ((0, syn.val_list, syn.class_csv), (1, syn.novel_list, syn.novel_class_csv))
          for k, v in (("root", syn.root), ("list", lst), ("class_csv", csv))],
        *overrides,
    ])


def test_the_test_resize_reaches_validation_and_every_eval_dataset(tiny_synthetic, tmp_path):
    """"Resize the short side to S, then crop": the recipe's loaders give VideoDataset(short_side=S)'s frames, unlike the default."""
    from mergekit_video.data import VideoDataset
    from mergekit_video.runners.common import build_eval_loader, eval_suite
    from mergekit_video.runners.mote import MoTERunner

    syn = tiny_synthetic

    def direct(short_side, list_file=syn.val_list, class_csv=syn.class_csv, **kw):  # item 0 of that list, built by hand
        return VideoDataset(list_file=list_file, root=syn.root, class_names=class_csv, num_frames=4, train=False, input_size=32,
                            short_side=short_side, normalize=False, **kw)[0]["frames"]

    def evaluated(cfg):  # item 0 of each eval dataset, through the recipe's loaders
        entries = eval_suite(cfg["eval"], cfg["data"], model_input_size=32)
        return [build_eval_loader(e, e.splits[0], eval_cfg=cfg["eval"], data_cfg=cfg["data"], normalize=False, dist=None,
                                  seed=0).dataset[0]["frames"] for e in entries]

    def validated(cfg):
        runner = MoTERunner(cfg=cfg)
        runner.data_cfg, runner.input_size, runner.train_class_names = cfg["data"], 32, syn.class_names
        return runner._build_val_dataset()[0]["frames"]

    default = _short_side_recipe(syn, tmp_path)
    val, novel = evaluated(default)
    assert val.shape == (3, 4, 3, 32, 32) and novel.shape == (3, 4, 3, 32, 32)
    assert torch.equal(val, direct(None, num_crops=3)) and torch.equal(validated(default), direct(None, num_crops=1, num_clips=1))
    # data.short_side: validation and every eval dataset; eval.datasets.1.short_side overrides it for that dataset
    cfg = _short_side_recipe(syn, tmp_path, "data.short_side=48", "eval.datasets.1.short_side=40")
    val, novel = evaluated(cfg)
    assert torch.equal(val, direct(48, num_crops=3))
    assert torch.equal(novel, direct(40, syn.novel_list, syn.novel_class_csv, num_clips=3))
    assert torch.equal(validated(cfg), direct(48))
    assert not torch.equal(val, direct(None, num_crops=3)) and not torch.equal(validated(cfg), validated(default))
    assert not torch.equal(novel, direct(None, syn.novel_list, syn.novel_class_csv, num_clips=3))
    # 48 is the videos' own short side: the crop is the 32x32 centre of the decoded 48x64 frame (no resize)
    full = VideoDataset(list_file=syn.val_list, root=syn.root, num_frames=4, train=False, input_size=48, short_side=48, normalize=False)
    decoded = full[0]["frames"][0]  # [T,3,48,48], the centre of 48x64 frames
    assert torch.equal(val[1], decoded[:, :, 8:40, 8:40])  # the centre crop of the 3 (view 1)


def test_the_test_resize_must_not_be_smaller_than_the_frame_size(tmp_path):
    from mergekit_video.runners.common import eval_suite

    tail = "test views resize the short side to {k}, then crop 32x32; set {k} >= 32, or leave it unset (resize to 32)"
    probs, _ = _problems(["data.short_side=16"])
    assert probs == {"data.short_side": "16 is smaller than the frame size 32 (data.input_size): " + tail.format(k="data.short_side")}
    probs, _ = _problems(["eval.datasets.1.short_side=31", "data.short_side=40"])
    assert probs == {"eval.datasets.1.short_side": "31 is smaller than the frame size 32 (data.input_size): "
                                                   + tail.format(k="eval.datasets.1.short_side")}
    probs, _ = _problems(["~data.input_size", "data.short_side=24"])  # the architecture's frame size
    assert probs == {"data.short_side": "24 is smaller than the frame size 32 (the visual tower of model.clip_name mergevid-tiny-vit): "
                                        + tail.format(k="data.short_side")}
    assert _problems(["data.short_side=0", "eval.datasets.0.short_side=2.5"])[0] == {
        "data.short_side": "must be >= 8, got 0", "eval.datasets.0.short_side": "expected int, got float (2.5)"}
    assert _load_validated(QUICKSTART, ["data.short_side=32", "eval.datasets.0.short_side=36"])["data"]["short_side"] == 32
    assert _load_validated(QUICKSTART, [])["data"]["short_side"] is None  # the default: resize to the frame size
    # at run time (a recipe dict run from Python; the model's frame size): the same, naming the key
    ds = {"name": "v", "kind": "close_set", "root": "/r", "list": "/r/v.txt", "class_csv": "/r/c.csv"}
    assert [e.short_side for e in eval_suite({"datasets": [ds, {**ds, "short_side": 40}]}, {"short_side": 36}, model_input_size=32)] == [36, 40]
    assert eval_suite({"datasets": [ds]}, {}, model_input_size=32)[0].short_side is None
    with pytest.raises(ValueError, match=r"^data.short_side=24 is smaller than the frame size 32 \(the model's visual tower\): "):
        eval_suite({"datasets": [ds]}, {"short_side": 24}, model_input_size=32)
    with pytest.raises(ValueError, match=r"^eval.datasets.1.short_side=24 is smaller than the frame size 32 \(data.input_size\): "):
        eval_suite({"datasets": [ds, {**ds, "short_side": 24}]}, {"input_size": 32, "short_side": 48}, model_input_size=32)
    with pytest.raises(ValueError, match=r"^eval.datasets.0.short_side must be a positive integer \(pixels\), got 0$"):
        eval_suite({"datasets": [{**ds, "short_side": 0}]}, {}, model_input_size=32)


# ---------------------------------------------------------------------------------------------
# frame folders numbered from 0: data.frame_index_base
# ---------------------------------------------------------------------------------------------
def test_frame_folders_numbered_from_0_are_read_with_data_frame_index_base(tmp_path):
    """A folder of img_00000.jpg ... read from 1 came back one frame off, without an error; it is refused at
    open now, and data.frame_index_base=0 reads it (validation and evaluation alike)."""
    import shutil

    from data_helpers import write_frame_folder

    from mergekit_video.data import VideoReadError
    from mergekit_video.runners.common import build_eval_loader, eval_suite
    from mergekit_video.runners.mote import MoTERunner

    one = write_frame_folder(tmp_path / "one" / "v0", 10, h=48, w=64)
    (tmp_path / "zero" / "v0").mkdir(parents=True)
    for i in range(10):
        shutil.copy(one / f"img_{i + 1:05d}.jpg", tmp_path / "zero" / "v0" / f"img_{i:05d}.jpg")
    for root in ("one", "zero"):
        (tmp_path / root / "list.txt").write_text("v0 10 0\n")
    (tmp_path / "classes.csv").write_text("id,name\n0,a\n1,b\n")

    def recipe(root, *overrides):
        r = tmp_path / root
        return _load_validated(QUICKSTART, [
            f"output_dir={tmp_path / 'run'}", "~data.synthetic", f"data.root={r}", f"data.train_list={r}/list.txt",
            f"data.val_list={r}/list.txt", f"data.class_csv={tmp_path}/classes.csv", "data.list_format=frames", "data.backend=frames",
            "data.num_frames=4", "data.num_workers=0", "eval.num_workers=0", "eval.datasets=[{name: val, kind: close_set, "
            f"root: {r}, list: {r}/list.txt, class_csv: {tmp_path}/classes.csv, list_format: frames}}]",
            "eval.summary={close_set: val}", *overrides])

    def frames(cfg):  # validation and evaluation items, through the recipe's datasets
        runner = MoTERunner(cfg=cfg)
        runner.data_cfg, runner.input_size, runner.train_class_names = cfg["data"], 32, ["a", "b"]
        entry = eval_suite(cfg["eval"], cfg["data"], model_input_size=32)[0]
        loader = build_eval_loader(entry, entry.splits[0], eval_cfg=cfg["eval"], data_cfg=cfg["data"], normalize=False, dist=None, seed=0)
        return runner._build_val_dataset()[0]["frames"], loader.dataset[0]["frames"]

    reference = frames(recipe("one"))
    got = frames(recipe("zero", "data.frame_index_base=0"))
    assert all(torch.equal(a, b) for a, b in zip(got, reference)) and reference[0].shape == (1, 4, 3, 32, 32)
    cfg = recipe("zero")
    entry = eval_suite(cfg["eval"], cfg["data"], model_input_size=32)[0]
    loader = build_eval_loader(entry, entry.splits[0], eval_cfg=cfg["eval"], data_cfg=cfg["data"], normalize=False, dist=None, seed=0)
    with pytest.raises(VideoReadError, match=r"has img_00000.jpg: set frame_index_base=0 \(data.frame_index_base in a recipe"):
        loader.dataset[0]
    probs, _ = _problems(["data.frame_index_base=2"])
    assert probs == {"data.frame_index_base": "2 is not one of: 0, 1"}
