"""Benchmarks of training and evaluation steps (``mergevid bench head`` / ``mergevid bench train``).

Timings are measured, written as JSON and rendered as markdown for ``docs/benchmarks.md``;
nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: Dense bf16 tensor-core peak FLOP/s by device name fragment (vendor data sheets, no sparsity).
#: The first fragment found in the name wins, so longer names come before their prefixes.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835.5e12),
    ("H200", 989.4e12),  # also GH200
    ("H100 NVL", 835.5e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.0e12),
    ("L40", 181.0e12),
    ("L4", 121.0e12),
    ("RTX 4090", 165.2e12),
    ("A10", 125.0e12),
)

HEAD_SHAPES = (("ViT-B/16 head", 512, 4), ("ViT-L/14 head", 768, 6))


def describe_device(device: torch.device) -> str:
    """A human description of the machine measured."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    from ..utils.cpu import cpu_model_name

    return f"CPU {cpu_model_name()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, None when unknown or on CPU."""
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


def peak_flops_for(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a card by its name (``"NVIDIA H100 80GB HBM3"``), None when unknown."""
    return next((flops for frag, flops in PEAK_BF16_FLOPS if frag in device_name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], *, device: torch.device, steps: int, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` over ``steps`` timed calls after ``warmup`` calls."""
    return time_interleaved({"fn": fn}, device=device, steps=steps, warmup=warmup)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], *, device: torch.device, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation.

    Every round calls each function once, so slow drifts of a shared machine (other
    tenants, frequency changes) hit all of them alike and their ratios stay meaningful.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _prepare_device(device: torch.device) -> bool:
    """Process tuning before timing; True when the CPU allocator was tuned (see :mod:`..utils.cpu`)."""
    if device.type != "cpu":
        return False
    from ..utils.cpu import tune_cpu_allocator

    return tune_cpu_allocator()


def _resolve_device(device: str) -> torch.device:
    from ..utils.device import select_device

    return select_device(device)


def _autocast(device: torch.device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def head_shape(spec: str) -> tuple[str, int, int]:
    """``"WIDTHxLAYERS"`` → ``(name, width, layers)``; the paper's shapes keep their names (``512x4`` = ViT-B/16 head)."""
    try:
        width, layers = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"a head shape looks like WIDTHxLAYERS (e.g. 512x4), got {spec!r}") from None
    if width < 64 or width % 64 or layers < 1:
        raise ValueError(f"head shape {spec!r}: the width must be a positive multiple of 64 (heads of 64) and layers >= 1")
    name = next((n for n, w, l in HEAD_SHAPES if (w, l) == (width, layers)), f"{width}x{layers} head")
    return name, width, layers


