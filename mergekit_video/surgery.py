"""Model surgery: turn modules of any backbone into expert containers, and back.

    names = add_experts(model, "transformer.resblocks.*.mlp", num_experts=4)
    ...train...
    collapse_experts(model)             # plain modules again, original state-dict keys
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .experts import (
    ExpertContainer,
    checkpoints_plainly,
    find_containers,
    per_container_merge_kwargs,
    router_keeps_state,
    sequence_first_problem,
    state_dict_under,
)
from .merging import default_seed, non_float_notices, requires_base
from .routers import Router, build_router, default_generator
from .utils.warn import warn_user

EXPERT_INITS = ("normal", "copy", "copy_noise")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
#: Modules whose output at one position depends on others: they cannot run on routed single tokens.
_MIXES_POSITIONS = (nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)


#: Parents that read their children's tensors themselves instead of calling them (a container put there would
#: never route nor merge): nn.MultiheadAttention hands out_proj's weight to F.multi_head_attention_forward, and
#: nn.TransformerEncoderLayer's eval fast path (no grad) hands every child's weights to one fused kernel.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


class SurgeryError(ValueError):
    """A target pattern or surgery argument does not fit the model."""


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _container_names(model: nn.Module) -> dict[str, ExpertContainer]:
    """Every container of ``model`` under every name it has (a shared container under each alias)."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, ExpertContainer)}


def _enclosing_container(name: str, containers: Mapping[str, ExpertContainer]) -> str | None:
    """The name of a container that ``name`` lies inside (under any alias of the container), or None."""
    parts = name.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in containers), None)


def _check_not_nested(name: str, containers: Mapping[str, ExpertContainer], pattern: str | None = None) -> None:
    """Refuse a target inside a container or holding one: containers do not nest."""
    how = f" (matched by {pattern!r})" if pattern is not None else ""
    outer = _enclosing_container(name, containers)
    if outer is not None:
        raise SurgeryError(f"{name!r}{how} lies inside the ExpertContainer {outer!r}: containers cannot be nested; "
                           "collapse_experts first, or target modules outside the container")
    inner = next((c for c in containers if c.startswith(name + ".")), None)
    if inner is not None:
        raise SurgeryError(f"{name!r}{how} holds the ExpertContainer {inner!r}: containers cannot be nested; "
                           "collapse_experts first, or target modules beside the container")


def match_modules(model: nn.Module, target: str | Sequence[str]) -> list[str]:
    """Qualified names of the submodules matching the glob(s) in ``target``.

    A module inside an already-matched module is skipped (globs' ``*`` also matches dots), and
    so is a module inside an ExpertContainer, under any of the container's names. Containers
    do not nest: a pattern that matches only modules inside containers, or a match that holds
    a container, raises :class:`SurgeryError` naming the container. Raises it too, showing the
    nearest module names, when a pattern matches nothing.
    """
    modules = [target] if isinstance(target, nn.Module) else list(target) if isinstance(target, Sequence) and not isinstance(target, str) else []
    if modules and all(isinstance(t, nn.Module) for t in modules):  # module objects: name them
        by_id = {}
        for n, m in model.named_modules():
            by_id.setdefault(id(m), n)
        named = [by_id.get(id(m)) for m in modules]
        if "" in named:
            raise SurgeryError("target must be module names or globs over them, not module objects; the model itself cannot "
                               "be a target (experts replace its submodules): put it in a parent module")
        if all(n is not None for n in named):
            raise SurgeryError(f"target must be module names or globs over them, not module objects: pass {named if len(named) > 1 else named[0]!r}")
        raise SurgeryError("target must be module names or globs over them (such as 'blocks.*.mlp'), not module objects; "
                           f"{type(modules[named.index(None)]).__name__} given is not a submodule of the model")
    if not isinstance(target, str) and not (isinstance(target, Sequence) and all(isinstance(t, str) for t in target)):
        raise SurgeryError(f"target must be a glob or a list of globs over module names (such as 'blocks.*.mlp'), got {target!r}")
    patterns = [target] if isinstance(target, str) else list(target)
    if not patterns:
        raise SurgeryError("target is empty: give a glob or a list of globs over module names, such as 'blocks.*.mlp'")
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]  # a shared module under every name
    containers = _container_names(model)
    inside_container = {n for n in names if _enclosing_container(n, containers) is not None}
    matched: list[str] = []
    matched_by: dict[str, str] = {}
    for pat in patterns:
        everywhere = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not everywhere:
            params = [n for n, _ in model.named_parameters() if fnmatch.fnmatchcase(n, pat)]
            if params:
                owner = params[0].rpartition(".")[0]
                raise SurgeryError(f"target pattern {pat!r} matches the parameter {params[0]!r}, not a module: experts replace "
                                   f"modules; target {owner!r}" if owner else f"target pattern {pat!r} matches the parameter "
                                   f"{params[0]!r} of the model itself, not a module: experts replace submodules")
            raise SurgeryError(f"target pattern {pat!r} matches no module; nearest module names: {nearest_names(pat, names)}")
        hits = [n for n in everywhere if n not in inside_container]
        if not hits:
            _check_not_nested(everywhere[0], containers, pat)
        again = next((h for h in hits if h in containers), None)
        if again is not None:
            raise SurgeryError(f"{again!r} (matched by {pat!r}) already is an ExpertContainer: add_experts ran on it "
                               "before; collapse_experts first, or target other modules")
        for h in hits:
            if h not in matched:
                matched.append(h)
                matched_by[h] = pat
    # drop nested matches: keep outermost
    outermost = [n for n in matched if not any(n.startswith(m + ".") for m in matched if m != n)]
    for n in outermost:
        _check_not_nested(n, containers, matched_by[n])
    return outermost


