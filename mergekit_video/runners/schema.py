"""Recipe schemas of the runners (validated before anything heavy runs)."""

from __future__ import annotations

from typing import Any

from ..config import Component, Field, Problem, Section, recipe_schema


def _names(kind: str):
    def names() -> list[str]:
        from ..registry import get_registry

        return get_registry(kind).names()

    return names


#: Seeds of a recipe: what every generator they feed (Python, NumPy, torch) takes.
SEED_MAX = 2**32 - 1

PLUGIN_HINT = "a plugin's part? list its module under plugins: in the recipe, or pip install the plugin package"

MODEL_FIELDS = {
    "clip_name": Field(str, doc="open_clip architecture, e.g. ViT-B-16, ViT-L-14"),
    "pretrained": Field(str, nullable=True, path="weights", doc="open_clip tag (openai), a local file, or null"),
    "force_quick_gelu": Field(bool, nullable=True, doc="QuickGELU activations (OpenAI weights); null: from the tag or file"),
    "cache_dir": Field(str, nullable=True, doc="where open_clip keeps downloaded weights (default: its own cache)"),
    "temporal_layers": Field(int, min=1),
    "num_experts": Field(int, min=0, max=1024, doc="0 = plain FFN (baseline)"),
    "router": Field(str, choices=_names("routers"), choices_hint=PLUGIN_HINT),
    "expert_init": Field(str, choices=("normal", "copy", "copy_noise")),
    "merge": Field(str, choices=_names("merges"), choices_hint=PLUGIN_HINT),
    "tfm_k": Field(int, min=1),
    "tfm_gamma": Field(float, min=0, exclusive_min=True),
    "num_positions": Field(int, min=1, max=4096, doc="frame position embeddings: the most frames the head takes"),
    "grad_checkpointing": Field(bool),
    "router_kwargs": Field(dict, nullable=True, doc="arguments of the router (topk: k, granularity, ...)"),
    "merge_kwargs": Field(dict, nullable=True, doc="arguments of the merge (temperature_softmax: tau, weighted: weights)"),
}

OBJECTIVE_FIELDS = {
    "wmr_weight": Field(float, min=0, doc="λ of Eq. 10"),
    "mse_weight": Field(float, min=0, doc="η of Eq. 10"),
    "wmr_loss": Field(str, choices=("ce", "kl", "mse")),
    "expert_data": Field(str, choices=("routed", "all")),
    "aux_weight": Field(float, min=0, doc="topk routers: load-balancing loss coefficient, z-loss a tenth of it (default 0.01)"),
    "fuse_paths": Field(bool),
    "label_smoothing": Field(float, min=0, max=1),
    "wmr": Section(
        {
            "beta": Field(float, min=0, exclusive_min=True, doc="β of Eq. 7: τ ∈ {±2ⁿ·β} ∪ {∞} (default 0.6)"),
            "num_powers": Field(int, min=1, max=64, doc="n = 0 .. num_powers-1 (default 5: 11 values of τ)"),
            "sampling": Field(str, choices=("discrete", "point", "normal", "uniform"),
                              doc="discrete (default, Eq. 7), point (τ = ∞ only), or continuous (Table 2e, 7f)"),
            "seed": Field(int, nullable=True, min=0, max=SEED_MAX, doc="seed of the τ draws (default: drawn from the torch RNG, which the run's seed sets)"),
        },
        nullable=True,
    ),
}

DEVICE = Field(str, default="auto", doc="auto | cuda | cuda:N | cpu")
PRECISION = Field(str, default="auto", choices=("auto", "bf16", "fp16", "fp32"), doc="auto: bf16 autocast on CUDA, fp32 on CPU")
RUNNER_NAMES = ("mote", "evaluate", "compare")

SYNTHETIC = Section(
    {
        "num_classes": Field(int, default=6, min=2),
        "videos_per_class": Field(int, default=8, min=1),
        "val_per_class": Field(int, default=4, min=1),
        "num_novel_classes": Field(int, default=4, min=0),
        "frames": Field(int, default=32, min=1),
        "size": Field(list, default=[64, 64], item=Field(int, min=16), doc="[height, width], even"),
        "seed": Field(int, default=0, min=0, max=SEED_MAX),
    },
    nullable=True,
    doc="write a synthetic mp4 dataset under {output_dir}/data and use its lists (offline quickstart)",
)

FEW_SHOT = Section(
    {
        "shots": Field(int, required=True, choices=(1, 2, 4, 8, 16, 32)),
        "seed": Field(int, default=0, min=0, max=SEED_MAX),
        "repeat_to_full": Field(bool, default=True, doc="repeat the K-shot subset to the full dataset size"),
    },
    nullable=True,
)