def bench_head(
    *,
    device: str = "auto",
    steps: int = 50,
    warmup: int = 3,
    batch_size: int = 32,
    frames: int = 8,
    num_experts: int = 4,
    num_classes: int = 400,
    shapes: Sequence[tuple[str, int, int]] = HEAD_SHAPES,
) -> dict[str, Any]:
    """Time the temporal head alone, by default at the ViT-B/16 and ViT-L/14 shapes.

    Per shape ``(name, width, layers)``: the MoTE train step (expert path + WMR path + MSE +
    AdamW, fused paths), the same with two separate temporal forwards (the usual
    implementation), the plain-FFN baseline step; merged eval vs plain eval, and eval that
    re-merges on every forward. Each measurement is the median of ``steps`` timed calls after
    ``warmup`` untimed ones; the variants compared are called in alternation. On the CPU the
    allocator is tuned first, as in training (:func:`..utils.cpu.tune_cpu_allocator`).
    """
    from ..models.objective import MoTEObjective
    from ..models.temporal import TemporalHead
    from ..training.optim import build_optimizer

    dev = _resolve_device(device)
    tuned = _prepare_device(dev)
    out: dict[str, Any] = {
        "device": describe_device(dev), "cpu_allocator_tuned": tuned, "precision": "bf16" if dev.type == "cuda" else "fp32",
        "batch_size": batch_size, "frames": frames, "num_experts": num_experts, "num_classes": num_classes,
        "steps": steps, "warmup": warmup, "shapes": {},
    }
    for name, width, layers in shapes:
        torch.manual_seed(0)
        feats = F.normalize(torch.randn(batch_size, frames, width, device=dev), dim=-1)
        classes = F.normalize(torch.randn(num_classes, width, device=dev), dim=-1)
        labels = torch.randint(0, num_classes, (batch_size,), device=dev)
        scale = torch.tensor(100.0, device=dev)

        def train_step_fn(head: TemporalHead, objective: MoTEObjective) -> Callable[[], None]:
            opt = build_optimizer(head.parameters(), lr=1e-4, weight_decay=0.2)

            def step() -> None:
                with _autocast(dev):
                    loss = objective(head, feats, classes, labels, scale).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        mote = TemporalHead(width=width, layers=layers, num_experts=num_experts).to(dev).train()
        plain = TemporalHead(width=width, layers=layers, num_experts=0).to(dev).train()
        train = time_interleaved(
            {
                "mote": train_step_fn(mote, MoTEObjective(fuse_paths=True)),
                "mote_unfused": train_step_fn(copy.deepcopy(mote), MoTEObjective(fuse_paths=False)),
                "plain": train_step_fn(plain, MoTEObjective(wmr_weight=0, mse_weight=0)),
            },
            device=dev,
            steps=steps,
            warmup=warmup,
        )
        t_mote, t_mote_unfused, t_plain = train["mote"], train["mote_unfused"], train["plain"]

        mote.eval()
        plain.eval()

        @torch.no_grad()
        def eval_fn(head: TemporalHead, remerge: bool = False) -> Callable[[], None]:
            def run() -> None:
                if remerge:
                    for m in head.modules():
                        if hasattr(m, "invalidate_merge"):
                            m.invalidate_merge()
                with torch.no_grad(), _autocast(dev):
                    head(feats, classes)

            return run

        evals = time_interleaved(
            {"mote": eval_fn(mote), "plain": eval_fn(plain), "remerge": eval_fn(mote, remerge=True)},
            device=dev,
            steps=steps,
            warmup=warmup,
        )
        e_mote, e_plain, e_remerge = evals["mote"], evals["plain"], evals["remerge"]
        out["shapes"][name] = {
            "width": width,
            "layers": layers,
            "train_ms": {"mote_fused": 1e3 * t_mote, "mote_two_forwards": 1e3 * t_mote_unfused, "plain": 1e3 * t_plain},
            "eval_ms": {"mote_merged_cached": 1e3 * e_mote, "plain": 1e3 * e_plain, "mote_remerge_every_forward": 1e3 * e_remerge},
            "train_ratio_mote_vs_plain": t_mote / t_plain,
            "train_ratio_two_forwards_vs_plain": t_mote_unfused / t_plain,
            "eval_ratio_merged_vs_plain": e_mote / e_plain,
            "eval_ratio_remerge_vs_plain": e_remerge / e_plain,
        }
    return out


