"""Parameter groups and optimizers.

MoTE trains the CLIP layers with a small lr (3e-6) and the new temporal parameters with a
larger one (5e-5), AdamW with weight decay 0.2 and betas (0.9, 0.999) (paper Table 6). Recipes
describe the groups as globs over parameter names:

    groups:
      - {name: clip, match: ["visual.*", "transformer.*"], lr: 3.0e-6}
    # every other trainable parameter falls in the default group (lr 5e-5)
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "build_optimizer", "build_param_groups", "describe_param_groups", "is_no_decay"]

_GROUP_KEYS = ("name", "match", "lr", "weight_decay")
_NO_DECAY_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
    nn.EmbeddingBag,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_no_decay(name: str, param: torch.Tensor, module: nn.Module | None, extra: Iterable[str] = ()) -> bool:
    """Whether a parameter is excluded from weight decay: biases and other 1-D tensors (norm
    scales), parameters of norm and embedding modules, and embeddings/tokens by name
    (``positional_embedding``, ``class_embedding``, ``pos_embed``, ``cls_token``, ...)
    or listed in ``extra`` (a model's ``no_weight_decay()`` names, full or leaf)."""
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim <= 1 or leaf == "bias":
        return True
    if module is not None and (isinstance(module, _NO_DECAY_MODULES) or "Norm" in type(module).__name__):
        return True
    if "embed" in leaf or leaf.endswith("_token"):
        return True
    extra = set(extra)
    return name in extra or leaf in extra


def build_param_groups(
    model: nn.Module,
    *,
    groups: Sequence[Mapping[str, Any]] = (),
    lr: float,
    weight_decay: float,
    no_decay_norm_bias_embedding: bool = False,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into optimizer param groups.

    Args:
        model: the model; frozen parameters (``requires_grad=False``) are left out.
        groups: ``{"name", "match": glob or list of globs over parameter names, "lr"?,
            "weight_decay"?}``; a parameter goes to the FIRST group that matches, the rest to
            the ``default`` group (``lr``, ``weight_decay``). A glob that matches no trainable
            parameter is an error.
        lr, weight_decay: defaults for the ``default`` group and for groups that omit them.
        no_decay_norm_bias_embedding: put norms, biases, 1-D params and embeddings of every
            group into a ``<name>/no_decay`` sibling group with weight decay 0 (:func:`is_no_decay`).

    Returns:
        Param-group dicts with ``params``, ``param_names``, ``name``, ``lr``, ``weight_decay``
        (empty groups omitted); every trainable parameter is in exactly one group.
    """
    specs = _check_group_specs(groups)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    owner = {id(p): m for _, m in model.named_modules() for p in m.parameters(recurse=False)}
    extra_nd: set[str] = set()
    if no_decay_norm_bias_embedding and callable(getattr(model, "no_weight_decay", None)):
        extra_nd = set(model.no_weight_decay())  # timm convention

    assigned: dict[str, list[tuple[str, torch.Tensor]]] = {s["name"]: [] for s in specs}
    assigned["default"] = []
    hits = {(s["name"], pat): 0 for s in specs for pat in s["match"]}
    for n, p in named:
        target = "default"
        for s in specs:
            matched = [pat for pat in s["match"] if fnmatch.fnmatchcase(n, pat)]
            for pat in matched:
                hits[(s["name"], pat)] += 1
            if matched:
                target = s["name"]
                break
        assigned[target].append((n, p))

    unmatched = [(g, pat) for (g, pat), k in hits.items() if k == 0]
    if unmatched:
        names = [n for n, _ in named]
        msgs = []
        for g, pat in unmatched:
            close = difflib.get_close_matches(pat, names, n=3, cutoff=0.5)
            hint = f" (close names: {', '.join(close)})" if close else f" (e.g. {', '.join(names[:3])})"
            msgs.append(f"param group {g!r}: pattern {pat!r} matches no trainable parameter "
                        f"not already taken by an earlier group{hint}")
        raise ValueError("; ".join(msgs))

    out: list[dict[str, Any]] = []
    for s in [*specs, {"name": "default", "lr": None, "weight_decay": None}]:
        members = assigned[s["name"]]
        g_lr = lr if s.get("lr") is None else float(s["lr"])
        g_wd = weight_decay if s.get("weight_decay") is None else float(s["weight_decay"])
        if no_decay_norm_bias_embedding:
            nd = [(n, p) for n, p in members if is_no_decay(n, p, owner.get(id(p)), extra_nd)]
            nd_ids = {id(p) for _, p in nd}
            parts = [(s["name"], [(n, p) for n, p in members if id(p) not in nd_ids], g_wd),
                     (f"{s['name']}/no_decay", nd, 0.0)]
        else:
            parts = [(s["name"], members, g_wd)]
        for gname, mem, wd in parts:
            if mem:
                out.append({"params": [p for _, p in mem], "param_names": [n for n, _ in mem],
                            "name": gname, "lr": g_lr, "weight_decay": wd})
    return out


def _check_group_specs(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    seen: set[str] = {"default"}
    for i, g in enumerate(groups):
        where = f"groups[{i}]"
        if not isinstance(g, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys {_GROUP_KEYS}, got {type(g).__name__}")
        unknown = [k for k in g if k not in _GROUP_KEYS]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {', '.join(_GROUP_KEYS)})")
        name = g.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name: must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.name: {name!r} is used twice (or is the reserved 'default')")
        seen.add(name)
        match = g.get("match")
        pats = [match] if isinstance(match, str) else list(match) if isinstance(match, (list, tuple)) else None
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise ValueError(f"{where}.match: must be a glob or a non-empty list of globs, got {match!r}")
        for key in ("lr", "weight_decay"):
            v = g.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{where}.{key}: must be a non-negative number, got {v!r}")
        specs.append({"name": name, "match": pats, "lr": g.get("lr"), "weight_decay": g.get("weight_decay")})
    return specs


def describe_param_groups(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per group (name, tensors, parameters, lr, weight_decay) for a summary table."""
    return [
        {"group": g.get("name", str(i)), "tensors": len(g["params"]),
         "parameters": sum(p.numel() for p in g["params"]), "lr": g.get("lr"), "weight_decay": g.get("weight_decay")}
        for i, g in enumerate(groups)
    ]


OPTIMIZERS = ("adamw", "adam", "sgd")


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]],
    *,
    name: str = "adamw",
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.0,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Build ``adamw`` (decoupled weight decay), ``adam`` or ``sgd`` over ``params`` (tensors or groups).

    ``fused=None`` picks the fused kernel when every parameter is a floating tensor on a device
    with fused kernels (CUDA, CPU) and the multi-tensor ``foreach`` kernel otherwise;
    ``True``/``False`` force or forbid fused.
    Group-level ``lr``/``weight_decay`` override the defaults given here.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, OPTIMIZERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint} (allowed: {', '.join(OPTIMIZERS)})")
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    tensors = [p for g in params for p in (g["params"] if isinstance(g, Mapping) else [g])]
    if fused is None:  # the fused kernels exist for CUDA and the CPU (8x faster than foreach on CPU AdamW)
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
        fused = key in ("adamw", "adam", "sgd") and all(t.device.type in supported and t.is_floating_point() for t in tensors)
    kernel = {"fused": True} if fused else {"foreach": True}
    if key in ("adamw", "adam"):
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)!r}")
        cls = torch.optim.AdamW if key == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay, **kernel)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kernel)