DATA = Section(
    {
        "root": Field(str, nullable=True, path="dir", doc="folder the annotation paths are relative to"),
        "train_list": Field(str, nullable=True, path="file", doc="annotation list: 'relative/path.mp4 label' per line (frames: 'folder num_frames label')"),
        "val_list": Field(str, nullable=True, path="file", doc="per-epoch validation list (train.val_views views)"),
        "class_csv": Field(str, nullable=True, path="file", doc="CSV 'id,name' with a header"),
        "synthetic": SYNTHETIC,
        "list_format": Field(str, default="video", choices=("video", "frames")),
        "backend": Field(str, default="decord", choices=("decord", "pyav", "frames", "auto")),
        "frame_index_base": Field(int, default=1, choices=(0, 1), doc="frame folders (list_format frames): the number of each "
                                  "folder's first image, img_00001.jpg (1, as TSN/mmaction2 write them) or img_00000.jpg (0)"),
        "num_frames": Field(int, default=8, min=1, max=77),
        "sampling": Field(str, default="segment", choices=("segment", "dense"), doc="segment: TSN (one frame per segment); dense: num_frames frames stride apart"),
        "stride": Field(int, default=8, min=1, doc="sampling=dense: frames between sampled frames (a clip spans num_frames × stride)"),
        "input_size": Field(int, nullable=True, default=None, min=8, doc="frame size; default: the model's (224 for ViT-B/16, ViT-L/14)"),
        "batch_size": Field(int, default=144, min=1, doc="total batch over all processes and accumulation steps"),
        "num_workers": Field(int, default=8, min=0),
        "flip": Field(bool, default=True, doc="random horizontal flip p=0.5 (off, or with flip_label_pairs, for direction-sensitive data such as SSv2)"),
        "flip_label_pairs": Field(
            list, nullable=True, item=Field(list, items=(Field(int, min=0, doc="class id"), Field(int, min=0, doc="class id"))),
            doc="[[a, b], ...]: classes a flip turns into each other, swapped in a flipped clip's label (SSv2: [[86, 87], [93, 94], [166, 167]])",
        ),
        "grayscale_p": Field(float, default=0.2, min=0, max=1, doc="probability of a grayscale clip in training (the official MoTE code: 0 for SSv2)"),
        "short_side": Field(
            int, nullable=True, default=None, min=8,
            doc="test views (validation, and the default of eval.datasets.*.short_side): resize the short side to this, then crop "
                "input_size (e.g. 256 for resize 256, crop 224); default: input_size",
        ),
        "decode_short_side": Field(
            int, nullable=True, default=None, min=8,
            doc="training only: decode frames with the short side at this size (decoder's scaler; large videos); validation and "
                "evaluation decode at full size",
        ),
        "on_error": Field(str, default="resample", choices=("raise", "skip", "resample")),
        "read_timeout_s": Field(float, default=60.0, min=0, exclusive_min=True),
        "few_shot": FEW_SHOT,
    },
    required=True,
)

#: ``[clips, crops]`` of a test-mode loader: any number of temporal clips, 1 (centre) or 3 spatial crops.
VIEWS = (Field(int, min=1, doc="clips"), Field(int, choices=(1, 3), doc="crops"))

SPLIT = Section({
    "list": Field(str, required=True, path="file", doc="annotation list of the split"),
    "class_csv": Field(str, nullable=True, path="file", doc="its class names (default: the dataset's class_csv)"),
})

EVAL_DATASET = Section(
    {
        "name": Field(str, required=True, doc="key of the results (two evaluations of one dataset, 1x1 and 4x3, need two names)"),
        "kind": Field(str, required=True, choices=("close_set", "zero_shot", "few_shot"),
                      doc="close_set: the training classes (TFM source = target); zero_shot: other classes, splits reported as mean ± std"),
        "root": Field(str, nullable=True, path="dir", doc="folder the list's paths are relative to (default: data.root)"),
        "list": Field(str, nullable=True, path="file", doc="one annotation list (close-set)"),
        "class_csv": Field(str, nullable=True, path="file", doc="CSV 'id,name' with a header, the classes the list's labels index"),
        "splits": Field(list, nullable=True, item=SPLIT, doc="zero-shot splits: [{list, class_csv}], mean ± std reported"),
        "list_format": Field(str, default="video", choices=("video", "frames")),
        "num_clips": Field(int, default=1, min=1, doc="temporal views (the paper: 4 close-set, 3 zero-shot)"),
        "num_crops": Field(int, default=1, choices=(1, 3), doc="spatial views: centre, or left/centre/right"),
        "test_offsets": Field(str, nullable=True, choices=("centre", "start"), doc="default: eval.test_offsets"),
        "sampling": Field(str, nullable=True, choices=("segment", "dense"), doc="default: data.sampling (segment)"),
        "stride": Field(int, nullable=True, min=1, doc="sampling=dense: default data.stride (8)"),
        "num_frames": Field(int, nullable=True, min=1, max=77, doc="default: data.num_frames"),
        "input_size": Field(int, nullable=True, min=8, doc="default: data.input_size, else the model's"),
        "short_side": Field(int, nullable=True, min=8, doc="resize the short side to this, then crop input_size; default: data.short_side, else input_size"),
        "on_error": Field(str, default="raise", choices=("raise", "skip"), doc="a video that cannot be read: stop, or skip it and report the count"),
    }
)

#: Merge strategies the ``compare`` runner evaluates by default (besides each expert and the logit ensemble).
DEFAULT_COMPARE_MERGES = (
    {"name": "temperature_softmax", "tau": 0.6},
    {"name": "temperature_softmax", "tau": -0.6},
    {"name": "ensemble"},
)

_COMPARE_MERGE = Section({"name": Field(str, required=True, choices=_names("merges"), choices_hint=PLUGIN_HINT)}, allow_unknown=True)

COMPARE = Section(
    {
        "merges": Field(list, default=[], doc="[{name: strategy, ...kwargs}] evaluated besides the configured merge", item=_COMPARE_MERGE),
        "experts": Field(bool, default=True, doc="report each expert alone (Figure 3); the logit ensemble runs them either way"),
        "logit_ensemble": Field(bool, default=True, doc="per view, average the experts' logits (Table 2c)"),
        "random_routing": Field(bool, default=False, doc="each view of each video runs one uniformly drawn expert per layer, seeded by seed and the video's index (Table 2c)"),
    },
    nullable=True,
)