def render_head_markdown(res: dict[str, Any]) -> str:
    """Markdown table of :func:`bench_head` results."""
    lines = [
        f"`mergevid bench head` on {res['device']}; batch {res['batch_size']}, {res['frames']} frames, {res['num_experts']} experts.",
        "",
        "| shape | plain train (ms) | MoTE train (ms) | MoTE / plain | two forwards / plain | plain eval (ms) | merged eval (ms) "
        "| merged / plain | re-merge every forward / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["shapes"].items():
        lines.append(
            f"| {name} (D={r['width']}, L={r['layers']}) | {r['train_ms']['plain']:.2f} | {r['train_ms']['mote_fused']:.2f} | "
            f"**{r['train_ratio_mote_vs_plain']:.2f}x** | {r['train_ratio_two_forwards_vs_plain']:.2f}x | {r['eval_ms']['plain']:.3f} | "
            f"{r['eval_ms']['mote_merged_cached']:.3f} | **{r['eval_ratio_merged_vs_plain']:.2f}x** | {r['eval_ratio_remerge_vs_plain']:.2f}x |"
        )
    return "\n".join(lines)


def _count_model_flops(model: torch.nn.Module, step: Callable[[int], Any], *, batch_size: int) -> int:
    """Model FLOPs of one training step of ``batch_size`` clips, for MFU.

    Counted on one eager step of a single clip with gradient checkpointing off, times the batch:
    every counted op (frame encoder, temporal head, logits) is per clip, and model FLOPs leave
    out what checkpointing recomputes (counted, it would turn MFU into hardware-FLOPs use).
    ``FlopCounterMode`` does not see inside compiled graphs, hence the eager step.
    """
    flags = {m: m.grad_checkpointing for m in model.modules() if isinstance(getattr(m, "grad_checkpointing", None), bool)}
    for m in flags:  # open_clip, timm and the temporal head keep the switch on their block stacks
        m.grad_checkpointing = False
    try:
        return count_step_flops(lambda: step(1)) * batch_size
    finally:
        for m, on in flags.items():
            m.grad_checkpointing = on


def count_step_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (forward + backward) counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def bench_train(cfg: dict[str, Any], *, steps: int = 10, warmup: int = 3, batch_size: int | None = None, baseline: bool = True) -> dict[str, Any]:
    """Clips/s of full training steps (visual tower + head + objective + AdamW) on synthetic in-memory frames.

    The model is built from the recipe without pretrained weights (speed does not depend on
    them); frames are uint8 on the device, normalised on the device as in training. The
    recipe's ``precision``, ``train.grad_checkpointing`` and ``train.compile`` apply, as in
    training. MoTE and the baseline (no experts, no WMR, no MSE) are both built first and then
    timed in alternation (:func:`time_interleaved`), so that a shared machine's drifts hit both
    alike and their ratio stays meaningful. On CUDA, model FLOPs are counted for MFU (see
    :func:`_count_model_flops`), and each variant's peak memory is measured in one more step,
    less the memory the other variant holds.
    """
    from .precision import resolve_precision

    dev = _resolve_device(cfg.get("device", "auto"))
    tuned = _prepare_device(dev)
    data = cfg["data"]
    b = int(batch_size or data.get("batch_size", 144))
    t = int(data.get("num_frames", 8))
    size = data.get("input_size")  # None: the model's own frame size (set once the model is built)
    train_cfg = cfg.get("train") or {}
    compile_visual = bool(train_cfg.get("compile"))
    precision = resolve_precision(dev, cfg.get("precision", "auto"))
    results: dict[str, Any] = {
        "device": describe_device(dev), "cpu_allocator_tuned": tuned, "precision": precision, "batch_size": b, "frames": t,
        "input_size": size, "model": cfg["model"].get("clip_name"), "num_experts": cfg["model"].get("num_experts"),
        "steps": steps, "warmup": warmup, "compile": compile_visual, "grad_checkpointing": bool(train_cfg.get("grad_checkpointing")),
        "runs": {},
    }
    variants = [("mote", cfg["model"], cfg["objective"])]
    if baseline:
        base_model = {**cfg["model"], "num_experts": 0}
        base_obj = {**cfg["objective"], "wmr_weight": 0.0, "mse_weight": 0.0}
        variants.append(("baseline", base_model, base_obj))
    built: dict[str, _TrainVariant] = {}
    for label, model_cfg, obj_cfg in variants:
        built[label] = _TrainVariant(
            cfg, model_cfg, obj_cfg, dev=dev, batch_size=b, frames=t, size=size, precision=precision,
            grad_checkpointing=results["grad_checkpointing"], compile_visual=compile_visual,
        )
        size = built[label].size
    results["input_size"] = size
    seconds = time_interleaved({label: v.step for label, v in built.items()}, device=dev, steps=steps, warmup=max(0, warmup - 1))
    for label, v in built.items():
        run: dict[str, Any] = {"step_s": seconds[label], "clips_per_s": b / seconds[label]}
        if v.flops is not None:
            peak = peak_flops(dev) if precision in ("bf16", "fp16") else None  # the table holds 16-bit tensor-core peaks
            run["flops_per_step"] = v.flops
            run["achieved_tflops"] = v.flops / seconds[label] / 1e12
            run["mfu"] = None if peak is None else v.flops / seconds[label] / peak
            run["peak_tflops"] = None if peak is None else peak / 1e12
        if dev.type == "cuda":
            others = sum(o.resident_bytes for k, o in built.items() if k != label)
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            v.step()
            torch.cuda.synchronize(dev)
            run["max_memory_gib"] = (torch.cuda.max_memory_allocated(dev) - others) / 2**30
        results["runs"][label] = run
    if "baseline" in results["runs"]:
        results["overhead_mote_vs_baseline"] = results["runs"]["mote"]["step_s"] / results["runs"]["baseline"]["step_s"]
    return results


class _TrainVariant:
    """One model + objective + AdamW built from the recipe, with its training step (``step()``),
    warmed up once (optimizer state created, compiled if asked); ``resident_bytes``: the device
    memory it keeps between steps (weights, optimizer state, inputs)."""

    def __init__(
        self, cfg: dict[str, Any], model_cfg: dict[str, Any], obj_cfg: dict[str, Any], *, dev: torch.device, batch_size: int,
        frames: int, size: int | None, precision: str, grad_checkpointing: bool, compile_visual: bool,
    ) -> None:
        from ..config import instantiate
        from ..data import normalize_frames
        from ..training.optim import build_optimizer, build_param_groups
        from ..training.trainer import TrainStep
        from .precision import autocast_context

        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        torch.manual_seed(0)
        model = instantiate({**model_cfg, "pretrained": None}, _path="model").to(dev).train()
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        objective = instantiate(obj_cfg, _path="objective")
        step_module = TrainStep(model=model, objective=objective)
        o = cfg.get("optimizer", {})
        groups = build_param_groups(model, groups=[{"name": "clip", "match": ["clip.*"], "lr": o.get("clip_lr", 3e-6)}], lr=o.get("lr", 5e-5), weight_decay=o.get("weight_decay", 0.2))
        opt = build_optimizer(groups, lr=o.get("lr", 5e-5), weight_decay=o.get("weight_decay", 0.2))
        self.size = int(size or model.input_size or 224)  # None: the model's own frame size
        classes = F.normalize(torch.randn(400, model.head.width, device=dev), dim=-1)
        frames_u8 = torch.randint(0, 256, (batch_size, frames, 3, self.size, self.size), dtype=torch.uint8, device=dev)
        labels = torch.randint(0, 400, (batch_size,), device=dev)

        def step(clip_count: int = batch_size) -> None:
            clips = normalize_frames(frames_u8[:clip_count])  # [B, T, 3, H, W] float, on the device as in training
            with autocast_context(dev, precision):
                loss = step_module(clips, labels[:clip_count], classes).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        self.flops = _count_model_flops(model, step, batch_size=batch_size) if dev.type == "cuda" else None
        if compile_visual:
            model.visual.compile()  # as train.compile=true does; compiled during the first step
        self.step = step
        step()  # the optimizer's state exists from here on
        _sync(dev)
        self.resident_bytes = torch.cuda.memory_allocated(dev) - before if dev.type == "cuda" else 0


def render_train_markdown(res: dict[str, Any]) -> str:
    """Markdown table of :func:`bench_train` results."""
    lines = [
        f"`mergevid bench train` on {res['device']}; batch {res['batch_size']}, {res['frames']} frames at {res['input_size']}px"
        f"{', torch.compile' if res.get('compile') else ''}{', grad checkpointing' if res.get('grad_checkpointing') else ''}.",
        "",
        "| run | step (s) | clips/s | MFU | TFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for label, r in res["runs"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        tf = f"{r['achieved_tflops']:.1f}" if r.get("achieved_tflops") is not None else "n/a"
        lines.append(f"| {label} | {r['step_s']:.3f} | {r['clips_per_s']:.1f} | {mfu} | {tf} |")
    if "overhead_mote_vs_baseline" in res:
        lines.append(f"\nMoTE step / baseline step: {res['overhead_mote_vs_baseline']:.3f}×")
    return "\n".join(lines)
