"""VideoCLIP: an open_clip CLIP encoding frames, plus the MoTE temporal head.

frames ``[B, T, 3, H, W]`` → visual encoder per frame → e ``[B, T, D]`` →
z = mean_T(e + ρ·h(e)) → cosine logits against class text features (MoTE Eq. 1–2, 11).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .clip import ClassFeatureCache, build_clip_from_config, create_clip, encode_class_names
from .prompts import MOTE_TEMPLATES, resolve_templates
from .temporal import TemporalHead

CONFIG_FORMAT = "mergekit_video/video_clip"
CONFIG_VERSION = 1


class VideoCLIP(nn.Module):
    """CLIP frame encoder + :class:`TemporalHead`.

    Public surface: ``.visual`` (the open_clip visual tower), ``.head``, ``.logit_scale``
    (CLIP's log-scale parameter; use ``logit_scale.exp()``), :meth:`encode_frames`,
    :meth:`encode_text` and :meth:`class_features`. The whole open_clip model is kept
    under ``.clip`` (its text tower frozen) so that the CLIP part of the state dict loads
    into plain open_clip.

    Args:
        clip: an open_clip ``CLIP``.
        head: the temporal head (width = CLIP embedding size).
        config: the JSON-able config that rebuilds this model (see :func:`build_video_clip`).
    """

    def __init__(self, *, clip: nn.Module, head: TemporalHead, config: dict[str, Any]) -> None:
        super().__init__()
        self.clip = clip
        self.head = head
        self.config = config
        self.freeze_text()

    @property
    def config(self) -> dict[str, Any]:
        """The config that rebuilds this model; its ``head`` part is always the live head's.

        ``plugins`` lists the modules outside mergekit_video that register a router or merge strategy
        of the model's experts (imported again when the model is loaded).
        """
        config = {**self._config, "head": dict(self.head.config)}
        clip_experts = clip_experts_record(self.clip)
        if clip_experts:
            config["clip_experts"] = clip_experts
        plugins = plugin_modules(self)
        if plugins:
            config["plugins"] = plugins
        return config

    @config.setter
    def config(self, value: dict[str, Any]) -> None:
        self._config = {k: copy.deepcopy(v) for k, v in value.items() if k not in ("head", "plugins", "clip_experts")}

    # -- public surface ------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        """The open_clip visual tower."""
        return self.clip.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's log logit scale (the scale s is its exponential)."""
        return self.clip.logit_scale

    @property
    def input_size(self) -> int | None:
        """The frame size (square side, pixels) the visual tower takes; None when it is not fixed."""
        size = getattr(self.clip.visual, "image_size", None)
        if isinstance(size, (tuple, list)):
            return int(size[0]) if len(set(size)) == 1 else None
        return int(size) if isinstance(size, int) else None

    @property
    def model_name(self) -> str:
        """The open_clip architecture name."""
        return self.config["clip"]["name"]

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, 3, H, W]`` → per-frame CLIP features e ``[B, T, D]`` (f(V|θ_v), MoTE Eq. 1)."""
        b, t = frames.shape[:2]
        feats = self.visual(frames.flatten(0, 1))  # [B*T, D]
        return feats.view(b, t, -1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[C, L]`` → text features y ``[C, D]`` (g(C|θ_c), MoTE Eq. 1; frozen text tower)."""
        return self.clip.encode_text(tokens)

    def forward(self, frames: torch.Tensor, class_features: torch.Tensor, modulation: bool = False) -> torch.Tensor:
        """Cosine logits ``[B, C]`` (unscaled; multiply by ``logit_scale.exp()`` for a loss)."""
        return self.head(self.encode_frames(frames), class_features, modulation=modulation)

    @torch.no_grad()
    def class_features(
        self,
        class_names: Sequence[str],
        *,
        templates: Sequence[str] | str = MOTE_TEMPLATES,
        cache: ClassFeatureCache | None = None,
    ) -> torch.Tensor:
        """Prompt-ensembled class text features ``[C, D]`` (Table 8 templates), cached when ``cache`` is given."""
        if self.config["clip"].get("text_weights") == "missing":
            raise ValueError(
                "this model has no text-tower weights (it was converted from a checkpoint without them); "
                "rebuild it with pretrained text weights (mergevid convert ... --clip-pretrained openai|/path/to/clip.pt) "
                "or pass precomputed class features"
            )
        templates = resolve_templates(templates)
        device = self.logit_scale.device
        if cache is None:
            return encode_class_names(self.clip, class_names, templates=templates, model_name=self.model_name, device=device).cpu()
        return cache.get_or_compute(
            self.clip, class_names, model_name=self.model_name, templates=templates, model_cfg=self.config["clip"].get("model_cfg"), device=device
        )

    # -- parameter handling -----------------------------------------------------------
    def freeze_text(self) -> None:
        """Freeze the text tower (everything in ``.clip`` except the visual tower and the logit scale)."""
        for name, p in self.clip.named_parameters():
            if not (name.startswith("visual.") or name == "logit_scale"):
                p.requires_grad_(False)

    def set_grad_checkpointing(self, clip: bool = True, head: bool = False) -> None:
        """Gradient checkpointing for the CLIP visual tower (and optionally the temporal head)."""
        from ..surgery import warn_plain_checkpointing

        self.clip.set_grad_checkpointing(clip)
        self.head.set_grad_checkpointing(head)
        warn_plain_checkpointing(self)  # experts added to the CLIP tower would be re-routed

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with open_clip's own keys (loads into ``open_clip.create_model(name)``)."""
        return self.clip.state_dict()