#: ``eval.compare`` of the ``compare`` runner: always there, with the default merges unless ``merges`` is given
#: (an explicit ``merges: []`` compares none); a recipe that sets other keys keeps them.
COMPARE_RUNNER_COMPARE = Section(
    {
        **COMPARE.fields,
        "merges": Field(
            list, default=[dict(m) for m in DEFAULT_COMPARE_MERGES], item=_COMPARE_MERGE,
            doc="[{name: strategy, ...kwargs}] evaluated besides the configured merge (default: temperature_softmax tau ±0.6, ensemble)",
        ),
    },
)

EVAL = Section(
    {
        "batch_size": Field(int, default=16, min=1, doc="clips per process and batch in validation and evaluation (unlike data.batch_size, not a total: each rank evaluates its own shard)"),
        "num_workers": Field(
            int, nullable=True, min=0,
            doc="loader workers for validation and evaluation; default: data.num_workers when the recipe has data, else min(4, CPU count)",
        ),
        "view_reduce": Field(str, default="softmax_mean", choices=("softmax_mean", "logit_mean")),
        "precision": Field(
            str, nullable=True, choices=("auto", "bf16", "fp16", "fp32"),
            doc="validation and evaluation precision; default: the run's 'precision' (the official MoTE code tests in fp32)",
        ),
        "clip_blend": Field(
            float, nullable=True, min=0, max=1, exclusive_min=True,
            doc="evaluate α·θ + (1-α)·θ_CLIP for the visual tower (the official MoTE test.py: 0.99); the saved model is unchanged",
        ),
        "clip_blend_weights": Field(
            str, nullable=True, path="weights", doc="θ_CLIP of eval.clip_blend: an open_clip tag or a local file (default: the model's model.pretrained)",
        ),
        "test_offsets": Field(
            str, default="centre", choices=("centre", "start"),
            doc="where test views sit in their segments: centre (TSN) or start (the official MoTE test code); validation too",
        ),
        "modulation": Field(list, default=[False, True], item=Field(bool), min_items=1, distinct=True,
                            doc="TFM settings to evaluate: [false] (without TFM), [true], or both"),
        "datasets": Field(list, default=[], item=EVAL_DATASET),
        "compare": COMPARE,
        "summary": Section(
            {
                "close_set": Field(str, nullable=True, doc="dataset of the Trade-off's close-set top-1; absent: the first close_set dataset; null: none"),
                "zero_shot": Field(list, nullable=True, default=[], item=Field(str),
                                   doc="datasets of HM_ZS; absent or []: every zero_shot dataset; null: none"),
            },
            nullable=True,
        ),
        "plot": Field(bool, default=True),
    },
)

TEXT = Section(
    {
        "templates": Field((str, list), default="mote", item=Field(str), doc="'mote' (28 templates of Table 8), 'single', or a list of strings with '{}'"),
        "cache_dir": Field(str, nullable=True, default=None,
                           doc="class text-feature cache (default: $MERGEKIT_VIDEO_CACHE, else ~/.cache/mergekit_video)"),
    }
)

OPTIMIZER = Section(
    {
        "name": Field(str, default="adamw", choices=("adamw", "adam", "sgd")),
        "lr": Field(float, default=5e-5, min=0, exclusive_min=True, doc="new parameters (temporal head)"),
        "clip_lr": Field(float, default=3e-6, min=0, doc="CLIP visual tower and logit scale"),
        "weight_decay": Field(float, default=0.2, min=0),
        "betas": Field(list, default=[0.9, 0.999], items=(Field(float, min=0, max=1, exclusive_max=True, doc="beta1"),
                                                          Field(float, min=0, max=1, exclusive_max=True, doc="beta2")),
                       doc="Adam(W) [beta1, beta2], each in [0, 1)"),
        "eps": Field(float, default=1e-8, min=0, exclusive_min=True),
        "no_decay_norm_bias_embedding": Field(bool, default=False),
    }
)

SCHEDULE = Section(
    {
        "epochs": Field(int, default=30, min=1),
        "warmup_epochs": Field(float, default=5, min=0),
        "min_lr_ratio": Field(float, default=0.0, min=0, max=1),
    }
)

TRAIN = Section(
    {
        "grad_accumulation": Field(int, default=1, min=1),
        "max_steps": Field(int, nullable=True, default=None, min=1),
        "log_every": Field(int, default=10, min=1),
        "eval_every_epochs": Field(int, default=1, min=1),
        "val_views": Field(list, default=[1, 1], items=VIEWS, doc="[clips, crops] of the per-epoch validation (crops: 1 or 3)"),
        "val_precision": Field(
            str, nullable=True, choices=("auto", "bf16", "fp16", "fp32"),
            doc="precision of the per-epoch validation (model selection); default: eval.precision, else the run's 'precision'",
        ),
        "save_every_steps": Field(int, nullable=True, default=None, min=1),
        "keep_last": Field(int, default=2, min=1),
        "resume": Field(str, nullable=True, default="auto", path="checkpoint", doc="auto | a checkpoint path | null"),
        "compile": Field(bool, default=False),
        "routing_draws": Field(str, default="global", choices=["global", "per_rank"],
                               doc="under DDP: global = one expert and τ per layer for the whole batch (the paper); "
                                   "per_rank = each GPU's sub-batch draws its own (the official code)"),
        "clip_grad_norm": Field(float, nullable=True, default=None, min=0, exclusive_min=True),
        "freeze_visual": Field(bool, default=False),
        "grad_checkpointing": Field(bool, default=False, doc="recompute CLIP blocks in backward"),
        "tensorboard": Field(bool, default=False),
        "export_dense": Field(bool, default=True, doc="also write the collapsed (plain-FFN) model"),
    }
)

