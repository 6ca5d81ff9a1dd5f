"""Expert containers: N same-structure modules behind a router, merged for inference.

:class:`ExpertContainer` is a drop-in replacement for one module (say an FFN):

- in **train** mode its router picks the expert(s) that run (per batch, sample or token);
- in **eval** mode it runs one dense module holding the merge of the experts
  (``mean`` by default, MoTE Eq. 6). The merge is computed once and cached until an
  expert tensor changes (tracked by tensor version counters);
- :meth:`ExpertContainer.merged_forward` runs a differentiable forward with weights
  Σ wᵢ·θᵢ, as :func:`torch.func.functional_call` would (used by weight-merging regularization);
- :meth:`ExpertContainer.collapse` returns a dense module of the experts' own class.

A *routing plan* overrides what a container does for the next forwards without touching
the model's code. :func:`routing_plan` sets one on every container of a model; the
helpers :func:`use_expert`, :func:`use_merge_weights` and :func:`use_merge` cover the
common cases. A plan is one of

- ``"routed"`` / ``"merged"``: the train / eval behaviour, whatever the mode;
- ``"ensemble"``: every expert runs on all inputs and the outputs are averaged;
- an ``int`` i: expert i alone;
- a ``[N]`` tensor of merge coefficients: :meth:`merged_forward` with those weights;
- a list of ``(batch_size, plan)`` segments: the batch is split along the container's
  ``batch_dim`` (0 by default) and each segment runs its own plan (two training paths in one
  batched forward);
- a :class:`~mergekit_video.routers.Router`: routes with it instead of the container's own
  (:func:`use_router`; per-sample random routing at evaluation, MoTE Table 2c).
"""

from __future__ import annotations

import collections
import copy
import inspect
import operator
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

from .merging import (
    buffer_coefficients,
    buffer_merge as _merge_buffer,
    check_merge_arguments,
    convex_buffer_weights,
    default_seed,
    is_output_space,
    linear_combinations,
    merge_coefficients,
    merge_state_dicts,
    merge_tensors,
    non_float_notices,
    requires_base,
    resolve_strategy,
)
from .routers import GRANULARITIES, Router, RouterOutput, build_router, num_groups
from .utils.warn import warn_user

Plan = Union[str, int, torch.Tensor, Router, Sequence[tuple[int, Any]]]

# Module structure changes (a submodule, parameter or buffer registered anywhere) bump this
# counter; lookups that walk a module tree (the containers of a model, the tensors of the
# experts) are cached against it instead of being redone in every forward.
_structure_epoch = 0


def _bump_structure_epoch(*_: Any) -> None:
    global _structure_epoch
    _structure_epoch += 1


_module.register_module_module_registration_hook(_bump_structure_epoch)
_module.register_module_parameter_registration_hook(_bump_structure_epoch)
_module.register_module_buffer_registration_hook(_bump_structure_epoch)


