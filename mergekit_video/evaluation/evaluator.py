"""Streaming multi-variant evaluation of a VideoCLIP.

Each batch is decoded and sent through the CLIP visual tower **once**; every head variant
(merged experts with TFM off/on, each expert alone, other merge strategies, per-layer
output ensembling, the logit ensemble of Figure 3 / Table 2c) then runs on the same frame
features. When the visual tower holds experts too, a variant's routing applies to the whole
model, and the frames are encoded once per routing instead. Multi-view testing (clips × crops)
averages the per-view class probabilities, as the official implementation does.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch

from ..data.failures import note_batch_failures
from ..experts import find_containers, use_expert, use_merge
from ..training.precision import autocast_context, resolve_precision
from .metrics import topk_hits

log = logging.getLogger(__name__)

VIEW_REDUCTIONS = ("softmax_mean", "logit_mean")


class NoVideoEvaluatedError(ValueError):
    """No video of an evaluation could be read (an empty list, or all failed under ``on_error: skip``)."""

    def __init__(self, message: str, *, failed: Sequence[str]) -> None:
        super().__init__(message)
        self.failed = list(failed)


@dataclass(frozen=True)
class Variant:
    """One way of running the head at evaluation.

    Attributes:
        name: label in tables and JSON.
        kind: ``merged`` (the model as configured), ``expert``, ``merge`` (another merge
            strategy), ``logit_ensemble`` (per view, the mean of the experts' cosine logits;
            then the views are reduced as for every variant), ``random_routing`` (each view of
            each video runs one uniformly drawn expert per layer, MoTE Table 2c; the draw is
            seeded by ``seed`` and the video's dataset index, so it does not depend on the batch
            a video lands in, and the TFM-off and TFM-on variants share it).
        context: ``module -> context manager`` that sets the routing of every expert under
            ``module`` (the head, or the whole model when its visual tower holds experts too);
            None for the default. Variants that share one context object share one encoding.
        modulation: temporal feature modulation on (Eq. 11).
        members: for ``logit_ensemble``, the expert variant names averaged.
        report: False for a variant computed only as a member of another (the experts of a
            logit ensemble when each expert alone was not asked for): left out of the results.
        seed: the ``random_routing`` draws' seed.
    """

    name: str
    kind: str = "merged"
    context: Callable[[torch.nn.Module], ContextManager] | None = None
    modulation: bool = False
    members: tuple[str, ...] = ()
    report: bool = True
    seed: int = 0


def tfm_suffix(modulation: bool) -> str:
    """The variant-label suffix for temporal feature modulation (``+tfm`` when on)."""
    return "+tfm" if modulation else ""


def build_variants(
    model: torch.nn.Module,
    *,
    modulation: Sequence[bool] = (False, True),
    merges: Sequence[dict[str, Any]] = (),
    experts: bool = False,
    logit_ensemble: bool = False,
    random_routing: bool = False,
    seed: int = 0,
) -> list[Variant]:
    """The standard set: merged (per TFM setting), optional other merges, each expert and their logit ensemble,
    and random routing (MoTE Table 2c's three ways of aggregating the experts: random routing, the logit
    ensemble, merged weights).

    ``logit_ensemble`` without ``experts`` runs the experts for the ensemble but leaves them out of the results.

    ``merges`` entries are ``{"name": strategy, **kwargs}`` (e.g. ``{"name": "temperature_softmax", "tau": 0.6}``).
    The TFM-off and TFM-on variants of one routing share its context.
    """
    n = max((c.num_experts for _, c in find_containers(model)), default=0)  # the head's, or the CLIP tower's
    config = getattr(model, "config", None)
    exported = isinstance(config, dict) and ((config.get("exported_from") or {}).get("num_experts") or 0) > 0
    plain = "merged" if exported else "model"  # a dense export is its experts' merge; the baseline is the model
    if not n and (merges or experts or logit_ensemble or random_routing):
        log.warning("the model has no experts (a dense export or the plain-FFN baseline): only the model itself is evaluated")
    merge_ctx = [_merge_ctx(spec["name"], {k: v for k, v in spec.items() if k != "name"}) for spec in merges]
    expert_ctx = [_expert_ctx(i) for i in range(n)]
    out: list[Variant] = []
    for mod in modulation:
        sfx = tfm_suffix(mod)
        out.append(Variant(name=f"merged{sfx}" if n else f"{plain}{sfx}", modulation=mod))
        if not n:
            continue
        for spec, ctx in zip(merges, merge_ctx):
            spec = dict(spec)
            strategy = spec.pop("name")
            label = strategy + ("(" + ",".join(f"{k}={v}" for k, v in spec.items()) + ")" if spec else "")
            out.append(Variant(name=f"{label}{sfx}", kind="merge", modulation=mod, context=ctx))
        if experts or logit_ensemble:
            names = []
            for i in range(n):
                names.append(f"expert_{i}{sfx}")
                out.append(Variant(name=names[-1], kind="expert", modulation=mod, context=expert_ctx[i], report=experts))
            if logit_ensemble:
                out.append(Variant(name=f"logit_ensemble{sfx}", kind="logit_ensemble", modulation=mod, members=tuple(names)))
        if random_routing:
            out.append(Variant(name=f"random_routing{sfx}", kind="random_routing", modulation=mod, seed=int(seed)))
    return out


def _merge_ctx(strategy: str, kwargs: dict[str, Any]) -> Callable[[torch.nn.Module], ContextManager]:
    return lambda module: use_merge(module, strategy, **kwargs)


def _expert_ctx(i: int) -> Callable[[torch.nn.Module], ContextManager]:
    return lambda module: use_expert(module, i)


@dataclass
class VariantResult:
    """Accuracy of one variant (percent); ``top5`` is None over 5 classes or fewer (it would be 100 by construction)."""

    top1: float
    top5: float | None
    num_videos: int


@dataclass
class EvalResult:
    """Everything one evaluation pass produced."""

    dataset: str
    variants: dict[str, VariantResult]
    num_videos: int
    num_failed: int = 0
    failed: list[str] = field(default_factory=list)
    views: tuple[int, int] = (1, 1)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as written to ``results.json``."""
        return {
            "dataset": self.dataset,
            "num_videos": self.num_videos,
            "num_failed": self.num_failed,
            "failed": self.failed,
            "views": list(self.views),
            "seconds": round(self.seconds, 2),
            "variants": {k: vars(v) for k, v in self.variants.items()},
        }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    class_features: torch.Tensor,
    *,
    variants: Sequence[Variant] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    view_reduce: str = "softmax_mean",
    dataset_name: str = "",
    views: tuple[int, int] = (1, 1),
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Top-k accuracy of every variant over ``loader`` (batches from ``collate_videos``).

    Args:
        model: a :class:`~mergekit_video.models.VideoCLIP` (unwrapped from DDP).
        class_features: ``[C, D]`` target class text features.
        view_reduce: ``softmax_mean`` (average per-view probabilities of the unscaled cosine
            logits, as the official code) or ``logit_mean``.
        progress: called with the number of videos after each batch.
        precision: as the trainer's (:func:`~mergekit_video.training.precision.resolve_precision`):
            ``auto`` is bf16 autocast on a CUDA device that supports bf16, fp32 otherwise. Autocast
            covers the visual tower and the temporal transformer; the class similarities and ρ
            (Eq. 11) are always fp32 (:func:`~mergekit_video.models.cosine_logits`,
            :func:`~mergekit_video.models.semantic_association`), as the official test code.

    Without ``variants``: the model alone, named ``merged`` (``model`` for the plain-FFN baseline).

    Raises :class:`NoVideoEvaluatedError` (a ValueError) when no video was evaluated (an empty list, or every video failed under
    ``on_error: skip``): there is no accuracy to report, and a 0 would turn HM_ZS into 0.

    In DDP every rank evaluates its shard; results are gathered and de-duplicated by
    dataset index, so padded samples never count twice.
    """
    if view_reduce not in VIEW_REDUCTIONS:
        raise ValueError(f"view_reduce must be one of {VIEW_REDUCTIONS}, got {view_reduce!r}")
    device = torch.device(device)
    precision = resolve_precision(device, precision)  # the trainer's decision (bf16 only where supported)
    head = model.head
    variants = list(variants or build_variants(model, modulation=(False,)))
    # experts outside the head (in the visual tower): a variant's routing covers the whole model
    whole_model = len(find_containers(model)) > len(find_containers(head))
    if whole_model:
        _check_expert_counts(model, variants)
    _check_source_features(head, variants)  # before any decoding
    routed = model if whole_model else head
    was_training = model.training
    model.eval()
    cls = class_features.to(device)
    records: dict[int, dict[str, tuple[bool, ...]]] = {}
    failed: list[tuple[Any, str]] = []  # (dataset index, else path; path) of each skipped item
    bad_seen: set[str] = set()
    start = time.perf_counter()
    from ..data import normalize_frames
    from ..data.loader import iterate_with_workers_started

    try:
        for batch in iterate_with_workers_started(loader):  # a Ctrl-C while its workers fork is not lost
            note_batch_failures(batch, bad_seen)  # logs each new bad video once
            paths, indices = list(batch.get("failed", [])), list(batch.get("failed_index", []) or [])
            # counted by dataset index: a list may name one file twice (each line is a video to evaluate)
            failed.extend(zip(indices if len(indices) == len(paths) else paths, paths))
            if batch["label"].numel() == 0:  # every item of the batch failed (on_error: skip)
                continue
            frames = batch["frames"].to(device, non_blocking=True)
            if frames.dtype == torch.uint8:
                frames = normalize_frames(frames)
            if frames.dim() == 5:  # [B, T, 3, H, W] → one view
                frames = frames.unsqueeze(1)
            labels = batch["label"].to(device, non_blocking=True)
            probs = _variant_scores(model, frames, cls, variants, routed=routed, per_routing=whole_model,
                                    device=device, precision=precision, view_reduce=view_reduce, indices=batch["index"])
            names = list(probs)
            # [variants, ks + 1, B] hit flags and whether the scores are finite, read back in one copy (not one sync per flag)
            flags = torch.stack([torch.stack([*(h[k] for k in _KS), torch.isfinite(probs[n]).all(dim=-1)])
                                 for n, h in ((n, topk_hits(probs[n], labels, _KS)) for n in names)]).cpu().tolist()
            for j, idx in enumerate(batch["index"].tolist()):
                records[idx] = {name: tuple(flags[v][i][j] for i in range(len(_KS) + 1)) for v, name in enumerate(names)}
            if progress is not None:
                progress(len(records))
    finally:
        model.train(was_training)
    records, failed = _gather(records, failed)
    failed_items = dict(failed)  # DDP padding repeats indices: each failed item once
    failed_paths = sorted(set(failed_items.values()))
    n = len(records)
    if n == 0:
        label = f"dataset {dataset_name!r}" if dataset_name else "the evaluation"
        raise NoVideoEvaluatedError(
            f"no video of {label} was evaluated: "
            + (f"all {len(failed_items)} failed to load (first: {failed_paths[0]}); check the data root and the video list"
               if failed_items else "its video list is empty"),
            failed=failed_paths,
        )
    _check_finite_scores(model, records, dataset_name)
    results = {}
    for var in variants:
        if not var.report:
            continue
        top1, top5 = (sum(r[var.name][i] for r in records.values()) for i in range(len(_KS)))
        results[var.name] = VariantResult(top1=100.0 * top1 / n, top5=100.0 * top5 / n if cls.shape[0] > 5 else None, num_videos=n)
    return EvalResult(
        dataset=dataset_name,
        variants=results,
        num_videos=n,
        num_failed=len(failed_items),
        failed=failed_paths,
        views=views,
        seconds=time.perf_counter() - start,
    )


class NonFiniteScoresError(ValueError):
    """A variant scored videos with NaN or infinite class scores: its accuracy would be meaningless."""


def _check_finite_scores(model: torch.nn.Module, records: dict[int, dict[str, tuple[bool, ...]]], dataset_name: str | None) -> None:
    """Raise :class:`NonFiniteScoresError` when a variant's class scores of any video were NaN or infinite
    (``topk`` ranks NaN arbitrarily, so the accuracy would look plausible), naming the variant and the cause
    where it is the model's weights."""
    bad: dict[str, int] = {}
    for r in records.values():
        for name, flags in r.items():
            if not flags[-1]:
                bad[name] = bad.get(name, 0) + 1
    if not bad:
        return
    label = f"dataset {dataset_name!r}" if dataset_name else "the evaluation"
    shown = ", ".join(f"{name!r} ({n} of {len(records)} videos)" for name, n in bad.items())
    weight = next((name for name, t in model.state_dict().items()
                   if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    cause = (f"the model's {weight!r} holds NaN or infinite values (a diverged or damaged checkpoint?)" if weight is not None
             else "the weights are finite, so the forward overflowed: evaluate with eval.precision=fp32 (or bf16)")
    raise NonFiniteScoresError(f"{label}: NaN or infinite class scores from {shown}: {cause}")


def _variant_scores(
    model: torch.nn.Module,
    frames: torch.Tensor,
    cls: torch.Tensor,
    variants: Sequence[Variant],
    *,
    routed: torch.nn.Module,
    per_routing: bool,
    device: torch.device,
    precision: str,
    view_reduce: str,
    indices: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """View-averaged class scores ``[B, C]`` of every variant for frames ``[B, V, T, 3, H, W]``.

    The frames are encoded once, or, with ``per_routing`` (experts in the visual tower), once per
    routing context, under that routing. ``indices`` (``[B]`` dataset indices) seed the
    ``random_routing`` draws.
    """
    b, v = frames.shape[:2]
    random_plans: dict[int, Callable[[torch.nn.Module], ContextManager]] = {}  # by seed: one draw per batch
    encoded: dict[Any, torch.Tensor] = {}  # frame features [B*V, T, D] by routing context
    rhos: dict[Any, torch.Tensor] = {}  # TFM's ρ [B*V] by routing context
    view_logits: dict[str, torch.Tensor] = {}  # [B, V, C] cosine logits, kept for logit ensembles
    probs: dict[str, torch.Tensor] = {}
    for var in variants:
        if var.kind == "logit_ensemble":  # Table 2c: average the experts' logits, then reduce the views
            logits = torch.stack([view_logits[m] for m in var.members]).mean(0)  # [B, V, C]
            probs[var.name] = (logits.softmax(-1) if view_reduce == "softmax_mean" else logits).mean(1)
            continue
        context = var.context
        if var.kind == "random_routing":
            if var.seed not in random_plans:
                random_plans[var.seed] = _random_routing_ctx(routed, indices, views=v, frames=frames.shape[2], seed=var.seed)
            context = random_plans[var.seed]
        key = context if per_routing else None
        with context(routed) if context else contextlib.nullcontext():
            if key not in encoded:
                with autocast_context(device, precision):
                    encoded[key] = model.encode_frames(frames.flatten(0, 1)).float()  # [B*V, T, D]
            with autocast_context(device, precision):
                if var.modulation:  # ρ depends on the frame features and classes only, not on the merge
                    if key not in rhos:
                        rhos[key] = model.head.modulation_weights(encoded[key], cls)  # [B*V]
                    logits = model.head(encoded[key], cls, modulation=True, rho=rhos[key]).float()  # [B*V, C]
                else:
                    logits = model.head(encoded[key], cls, modulation=False).float()  # [B*V, C]
        logits = logits.view(b, v, -1)  # [B, V, C]
        if var.kind == "expert":
            view_logits[var.name] = logits
        probs[var.name] = (logits.softmax(-1) if view_reduce == "softmax_mean" else logits).mean(1)  # [B, C]
    return probs


def random_routing_draws(index: int, num_experts: Sequence[int], *, views: int, seed: int) -> torch.Tensor:
    """``[views, L]`` experts of one video (dataset ``index``) for random routing: uniform, one per
    container (``num_experts[l]`` experts each) and view, from a generator seeded by ``seed`` and ``index``."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.stack([torch.randint(0, n, (views,), generator=g) for n in num_experts], dim=1)


def _random_routing_ctx(routed: torch.nn.Module, indices: torch.Tensor | None, *, views: int, frames: int,
                        seed: int) -> Callable[[torch.nn.Module], ContextManager]:
    """The routing context of one batch's random-routing variants: head container l routes row j of
    ``[B*V, ...]`` (video j // V, view j % V) to that video's drawn expert; a container of the visual
    tower (``routed`` is the whole model) sees ``[B*V*T, ...]`` frames, each routed as its clip."""
    from ..experts import routing_plan
    from ..routers import AssignedRouter

    if indices is None:
        raise ValueError("random routing needs the batch's dataset indices (batch['index'])")
    containers = find_containers(routed)
    counts = [c.num_experts for _, c in containers]
    draws = torch.stack([random_routing_draws(int(i), counts, views=views, seed=seed) for i in indices.tolist()])  # [B, V, L]
    whole_model = routed is not getattr(routed, "head", routed)
    plan = {}
    for l, (name, c) in enumerate(containers):
        rows = draws[:, :, l].reshape(-1)  # [B*V]
        if whole_model and not name.startswith("head."):
            rows = rows.repeat_interleave(frames)  # [B*V*T]: the visual tower encodes frame by frame
        plan[name] = AssignedRouter(num_experts=c.num_experts, indices=rows)
    return lambda module: routing_plan(module, plan)


_KS = (1, 5)  # top-1 and top-5 (capped at the class count)


def _check_source_features(head: torch.nn.Module, variants: Sequence[Variant]) -> None:
    """TFM variants need the stored source class features y_f (Eq. 11): fail before decoding anything."""
    source = getattr(head, "source_class_features", None)
    if any(v.modulation for v in variants) and isinstance(source, torch.Tensor) and source.numel() == 0:
        raise ValueError(
            "temporal feature modulation needs the source (fine-tuning) class features, and this model stores none; "
            "evaluate with modulation off (eval.modulation: [false]), or train/convert the model with its source classes"
        )


def differing_expert_counts(model: torch.nn.Module) -> list[tuple[str, int]]:
    """``(container name, expert count)`` of the first container with each count, in model order, when the
    containers' counts differ (per-expert variants run expert i of every container: they need one); else []."""
    first: dict[int, str] = {}
    for name, c in find_containers(model):
        first.setdefault(c.num_experts, name)
    return [(name, n) for n, name in first.items()] if len(first) > 1 else []


def _check_expert_counts(model: torch.nn.Module, variants: Sequence[Variant]) -> None:
    """Per-expert variants over the whole model need one expert count everywhere (expert i of every container)."""
    counts = sorted(n for _, n in differing_expert_counts(model))
    if counts and any(v.kind in ("expert", "logit_ensemble") for v in variants):
        raise ValueError(
            f"per-expert evaluation runs expert i in every expert container, but this model's containers have "
            f"{' and '.join(map(str, counts))} experts (the head and the visual tower differ); evaluate without "
            "per-expert variants (eval.compare.experts: false and eval.compare.logit_ensemble: false)"
        )


def _gather(records: dict[int, Any], failed: list[tuple[Any, str]]) -> tuple[dict[int, Any], list[tuple[Any, str]]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records, failed
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (records, failed))
    merged: dict[int, Any] = {}
    all_failed: list[tuple[Any, str]] = []
    for recs, fails in gathered:
        merged.update(recs)
        all_failed.extend(fails)
    return merged, all_failed