COMMON = {
    "runner": Field(str, required=True, choices=RUNNER_NAMES),
    "seed": Field(int, default=0, min=0, max=SEED_MAX),
    "device": DEVICE,
    "precision": PRECISION,
    "dist_timeout_s": Field(float, default=1800.0, min=1, doc="DDP: how long a process waits for the others in a collective "
                            "before the job fails (a stalled rank stops every rank after this)"),
    "text": TEXT,
    "eval": EVAL,
}

MOTE_SCHEMA = recipe_schema(
    {
        **COMMON,
        "model": Component(required=True, doc="builds the VideoCLIP, e.g. mergekit_video.models.build_video_clip", fields=MODEL_FIELDS),
        "objective": Component(required=True, doc="the training loss, e.g. mergekit_video.models.MoTEObjective", fields=OBJECTIVE_FIELDS),
        "data": DATA,
        "optimizer": OPTIMIZER,
        "schedule": SCHEDULE,
        "train": TRAIN,
    },
    doc="train MoTE, then evaluate",
)

EVALUATE_SCHEMA = recipe_schema(
    {
        **COMMON,
        "checkpoint": Field(str, nullable=True, path="model", doc="a saved model / export / trainer checkpoint"),
        "model": Component(nullable=True, doc="or build a model when no checkpoint is given", fields=MODEL_FIELDS),
        "data": Section({
            "synthetic": SYNTHETIC,
            "root": Field(str, nullable=True),
            "backend": DATA.fields["backend"],  # the evaluation's readers, as in training
            "frame_index_base": DATA.fields["frame_index_base"],
            "read_timeout_s": DATA.fields["read_timeout_s"],
        }, nullable=True),
    },
    doc="evaluate a model",
)

COMPARE_SCHEMA = recipe_schema(
    {
        **EVALUATE_SCHEMA.fields,
        "eval": Section({**EVAL.fields, "compare": COMPARE_RUNNER_COMPARE}, doc=EVAL.doc),
    },
    doc="evaluate a model: each expert, other merges and the ensembles besides the configured merge",
)

SCHEMAS = {"mote": MOTE_SCHEMA, "evaluate": EVALUATE_SCHEMA, "compare": COMPARE_SCHEMA}


#: Why a task-arithmetic merge does not apply to a MoTE model (after the strategy's name).
NO_BASE_MESSAGE = (
    "merges relative to a base model, and the experts of a MoTE model have none (each is trained from its "
    "own init); use mean, weighted or temperature_softmax here, or ExpertContainer.collapse(strategy, base=...) "
    "in Python for experts upcycled from a known module"
)


def _base_merge_problems(cfg: dict[str, Any]) -> list[Problem]:
    """Task-arithmetic merges (task_arithmetic, TIES, DARE) named where no base weights exist."""
    from ..merging import requires_base

    problems = []
    merge = (cfg.get("model") or {}).get("merge")
    if isinstance(merge, str) and requires_base(merge):
        problems.append(Problem("model.merge", f"{merge!r} {NO_BASE_MESSAGE}"))
    compare = compare_merge_specs(cfg)
    for i, spec in enumerate(compare):
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and requires_base(name):
            problems.append(Problem(f"eval.compare.merges.{i}.name", f"{name!r} {NO_BASE_MESSAGE}"))
    return problems


def _compare_merge_arguments(cfg: dict[str, Any]) -> list[Problem]:
    """The keyword arguments of each ``eval.compare.merges`` entry against its strategy's signature."""
    from ..config.components import check_call
    from ..registry import MERGES

    problems = []
    compare = compare_merge_specs(cfg)
    for i, spec in enumerate(compare):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name not in MERGES.names():
            continue  # the schema reports it
        kwargs = [str(k) for k in spec if k != "name"]
        for msg in check_call(MERGES.get(name), kwargs, path=f"eval.compare.merges.{i}", allow_missing=("base",), hidden=("tensors",)):
            where, _, text = msg.partition(": ")
            problems.append(Problem(where, text))
    return problems


def compare_merge_specs(cfg: dict[str, Any]) -> list[Any]:
    """The recipe's ``eval.compare.merges`` entries (``[]`` where there are none)."""
    return ((cfg.get("eval") or {}).get("compare") or {}).get("merges") or []


def compare_merge_problems(cfg: dict[str, Any], num_experts: int | None) -> list[Problem]:
    """Every ``eval.compare.merges`` entry dry-run (:func:`merge_argument_problem`) for ``num_experts`` experts
    (None: unknown, the checks that need no count)."""
    from ..registry import MERGES

    problems = []
    for i, spec in enumerate(compare_merge_specs(cfg)):
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name in MERGES.names():
            found = merge_argument_problem(name, {k: v for k, v in spec.items() if k != "name"}, num_experts)
            if found:
                problems.append(Problem(f"eval.compare.merges.{i}", found))
    return problems