def _bump_versions_after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Fused optimizer kernels (torch.optim's ``fused=True``) write parameters without bumping their
    version counters, and optimizers from other libraries may do the same: bump those of the
    parameters the optimizer holds, so that the eval merges cached from exactly those tensors are
    merged again (torch's for-loop and foreach kernels bump them themselves)."""
    if type(optimizer).__module__.startswith("torch.optim.") and not any(g.get("fused") for g in optimizer.param_groups):
        return
    increment_version([p for g in optimizer.param_groups for p in g["params"]])


register_optimizer_step_post_hook(_bump_versions_after_step)

_version_of = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr

#: One tensor name of the experts → where each expert keeps it: ``(owner._parameters or owner._buffers, leaf)``.
_Slot = tuple[str, list[tuple[dict, str]]]


class _SlotTable:
    """Where the experts keep their tensors, built once per module structure (see ``_structure_epoch``).

    ``slots``: one entry per distinct tensor of expert 0 (first name; a tied tensor once), with
    each expert's slot. ``flat``: every expert's slot, slot-major. ``swaps``: every slot of
    expert 0 as ``(dict, leaf, slot index)``, a tied tensor under each of its names.
    ``aliases``: every name of each slot. ``buffers``: the indices of buffer slots.
    """

    __slots__ = ("epoch", "slots", "flat", "swaps", "aliases", "buffers")

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        self.epoch = _structure_epoch
        self.slots: list[_Slot] = []
        self.swaps: list[tuple[dict, str, int]] = []
        self.aliases: list[list[str]] = []
        self.buffers: list[int] = []
        e0 = experts[0]
        index_of: dict[int, int] = {}  # id(tensor of expert 0) → slot index
        for kind, named in (("_parameters", e0.named_parameters(remove_duplicate=False)), ("_buffers", e0.named_buffers(remove_duplicate=False))):
            for name, t in named:
                prefix, _, leaf = name.rpartition(".")
                own = getattr(e0.get_submodule(prefix), kind)
                i = index_of.get(id(t))
                if i is None:  # a new tensor: its slot in every expert, by name
                    i = index_of[id(t)] = len(self.slots)
                    self.slots.append((name, [(getattr(e.get_submodule(prefix), kind), leaf) for e in experts]))
                    self.aliases.append([])
                    if kind == "_buffers":
                        self.buffers.append(i)
                self.aliases[i].append(name)
                self.swaps.append((own, leaf, i))
        self.flat = [ref for _, refs in self.slots for ref in refs]


def _merge_key(strategy: str, kwargs: Mapping[str, Any]) -> Any:
    """A hashable key of a merge: tensors and other unhashable arguments by identity and version."""

    def freeze(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            try:
                version = v._version
            except RuntimeError:  # inference tensors have no version: never equal to an earlier key
                return ("tensor", id(v), object())
            try:  # by storage: a module's state_dict() gives new detached views of the same tensors every call
                where: Any = (v.data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype, str(v.device))
            except RuntimeError:  # no storage (fake / meta tensors)
                where = id(v)
            return ("tensor", where, version)
        if isinstance(v, Mapping):
            return ("map", tuple(sorted((str(k), freeze(x)) for k, x in v.items())))
        if isinstance(v, (list, tuple)):
            return ("seq", tuple(freeze(x) for x in v))
        if isinstance(v, nn.Module):  # a base module: its tensors (changed in place: another key)
            return ("module", freeze(v.state_dict(keep_vars=True)))
        try:
            hash(v)
        except TypeError:
            return ("object", object())  # unhashable and unknown (a numpy array): never matches
        return v

    return (strategy, freeze(kwargs))


def _argument_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (mappings, sequences and modules searched), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, nn.Module):  # a base module: its parameters and buffers
        return list(value.state_dict(keep_vars=True).values())
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _argument_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _argument_tensors(v)]
    return []


def _holds_module(value: Any) -> bool:
    """Whether ``value`` (mappings and sequences searched) holds an ``nn.Module`` (a base given as a module)."""
    if isinstance(value, nn.Module):
        return True
    if isinstance(value, Mapping):
        return any(_holds_module(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_module(v) for v in value)
    return False


def _copy_containers(value: Any) -> Any:
    """``value`` with its lists, tuples and dicts copied, recursively; tensors, modules and the rest shared."""
    if isinstance(value, Mapping):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_containers(v) for v in value) if type(value) in (list, tuple) else value
    return value


def _data_pointers(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """Each tensor's data address (None where tensors have no storage: fake or meta tensors)."""
    try:
        return list(map(_data_ptr, tensors))  # map over the C method: no Python frame per tensor
    except RuntimeError:
        return None


def _all_equal(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor equals the first (False where values cannot be read: torch.func batched tensors)."""
    try:
        return all(torch.equal(tensors[0], t) for t in tensors[1:])
    except RuntimeError:
        return False


def _module_kind(m: nn.Module) -> type:
    """A submodule's class for the structure check: a parametrized module's original class
    (``torch.nn.utils.parametrize`` makes a new ``Parametrized<Class>`` for every module)."""
    from torch.nn.utils import parametrize

    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def check_same_structure(experts: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` naming the first submodule or tensor in which the experts differ.

    Experts must be of one class with the same submodules (names, classes and ``extra_repr``
    settings: an activation, a dropout rate, a LayerNorm eps), no shared parameters, and the same
    tensor names, shapes, dtypes and devices.
    """
    if len(experts) == 0:
        raise ValueError("ExpertContainer needs at least one expert")
    ref = experts[0]
    ref_sd = ref.state_dict()
    ref_ids = {id(p) for p in ref.parameters()}
    for i, e in enumerate(experts[1:], 1):
        if e is ref or any(id(p) in ref_ids for p in e.parameters()):
            raise ValueError(f"expert {i} shares parameters with expert 0; pass independent copies (copy.deepcopy)")
        if _module_kind(e) is not _module_kind(ref):
            raise ValueError(f"expert {i} is a {type(e).__name__} but expert 0 is a {type(ref).__name__}")
        sd = e.state_dict()
        for k, t in ref_sd.items():
            if k not in sd:
                raise ValueError(f"expert {i} has no tensor {k!r}, which expert 0 has")
            if sd[k].shape != t.shape:
                raise ValueError(
                    f"tensor {k!r} differs: expert 0 has shape {tuple(t.shape)}, expert {i} has {tuple(sd[k].shape)}"
                )
            if sd[k].dtype != t.dtype:
                raise ValueError(f"tensor {k!r} differs: expert 0 has dtype {t.dtype}, expert {i} has {sd[k].dtype}")
            if sd[k].device != t.device:
                raise ValueError(f"tensor {k!r} differs: expert 0 has it on {t.device}, expert {i} on {sd[k].device} "
                                 "(move the experts to one device first)")
        for k in sd:
            if k not in ref_sd:
                raise ValueError(f"expert {i} has tensor {k!r}, which expert 0 lacks")
        # submodules: same names, classes and settings (a parameter-free ReLU vs Tanh has no tensor to differ)
        ref_modules, modules = dict(ref.named_modules()), dict(e.named_modules())
        for name, m in ref_modules.items():
            other = modules.get(name)
            label = f"submodule {name!r}" if name else "the module"
            if other is None:
                raise ValueError(f"expert {i} has no {label}, which expert 0 has")
            if _module_kind(other) != _module_kind(m) or other.extra_repr() != m.extra_repr():
                raise ValueError(
                    f"{label} differs: expert 0 has {type(m).__name__}({m.extra_repr()}), "
                    f"expert {i} has {type(other).__name__}({other.extra_repr()})"
                )
        for name in modules:
            if name not in ref_modules:
                raise ValueError(f"expert {i} has submodule {name!r}, which expert 0 lacks")


def _tensor_output(y: Any, where: str, combining: str) -> torch.Tensor:
    """``y`` when it is a tensor; else a TypeError naming ``where`` (outputs such as ``nn.MultiheadAttention``'s
    ``(out, weights)`` tuple cannot be ``combining``)."""
    if isinstance(y, torch.Tensor):
        return y
    raise TypeError(
        f"{where}: {combining} needs each expert to return one tensor, but it returned a {type(y).__name__} "
        "(such as nn.MultiheadAttention's (output, weights)); route per batch, merge weights instead, "
        "or wrap the expert so that it returns a tensor"
    )


def _sequence_first_submodule(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The first (name, submodule) of ``module`` (itself: ``""``) with ``batch_first=False``, or None."""
    return next(((n, m) for n, m in module.named_modules() if getattr(m, "batch_first", None) is False), None)


def _sequence_first_message(found: tuple[str, nn.Module], *, label: str, fix: str) -> str:
    name, module = found
    what = f"holds a {type(module).__name__} ({name!r})" if name else f"is a {type(module).__name__}"
    return (f"{label} {what} with batch_first=False, so its input is sequence-first ([S, B, ...]), and per-sample "
            f"routing would split dim 0, the sequence, among the experts: pass batch_dim=1 ({fix}), or build the module "
            "with batch_first=True; if its input is batch-first nevertheless, pass batch_dim=0")


def sequence_first_problem(module: nn.Module, *, label: str, fix: str) -> str | None:
    """Why per-sample routing of ``module`` along dim 0 would split the wrong axis, or None.

    Per-sample routing (and routing-plan segments) split a container's input along its ``batch_dim``, 0
    unless given. A module holding a submodule with ``batch_first=False`` (``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``'s attention, ``nn.LSTM`` by default) reads sequence-first inputs
    ``[S, B, ...]``. ``label`` names the module in the message and ``fix`` is the call to suggest.
    """
    found = _sequence_first_submodule(module)
    return None if found is None else _sequence_first_message(found, label=label, fix=fix)


def _generator_as_seed(strategy: str | Callable[..., torch.Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a ``generator=`` of a seeded strategy (DARE) replaced by a seed drawn from it once.

    A container merges again after every change of its experts (and :meth:`ExpertContainer.collapse`
    merges once more): a live generator would draw other masks each time, so the evaluated merge and
    the exported one would differ. Containers given one generator in turn draw their own seeds."""
    g = kwargs.get("generator")
    if not isinstance(g, torch.Generator):
        return kwargs
    try:
        params = inspect.signature(resolve_strategy(strategy)).parameters
    except Exception:  # noqa: BLE001 - an unknown strategy: check_merge_arguments names it
        return kwargs
    if "seed" not in params or "generator" not in params:
        return kwargs
    seed = int(torch.randint(0, 2**62, (), generator=g, device=g.device))
    return {**{k: v for k, v in kwargs.items() if k != "generator"}, "seed": seed}


class ExpertEnsemble(nn.Module):
    """Output-space "merge": runs all N experts and averages their outputs (N forwards)."""

    def __init__(self, experts: Sequence[nn.Module], *, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        w = torch.full((len(experts),), 1.0 / len(experts)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.numel() != len(experts) or abs(float(w.sum())) < 1e-12:
            raise ValueError(f"ensemble weights {w.tolist()} must give one weight per expert ({len(experts)}) and not sum to zero")
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self._weight_values = tuple((w / w.sum()).tolist())  # Python floats: no device read per forward on a GPU

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Σ wᵢ·expertᵢ(x): N forwards, the output-space reference for weight merges."""
        out = None
        for w, e in zip(self._weight_values, self.experts):
            y = _tensor_output(e(x, *args, **kwargs), "ensemble merge", "averaging expert outputs") * w
            out = y if out is None else out + y
        return out


class ExpertContainer(nn.Module):
    """N experts of one structure behind a router; a merged dense module in eval.

    Args:
        experts: modules of one class with identical tensor names, shapes and dtypes.
        router: a :class:`~mergekit_video.routers.Router` or a registered router name.
        merge: merge strategy used in eval mode and by :meth:`collapse` by default
            (a registered name such as ``"mean"`` or ``"ensemble"``).
        merge_kwargs: keyword arguments for the merge strategy.
        router_kwargs: keyword arguments when ``router`` is a name.
        batch_dim: the input's batch axis, along which per-sample routing and routing-plan
            segments split it (``None``: 0, inputs ``[B, ...]``). A sequence-first module
            (``batch_first=False``: ``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention``,
            ``nn.LSTM``; inputs ``[S, B, ...]``) needs ``batch_dim=1``: a per-sample router on experts
            holding one is refused unless ``batch_dim`` is given. Routers always see ``[B, ...]``.

    State-dict keys are ``experts.{i}.<expert keys>`` plus the router's own (if any).
    """

    #: Merges of other strategies kept for a switch back (see :meth:`set_merge`); each is one dense
    #: copy of an expert, so lower it for large experts on a small device.
    merge_pool_size: int = 4

    def __init__(
        self,
        experts: Sequence[nn.Module],
        router: str | Router = "multinomial",
        merge: str = "mean",
        *,
        merge_kwargs: Mapping[str, Any] | None = None,
        router_kwargs: Mapping[str, Any] | None = None,
        batch_dim: int | None = None,
    ) -> None:
        super().__init__()
        if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)):
            raise TypeError(f"batch_dim must be an int (the input's batch axis) or None, got {batch_dim!r}")
        experts = list(experts)
        check_same_structure(experts)
        nested = next((n for n, m in experts[0].named_modules() if isinstance(m, ExpertContainer)), None)
        if nested is not None:  # merging, collapsing and surgery assume experts of plain modules
            raise ValueError(
                f"expert 0 {f'holds an ExpertContainer at {nested!r}' if nested else 'is an ExpertContainer'}: containers cannot be nested; "
                "collapse it first (collapse_experts) or put experts beside it"
            )
        self.experts = nn.ModuleList(experts)
        self.router = build_router(router, num_experts=len(experts), module=experts[0], **dict(router_kwargs or {}))
        if self.router.num_experts != len(experts):
            raise ValueError(f"router is built for {self.router.num_experts} experts but the container has {len(experts)}")
        #: the input's batch axis (per-sample routing and plan segments split along it); given or 0
        self.batch_dim = 0 if batch_dim is None else int(batch_dim)
        self.batch_dim_given = batch_dim is not None  # False: a per-sample router on a sequence-first expert is refused
        if getattr(self.router, "granularity", None) == "sample":
            problem = self.sequence_first_problem(fix="ExpertContainer(..., batch_dim=1)", label="the expert")
            if problem is not None:
                raise ValueError(problem)
        object.__setattr__(self, "_merge_cache", None)  # (tensors merged, versions, module, argument versions, data, base module's)
        object.__setattr__(self, "_merge_pool", collections.OrderedDict())  # merges of other strategies, by _merge_key
        self.set_merge(merge, **dict(merge_kwargs or {}))  # fails now on an unknown name, not at the first eval forward
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_routing: RouterOutput | None = None
        self.merge_count = 0  # how many times the eval merge was computed
        self._plan: Plan | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # ``container.router = r`` after construction gets the constructor's checks
        if name == "router" and "batch_dim_given" in self.__dict__:
            if not isinstance(value, nn.Module):
                raise TypeError(f"{self._label()}: router must be a Router (build one with build_router), got {type(value).__name__}")
            if getattr(value, "num_experts", self.num_experts) != self.num_experts:
                raise ValueError(f"{self._label()}: the router is built for {value.num_experts} experts but the container has {self.num_experts}")
            if getattr(value, "granularity", None) == "sample":
                problem = self.sequence_first_problem(fix="ExpertContainer(..., batch_dim=1) or add_experts(..., batch_dim=1)")
                if problem is not None:
                    raise ValueError(problem)
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # Drop-in replacement: attributes the container lacks are read from expert 0, so
        # backbone code that inspects its module (open_clip's text tower reads
        # ``resblocks[0].mlp.c_fc.weight.dtype``) keeps working after surgery.
        try:
            return super().__getattr__(name)
        except AttributeError as err:
            experts = self.__dict__.get("_modules", {}).get("experts")
            if experts is None or name.startswith("__") or len(experts) == 0:
                raise
            try:
                return getattr(experts[0], name)
            except AttributeError:
                raise err from None

    @property
    def num_experts(self) -> int:
        """N, the number of experts."""
        return len(self.experts)

    @property
    def merge(self) -> str:
        """The eval merge strategy; assigning one (with default arguments) invalidates the cached merge."""
        return self._merge

    @merge.setter
    def merge(self, strategy: str) -> None:
        self.set_merge(strategy)

    @property
    def merge_kwargs(self) -> Mapping[str, Any]:
        """Keyword arguments of the eval merge strategy (read-only; change them with :meth:`set_merge`)."""
        return types.MappingProxyType(self._merge_kwargs)

    # -- public API ---------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Train mode: the router's expert(s) run on ``x``; eval mode: the cached merged module (MoTE Eq. 6 by default)."""
        if torch.compiler.is_exporting():
            raise RuntimeError(
                "torch.export cannot trace an ExpertContainer (a cached merge, or a routed choice of expert); "
                "export the collapsed model instead: mergekit_video.collapse_experts(model) turns every container "
                "into its dense merged module (for a saved MoTE model: mergevid export MODEL OUT --dense)"
            )
        plan = self._plan
        if "_aux_dropped_by_plan" in self.__dict__:  # set below by a plan forward that drops routed aux losses
            del self.__dict__["_aux_dropped_by_plan"]
        if plan is None:
            if not self.training:  # the eval fast path: the cached merge
                if self.last_routing is not None or self.aux_losses:
                    self._forget_routing()
                if _functorch_transforms_active():  # vmap / grad / jacrev (torch.func)
                    return self._merged_under_transforms(x, args, kwargs)
                if torch.is_grad_enabled() and "_eval_grad_warned" not in self.__dict__:
                    self._warn_if_experts_need_grad()
                return self._merged_call()(x, *args, **kwargs)
            plan = "routed"
        if not (isinstance(plan, str) and plan == "routed") and (self.last_routing is not None or self.aux_losses):
            # a forward that does not route (or whose routed segments set them anew) leaves no
            # routing record: aux losses of an earlier graph would be backpropagated twice
            if self.aux_losses and self.training:
                object.__setattr__(self, "_aux_dropped_by_plan", True)  # said by collect_aux_losses if read after
            self._forget_routing()
        if isinstance(plan, (list, tuple)):
            return self._segmented_forward(plan, x, args, kwargs)
        return self._run(plan, x, args, kwargs)

    def _forget_routing(self) -> None:
        """Drop the last routing and its auxiliary losses."""
        self.aux_losses, self.last_routing = {}, None

    def merged_forward(self, x: torch.Tensor, weights: torch.Tensor | Sequence[float], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forward with weights Σ wᵢ·θᵢ, differentiable in the experts and in ``weights``.

        Args:
            x: input of the expert module.
            weights: ``[N]`` coefficients (not renormalised).
        """
        # a tensor keeps its float dtype (float64 coefficients stay exact); Python floats are float64
        w = weights if isinstance(weights, torch.Tensor) and weights.is_floating_point() else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (self.num_experts,):
            raise ValueError(f"merged_forward needs weights of shape [{self.num_experts}] (one per expert), got {list(w.shape)}")
        merged = self._merge_slots(w)
        swaps = self._slots_cache.swaps  # refreshed by _merge_slots if a tensor was deleted
        # expert 0's code runs on the merged tensors, swapped into its own parameter and buffer
        # slots (a tied tensor under each of its names) for the call, as functional_call does,
        # without its per-call bookkeeping
        originals = [d[leaf] for d, leaf, _ in swaps]
        try:
            for d, leaf, i in swaps:
                d[leaf] = merged[i]
            return self.experts[0](x, *args, **kwargs)
        finally:
            for (d, leaf, _), t in zip(swaps, originals):
                d[leaf] = t

    def collapse(self, strategy: str | None = None, *, base: nn.Module | Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> nn.Module:
        """Return a dense module of the experts' own class holding the merged weights.

        ``strategy="ensemble"`` returns an :class:`ExpertEnsemble` instead (no weight merge).
        ``base`` is the pre-expert module or its state dict, for task-arithmetic strategies.
        Under a strategy that is not a fixed linear combination (``task_arithmetic``, ``ties``,
        ``dare``, ``slerp``) floating buffers (BatchNorm running statistics) are a convex
        combination (:func:`~mergekit_video.merging.buffer_coefficients`: slerp's (1 − t, t), else
        the mean): a variance's task vector can make it negative. Under a linear one they take its
        weights normalised, or the mean when a weight is negative.
        """
        if strategy is None:
            strategy, kwargs = self.merge, {**self.merge_kwargs, **kwargs}
        if base is None:  # a task-arithmetic eval merge keeps its base among its arguments
            base = self._with_own_base(strategy, kwargs).pop("base", None)
        kwargs.pop("base", None)
        check_merge_arguments(strategy, {**kwargs, "base": base}, num_experts=self.num_experts)
        if is_output_space(strategy):
            return ExpertEnsemble([copy.deepcopy(e) for e in self.experts], **kwargs).train(self.training)
        # differing non-float tensors (BatchNorm counters): one warning naming this container (the first per tensor)
        with torch.no_grad(), non_float_notices(where=self._label()):
            base_sd = base.state_dict() if isinstance(base, nn.Module) else base
            coeff = merge_coefficients(strategy, self.num_experts, **kwargs)
            dense = self._copy_of_first_expert()
            if coeff is not None:
                # every parameter and buffer, non-persistent buffers included (not in state_dict)
                warned = self.__dict__.setdefault("_non_float_warned", set())
                tensors = self._slot_tensors()
                # weights summing to 1: a tensor equal in every expert (upcycled, untrained) stays bit-exact
                convex = abs(float(coeff.sum()) - 1.0) < 1e-9
                for (name, _), ts, value in zip(self._tensor_slots(), tensors, self._merge_slots(coeff, tensors)):
                    if convex and _all_equal(ts):
                        continue  # the dense copy of expert 0 holds it
                    # counters, indices: never averaged; expert 0's, with a warning when they differ (once per tensor)
                    if not ts[0].is_floating_point() and name not in warned and not _all_equal(ts):
                        value = merge_tensors(ts, name=name)
                        warned.add(name)
                    owner, _, leaf = name.rpartition(".")
                    getattr(dense.get_submodule(owner), leaf).copy_(value)
            else:
                # the strategy merges the parameters; buffers are averaged (below)
                tensors = self._slot_tensors()
                table = self._slots_cache
                buffer_names = {name for i in table.buffers for name in table.aliases[i]}
                sds = [{k: v for k, v in e.state_dict().items() if k not in buffer_names} for e in self.experts]
                if base_sd is not None:
                    base_sd = {k: v for k, v in base_sd.items() if k not in buffer_names}
                merged = merge_state_dicts(sds, strategy, base=base_sd, **kwargs)
                missing, unexpected = dense.load_state_dict(merged, strict=False)
                if unexpected or set(missing) - buffer_names:  # pragma: no cover - the experts share one structure
                    raise RuntimeError(f"collapse: merged keys do not fit the dense module ({missing}, {unexpected})")
                # floating buffers (BatchNorm running statistics) are statistics of data, not task
                # vectors: base + Σ(bᵢ − base) can turn a variance negative. They are a convex
                # combination (slerp's lerp weights, else the mean); entries equal in every expert
                # (a causal mask of -inf) are kept as they are.
                # Other buffers (counters) are expert 0's, as in a linear merge.
                mean_w = buffer_coefficients(strategy, self.num_experts, **kwargs)
                warned = self.__dict__.setdefault("_non_float_warned", set())
                for i in table.buffers:
                    name, ts = table.slots[i][0], tensors[i]
                    if ts[0].is_floating_point():
                        value = _merge_buffer(ts, mean_w)
                    elif name not in warned and not _all_equal(ts):
                        value = merge_tensors(ts, name=name)  # expert 0's, with a warning (once per tensor)
                        warned.add(name)
                    else:
                        continue  # the dense copy of expert 0 holds it
                    owner, _, leaf = name.rpartition(".")
                    getattr(dense.get_submodule(owner), leaf).copy_(value)
        # a merged parameter is trainable if any expert's is (the copy of expert 0 has only its flags)
        slots, buffers = self._tensor_slots(), self._slots_cache.buffers
        for i, ((name, _), ts) in enumerate(zip(slots, self._slot_tensors())):
            if i not in buffers and ts[0].is_floating_point():
                owner, _, leaf = name.rpartition(".")
                dense.get_submodule(owner)._parameters[leaf].requires_grad_(any(t.requires_grad for t in ts))
        dense.train(self.training)
        return dense

    def _warn_if_experts_need_grad(self) -> None:
        if any(p.requires_grad for p in self.experts.parameters()):
            warn_user(
                "an eval-mode ExpertContainer runs its cached merge, which is a constant: gradients reach the "
                "input but not the experts. To train through the merge, use train mode, or "
                "use_merge_weights(model, weights) (differentiable, MoTE Eq. 7); for evaluation, torch.no_grad()."
            )
            object.__setattr__(self, "_eval_grad_warned", True)

    def _copy_of_first_expert(self) -> nn.Module:
        """``deepcopy(experts[0])``, also while its slots hold graph tensors (``torch.func.functional_call``)."""
        self._tensor_slots()
        targets = [(d, leaf) for d, leaf, _ in self._slots_cache.swaps]
        originals = [d[leaf] for d, leaf in targets]
        try:
            for (d, leaf), t in zip(targets, originals):
                if isinstance(t, torch.Tensor) and not t.is_leaf:
                    d[leaf] = t.detach()  # deepcopy refuses non-leaf tensors; the copy's values are overwritten anyway
            return copy.deepcopy(self.experts[0])
        finally:
            for (d, leaf), t in zip(targets, originals):
                d[leaf] = t

    def merged_module(self) -> nn.Module:
        """The cached eval-mode dense module, recomputed only after an expert tensor changed."""
        self._merged_call()
        return self._merge_cache[2]

    def _refuse_data_parallel_replica(self) -> None:
        """Merged forwards cannot run in an ``nn.DataParallel`` replica (routed ones can)."""
        if self.__dict__.get("_is_replica"):
            raise RuntimeError(
                f"{self._label()}: an nn.DataParallel replica cannot merge its experts (DataParallel copies the "
                "parameters of each replica as plain tensors, which the container does not see: the merge would be "
                "of the original's tensors or of expert 0's). Train with DistributedDataParallel (torchrun; "
                "mergevid run does), or evaluate the collapsed model (mergekit_video.collapse_experts(model)) "
                "under DataParallel"
            )

    def _merged_call(self) -> Callable[..., Any]:
        """The cached merge's forward, merged again first if an expert tensor changed."""
        self._refuse_data_parallel_replica()
        cache = self._merge_cache
        if cache is None or not self._merge_is_current(cache):
            try:
                cache = self._remerge()
            except (ValueError, TypeError) as err:  # a merge argument that does not fit (a base of other shapes)
                raise type(err)(f"{self._label()}: {err}") from err
        dense = cache[2]
        # a private module: skip nn.Module.__call__ unless some hook wants to see the call
        if dense._forward_hooks or dense._forward_pre_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return dense
        return dense.forward

    def _merged_under_transforms(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The eval forward inside ``torch.func`` transforms.

        Experts holding plain tensors (a transform over the input: ``vmap(model)``, ``jacrev``) are
        merged as ever, the cache built outside the transforms (they refuse ``requires_grad_`` and
        storage reads); only the dense forward runs under them. Experts holding the transforms'
        tensors (``functional_call`` under ``grad``/``vmap`` over the parameters, as
        ``torch.func.stack_module_state`` ensembles do) are merged in the graph, differentiable,
        never cached: linear strategies only (their coefficients, :func:`merge_coefficients`).
        """
        if not any(map(_is_functorch_tensor, self._slot_tensors(flat=True))):
            with _interpreters_cleared():
                call = self._merged_call()
            return call(x, *args, **kwargs)
        coeff = merge_coefficients(self.merge, self.num_experts, **self._merge_kwargs)
        if coeff is None:
            raise RuntimeError(
                f"{self._label()}: under torch.func transforms over the experts' tensors, an eval-mode container merges "
                f"with a linear strategy only (its merge is {self.merge!r}); collapse the experts first "
                f"(mergekit_video.collapse_experts(model, {self.merge!r})) and transform the dense model"
            )
        return self.merged_forward(x, coeff, *args, **kwargs)

    def _merge_is_current(self, cache: tuple) -> bool:
        """Whether the experts still hold the tensors the cache was merged from, unchanged.

        This runs on every eval forward, so it reads each expert tensor's slot and version
        counter and nothing else: in-place writes (optimizer steps, ``load_state_dict``) bump
        versions; a replaced tensor (``torch.func.functional_call``, ``load_state_dict(assign=True)``,
        a new ``nn.Parameter``) is another object in the slot. Device and dtype moves go through
        :meth:`_apply`, which drops the cache. Inference tensors (a model built under
        ``torch.inference_mode()``) have no version counter: their merge is never current.
        """
        table = self.__dict__.get("_slots_cache")
        if table is None or table.epoch != _structure_epoch:
            self._tensor_slots()
            table = self._slots_cache
        try:
            tensors = [d[leaf] for d, leaf in table.flat]
        except KeyError:  # a tensor was deleted: the merge is stale and the slots are re-read on re-merging
            return False
        merged_from, versions = cache[0], cache[1]
        if len(tensors) != len(merged_from) or not all(map(operator.is_, tensors, merged_from)):
            return False
        if cache[3] and list(map(_version_of, self._merge_arg_tensors)) != cache[3]:
            return False  # a tensor argument of the merge (weights=..., base=...) was written in place
        if cache[5] is not None:  # a base module: a tensor of it replaced (new Parameter, assign=True, .data =, .double())
            current = _argument_tensors(self._merge_kwargs)
            if len(current) != len(cache[5][0]) or not all(map(operator.is_, current, cache[5][0])):
                return False
            if _data_pointers(current) != cache[5][1]:
                return False
        if versions is None or list(map(_version_of, tensors)) != versions:
            return False
        return cache[4] is None or _data_pointers(tensors) == cache[4][0]  # new data through .data = (no version bump)

    @torch.compiler.disable  # a one-off, no-grad computation: eager under torch.compile, not traced (no graph breaks inside)
    def _remerge(self) -> tuple:
        # built outside inference mode: a cache filled inside torch.inference_mode() would
        # hold inference tensors and break a later eval forward that needs autograd
        if self.__dict__.get("_merge_arg_module"):  # the base module's tensors now (collapse() reads them afresh)
            object.__setattr__(self, "_merge_arg_tensors", _argument_tensors(self._merge_kwargs))
        with torch.inference_mode(False):
            dense = self.collapse()
        dense.eval()
        for p in dense.parameters():
            p.requires_grad_(False)
        tensors = self._slot_tensors(flat=True)
        try:
            versions = list(map(_version_of, tensors))
        except RuntimeError:  # inference tensors (a model built under inference_mode) have no version counter
            versions = None  # changes cannot be seen: every eval forward merges again
            if "_no_versions_warned" not in self.__dict__:
                warn_user(
                    "ExpertContainer experts are inference tensors (created under torch.inference_mode()), which "
                    "have no version counters: the eval merge cannot be cached and is recomputed in every forward. "
                    "Build or load the model outside inference_mode to cache it."
                )
                object.__setattr__(self, "_no_versions_warned", True)
        try:
            argument_versions = list(map(_version_of, self._merge_arg_tensors))
        except RuntimeError:  # an inference tensor as argument: its changes cannot be seen
            argument_versions = []
        pointers = _data_pointers(tensors)
        # the merged-from data is kept alive with its addresses: freed, its memory could come back under the same
        # address after two `.data =` (a stale merge would pass the check)
        module_arguments = None
        if self.__dict__.get("_merge_arg_module"):
            arg_tensors = self._merge_arg_tensors
            module_arguments = (arg_tensors, _data_pointers(arg_tensors), [t.detach() for t in arg_tensors])  # refs keep addresses
        cache = (tensors, versions, dense, argument_versions, None if pointers is None else (pointers, [t.detach() for t in tensors]),
                 module_arguments)
        object.__setattr__(self, "_merge_cache", cache)
        self.merge_count += 1
        return cache

    def invalidate_merge(self) -> None:
        """Drop the cached merges (needed only after writing into expert tensors through ``.data``: ``p.data.add_(1)``)."""
        object.__setattr__(self, "_merge_cache", None)
        self.__dict__.get("_merge_pool", {}).clear()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> ExpertContainer:
        # .to() / .cuda() / .double() replace tensor data without bumping versions
        self.invalidate_merge()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> ExpertContainer:
        """Switching to training mode drops the cached merge: the experts are about to change.

        Tensor version counters already catch in-place updates; this also covers updates
        that bypass them (writes through ``.data``, kernels that do not bump versions).
        Switching mode also forgets the last routing and its auxiliary losses.
        """
        if mode:
            self.invalidate_merge()
        if mode != self.training:
            self.aux_losses, self.last_routing = {}, None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles leave out the last forward's routing: its auxiliary losses are
        # graph tensors (deepcopy refuses them), and the cached merge is rebuilt on demand
        state = self.__dict__.copy()
        state["aux_losses"], state["last_routing"], state["_merge_cache"] = {}, None, None
        state["_plan"] = None  # a routing plan lives only inside its with-block, never in a copy
        state["_merge_pool"] = collections.OrderedDict()
        state.pop("_slots_cache", None)  # refers to the experts' own dicts
        state.pop("_no_versions_warned", None)
        state.pop("_sequence_first_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("batch_dim", 0)  # pickled before batch_dim existed: batch first
        state.setdefault("batch_dim_given", False)
        super().__setstate__(state)
        # the key names tensors by identity: the copy's arguments are other tensors
        object.__setattr__(self, "_merge_key", _merge_key(self._merge, self._merge_kwargs))

    def set_merge(self, strategy: str, **kwargs: Any) -> None:
        """Change the eval merge strategy.

        The merge of the strategy set before is kept, with up to :attr:`merge_pool_size` others:
        switching back and forth (an evaluation comparing merges batch by batch) merges each once,
        as long as the experts do not change (the same check as every eval forward). A ``base``
        given once (the weights the experts were tuned from) is the container's: later
        task-arithmetic merges (``ties``, ``dare``, ...) without one use it.
        """
        # lists, tuples and dicts copied: the caller editing its list later must not split eval from collapse()
        kwargs = self._with_own_base(strategy, {k: _copy_containers(v) for k, v in kwargs.items()})
        kwargs = _generator_as_seed(strategy, kwargs)
        check_merge_arguments(strategy, kwargs, num_experts=self.num_experts)
        pool, key = self.__dict__["_merge_pool"], _merge_key(strategy, kwargs)
        kept = pool.pop(key, (None,))[0]
        if self._merge_cache is not None and self.merge_pool_size > 0:
            pool[self._merge_key] = (self._merge_cache, self._merge_kwargs)  # the arguments keep the key's ids alive
        while len(pool) > max(self.merge_pool_size, 0):
            pool.popitem(last=False)  # the least recently used
        object.__setattr__(self, "_merge", strategy)
        object.__setattr__(self, "_merge_kwargs", dict(kwargs))
        # tensor arguments (weights=..., the base's tensors): an in-place write to one merges again
        object.__setattr__(self, "_merge_arg_tensors", _argument_tensors(kwargs))
        object.__setattr__(self, "_merge_arg_module", _holds_module(kwargs))  # its tensors may be replaced: checked by identity
        object.__setattr__(self, "_merge_key", key)
        object.__setattr__(self, "_merge_cache", kept)
        if kwargs.get("base") is not None:
            object.__setattr__(self, "_merge_base", kwargs["base"])

    def _with_own_base(self, strategy: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with the container's own base for a task-arithmetic strategy given none."""
        own = self.__dict__.get("_merge_base")
        if own is not None and kwargs.get("base") is None and requires_base(strategy):
            return {**kwargs, "base": own}
        return kwargs

    # -- internals -----------------------------------------------------------------
    def _tensor_slots(self) -> list[_Slot]:
        """Every distinct parameter and buffer of the experts (first name) with each expert's slot, cached per module structure."""
        table = self.__dict__.get("_slots_cache")
        if table is None or table.epoch != _structure_epoch:
            table = _SlotTable(self.experts)
            object.__setattr__(self, "_slots_cache", table)
        return table.slots

    def _slot_tensors(self, *, flat: bool = False) -> list:
        """Current tensors, ``[slot][expert]`` (or flat); a deleted tensor refreshes the slots."""
        for attempt in range(2):
            self._tensor_slots()
            table = self._slots_cache
            try:
                if flat:
                    return [d[leaf] for d, leaf in table.flat]
                return [[d[leaf] for d, leaf in slot_refs] for _, slot_refs in table.slots]
            except KeyError:
                if attempt:
                    raise
                object.__setattr__(self, "_slots_cache", None)
        raise AssertionError("unreachable")

    def _merge_slots(self, weights: torch.Tensor, tensors: list[list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """:meth:`_merge_slots_now`, run outside the graph under ``torch.compile``.

        Traced, the merge would guard on the module-structure counter (which compiling itself
        bumps) and specialise on every coefficient value (the weight-merging regularizer samples
        new ones each step): recompiles until dynamo's limit, then eager anyway. Eager calls skip
        the disable wrapper altogether.
        """
        if torch.compiler.is_compiling():
            return _merge_slots_outside_graph(self, weights, tensors)
        self._refuse_data_parallel_replica()
        return self._merge_slots_now(weights, tensors)

    def _merge_slots_now(self, weights: torch.Tensor, tensors: list[list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """Merged tensor per slot, for ``weights`` ``[N]``.

        Floating parameters: Σ wᵢ·θᵢ, one multi-tensor op, differentiable. Floating buffers
        (BatchNorm running statistics, masks): Σ wᵢ·bᵢ as a constant (a buffer that requires
        grad breaks BatchNorm) with the weights made convex (:func:`convex_buffer_weights`: a
        variance stays a variance), except the entries equal in every expert, which keep expert 0's
        value (a -inf mask stays -inf: 0 · -inf would be NaN). Other tensors are expert 0's;
        buffers among them are copies, so a merged forward in training mode (BatchNorm's
        ``num_batches_tracked``) does not write into expert 0.
        """
        tensors = self._slot_tensors() if tensors is None else tensors  # [slot][expert]
        buffers = self._slots_cache.buffers
        params = [i for i, ts in enumerate(tensors) if ts[0].is_floating_point() and i not in buffers]
        merged = linear_combinations([tensors[i] for i in params], weights)
        out = [ts[0] for ts in tensors]
        for i, m in zip(params, merged):
            out[i] = m
        if buffers:
            with torch.no_grad():
                w = convex_buffer_weights(weights.detach())
                for i in buffers:
                    out[i] = _merge_buffer(tensors[i], w) if tensors[i][0].is_floating_point() else tensors[i][0].clone()
        return out

    def _run(self, plan: Plan, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if isinstance(plan, str):
            if plan == "routed":
                return self._routed_forward(x, args, kwargs)
            if plan == "merged":  # the eval fast path's merge, torch.func transforms included (use_merge)
                if _functorch_transforms_active():
                    return self._merged_under_transforms(x, args, kwargs)
                return self._merged_call()(x, *args, **kwargs)
            if plan == "ensemble":  # every expert sees all data; outputs averaged (differentiable)
                outs = [_tensor_output(e(x, *args, **kwargs), self._label(), "the ensemble plan (averaging expert outputs)")
                        for e in self.experts]
                return sum(outs) / self.num_experts
            raise ValueError(f"unknown routing plan {plan!r}; expected 'routed', 'merged', 'ensemble', an int, weights or a Router")
        if isinstance(plan, int):
            return self.experts[plan](x, *args, **kwargs)
        if isinstance(plan, torch.Tensor):
            return self.merged_forward(x, plan, *args, **kwargs)
        if isinstance(plan, Router):
            return self._routed_forward(x, args, kwargs, router=plan)
        raise TypeError(f"unsupported routing plan of type {type(plan).__name__}")

    def _segmented_forward(self, segments: Sequence[tuple[int, Any]], x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        sizes = [int(n) for n, _ in segments]
        bd = self._batch_axis(x)
        if sum(sizes) != x.shape[bd]:
            raise ValueError(f"plan segments cover {sum(sizes)} samples but the batch has {x.shape[bd]}" + (f" (dim {bd} of the input)" if bd else ""))
        outs = [self._run(p, part, args, kwargs) for (_, p), part in zip(segments, x.split(sizes, dim=bd))]
        return torch.cat(outs, dim=bd)

    def _batch_axis(self, x: torch.Tensor) -> int:
        """``batch_dim`` as a non-negative axis of ``x``; a ValueError naming the container when ``x`` lacks it."""
        if not -x.dim() <= self.batch_dim < max(x.dim(), 1):
            raise ValueError(f"{self._label()} splits samples along batch_dim={self.batch_dim}, but its input has shape "
                             f"{list(x.shape)}")
        return self.batch_dim % max(x.dim(), 1)

    def sequence_first_problem(self, *, fix: str, label: str | None = None) -> str | None:
        """Why per-sample routing would split the wrong axis (:func:`sequence_first_problem` of expert 0, named
        ``label`` or the container's own label), or None; None too when ``batch_dim`` was given. Cached per module
        structure (routing plans check it on every entry)."""
        if self.batch_dim_given:
            return None
        cached = self.__dict__.get("_sequence_first_cache")
        if cached is None or cached[0] != _structure_epoch:
            cached = (_structure_epoch, _sequence_first_submodule(self.experts[0]))
            object.__setattr__(self, "_sequence_first_cache", cached)
        return None if cached[1] is None else _sequence_first_message(cached[1], label=label or self._label(), fix=fix)

    def _check_routing(self, routing: Any, router: Router, x: torch.Tensor) -> None:
        """A router's decision that does not fit ``x`` or the experts, named with the router and the container
        (a plugin router's mistake gave zeros or expert 0's output silently). Shapes always; the index range only
        for routers outside this package (the built-in ones are in range by construction), without a device sync
        (asynchronously for indices on the GPU)."""
        where = f"{self._label()}: {type(router).__name__}"
        if not isinstance(routing, RouterOutput):
            raise TypeError(f"{where} returned a {type(routing).__name__}, not a RouterOutput")
        if routing.granularity not in GRANULARITIES:
            raise ValueError(f"{where} returned granularity {routing.granularity!r}, not one of {GRANULARITIES}")
        idx, w = routing.indices, routing.weights
        groups = num_groups(x, routing.granularity)
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[0] != groups or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"{where} returned indices {got}; per-{routing.granularity} routing of this input needs an "
                             f"integer tensor [{groups}, k] (one row per {routing.granularity})")
        if not isinstance(w, torch.Tensor) or w.shape != idx.shape:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{where} returned weights {got} for indices {tuple(idx.shape)}; they need the same shape")
        if idx.numel() == 0 or type(router).__module__ == Router.__module__:
            return
        if idx.device.type == "cpu":
            low, high = int(idx.min()), int(idx.max())
            if low < 0 or high >= self.num_experts:
                raise ValueError(f"{where} chose expert {low if low < 0 else high}, but the container has experts 0 to {self.num_experts - 1}")
        else:
            torch._assert_async(((idx >= 0) & (idx < self.num_experts)).all(), f"{where} chose an expert outside 0..{self.num_experts - 1}")

    def _routed_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, *, router: Router | None = None) -> torch.Tensor:
        router = self.router if router is None else router
        if _recomputed_in_backward() and (getattr(router, "stochastic", True) or router_keeps_state(router)):
            raise RuntimeError(
                f"an ExpertContainer with a {type(router).__name__} is being recomputed in backward by a plain "
                "gradient checkpoint (torch.utils.checkpoint, timm's or open_clip's set_grad_checkpointing) around it: "
                "its router would draw another expert than the forward did, and the gradients would be wrong. "
                "Checkpoint with mergekit_video.experts.checkpoint_routed (it replays the routing), or turn that "
                "module's gradient checkpointing off"
            )
        bd = self._batch_axis(x) if self.batch_dim else 0
        xr = x.movedim(bd, 0) if bd else x  # [B, ...]: routers see the batch first
        try:
            routing = router(xr)
        except ValueError as err:  # an input the router cannot take (a topk gate of another width)
            raise ValueError(f"{self._label()}: {err}") from err
        self._check_routing(routing, router, xr)
        self.last_routing = routing
        self.aux_losses = routing.aux_losses
        if routing.granularity == "batch":
            expert = int(routing.indices.reshape(-1)[0])  # CPU tensor for stochastic routers: no sync
            return self.experts[expert](x, *args, **kwargs)
        tensor_arg = next((repr(k) for k, v in (*enumerate(args, 1), *kwargs.items()) if isinstance(v, torch.Tensor)), None)
        if tensor_arg is not None:
            raise ValueError(
                f"{self._label()}: per-{routing.granularity} routing splits the input among the experts, but the experts also get the "
                f"tensor argument {tensor_arg}, which it cannot split alike; route per batch (MoTE), or pass the "
                "experts only the input (other arguments that are not tensors, such as attn_mask=None, pass through)"
            )
        sample = routing.granularity == "sample"
        flat = xr if sample else xr.reshape(-1, xr.shape[-1])  # [G, ...]

        def run(expert: nn.Module, part: torch.Tensor) -> Any:
            # part: [g, ...] rows of flat; a sample-routed expert gets (and returns) its own layout, batch on dim bd
            if not (sample and bd):
                return expert(part, *args, **kwargs)
            y = expert(part.movedim(0, bd), *args, **kwargs)
            return y.movedim(bd, 0) if isinstance(y, torch.Tensor) else y

        indices = routing.indices.to(flat.device)
        weights = routing.weights.to(flat.device)
        out = None
        for e, expert in enumerate(self.experts):
            pos, slot = (indices == e).nonzero(as_tuple=True)
            if pos.numel() == 0:
                continue
            try:
                y = run(expert, flat[pos])
            except (RuntimeError, ValueError, TypeError) as err:
                if sample and isinstance(err, ValueError) and "more than 1 value per channel when training" in str(err):
                    raise ValueError(
                        f"{self._label()}: per-sample routing runs each expert on the samples routed to it, a sub-batch "
                        f"(expert {e} got {pos.numel()}), and a BatchNorm in the expert needs more than one sample per expert "
                        f"in training; route it per batch (granularity='batch', as MoTE does) or use larger batches. ({err})"
                    ) from err
                if routing.granularity != "token" or isinstance(err, torch.OutOfMemoryError):
                    raise
                raise RuntimeError(
                    f"{self._label()}: per-token routing runs each expert on the tokens routed to it, a [tokens, {flat.shape[-1]}] "
                    f"matrix, and the expert ({type(expert).__name__}) failed on it: a module that mixes positions "
                    f"(attention, convolution) cannot be routed per token; route it per batch or per sample. ({err})"
                ) from err
            y = _tensor_output(y, self._label(), f"per-{routing.granularity} routing (weighting and scattering expert outputs)")
            y = y * weights[pos, slot].to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
            if out is None:
                out = y.new_zeros((flat.shape[0], *y.shape[1:]))
            out = out.index_add(0, pos, y)
        if out is None:  # no routing slots at all (empty input)
            out = run(self.experts[0], flat)
        if routing.granularity == "token":
            out = out.reshape(*xr.shape[:-1], out.shape[-1])
        return out.movedim(0, bd) if bd else out

    def extra_repr(self) -> str:
        """The module repr's summary: expert count, eval merge strategy and a non-default ``batch_dim``."""
        return f"num_experts={self.num_experts}, merge={self.merge!r}" + (f", batch_dim={self.batch_dim}" if self.batch_dim else "")

    def _label(self) -> str:
        """How errors name this container: by the module it replaced (``add_experts`` records it)."""
        name = self.__dict__.get("target_name")
        return f"expert container {name!r}" if name else "expert container"


_merge_slots_outside_graph = torch.compiler.disable(ExpertContainer._merge_slots_now)


# -- model-wide helpers -------------------------------------------------------------------


# model -> (structure epoch, [(name, container)], links (parent, child name, child) on the paths to them)
_containers_cache: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[tuple[str, ExpertContainer]], list[tuple[nn.Module, str, nn.Module]]]] = (
    weakref.WeakKeyDictionary()
)


def _functorch_transforms_active() -> bool:
    """Whether this forward runs inside a ``torch.func`` transform (vmap, grad, jacrev, ...)."""
    if torch.compiler.is_compiling():  # dynamo traces torch.func transforms itself
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def _is_functorch_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _interpreters_cleared() -> Any:
    """A context in which no ``torch.func`` transform is active (the eval merge is built there)."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def _paths_to(model: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    for name in names:
        parent = model
        for part in name.split(".") if name else []:
            child = parent._modules[part]
            links[(id(parent), part)] = (parent, part, child)
            parent = child
    return list(links.values())


def find_containers(model: nn.Module) -> list[tuple[str, ExpertContainer]]:
    """All (qualified name, container) pairs in module order.

    Cached until a module is registered anywhere, or a module on the path to a container is
    deleted or renumbered (``del model.block``, ``del layers[0]``), which torch reports to no hook.
    """
    cached = _containers_cache.get(model)
    if (
        cached is None
        or cached[0] != _structure_epoch
        or any(parent._modules.get(part) is not child for parent, part, child in cached[2])
    ):
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertContainer)]
        cached = (_structure_epoch, found, _paths_to(model, [n for n, _ in found]))
        _containers_cache[model] = cached
    return list(cached[1])


def collect_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Sum of the routers' auxiliary losses from the last forward, by loss name.

    Warns once per container when a trainable router's losses carry no gradient: its forward ran
    with gradients off, as a reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``, timm's
    ``set_reentrant_ckpt``) runs it; adding them to the loss would then train no gate.
    """
    total: dict[str, torch.Tensor] = {}
    for name, c in find_containers(model):
        for k, v in c.aux_losses.items():
            total[k] = total[k] + v if k in total else v
        if (c.aux_losses and not any(v.requires_grad for v in c.aux_losses.values()) and c.training
                and torch.is_grad_enabled() and "_no_grad_aux_warned" not in c.__dict__
                and any(p.requires_grad for p in c.router.parameters())):
            warn_user(
                f"the auxiliary losses of container {name!r} carry no gradient: its last forward ran with gradients off "
                "(a reentrant checkpoint, use_reentrant=True, runs it so), so its router's gate would not be trained "
                "by them; checkpoint with use_reentrant=False or mergekit_video.experts.checkpoint_routed"
            )
            object.__setattr__(c, "_no_grad_aux_warned", True)
        if not c.aux_losses and c.__dict__.get("_aux_dropped_by_plan") and "_plan_aux_warned" not in c.__dict__:
            warn_user(
                f"container {name!r} has no auxiliary losses: its last forward ran a routing plan (a weight merge, such "
                "as WeightMergingRegularizer.merged_region, or use_expert / use_merge), which drops those of the routed "
                "forward before it; collect them (collect_aux_losses, the load_balance regularizer) right after the routed forward"
            )
            object.__setattr__(c, "_plan_aux_warned", True)
    return total


@contextmanager
def routing_plan(
    model: nn.Module,
    plan: Plan | Mapping[str, Plan] | Callable[[str, ExpertContainer], Plan],
) -> Iterator[list[tuple[str, ExpertContainer]]]:
    """Set a routing plan on every container of ``model`` for the duration of the block.

    ``plan`` is one plan for all containers, a mapping from container name to plan, or a
    callable ``(name, container) -> plan``. Plans nest: the previous ones are restored.
    """
    containers = find_containers(model)
    if not containers:
        raise ValueError("routing_plan: the model has no ExpertContainer (did you call add_experts?)")
    previous = [c._plan for _, c in containers]
    try:
        for name, c in containers:
            if callable(plan) and not isinstance(plan, (torch.Tensor, Router)):
                object.__setattr__(c, "_plan", plan(name, c))  # a Router plan is not a submodule
            elif isinstance(plan, Mapping):
                if name not in plan:
                    raise KeyError(f"routing plan has no entry for container {name!r}")
                object.__setattr__(c, "_plan", plan[name])
            else:
                object.__setattr__(c, "_plan", plan)
            _check_plan(name, c)
        if torch.is_grad_enabled() and any(not (isinstance(c._plan, str) and c._plan == "routed") for _, c in containers):
            _warn_plan_under_plain_checkpointing(model)
        yield containers
    finally:
        for (_, c), p in zip(containers, previous):
            object.__setattr__(c, "_plan", p)


def _plan_parts(plan: Any) -> list[Any]:
    """The plans a plan is made of: itself, or those of its ``(batch_size, plan)`` segments."""
    if isinstance(plan, (list, tuple)):
        return [part for _, p in plan for part in _plan_parts(p)]
    return [plan]


def _check_plan(name: str, c: ExpertContainer) -> None:
    """An expert index, merge weights or a router that do not fit the container, named now (not deep in its
    forward); the plans of a segment list each."""
    for plan in _plan_parts(c._plan):
        _check_one_plan(name, c, plan)


def _check_one_plan(name: str, c: ExpertContainer, plan: Any) -> None:
    if isinstance(plan, int) and not isinstance(plan, bool) and not 0 <= plan < c.num_experts:
        raise IndexError(f"expert {plan} does not exist in container {name!r}, which has {c.num_experts} experts (0 to {c.num_experts - 1})")
    if isinstance(plan, torch.Tensor) and plan.shape != (c.num_experts,):
        raise ValueError(f"merge weights for container {name!r} need shape [{c.num_experts}] (one per expert), got {list(plan.shape)}")
    if isinstance(plan, Router) and plan.num_experts != c.num_experts:
        raise ValueError(f"a router for {plan.num_experts} experts cannot route container {name!r}, which has {c.num_experts}")
    if isinstance(plan, Router) and plan.granularity == "sample":
        problem = c.sequence_first_problem(fix="add_experts(..., batch_dim=1) or ExpertContainer(..., batch_dim=1)",
                                           label=f"container {name!r}")
        if problem is not None:
            raise ValueError(f"a per-sample router plan (use_router): {problem}")


def checkpoints_plainly(module: nn.Module) -> bool:
    """Whether ``module`` has gradient checkpointing on (``grad_checkpointing = True``, as open_clip
    and timm set it) done with plain ``torch.utils.checkpoint``, that is without ``replays_routing``."""
    return getattr(module, "grad_checkpointing", False) is True and not getattr(module, "replays_routing", False)


# model -> (structure epoch, [(name, module)] that can turn plain checkpointing on and hold containers)
_checkpointing_cache: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[tuple[str, nn.Module]]]] = weakref.WeakKeyDictionary()


def _warn_plan_under_plain_checkpointing(model: nn.Module) -> None:
    """A plan lives only inside its ``with`` block; a plain checkpoint recomputes in backward, after it."""
    cached = _checkpointing_cache.get(model)
    if cached is None or cached[0] != _structure_epoch:  # the walk (attribute misses raise) once per structure
        candidates = [
            (name, m) for name, m in model.named_modules()
            if hasattr(m, "grad_checkpointing") and not getattr(m, "replays_routing", False) and find_containers(m)
        ]
        cached = (_structure_epoch, candidates)
        _checkpointing_cache[model] = cached
    for name, module in cached[1]:
        if checkpoints_plainly(module):
            warn_user(
                f"{name or type(model).__name__} has gradient checkpointing on and holds expert containers: a plain "
                "torch.utils.checkpoint recomputes them in backward without this routing plan (use_expert, "
                "use_merge, use_merge_weights, the weight-merging regularizer), which gives wrong gradients. Turn "
                "its checkpointing off, or checkpoint with mergekit_video.experts.checkpoint_routed."
            )
            return


def use_expert(model: nn.Module, index: int) -> Any:
    """Context manager: every container runs expert ``index`` alone (per-expert evaluation)."""
    return routing_plan(model, int(index))


def use_router(model: nn.Module, router: str = "random", *, seed: int = 0, granularity: str = "sample", **router_kwargs: Any) -> Any:
    """Context manager: every container routes with a router of its own built from ``router`` (a registered
    name), in train and eval mode alike; the routers share one generator seeded with ``seed``.

    ``use_router(head, "random")`` routes each sample to a uniformly drawn expert per layer: the
    "Random routing" aggregation of MoTE Table 2c (all experts kept, one runs per input). A gated
    router's width (``dim``) is inferred per container from its experts, as :func:`add_experts` does.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return routing_plan(model, lambda name, c: build_router(router, num_experts=c.num_experts, granularity=granularity,
                                                            generator=generator, module=c.experts[0], **router_kwargs))


def use_merge_weights(model: nn.Module, weights: torch.Tensor | Mapping[str, torch.Tensor]) -> Any:
    """Context manager: containers run :meth:`ExpertContainer.merged_forward` with ``weights``."""
    if isinstance(weights, Mapping):
        return routing_plan(model, {k: torch.as_tensor(v) for k, v in weights.items()})
    return routing_plan(model, torch.as_tensor(weights))


def state_dict_under(state_dict: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of a whole-model ``state_dict`` under module ``name``, with that prefix removed."""
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def per_container_merge_kwargs(
    containers: Sequence[tuple[str, ExpertContainer]],
    kwargs: Mapping[str, Any],
    base: nn.Module | Mapping[str, torch.Tensor] | None = None,
    *,
    strategy: str | Callable[..., torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """The arguments each container gets from one model-wide merge call, in the order of ``containers``.

    ``containers`` is :func:`find_containers` of the model. Container i gets ``seed + i`` in
    place of ``seed``, so that stochastic merges (DARE) draw their own masks per container,
    reproducibly; without a seed (and a generator), a stochastic ``strategy`` starts from its
    default seed (DARE: 0), so its containers still draw masks of their own. With ``base`` (the model before surgery or its state dict) it gets ``base=``
    the entries under its own name. :func:`use_merge`,
    :func:`~mergekit_video.surgery.collapse_experts` and ``add_experts(merge_kwargs=...)``
    all derive their per-container arguments here, so an evaluated merge and the exported
    collapse are the same weights.

    Raises:
        ValueError: ``base`` has no tensors under a container's name.
    """
    if isinstance(base, nn.Module) and find_containers(base):
        raise ValueError("base has expert containers: it is a model after add_experts; pass the model from before "
                         "add_experts (or its state dict), whose weights the task vectors are taken from")
    base_sd = base.state_dict() if isinstance(base, nn.Module) else base
    out = []
    seed = kwargs.get("seed")
    if seed is None and kwargs.get("generator") is None and strategy is not None:
        seed = default_seed(strategy)
    for index, (name, container) in enumerate(containers):
        kw = dict(kwargs)
        if seed is not None:
            kw["seed"] = int(seed) + index
        if base_sd is not None:
            kw["base"] = state_dict_under(base_sd, name)
            if not kw["base"]:
                raise ValueError(f"base has no tensors under {name!r}")
            # the container's own keys (experts.{i}.<key>), not the expert's: a module whose child is named experts is fine
            if not set(container.experts[0].state_dict()) & set(kw["base"]) and all(k.startswith("experts.") for k in kw["base"]):
                raise ValueError(f"base holds experts under {name!r} ('{name}.experts.0...'): it is the state dict of a model after "
                                 "add_experts; pass the model from before add_experts (or its state dict)")
        out.append(kw)
    return out


@contextmanager
def use_merge(model: nn.Module, strategy: str, **kwargs: Any) -> Iterator[None]:
    """Context manager: evaluate with another merge strategy, restoring the old one after.

    The containers get the arguments :func:`~mergekit_video.surgery.collapse_experts` would
    give them (:func:`per_container_merge_kwargs`): ``base`` (task-arithmetic strategies, the
    model before surgery or its state dict) is sliced per container, and ``seed`` becomes
    ``seed + i`` for container i. The merge evaluated here is the one ``collapse_experts``
    exports with the same arguments.
    """
    containers = find_containers(model)
    previous = [(c.merge, dict(c.merge_kwargs), c.__dict__.get("_merge_base")) for _, c in containers]
    base = kwargs.pop("base", None)
    try:
        for (_, c), kw in zip(containers, per_container_merge_kwargs(containers, kwargs, base, strategy=strategy)):
            c.set_merge(strategy, **kw)
        with routing_plan(model, "merged"):
            yield
    finally:
        for (_, c), (s, kw, own_base) in zip(containers, previous):
            c.set_merge(s, **kw)
            object.__setattr__(c, "_merge_base", own_base)  # a base given for this block only is not kept


def router_keeps_state(router: nn.Module) -> bool:
    """Whether ``router`` keeps routing state of its own beyond its generator.

    That is nn.Module extra state (``get_extra_state`` / ``set_extra_state``, saved in the
    state dict as ``router._extra_state``), such as a round-robin step counter. Like a
    generator, it advances in every routed forward, so a recomputation must replay it.
    """
    return type(router).get_extra_state is not nn.Module.get_extra_state


def _router_state(router: Router) -> tuple[torch.Tensor, Any]:
    """A router's generator state and extra state (a copy; None without any)."""
    return router.generator.get_state(), copy.deepcopy(router.get_extra_state()) if router_keeps_state(router) else None


def _set_router_state(router: Router, state: tuple[torch.Tensor, Any]) -> None:
    router.generator.set_state(state[0])
    if router_keeps_state(router):
        router.set_extra_state(copy.deepcopy(state[1]))


def _routing_state(c: ExpertContainer) -> tuple[Any, tuple[torch.Tensor, Any], list[tuple[torch.Tensor, Any]]]:
    """A container's plan, its router's state, and the states of the routers in its plan (:func:`use_router`,
    or in its segments): generator and extra state (:func:`router_keeps_state`), which a recomputation replays."""
    plan_routers = [_router_state(p) for p in _plan_parts(c._plan) if isinstance(p, Router)]
    return c._plan, _router_state(c.router), plan_routers


def _set_routing_state(c: ExpertContainer, state: tuple[Any, tuple[torch.Tensor, Any], list[tuple[torch.Tensor, Any]]]) -> None:
    plan, own, plan_routers = state
    object.__setattr__(c, "_plan", plan)
    _set_router_state(c.router, own)
    for router, saved in zip((p for p in _plan_parts(plan) if isinstance(p, Router)), plan_routers):
        _set_router_state(router, saved)


_replay = threading.local()  # .depth > 0 while checkpoint_routed recomputes with the recorded routing (in that thread)


def _recomputed_in_backward() -> bool:
    """Whether a forward runs inside autograd's backward (a checkpoint's recomputation) other than
    :func:`checkpoint_routed`'s replay; never under ``torch.compile`` tracing."""
    if torch.compiler.is_compiling() or getattr(_replay, "depth", 0):
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def checkpoint_routed(module: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """:func:`torch.utils.checkpoint.checkpoint` (non-reentrant) for code that runs containers of ``module``.

    A plain checkpoint replays only the global RNGs, so the recomputation in backward would
    draw new experts from the routers' own generators (or advance a stateful router, see
    :func:`router_keeps_state`) and run without the routing plan of the original forward (its
    context has exited by then); the recomputed tensors would not match. Here the
    recomputation sees each container's plan, router generator state and router extra state
    as they were in the original forward; the current ones, and the routing records, are put
    back afterwards.
    """
    from torch.utils.checkpoint import checkpoint

    containers = [c for _, c in find_containers(module)]
    recorded = [_routing_state(c) for c in containers]
    calls = 0

    def run(*inner: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the original forward
            return function(*inner)
        current = [(_routing_state(c), c.aux_losses, c.last_routing) for c in containers]
        _replay.depth = getattr(_replay, "depth", 0) + 1
        try:
            for c, state in zip(containers, recorded):
                _set_routing_state(c, state)
            return function(*inner)
        finally:
            _replay.depth -= 1
            for c, (state, aux, last) in zip(containers, current):
                _set_routing_state(c, state)
                c.aux_losses, c.last_routing = aux, last

    return checkpoint(run, *args, use_reentrant=False)


def router_generator_states(model: nn.Module) -> dict[str, torch.Tensor]:
    """RNG states of every router generator, keyed by container name (for checkpoints)."""
    return {name: c.router.generator.get_state() for name, c in find_containers(model)}


def load_router_generator_states(model: nn.Module, states: Mapping[str, torch.Tensor]) -> None:
    """Restore states saved by :func:`router_generator_states`."""
    for name, c in find_containers(model):
        if name not in states:
            raise KeyError(f"no saved router RNG state for container {name!r}")
        c.router.generator.set_state(states[name].cpu() if isinstance(states[name], torch.Tensor) else states[name])