def build_video_clip(
    *,
    clip_name: str,
    pretrained: str | None = None,
    force_quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    temporal_layers: int = 6,
    num_experts: int = 4,
    router: str = "multinomial",
    router_kwargs: dict[str, Any] | None = None,
    expert_init: str = "normal",
    merge: str = "mean",
    merge_kwargs: dict[str, Any] | None = None,
    tfm_k: int = 5,
    tfm_gamma: float = 0.05,
    num_positions: int = 77,
    grad_checkpointing: bool = False,
) -> VideoCLIP:
    """Build a VideoCLIP with a MoTE head (``num_experts=0`` gives the Text4Vis baseline head).

    The head width is the CLIP embedding size; heads = width // 64.
    """
    clip, clip_cfg = create_clip(clip_name, pretrained=pretrained, force_quick_gelu=force_quick_gelu, cache_dir=cache_dir)
    clip_cfg["text_weights"] = "pretrained" if pretrained else "random"
    head = TemporalHead(
        width=int(clip_cfg["model_cfg"]["embed_dim"]),
        layers=temporal_layers,
        num_experts=num_experts,
        num_positions=num_positions,
        router=router,
        router_kwargs=router_kwargs,
        expert_init=expert_init,
        merge=merge,
        merge_kwargs=merge_kwargs,
        tfm_k=tfm_k,
        tfm_gamma=tfm_gamma,
    )
    model = VideoCLIP(clip=clip, head=head, config=model_config_dict(clip_cfg, head.config))
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def model_config_dict(clip_cfg: dict[str, Any], hcfg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The config stored next to saved weights."""
    return {"format": CONFIG_FORMAT, "format_version": CONFIG_VERSION, "clip": clip_cfg, "head": hcfg, **extra}


_JSON_SCALARS = (bool, int, float, str, type(None))
_UNRECORDED_WARNED: set[tuple[type, str]] = set()  # (router class, argument) said once per process


def _router_kwargs(router: nn.Module) -> dict[str, Any]:
    """The constructor arguments a router keeps as attributes of the same name (JSON values only):
    what rebuilds its structure (a ``topk`` gate's ``dim`` and ``k``) and its routing settings."""
    import inspect

    skip = {"self", "num_experts", "generator", "seed", "module"}
    kwargs: dict[str, Any] = {}
    for cls in type(router).__mro__:  # a subclass passes **kw on to its base's arguments (granularity)
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if name in skip or name in kwargs or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = getattr(router, name, None)
            if hasattr(router, name) and isinstance(value, (*_JSON_SCALARS, list, tuple)):
                kwargs[name] = list(value) if isinstance(value, tuple) else value
            elif (type(router), name) not in _UNRECORDED_WARNED:
                _UNRECORDED_WARNED.add((type(router), name))
                from ..utils.warn import warn_user

                warn_user(f"router {type(router).__name__}'s argument {name!r} is not kept as a number, string or list attribute of "
                          "that name, so a saved model cannot record it: loaded, its router takes the default. Keep constructor "
                          "arguments as attributes of the same name")
    return kwargs


def _stored_merge_kwargs(name: str, kwargs: Any) -> dict[str, Any]:
    """A container's merge arguments as JSON (tensors as lists, as the head's config keeps them). ``base`` (a
    task-arithmetic merge's weights) is not stored: :func:`save_model` refuses such models. Another argument
    that cannot be stored is left out with a warning: the loaded model would merge without it."""
    import json

    from ..utils.warn import warn_user

    stored = {}
    for k, v in kwargs.items():
        if k == "base":
            continue
        value = v.tolist() if isinstance(v, torch.Tensor) else v
        try:
            json.dumps(value)
        except TypeError:
            warn_user(f"the merge argument {k}={type(v).__name__} of the CLIP's expert container {name!r} cannot be saved in "
                      "config.json (give it as numbers or lists): a loaded model merges without it")
            continue
        stored[k] = value
    return stored


def clip_experts_record(clip: nn.Module) -> list[dict[str, Any]]:
    """The expert containers in the CLIP part (MoTE-style experts a recipe's model component added to the
    visual tower), as :func:`video_clip_from_config` re-applies them: the module each replaced, its
    expert count, router (registered name and settings), eval merge and, when it was given, ``batch_dim``."""
    from ..experts import find_containers
    from ..registry import ROUTERS

    record = []
    for name, c in find_containers(clip):
        router_names = ROUTERS.names_of(type(c.router))
        record.append({
            "module": name,
            "num_experts": c.num_experts,
            "router": router_names[0] if router_names else None,
            **({} if router_names else {"router_class": f"{type(c.router).__module__}.{type(c.router).__qualname__}"}),
            "router_kwargs": _router_kwargs(c.router),
            "merge": c.merge,
            "merge_kwargs": _stored_merge_kwargs(name, c.merge_kwargs),
            **({"batch_dim": c.batch_dim} if c.batch_dim_given else {}),  # a sequence-first module's batch axis
        })
    return record


def apply_clip_experts(clip: nn.Module, record: Sequence[dict[str, Any]]) -> None:
    """Turn the modules :func:`clip_experts_record` names into expert containers again (their weights are
    loaded afterwards), so a model with experts in its visual tower loads without its recipe."""
    from ..surgery import add_experts

    for entry in record:
        if entry.get("router") is None:
            raise ValueError(
                f"the model's CLIP module {entry.get('module')!r} holds experts routed by {entry.get('router_class')}, which is "
                "not a registered router: register it (@ROUTERS.register in a plugin) to save and load such models"
            )
        add_experts(clip, entry["module"], int(entry["num_experts"]), router=entry["router"], init="copy",
                    merge=entry.get("merge", "mean"), merge_kwargs=entry.get("merge_kwargs") or None,
                    batch_dim=entry.get("batch_dim"), **(entry.get("router_kwargs") or {}))


def plugin_modules(model: nn.Module) -> list[str]:
    """The modules outside mergekit_video that register the router or merge strategy of ``model``'s experts.

    A plugin registers its parts when its module is imported: a saved model lists these modules so
    that loading it imports them first (the registered names alone would be unknown). The module
    that registers a part is listed (:meth:`Registry.owner`), not the one that defines it (a
    ``functools.partial``, a class imported from a helper module); what a plugin registers while it
    imports is the plugin's, even through a helper module's function. A part registered by a script
    (``__main__``) cannot be imported by a later load: that is a warning (once per place).
    """
    from ..experts import find_containers
    from ..registry import MERGES, ROUTERS

    modules, from_script = set(), set()
    for _, container in find_containers(model):
        names = [(ROUTERS, n) for n in ROUTERS.names_of(type(container.router))] + [(MERGES, container.merge)]
        for registry, name in names:
            module = registry.owner(name)
            if module == "__main__":
                from_script.add(f"{registry.kind} {name!r}")
            elif module and module.split(".")[0] != "mergekit_video":
                modules.add(module)
    if from_script:
        from ..utils.warn import warn_user

        warn_user(f"the model's {' and '.join(sorted(from_script))} {'is' if len(from_script) == 1 else 'are'} registered by "
                  "the running script (__main__): a later load cannot import it; move the registration into an "
                  "importable module (a plugin) to save models that use it")
    return sorted(modules)


def import_model_plugins(config: dict[str, Any], *, source: str = "the model") -> None:
    """Import the plugin modules a saved config lists (``config["plugins"]``), with an error that says what to install."""
    from ..registry import import_plugins

    for module in config.get("plugins") or []:
        try:
            import_plugins([module])
        except ImportError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, ModuleNotFoundError) and cause.name and module.startswith(cause.name):
                advice = "install that plugin package, or put its folder on PYTHONPATH"  # not found at all
            else:  # found, but its import failed (import_plugins says what and where): not advice to install it
                cause = exc
                advice = "fix the plugin (or install what it needs) so that it imports"
            raise ImportError(
                f"{source} was saved with experts whose router or merge strategy comes from the plugin module {module!r}, "
                f"which cannot be imported here ({cause}): {advice}"
            ) from None


def video_clip_from_config(config: dict[str, Any]) -> VideoCLIP:
    """Rebuild the architecture (random weights, no download) from a saved config (its plugins imported first)."""
    if config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"not a mergekit_video model config (format={config.get('format')!r}, expected {CONFIG_FORMAT!r})")
    if int(config.get("format_version", 0)) > CONFIG_VERSION:
        raise ValueError(f"model config version {config['format_version']} is newer than this mergekit_video supports ({CONFIG_VERSION})")
    import_model_plugins(config)
    clip = build_clip_from_config(config["clip"]["model_cfg"])
    apply_clip_experts(clip, config.get("clip_experts") or [])
    head = TemporalHead(**config["head"])
    return VideoCLIP(clip=clip, head=head, config=config)