def merge_argument_problem(strategy: str, kwargs: dict[str, Any], num_experts: int | None) -> str | None:
    """Why ``strategy`` with ``kwargs`` cannot merge ``num_experts`` experts (None when it can).

    A dry run of the strategy on small random tensors: argument values of the wrong type, a weight
    list of another length, a two-expert strategy (slerp) for more experts show here, before
    anything heavy runs, instead of in the first merge after training. With ``num_experts=None``
    (the count unknown) the checks that need no count run: the signature, ranges and value types
    (the dry run merges as many tensors as ``weights`` holds, or the strategy's fixed count, or 2).
    """
    import torch

    from ..merging import check_merge_arguments, is_output_space, merge_tensors, requires_base, resolve_strategy

    if (num_experts is not None and num_experts < 1) or is_output_space(strategy):
        return None  # nothing merged
    g = torch.Generator().manual_seed(0)
    try:
        # the signature and the strategy's argument_ranges (a plugin's too); a base stands in where one is needed
        check_merge_arguments(strategy, {**kwargs, **({"base": torch.zeros(3, 2)} if requires_base(strategy) else {})},
                              num_experts=num_experts)
        if requires_base(strategy):
            return None  # refused with its own message where no base is given
        count = num_experts
        if count is None:
            weights = kwargs.get("weights")
            count = len(weights) if isinstance(weights, (list, tuple)) and weights else (
                getattr(resolve_strategy(strategy), "num_tensors", None) or 2)
        merge_tensors([torch.randn(3, 2, generator=g) for _ in range(count)], strategy, **kwargs)
    except Exception as err:  # noqa: BLE001 - a plugin's strategy may raise anything
        experts = f"{num_experts} experts" if num_experts is not None else "experts"
        return f"{strategy!r} with {kwargs or 'its defaults'} cannot merge {experts}: {err}"
    return None


def _video_clip_model(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's ``model`` when it is built by ``build_video_clip`` (its defaults known), else None."""
    model = cfg.get("model")
    if isinstance(model, dict) and str(model.get("_component_", "")).endswith("build_video_clip"):
        return model
    return None


def _model_problems(cfg: dict[str, Any]) -> list[Problem]:
    """A ``build_video_clip`` model's merge and router arguments, dry-run for its expert count, and the
    frame counts its position table takes; the ``eval.compare.merges`` arguments likewise."""
    model = _video_clip_model(cfg)
    if model is None:
        return []
    from ..registry import MERGES, ROUTERS

    problems = []
    n = model.get("num_experts", 4)
    merge, merge_kwargs = model.get("merge", "mean"), model.get("merge_kwargs") or {}
    if isinstance(n, int) and isinstance(merge, str) and merge in MERGES.names() and isinstance(merge_kwargs, dict):
        from ..config.components import check_call

        named = check_call(MERGES.get(merge), [str(k) for k in merge_kwargs], path="model.merge_kwargs", allow_missing=("base",),
                           hidden=("tensors",))
        found = "; ".join(m.partition(": ")[2] for m in named) or merge_argument_problem(merge, merge_kwargs, n)
        if found:
            problems.append(Problem("model.merge_kwargs" if merge_kwargs else "model.merge", found))
        from ..merging import is_output_space

        train = cfg.get("train") or {}
        if cfg.get("runner") == "mote" and n > 0 and is_output_space(merge) and train.get("export_dense", True):
            problems.append(Problem(
                "model.merge", f"{merge!r} combines expert outputs and has no merged weights, so the dense export after "
                "training (train.export_dense, on by default) cannot collapse it: use a weight merge (mean, weighted, "
                "temperature_softmax) or set train.export_dense=false",
            ))
    if isinstance(n, int):
        problems += compare_merge_problems(cfg, n)
    router, router_kwargs = model.get("router", "multinomial"), model.get("router_kwargs") or {}
    if isinstance(n, int) and n > 0 and isinstance(router, str) and router in ROUTERS.names() and isinstance(router_kwargs, dict):
        from torch import nn

        from ..routers import build_router

        expert = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))  # the shape of an FFN expert
        try:
            build_router(router, num_experts=n, module=expert, **router_kwargs)
        except Exception as err:  # noqa: BLE001 - a plugin's router may raise anything
            argument = getattr(err, "argument", None)  # a RouterArgumentError names the argument of the wrong type
            where = (f"model.router_kwargs.{argument}" if argument in router_kwargs
                     else "model.router_kwargs" if router_kwargs else "model.router")
            problems.append(Problem(where, f"{router!r} with {router_kwargs or 'its defaults'} for {n} experts: {err}"))
    positions = model.get("num_positions", 77)
    if isinstance(positions, int):
        data = cfg.get("data") or {}
        frames = [("data.num_frames", data.get("num_frames", 8))] if cfg.get("runner") == "mote" else []
        for i, ds in enumerate((cfg.get("eval") or {}).get("datasets") or []):
            if isinstance(ds, dict) and isinstance(ds.get("num_frames"), int):
                frames.append((f"eval.datasets.{i}.num_frames", ds["num_frames"]))
        for key, t in frames:
            if isinstance(t, int) and t > positions:
                problems.append(Problem(key, f"{t} frames, but model.num_positions={positions} frame position embeddings: "
                                             f"use at most {positions} frames or raise model.num_positions"))
    return problems


def _text_problems(cfg: dict[str, Any]) -> list[Problem]:
    """``text.templates``: a known template set, or a list of prompts each holding ``{}`` for the class name."""
    from ..models.prompts import TEMPLATE_SETS

    templates = (cfg.get("text") or {}).get("templates", "mote")
    if isinstance(templates, str) and templates not in TEMPLATE_SETS:
        return [Problem("text.templates", f"{templates!r} is not a template set ({', '.join(TEMPLATE_SETS)}); or give a list "
                                          "of prompts such as ['a video of a person {}.']")]
    if isinstance(templates, list):
        if not templates:
            return [Problem("text.templates", "an empty list: give at least one prompt with '{}'")]
        problems = []
        for i, t in enumerate(templates):
            if not isinstance(t, str):
                continue
            if "{}" not in t:
                problems.append(Problem(f"text.templates.{i}", f"{t!r} has no '{{}}' placeholder for the class name"))
                continue
            try:  # the prompt is made with str.format(class name): other fields or stray braces fail there
                t.format("class")
            except (KeyError, IndexError, ValueError) as err:
                why = f"field {{{err.args[0]}}}" if isinstance(err, KeyError) else str(err)
                problems.append(Problem(f"text.templates.{i}", f"{t!r} cannot be filled with a class name ({why}): one '{{}}' "
                                                                "for the class name, and other braces doubled ('{{' and '}}')"))
        return problems
    return []