def nearest_names(pattern: str, names: Sequence[str], n: int = 5) -> str:
    """A short, comma-separated list of the module names closest to ``pattern``."""
    probe = pattern.replace("*", "0").replace("?", "0")
    close = difflib.get_close_matches(probe, names, n=n, cutoff=0.3)
    if not close:
        close = list(names[:n])
    return ", ".join(repr(c) for c in close)


@torch.no_grad()
def reinit_normal_(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """MoTE expert init: Linear/Conv/Embedding weights ~ N(0, std), biases 0, norms 1/0.

    Norms are the torch ones and any module whose class name ends in ``Norm`` (RMSNorm, timm's
    RmsNorm, LayerNorm2d). An Embedding's ``padding_idx`` row stays zero. Other parameters are
    drawn from N(0, std) too, except those named ``bias`` (zeroed).
    """
    for m in module.modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, _NORMS) or type(m).__name__.lower().endswith(("norm", "norm2d", "normfp32")):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            continue
        for pname, p in own.items():
            if pname == "bias" or pname.endswith("_bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std).to(p))
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()
    return module


def _build_router(
    router: str | Router, num_experts: int, module: nn.Module, router_kw: dict[str, Any], index: int = 0
) -> Router:
    # Every container must route independently: a copied router gets a fresh generator
    # seeded from the template's, and an explicit seed becomes seed + container index.
    if isinstance(router, type):  # the class: a name or an instance is what is taken
        from .registry import ROUTERS

        named = ROUTERS.names_of(router)
        raise SurgeryError(f"router must be a registered name or a Router instance, got the class {router.__name__}: "
                           + (f"pass router={named[0]!r}" if named else f"pass an instance, {router.__name__}(...)"))
    if isinstance(router, nn.Module):  # its own arguments apply (router keywords are refused by add_experts)
        r = copy.deepcopy(router)
        template = getattr(router, "generator", None)
        if isinstance(template, torch.Generator):
            r.generator = default_generator(int(torch.randint(0, 2**62, (1,), generator=template)))
        return r
    kw = dict(router_kw)
    if kw.get("seed") is not None:
        kw["seed"] = int(kw["seed"]) + index
    try:
        return build_router(router, num_experts=num_experts, module=module, **kw)
    except ValueError as exc:  # a surgery argument that does not fit (dim not inferable, a bad value)
        raise SurgeryError(str(exc)) from None


def _check_router_keywords(router: Any, router_kw: Mapping[str, Any]) -> None:
    """Refuse router keywords that would be ignored (beside a Router instance) or that no one takes (a typo of
    add_experts's own keywords, ``init_sdt``, was blamed on the router), naming the closest accepted name."""
    if not router_kw:
        return
    if isinstance(router, nn.Module):
        raise SurgeryError(
            f"router is a {type(router).__name__} instance, which carries its own arguments ({router.extra_repr()}): the "
            f"keyword arguments {', '.join(map(repr, router_kw))} would be ignored; set them when building the instance, "
            "or pass the router's registered name with them"
        )
    if not isinstance(router, str):
        return  # a class or another object: _build_router names it
    from .registry import ROUTERS, _close, _keyword_parameters

    accepted = _keyword_parameters(ROUTERS.get(router))  # an unknown name: the registry's error, with close names
    if accepted is None:  # open-ended (**kwargs all the way): the router checks
        return
    own = [p for p in inspect.signature(add_experts).parameters if p not in ("model", "router_kw")]
    # add_experts passes num_experts and module itself, and takes generator as its own
    accepted = [a for a in accepted if a not in ("num_experts", "module", *own)]
    unknown = next((k for k in router_kw if k not in accepted), None)
    if unknown is not None:
        raise SurgeryError(
            f"add_experts got an unexpected argument {unknown!r}{_close(str(unknown), own + accepted)}: it is neither an "
            f"argument of add_experts ({', '.join(own)}) nor of router {router!r} ({', '.join(accepted) or 'none'}), to "
            "which add_experts passes its other keywords"
        )


def add_experts(
    model: nn.Module,
    target: str | Sequence[str],
    num_experts: int,
    router: str | Router = "multinomial",
    init: str = "normal",
    merge: str = "mean",
    *,
    noise_std: float | None = None,
    init_std: float | None = None,
    generator: torch.Generator | None = None,
    merge_kwargs: Mapping[str, Any] | None = None,
    batch_dim: int | None = None,
    **router_kw: Any,
) -> list[str]:
    """Replace every submodule matching ``target`` with an :class:`ExpertContainer` of N copies.

    Args:
        model: any ``nn.Module``; modified in place.
        target: glob or globs over qualified module names (``"blocks.*.mlp"``).
        num_experts: N.
        router: registered router name (each container gets its own router) or a Router
            to copy. ``router_kw`` go to its constructor; ``dim`` is inferred for gated routers.
            A Router instance carries its own arguments: router keywords beside one are refused.
            A keyword that is neither add_experts's nor the router's is refused with the closest
            name of either. Containers route independently: ``seed=s`` gives the i-th new container the seed
            s + k + i, where k counts the containers the model had before this call (so a
            second call with the same seed does not repeat the first call's routing), and a
            copied Router gets a generator seeded from the template's generator.
        init: ``"normal"`` re-initialises every expert independently (Linear weights
            N(0, init_std²), ``init_std`` 0.02 by default, biases 0, as MoTE does); ``"copy"``
            upcycles (each expert starts as the original weights); ``"copy_noise"`` copies then adds
            N(0, noise_std²) noise (``noise_std`` 0.01 by default). ``noise_std`` given with another
            init, or ``init_std`` with an init other than ``"normal"``, has no effect: a warning says so.
        merge: eval-mode merge strategy of the containers; ``merge_kwargs`` are its arguments.
            A task-arithmetic merge (task_arithmetic, ties, dare) merges relative to a base:
            ``merge_kwargs["base"]`` (the model before surgery, or its state dict), sliced per
            container, or, for upcycled experts (``copy`` / ``copy_noise``), the module each
            container replaces.
        generator: RNG for the ``normal`` / ``copy_noise`` inits (the global RNG if None).
        batch_dim: the targets' batch axis, along which per-sample routing splits their input
            (``None``: 0, inputs ``[B, ...]``). A sequence-first target (a submodule with
            ``batch_first=False``, such as ``nn.TransformerEncoderLayer`` by default: ``[S, B, D]``)
            needs ``batch_dim=1``; a per-sample router on one is refused unless it is given.

    Returns:
        The qualified names of the replaced modules. A module shared under several names (tied
        weights) becomes one container under all of them, and all of them are returned.
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"model must be an nn.Module, got {type(model).__name__}")
    if init not in EXPERT_INITS:
        raise SurgeryError(f"init must be one of {EXPERT_INITS}, got {init!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise SurgeryError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, (int, type(None))):
        raise SurgeryError(f"batch_dim must be an int (the targets' batch axis) or None, got {batch_dim!r}")
    _check_router_keywords(router, router_kw)
    for given, name, used_by in ((noise_std, "noise_std", "copy_noise"), (init_std, "init_std", "normal")):
        if given is not None and init != used_by:
            warn_user(f"add_experts: {name}={given} has no effect with init={init!r} (it is the std of init={used_by!r})")
    noise_std = 0.01 if noise_std is None else noise_std
    init_std = 0.02 if init_std is None else init_std
    matched = match_modules(model, target)
    # a module reachable under several names (tied weights) becomes one container under all of them
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    groups: list[list[str]] = []
    for name in matched:
        group = aliases[id(model.get_submodule(name))]
        if group not in groups:
            groups.append(group)
    names = [n for group in groups for n in group]
    containers_by_name = _container_names(model)
    for n in names:  # an alias of a matched module may lie inside a container (an expert reachable elsewhere)
        _check_not_nested(n, containers_by_name)
    _check_no_parameter_tied_outside(model, groups)
    for n in names:
        parent, _ = _get_parent(model, n)
        if isinstance(parent, _READS_CHILD_WEIGHTS):
            owner = n.rpartition(".")[0]
            how = ("passes its out_proj weights to F.multi_head_attention_forward itself" if isinstance(parent, nn.MultiheadAttention)
                   else "passes its children's weights to one fused kernel in eval (its fast path)")
            raise SurgeryError(f"{n!r} is read, not called, by its parent {owner or 'the model'!r}: {type(parent).__name__} {how}, "
                               f"so experts there would never route nor merge; target {owner!r} itself" if owner else
                               f"{n!r} is read, not called, by the model, a {type(parent).__name__}: put the model in a parent module "
                               "and target the whole of it")
    # router seeds continue after the model's existing containers: a second call with the same seed
    # (experts in the text tower after the visual tower) does not repeat the first call's routing
    seed_offset = len({id(c) for c in containers_by_name.values()})
    merge_kwargs = dict(merge_kwargs or {})
    bases = _merge_bases(model, groups, merge, merge_kwargs.pop("base", None) if requires_base(merge) else None, init)
    containers = []  # every container is built before the first is swapped in: an error leaves the model as it was
    frozen = []  # targets whose parameters are all frozen: their experts (copies) are too
    for index, group in enumerate(groups):
        original = model.get_submodule(group[0])
        params = list(original.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(group[0])
        experts = []
        for _ in range(num_experts):
            e = copy.deepcopy(original)
            if init == "normal":
                reinit_normal_(e, std=init_std, generator=generator)
            elif init == "copy_noise":
                with torch.no_grad():
                    for p in e.parameters():
                        p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(noise_std).to(p))
            experts.append(e)
        try:
            container_router = _build_router(router, num_experts, original, router_kw, seed_offset + index)
        except SurgeryError:
            raise
        except (ValueError, TypeError) as err:
            raise SurgeryError(f"the router for {group[0]!r}: {err}") from err
        if getattr(container_router, "granularity", None) == "sample" and batch_dim is None:
            problem = sequence_first_problem(original, label=repr(group[0]), fix="add_experts(..., batch_dim=1)")
            if problem is not None:
                raise SurgeryError(problem)
        if getattr(container_router, "granularity", None) == "token":
            mixing = next(((n, m) for n, m in original.named_modules() if isinstance(m, _MIXES_POSITIONS)), None)
            if mixing is not None:
                what = f"is a {type(mixing[1]).__name__}" if not mixing[0] else f"holds a {type(mixing[1]).__name__} ({mixing[0]!r})"
                pointwise = isinstance(mixing[1], nn.modules.conv._ConvNd) and all(k == 1 for k in mixing[1].kernel_size)
                if pointwise:  # mixes no positions, but reads [B, C, H, W], not the rows per-token routing hands out
                    raise SurgeryError(
                        f"{group[0]!r} {what}, a 1x1 convolution: it mixes no positions, but it reads channels-first input "
                        "([B, C, ...]), while per-token routing runs each expert on [tokens, dim] rows (the last dim as "
                        "channels); route it per batch or per sample (a sample-routed topk gate reads channels first)"
                    )
                raise SurgeryError(
                    f"{group[0]!r} {what}, which mixes positions: per-token routing runs each expert on single "
                    "tokens ([tokens, dim]); route it per batch or per sample"
                )
        try:
            container = ExpertContainer(
                experts,
                container_router,
                merge,
                merge_kwargs={**merge_kwargs, "base": bases[index]} if bases else merge_kwargs,
                batch_dim=batch_dim,
            )
        except (ValueError, TypeError) as err:
            raise SurgeryError(f"experts for {group[0]!r}: {err}") from err
        container.target_name = group[0]  # named in its forward's errors
        container.to(next(original.parameters(), torch.empty(0)).device)
        container.train(original.training)
        containers.append(container)
    for group, container in zip(groups, containers):
        for name in group:
            parent, child = _get_parent(model, name)
            setattr(parent, child, container)
    if merge_kwargs.get("generator") is None and (merge_kwargs.get("seed") is not None or default_seed(merge) is not None):
        # a stochastic merge (DARE): container i merges with seed + i, as collapse_experts does
        new = {id(c) for c in containers}
        everywhere = find_containers(model)
        for (_, c), kw in zip(everywhere, per_container_merge_kwargs(everywhere, merge_kwargs, strategy=merge)):
            if id(c) in new:
                c.set_merge(merge, **kw, **({"base": c.merge_kwargs["base"]} if bases else {}))
    if frozen:
        warn_user(
            f"the parameters of {frozen[0]!r}{f' (and {len(frozen) - 1} more targets)' if len(frozen) > 1 else ''} are "
            "frozen (requires_grad=False), and so are its experts, which are copies of it: they will not train. "
            "Unfreeze them with model.get_submodule(name).requires_grad_(True), or freeze the backbone after add_experts"
        )
    warn_plain_checkpointing(model)
    return names


def _check_no_parameter_tied_outside(model: nn.Module, groups: list[list[str]]) -> None:
    """Refuse a target holding a parameter that is also reachable outside it (a tied embedding and output head).

    Each expert gets its own copy, so the tie would be broken silently, and the collapsed
    state dict, loaded into the plain backbone, would give the tied slot whichever copy loads last.
    """
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for group in groups:
        inside = tuple(g + "." for g in group)
        for name, p in model.get_submodule(group[0]).named_parameters(prefix=group[0], remove_duplicate=False):
            outside = [n for n in names_of.get(id(p), []) if not n.startswith(inside)]
            if outside:
                raise SurgeryError(
                    f"{name!r} is the same parameter as {outside[0]!r}, outside the target {group[0]!r} (tied weights): "
                    "experts would each get their own copy and untie them. Target a module that shares no "
                    "parameter with the rest of the model, or untie the weights first"
                )


def _merge_bases(
    model: nn.Module, groups: list[list[str]], merge: str, base: nn.Module | Mapping[str, torch.Tensor] | None, init: str
) -> list[dict[str, torch.Tensor]] | None:
    """Per new container, the base of a task-arithmetic eval merge (None for other merges).

    ``base`` (a module or state dict of the whole model) is sliced under each container's
    name; without it, upcycled experts merge relative to a copy of the module they replace.
    """
    if not requires_base(merge):
        return None
    if base is None:
        if init == "normal":
            raise SurgeryError(
                f"merge {merge!r} merges relative to the weights the experts were tuned from, but init='normal' "
                "re-initialises them: use init='copy' or 'copy_noise', or pass merge_kwargs={'base': ...}"
            )
        return [{k: v.detach().clone() for k, v in model.get_submodule(group[0]).state_dict().items()} for group in groups]
    base_sd = base.state_dict() if isinstance(base, nn.Module) else base
    bases = [state_dict_under(base_sd, group[0]) for group in groups]
    empty = next((group[0] for group, b in zip(groups, bases) if not b), None)
    if empty is not None:
        raise SurgeryError(f"merge_kwargs base has no tensors under {empty!r}")
    return bases


def warn_plain_checkpointing(model: nn.Module) -> None:
    """Warn when a module that checkpoints with plain ``torch.utils.checkpoint`` holds stochastic or stateful routers.

    Such a module (``grad_checkpointing = True``, as open_clip and timm set it, and no
    ``replays_routing``) would recompute its forward in backward with newly drawn experts (or,
    for a router that keeps state such as a round-robin step, the next expert).
    Called by :func:`add_experts`; call it after turning checkpointing on in a backbone that has experts.
    """
    for name, module in model.named_modules():
        if not checkpoints_plainly(module):
            continue
        replay_unsafe = [
            n for n, c in find_containers(module) if getattr(c.router, "stochastic", True) or router_keeps_state(c.router)
        ]
        if replay_unsafe:
            warn_user(
                f"{name or type(model).__name__} has gradient checkpointing on and now holds stochastic or stateful "
                f"routers ({replay_unsafe[0]}...): a plain torch.utils.checkpoint recomputes with other experts, which "
                "gives wrong gradients. Turn its checkpointing off, or checkpoint with "
                "mergekit_video.experts.checkpoint_routed."
            )
            return


def collapse_experts(
    model: nn.Module,
    strategy: str | None = None,
    *,
    base: nn.Module | Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Replace every container in ``model`` by its collapsed dense module (in place).

    ``strategy=None`` collapses each container with its own eval merge (``merge=`` of
    :func:`add_experts`: ``"mean"``, MoTE Eq. 6, unless set otherwise), so the export holds the
    weights eval mode ran; a strategy name merges every container that way, with ``kwargs``.
    With a weight-merge strategy the result has exactly the original module classes and
    state-dict keys, so it loads into the unmodified backbone; a container shared under
    several names (tied weights) becomes one dense module under all of them. ``base`` (the
    model before surgery, or its state dict) supplies per-container base weights for task
    arithmetic, and ``seed=s`` gives container i the seed s + i (DARE), as :func:`use_merge`
    does (see :func:`~mergekit_video.experts.per_container_merge_kwargs`). Atomic: on an
    error (raised as :class:`SurgeryError`) the model is unchanged. Returns ``model``.
    """
    containers = find_containers(model)
    if not containers:
        raise SurgeryError("collapse_experts: the model has no ExpertContainer")
    if containers[0][0] == "":
        raise SurgeryError("collapse_experts: the model itself is an ExpertContainer; use its collapse() method")
    names = _container_names(model)
    for name in names:
        outer = _enclosing_container(name, names)
        if outer is not None:
            raise SurgeryError(f"the ExpertContainer {name!r} lies inside the ExpertContainer {outer!r}: "
                               "nested containers cannot be collapsed")
    aliases: dict[int, list[str]] = {}
    for name, c in names.items():  # a shared container is replaced under every name, by one dense module
        aliases.setdefault(id(c), []).append(name)
    try:  # each container's slice of base and, for seeded merges (DARE), seed + index
        per_container = per_container_merge_kwargs(containers, kwargs, base, strategy=strategy)
    except ValueError as exc:
        raise SurgeryError(str(exc)) from None
    # every dense module is built before the first is swapped in, so an error leaves the model as it was
    denses = []
    with non_float_notices():  # differing non-float tensors of every container: one warning for the call
        for (name, container), kw in zip(containers, per_container):
            try:
                denses.append(container.collapse(strategy, **kw))
            except (ValueError, TypeError) as exc:
                raise SurgeryError(f"collapsing {name!r} with {strategy or container.merge!r}: {exc}") from exc
    for (_, container), dense in zip(containers, denses):
        for name in aliases[id(container)]:
            parent, child = _get_parent(model, name)
            setattr(parent, child, dense)
    return model