def _summary_problems(cfg: dict[str, Any]) -> list[Problem]:
    """``eval.summary`` names datasets of ``eval.datasets`` (when there are any: no evaluation, no summary)
    of a fitting kind: ``close_set`` a close-set or few-shot one, ``zero_shot`` zero-shot ones."""
    eval_cfg = cfg.get("eval") or {}
    summary = eval_cfg.get("summary") or {}
    names = [d.get("name") for d in eval_cfg.get("datasets") or [] if isinstance(d, dict)]
    kinds = {d.get("name"): d.get("kind") for d in eval_cfg.get("datasets") or [] if isinstance(d, dict)}
    if not names:
        return []
    known = f"eval.datasets has {', '.join(repr(n) for n in names)}"
    problems = []
    for j, name in enumerate(names):
        if isinstance(name, str) and name in names[:j]:
            problems.append(Problem(
                f"eval.datasets.{j}.name",
                f"{name!r} is the name of eval.datasets.{names.index(name)} too: results are keyed by name, so each "
                f"evaluation needs its own (e.g. {name}_4x3 for another view protocol)",
            ))
    close = summary.get("close_set")
    if isinstance(close, str) and close not in names:
        problems.append(Problem("eval.summary.close_set", f"{close!r} is not an evaluated dataset ({known})"))
    elif isinstance(close, str) and kinds.get(close) == "zero_shot":
        problems.append(Problem("eval.summary.close_set", f"{close!r} is a zero_shot dataset; the Trade-off takes the top-1 of a "
                                                          "close_set (or few_shot) one"))
    for i, name in enumerate(summary.get("zero_shot") or []):
        if isinstance(name, str) and name not in names:
            problems.append(Problem(f"eval.summary.zero_shot.{i}", f"{name!r} is not an evaluated dataset ({known})"))
        elif isinstance(name, str) and kinds.get(name) != "zero_shot":
            problems.append(Problem(f"eval.summary.zero_shot.{i}", f"{name!r} is a {kinds.get(name)} dataset; HM_ZS is over "
                                                                   "zero_shot datasets"))
    return problems


#: What the recipe key ``device`` (and a ``--device`` option) takes.
DEVICE_VALUES = "auto, cpu, cuda, cuda:N or mps"


def _device_problems(cfg: dict[str, Any]) -> list[Problem]:
    import re

    device = cfg.get("device", "auto")
    if isinstance(device, str) and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        return [Problem("device", f"{device!r} is not a device: use {DEVICE_VALUES}")]
    return []


def _synthetic_problems(cfg: dict[str, Any]) -> list[Problem]:
    size = ((cfg.get("data") or {}).get("synthetic") or {}).get("size")
    if isinstance(size, list) and (len(size) != 2 or any(isinstance(v, int) and v % 2 for v in size)):
        return [Problem("data.synthetic.size", f"must be [height, width], both even, got {size!r}")]
    return []


def _eval_dataset_problems(cfg: dict[str, Any]) -> list[Problem]:
    """An ``eval.datasets`` entry with both ``list`` and ``splits`` (the run took ``splits`` and ignored ``list``),
    and one naming the synthetic novel files when ``data.synthetic.num_novel_classes`` is 0 (none are written)."""
    import os

    problems = []
    syn = (cfg.get("data") or {}).get("synthetic")
    novel_files = set()
    if isinstance(syn, dict) and syn.get("num_novel_classes", 4) == 0 and isinstance(cfg.get("output_dir"), str):
        data = os.path.join(os.path.expanduser(cfg["output_dir"]), "data")
        novel_files = {os.path.normpath(os.path.join(data, f)) for f in ("novel.txt", "novel_classes.csv")}
    for i, ds in enumerate((cfg.get("eval") or {}).get("datasets") or []):
        if not isinstance(ds, dict):
            continue
        if ds.get("list") and ds.get("splits"):
            problems.append(Problem(f"eval.datasets.{i}", "sets both list (one annotation list) and splits (several, each "
                                                         "{list, class_csv}): set one of them"))
        named = [(f"eval.datasets.{i}.{key}", ds.get(key)) for key in ("list", "class_csv")]
        named += [(f"eval.datasets.{i}.splits.{j}.{key}", sp.get(key)) for j, sp in enumerate(ds.get("splits") or [])
                  if isinstance(sp, dict) for key in ("list", "class_csv")]
        for key, path in named:
            if novel_files and isinstance(path, str) and os.path.normpath(os.path.expanduser(path)) in novel_files:
                problems.append(Problem(key, f"{path} is the synthetic novel split, but data.synthetic.num_novel_classes=0 "
                                             "writes none: set data.synthetic.num_novel_classes>0 or remove this dataset "
                                             "(and its eval.summary entry)"))
                break
    return problems


def _clip_problems(cfg: dict[str, Any]) -> list[Problem]:
    """An unknown open_clip architecture or pretrained tag, checked offline (the run would fail after writing data/)."""
    model = cfg.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("clip_name"), str):
        return []
    from ..models.clip import clip_choice_problem

    found = clip_choice_problem(model["clip_name"], model.get("pretrained"))
    if found:
        return [Problem(f"model.{found[0]}", found[1])]
    return [*_clip_blend_problems(cfg, model), *_input_size_problems(cfg, model["clip_name"])]


def _clip_blend_problems(cfg: dict[str, Any], model: dict[str, Any]) -> list[Problem]:
    """``eval.clip_blend`` of a built model: weights to blend with (``eval.clip_blend_weights``, else
    ``model.pretrained``), an open_clip tag of the architecture or a file."""
    from ..models.clip import clip_choice_problem

    ev = cfg.get("eval") or {}
    if not ev.get("clip_blend"):
        return []
    weights = ev.get("clip_blend_weights")
    if weights is None:
        pretrained = model.get("pretrained")
        if not isinstance(pretrained, str) or pretrained.lower() in ("", "none", "null", "random"):
            return [Problem("eval.clip_blend", "blends the fine-tuned CLIP with the pretrained weights it started from, but "
                                               "model.pretrained is null (random weights): set eval.clip_blend_weights to "
                                               "them (an open_clip tag or a file), or unset eval.clip_blend")]
        return []
    found = clip_choice_problem(model["clip_name"], weights)
    return [Problem("eval.clip_blend_weights", found[1])] if found and found[0] == "pretrained" else []


def _architecture_input_size(clip_name: str) -> int | None:
    """The square frame size the open_clip architecture's visual tower takes, None if not one size."""
    from ..models.clip import model_config

    size = model_config(clip_name).get("vision_cfg", {}).get("image_size")
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _input_size_problems(cfg: dict[str, Any], clip_name: str) -> list[Problem]:
    """Frame sizes (``data.input_size``, ``eval.datasets.N.input_size``) other than the one the architecture's
    visual tower takes (its position embeddings fix it): refused by the run after building the model."""
    size = _architecture_input_size(clip_name)
    if size is None:
        return []
    keys = [("data.input_size", (cfg.get("data") or {}).get("input_size"))]
    keys += [(f"eval.datasets.{i}.input_size", ds.get("input_size"))
             for i, ds in enumerate((cfg.get("eval") or {}).get("datasets") or []) if isinstance(ds, dict)]
    return [Problem(key, f"{value}, but {clip_name}'s visual tower takes {size}x{size} frames (set {key}={size} or leave it unset)")
            for key, value in keys if isinstance(value, int) and not isinstance(value, bool) and value != size]


def _short_side_problems(cfg: dict[str, Any]) -> list[Problem]:
    """A test resize (``data.short_side``, ``eval.datasets.N.short_side``) below the frame size it is cropped to: the
    crop would not fit. The frame size is the recipe's input_size key, else ``model.clip_name``'s (when it is known)."""
    def given(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    arch, arch_key = None, ""
    if isinstance(model.get("clip_name"), str):
        try:
            arch, arch_key = _architecture_input_size(model["clip_name"]), f"the visual tower of model.clip_name {model['clip_name']}"
        except ValueError:  # an unknown architecture: _clip_problems names it
            pass

    def frame_size(*keyed: tuple[str, Any]) -> tuple[int | None, str]:
        for key, value in keyed:
            if given(value):
                return value, key
        return arch, arch_key

    checks = [("data.short_side", data.get("short_side"), *frame_size(("data.input_size", data.get("input_size"))))]
    for i, ds in enumerate((cfg.get("eval") or {}).get("datasets") or []):
        if isinstance(ds, dict) and ds.get("short_side") is not None:
            checks.append((f"eval.datasets.{i}.short_side", ds["short_side"],
                           *frame_size((f"eval.datasets.{i}.input_size", ds.get("input_size")), ("data.input_size", data.get("input_size")))))
        elif isinstance(ds, dict) and given(ds.get("input_size")) and given(data.get("short_side")):
            # data.short_side is this dataset's test resize, against its own frame size
            checks.append(("data.short_side", data["short_side"], ds["input_size"], f"eval.datasets.{i}.input_size"))
    problems, seen = [], set()
    for key, value, size, size_key in checks:
        if given(value) and value > 0 and size is not None and value < size and key not in seen:
            seen.add(key)
            problems.append(Problem(key, f"{value} is smaller than the frame size {size} ({size_key}): test views resize the short "
                                         f"side to {key}, then crop {size}x{size}; set {key} >= {size}, or leave it unset (resize to {size})"))
    return problems


def _common_cross_checks(cfg: dict[str, Any]) -> list[Problem]:
    problems = [*_base_merge_problems(cfg), *_compare_merge_arguments(cfg), *_summary_problems(cfg), *_device_problems(cfg),
                *_synthetic_problems(cfg), *_clip_problems(cfg), *_text_problems(cfg), *_list_format_problems(cfg)]
    problems += _eval_dataset_problems(cfg)
    problems += _short_side_problems(cfg)
    # dry runs of merges and routers: reported for the keys not already named above (the same bad argument
    # would be told twice), so that one problem elsewhere does not hide them
    named = {p.path for p in problems}
    problems += [p for p in _model_problems(cfg)
                 if p.path not in named and not any(p.path.startswith(f"{k}.") or k.startswith(f"{p.path}.") for k in named)]
    return problems


def evaluate_cross_checks(cfg: dict[str, Any]) -> list[Problem]:
    """Combinations of keys that are each valid alone but not together (``evaluate``/``compare`` runners)."""
    problems = _common_cross_checks(cfg)
    if not cfg.get("checkpoint") and not cfg.get("model"):
        problems.append(Problem("checkpoint", "nothing to evaluate: set checkpoint (a saved model, dense export or trainer "
                                              "checkpoint) or model (a _component_ that builds one)"))
    problems += _checkpoint_problems(cfg, named={p.path for p in problems})
    return problems


def _checkpoint_problems(cfg: dict[str, Any], *, named: set[str]) -> list[Problem]:
    """``checkpoint`` and ``model`` both set (the run would load the checkpoint and ignore ``model``), and the
    ``eval.compare.merges`` arguments dry-run for the checkpoint's expert count (read from its config; where
    it cannot be read, the checks that need no count). Entries already named elsewhere are left out."""
    checkpoint = cfg.get("checkpoint")
    if not checkpoint:
        return []
    if cfg.get("model"):
        return [Problem("checkpoint", "set either checkpoint (a saved model to load) or model (a _component_ that builds "
                                      "one), not both: the run would load checkpoint and ignore model")]
    num_experts = None
    if isinstance(checkpoint, str):
        import os

        from ..models.checkpoint import read_config

        try:
            head = read_config(os.path.expanduser(checkpoint)).get("head")
        except (OSError, ValueError):
            head = None  # a missing or foreign path: --check-paths and the run say so
        if isinstance(head, dict) and isinstance(head.get("num_experts"), int) and not isinstance(head["num_experts"], bool):
            num_experts = head["num_experts"]
    return [p for p in compare_merge_problems(cfg, num_experts)
            if p.path not in named and not any(k.startswith(f"{p.path}.") for k in named)]


def mote_cross_checks(cfg: dict[str, Any]) -> list[Problem]:
    """Combinations of keys that are each valid alone but not together (``mote`` runner)."""
    problems = _common_cross_checks(cfg)
    model, objective = cfg.get("model") or {}, cfg.get("objective") or {}
    if model.get("num_experts") == 0 and (objective.get("wmr_weight") or 0) > 0:
        problems.append(Problem(
            "objective.wmr_weight",
            "the weight-merging regularizer needs experts, but model.num_experts is 0 (the plain-FFN baseline): "
            "set objective.wmr_weight=0 or model.num_experts>0",
        ))
    problems += _flip_label_problems(cfg.get("data") or {})
    problems += _training_data_problems(cfg.get("data") or {})
    total, accum = (cfg.get("data") or {}).get("batch_size", 144), (cfg.get("train") or {}).get("grad_accumulation", 1)
    if isinstance(total, int) and isinstance(accum, int) and accum > 0 and total % accum:
        problems.append(Problem("train.grad_accumulation", f"{accum} does not divide data.batch_size={total} (the total batch, "
                                                           "split into grad_accumulation micro-batches)"))
    return problems


def _list_format_problems(cfg: dict[str, Any]) -> list[Problem]:
    """``data.backend: frames`` reads frame folders, which only ``list_format: frames`` lists name (for the
    training data and every eval dataset, which reads with ``data.backend``); ``data.synthetic`` writes video lists."""
    data = cfg.get("data") or {}
    problems = []
    backend = data.get("backend", "decord")
    if data.get("synthetic") and data.get("list_format", "video") == "frames":
        problems.append(Problem("data.list_format", "frames, but data.synthetic writes mp4 files with video lists "
                                                    "('relative/path.mp4 label'): use list_format=video"))
    elif cfg.get("runner") == "mote" and backend == "frames" and data.get("list_format", "video") == "video":
        problems.append(Problem("data.backend", "frames reads frame folders, but data.list_format is video: set "
                                                "data.list_format=frames (lists 'folder num_frames label') or another backend"))
    if backend == "frames":
        for i, ds in enumerate((cfg.get("eval") or {}).get("datasets") or []):
            if isinstance(ds, dict) and ds.get("list_format", "video") == "video":
                problems.append(Problem(f"eval.datasets.{i}.list_format", "video, but data.backend is frames (frame folders), "
                                        "which this dataset reads with: set its list_format=frames, or data.backend to a video reader"))
    return problems


def _training_data_problems(data: dict[str, Any]) -> list[Problem]:
    """The data a ``mote`` run trains on: ``data.train_list``, ``data.class_csv`` and ``data.root``, unless
    ``data.synthetic`` writes them (each is nullable alone, as ``data.synthetic`` fills them in)."""
    if data.get("synthetic"):
        return []
    what = {"train_list": "the training list ('relative/path.mp4 label' per line)",
            "class_csv": "the class names (CSV 'id,name' with a header)",
            "root": "the folder the list's paths are relative to"}
    return [Problem(f"data.{key}", f"required: {text}, unless data.synthetic writes a dataset")
            for key, text in what.items() if not data.get(key)]


def _flip_label_problems(data: dict[str, Any]) -> list[Problem]:
    """``data.flip_label_pairs``: pairs of distinct ids, each id once, and a flip to swap them on."""
    from ..data.datasets import flip_label_pair_errors

    pairs = data.get("flip_label_pairs")
    if not pairs or not isinstance(pairs, list):
        return []
    problems = []
    for i, kind, detail in flip_label_pair_errors(pairs):  # shapes and negative ids: the schema reports them
        if kind == "same":
            problems.append(Problem(f"data.flip_label_pairs.{i}", f"needs two distinct class ids, got {detail}"))
        elif kind == "repeat":
            problems.append(Problem(f"data.flip_label_pairs.{i}", f"class id {detail[0]} is in data.flip_label_pairs.{detail[1]} too"))
    if problems:
        return problems
    if data.get("flip") is False:
        return [Problem("data.flip_label_pairs", "swaps the labels of flipped clips, but data.flip is false: "
                        "set data.flip=true (flip with swapped labels) or remove the pairs (~data.flip_label_pairs)")]
    return []


#: Per-runner checks across keys, run after the schema.
CROSS_CHECKS = {"mote": mote_cross_checks, "evaluate": evaluate_cross_checks, "compare": evaluate_cross_checks}
