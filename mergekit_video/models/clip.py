"""CLIP backbones from open_clip, and class text features by prompt ensembling.

- :func:`create_clip` builds any open_clip model by name with weights from an open_clip
  pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a local checkpoint file, or none
  (random weights, offline). OpenAI weights get QuickGELU (the ``openai`` tag, or a local
  OpenAI TorchScript ``.pt`` file).
- :func:`encode_class_names` computes class text features with the 28 templates of MoTE
  Table 8: encode every template for every class, L2-normalise per template, average
  over templates, renormalise.
- :class:`ClassFeatureCache` keeps those features on disk, keyed by (model name and
  architecture, text weights hash, class names, templates).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.io import atomic_save_safetensors, remove_stale_atomic_temps
from .prompts import MOTE_TEMPLATES

log = logging.getLogger(__name__)

_BUNDLED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_configs_registered = False

#: open_clip state-dict entries that are neither the text tower nor used by it.
NON_TEXT_PREFIXES = ("visual.", "logit_scale", "logit_bias")


class TokenizerUnavailableError(RuntimeError):
    """The text tokenizer of a CLIP model could not be loaded (missing package or no download)."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained; the message says how to point at a local file."""


def bundled_model_names() -> list[str]:
    """Names of the open_clip model configs shipped with mergekit_video (``mergevid-tiny-vit``)."""
    return sorted(p.stem for p in _BUNDLED_CONFIG_DIR.glob("*.json"))


def register_bundled_model_configs() -> None:
    """Make the model configs shipped with mergekit_video (e.g. ``mergevid-tiny-vit``) known to open_clip."""
    global _configs_registered
    if _configs_registered:
        return
    import open_clip

    open_clip.add_model_config(_BUNDLED_CONFIG_DIR)
    _configs_registered = True


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether downloads can reach ``host`` (False when offline mode is set or a connection fails fast)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # cannot probe through a proxy; let the download try
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub resolve from its local cache only (fails fast instead of retrying for a minute)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


class _DropOpenClipErrors(logging.Filter):
    """Drops the ERROR records open_clip sends to the root logger while we re-raise its failure,
    and its "No pretrained weights loaded" warning where we load the weights ourselves."""

    def __init__(self, *, weights_loaded_here: bool = False) -> None:
        super().__init__()
        self.weights_loaded_here = weights_loaded_here

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        if self.weights_loaded_here and record.getMessage().startswith("No pretrained weights loaded"):
            return False
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_open_clip_errors(*, weights_loaded_here: bool = False) -> Iterator[None]:
    """Silence open_clip's own "Failed to download" log line: the error we raise says it better.

    A NullHandler on the root logger for the duration also keeps ``logging.error`` from calling
    ``basicConfig()`` and changing the process's logging setup.
    """
    root = logging.getLogger()
    drop, null = _DropOpenClipErrors(weights_loaded_here=weights_loaded_here), logging.NullHandler()
    root.addFilter(drop)
    root.addHandler(null)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(null)


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive, the format of OpenAI's released CLIP ``.pt`` files.

    The test is torch's own: a ``constants.pkl`` record at the archive's top level
    (``<archive>/constants.pkl``; ``torch.save`` zips hold ``data.pkl`` only). Such files are read
    with ``torch.jit.load`` (see :func:`_torchscript_state_dict`), never unpickled.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


#: Entries of OpenAI's TorchScript CLIP state dicts that are not weights.
_TORCHSCRIPT_METADATA = ("input_resolution", "context_length", "vocab_size")


def _torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights of a TorchScript CLIP archive (OpenAI's release format), loaded with ``torch.jit.load``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated")
        archive = torch.jit.load(path, map_location="cpu")
    return {k: v for k, v in archive.state_dict().items() if k not in _TORCHSCRIPT_METADATA}


def needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """True when the weights were trained with QuickGELU.

    That is: ``-quickgelu`` names, the ``openai`` tag and tags open_clip marks so, and local
    OpenAI TorchScript files (``ViT-B-16.pt`` as OpenAI released it). A plain state dict of
    OpenAI weights cannot be told apart: set ``force_quick_gelu`` for it.
    """
    if model_name.endswith("-quickgelu") or (pretrained or "").lower() == "openai":
        return True
    if pretrained and os.path.isfile(pretrained):
        return is_torchscript_archive(pretrained)
    if pretrained:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        return bool(cfg.get("quick_gelu", False))
    return False


def model_config(model_name: str, *, quick_gelu: bool | None = None, name_key: str = "recipe key model.clip_name") -> dict[str, Any]:
    """The open_clip architecture config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of ``model_name``.

    ``quick_gelu`` True / False sets the activation; None keeps the config's own. ``name_key`` is where
    the user gave the name, which an unknown name's error names.
    """
    import open_clip

    register_bundled_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        import difflib

        names = open_clip.list_models()
        close = difflib.get_close_matches(model_name, names, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        vits = ", ".join(m for m in names if m.startswith("ViT-") and "quickgelu" not in m)[:300]
        raise ValueError(f"unknown open_clip model {model_name!r} ({name_key}); {hint}ViT models include: {vits} ...")
    cfg = copy.deepcopy(cfg)
    if quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)
    return cfg


def plain_open_clip_name(clip_config: Mapping[str, Any]) -> str | None:
    """The open_clip model name that builds ``clip_config``'s architecture with its activation, in an
    open_clip without mergekit_video (``ViT-B-16-quickgelu`` for OpenAI ``ViT-B-16`` weights); None when
    plain open_clip has no such config (a bundled or converted architecture: use ``local-dir:``)."""
    import open_clip

    name, quick_gelu = clip_config.get("name"), bool(clip_config.get("quick_gelu", False))
    if not isinstance(name, str) or name in bundled_model_names():
        return None
    for candidate in (name, f"{name}-quickgelu" if quick_gelu and not name.endswith("-quickgelu") else None):
        cfg = open_clip.get_model_config(candidate) if candidate else None
        if cfg is not None and bool(cfg.get("quick_gelu", False)) == quick_gelu:
            return candidate
    return None


def clip_choice_problem(model_name: str, pretrained: str | None) -> tuple[str, str] | None:
    """What is wrong with an open_clip ``model_name`` / ``pretrained`` pair, checked offline, or None.

    Returns ``("clip_name" | "pretrained", message)``: an unknown architecture, or a ``pretrained``
    that is neither an open_clip tag of that architecture nor a file path (a path is left to the
    path checks). Used by recipe validation, before anything is built or downloaded.
    """
    import open_clip

    from ..config.schema import looks_like_weights_file

    try:
        model_config(model_name)
    except ValueError as exc:
        return "clip_name", str(exc).replace(" (recipe key model.clip_name)", "")
    if not isinstance(pretrained, str) or pretrained.lower() in ("", "none", "null", "random"):
        return None
    if os.path.exists(pretrained) or looks_like_weights_file(pretrained):
        return None
    tags = open_clip.list_pretrained_tags_by_model(model_name.removesuffix("-quickgelu"))
    if pretrained in tags or open_clip.get_pretrained_cfg(model_name, pretrained):
        return None
    import difflib

    close = difflib.get_close_matches(pretrained, tags, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return "pretrained", (f"{pretrained!r} is neither an open_clip pretrained tag for {model_name} nor a file; {hint}"
                          f"tags for {model_name}: {', '.join(tags) or 'none'}")


def build_clip_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Instantiate an open_clip model directly from an architecture config (no name lookup, random weights).

    The class is chosen as open_clip's factory does: ``CustomTextCLIP`` for ``custom_text``
    configs and Hugging Face text towers (SigLIP, ViTamin, ...), ``CoCa`` for a
    ``multimodal_cfg``, else ``CLIP``.
    """
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(cfg)
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        from open_clip.coca_model import CoCa

        return CoCa(**cfg)
    return CustomTextCLIP(**cfg) if custom_text else CLIP(**cfg)


def _short_load_error(exc: BaseException) -> str:
    """torch's load_state_dict error (hundreds of key names) as counts and the first keys of each kind."""
    text = str(exc)
    if "Error(s) in loading state_dict" not in text:
        return text if len(text) <= 600 else text[:600] + " ..."
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*(?:Unexpected|size mismatch|$)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:size mismatch|$)")):
        m = re.search(pattern, text, re.S)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} key{'s' * (len(keys) != 1)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    mismatched = re.findall(r"size mismatch for ([^:]+):", text)
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape ({', '.join(mismatched[:3])}{', ...' if len(mismatched) > 3 else ''})")
    return "its tensors do not fit: " + "; ".join(parts) if parts else text[:600]


def create_clip(
    model_name: str,
    *,
    pretrained: str | None = None,
    force_quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    recipe_key: str = "model.pretrained",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build an open_clip CLIP model and return ``(model, config)``.

    Args:
        model_name: open_clip architecture name (``ViT-B-16``, ``ViT-L-14``, ``mergevid-tiny-vit``...).
        pretrained: an open_clip tag, a local checkpoint file, or None / ``"none"`` for random weights.
        force_quick_gelu: QuickGELU on (True) or off (False); None switches it on when the
            name or the weights need it (see :func:`needs_quick_gelu`) and otherwise keeps the
            config's own. Set it to True for OpenAI weights saved as a plain state dict.
        cache_dir: download cache for tags.
        recipe_key: the recipe key to name in error messages.

    Returns:
        The model (fp32, CPU, eval mode) and a JSON-able config that rebuilds its architecture
        with :func:`build_clip_from_config`.
    """
    import open_clip

    from ..config.schema import looks_like_weights_file

    register_bundled_model_configs()
    if isinstance(pretrained, str) and pretrained.lower() in ("", "none", "null", "random"):
        pretrained = None
    if force_quick_gelu is None:
        quick_gelu = True if needs_quick_gelu(model_name, pretrained) else None  # None: the config's own
    else:
        quick_gelu = bool(force_quick_gelu)
    cfg = model_config(model_name, quick_gelu=quick_gelu)
    quick_gelu = bool(cfg.get("quick_gelu", False))

    if pretrained is not None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name.removesuffix("-quickgelu"))
        if pretrained not in tags and not open_clip.get_pretrained_cfg(model_name, pretrained):
            if looks_like_weights_file(pretrained):
                raise FileNotFoundError(f"pretrained weights file {pretrained!r} does not exist (set {recipe_key})")
            raise ValueError(
                f"{pretrained!r} is neither an open_clip pretrained tag for {model_name} nor a file "
                f"(set {recipe_key}); tags for {model_name}: {', '.join(tags) or 'none'}"
            )
    local_file = pretrained is not None and os.path.isfile(pretrained)
    # OpenAI's .pt files are TorchScript archives, which torch.load refuses with weights_only=True:
    # they are read with torch.jit.load instead (every other file keeps weights_only=True)
    torchscript = local_file and is_torchscript_archive(pretrained)
    offline = pretrained is not None and not local_file and not hub_reachable()
    try:
        with _hub_offline() if offline else contextlib.nullcontext(), _quiet_open_clip_errors(weights_loaded_here=torchscript):
            model = open_clip.create_model(
                model_name,
                pretrained=None if torchscript else pretrained,
                cache_dir=cache_dir,
                device="cpu",
                precision="fp32",
                force_quick_gelu=quick_gelu,  # open_clip checks it against the tag's activation
                quick_gelu=quick_gelu,  # a constructor argument: also turns QuickGELU off when asked
            )
            if torchscript:
                model.load_state_dict(_torchscript_state_dict(pretrained), strict=True)
    except Exception as exc:  # noqa: BLE001 - rewrap download/load failures for the user
        if pretrained is None:
            raise
        if os.path.isfile(pretrained):
            raise PretrainedWeightsError(
                f"could not load CLIP weights from {pretrained!r} into {model_name}: {_short_load_error(exc)}. "
                f"Check that the file holds {model_name} weights (set {recipe_key})."
            ) from exc
        raise PretrainedWeightsError(
            f"could not download the {model_name} weights for pretrained tag {pretrained!r} "
            f"({'no network access' if offline else 'download failed'}). Download them on a machine with internet, e.g. "
            f"`open_clip.create_model('{model_name}', pretrained='{pretrained}')` (or the OpenAI .pt file), "
            f"then pass the local file: set {recipe_key}=/path/to/weights.pt "
            f"(on the command line: `mergevid run RECIPE {recipe_key}=/path/to/weights.pt`). "
            "OpenAI's own .pt files get QuickGELU automatically; for OpenAI weights re-saved as a plain "
            "state dict also set model.force_quick_gelu=true."
        ) from exc
    model.eval()
    config = {"name": model_name, "pretrained": pretrained, "quick_gelu": bool(cfg.get("quick_gelu", False)), "model_cfg": cfg}
    return model, config


def interpolate_weights(finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """α·θ_finetuned + (1−α)·θ_base for every key both hold with one shape (the others as fine-tuned).

    The official MoTE ``test.py`` patches the fine-tuned visual tower and ``logit_scale`` this way
    (α = 0.99) before every evaluation it reports.
    """
    out = dict(finetuned)
    for k, v in finetuned.items():
        b = base.get(k)
        if b is not None and b.shape == v.shape and v.is_floating_point():
            out[k] = alpha * v + (1 - alpha) * b.to(device=v.device, dtype=v.dtype)
    return out


def pretrained_clip_state(model: nn.Module, *, weights: str | None = None, cache_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The visual tower and ``logit_scale`` of the pretrained CLIP ``model`` was built from (CPU),
    for ``eval.clip_blend``; ``weights`` (a tag or file: ``eval.clip_blend_weights``) overrides
    the ``model.pretrained`` its config records.

    Raises:
        ValueError: no pretrained weights to blend with, or the model holds a blend already.
    """
    clip_cfg = model.config["clip"]
    done = (model.config.get("converted_from") or {}).get("interpolate_alpha")
    if done is not None:
        raise ValueError(f"eval.clip_blend: this model holds a blend already (converted with --interpolate-alpha {done}); unset eval.clip_blend")
    weights = weights or clip_cfg.get("pretrained")
    if not weights:
        raise ValueError(
            "eval.clip_blend blends the fine-tuned CLIP with the pretrained weights it started from, but this model "
            f"was built without any ({clip_cfg.get('name')} with pretrained=null); set eval.clip_blend_weights to them, "
            "or unset eval.clip_blend"
        )
    base, _ = create_clip(clip_cfg["name"], pretrained=weights, force_quick_gelu=clip_cfg.get("quick_gelu"), cache_dir=cache_dir,
                          recipe_key="eval.clip_blend_weights")
    return {k: v.detach() for k, v in base.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}


@contextlib.contextmanager
def clip_blended_with_pretrained(model: nn.Module, alpha: float | None, base: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Context manager: ``model.clip``'s visual tower and ``logit_scale`` are :func:`interpolate_weights`
    with ``base`` (:func:`pretrained_clip_state`), restored afterwards. ``alpha=None`` changes nothing.

    Parameters ``base`` lacks (experts added to the visual tower) stay as trained, with a warning.
    """
    if alpha is None or base is None:
        yield
        return
    params = {k: v for k, v in model.clip.state_dict(keep_vars=True).items() if k.startswith("visual.") or k == "logit_scale"}
    unblended = [k for k, v in params.items() if k not in base or base[k].shape != v.shape]
    if unblended:
        log.warning("eval.clip_blend: %d of %d visual tensors have no pretrained counterpart (experts in the visual tower?) and "
                    "are evaluated as trained, e.g. %s", len(unblended), len(params), unblended[0])
    original = {k: v.detach().to("cpu", copy=True) for k, v in params.items()}
    try:
        with torch.no_grad():
            for k, v in params.items():
                if k not in unblended:
                    v.mul_(alpha).add_(base[k].to(device=v.device, dtype=v.dtype), alpha=1 - alpha)
        yield
    finally:
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(original[k])


def load_tokenizer(model_name: str) -> Any:
    """open_clip's tokenizer for ``model_name``, with a clear error when it cannot be loaded.

    OpenAI-style models use the BPE vocabulary bundled with open_clip; others (SigLIP, MT5...)
    use a Hugging Face tokenizer, which needs ``transformers`` and a download (or a local cache).
    """
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except ImportError as exc:
        raise TokenizerUnavailableError(
            f"the {model_name} text tokenizer needs the {exc.name or 'missing'!r} package: pip install {exc.name or 'transformers'}"
        ) from exc
    except OSError as exc:  # Hugging Face Hub download or local-cache miss
        raise TokenizerUnavailableError(
            f"could not load the {model_name} text tokenizer from the Hugging Face Hub ({type(exc).__name__}). "
            f"On an offline machine, run open_clip.get_tokenizer('{model_name}') once where there is internet "
            "and point HF_HOME at that cache; or choose an OpenAI-style model (ViT-B-16, ViT-L-14), whose "
            "tokenizer ships with open_clip."
        ) from exc


def text_tower_state(clip_model: nn.Module) -> dict[str, torch.Tensor]:
    """The text-tower tensors of an open_clip model: everything except ``visual`` and the logit scale and bias.

    Covers both layouts: ``CLIP`` (``token_embedding``, ``transformer``, ``ln_final``,
    ``text_projection``...) and ``CustomTextCLIP`` (``text.*``).
    """
    sd = clip_model.state_dict()
    return {k: v for k, v in sd.items() if not k.startswith(NON_TEXT_PREFIXES)}


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def encode_class_names(
    clip_model: nn.Module,
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = MOTE_TEMPLATES,
    tokenizer: Any = None,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Prompt-ensembled class features ``[C, D]`` (MoTE §4.1 / Table 8).

    For every template: encode all classes, L2-normalise; then average over templates and
    L2-normalise again (the official implementation's order).
    """
    if tokenizer is None:
        if model_name is None:
            raise ValueError("encode_class_names needs tokenizer= or model_name=")
        register_bundled_model_configs()
        tokenizer = load_tokenizer(model_name)
    if device is None:
        device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    per_template = []
    for template in templates:
        texts = [template.format(c) for c in class_names]
        feats = []
        for i in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[i : i + batch_size]).to(device)
            feats.append(clip_model.encode_text(tokens).float())
        per_template.append(F.normalize(torch.cat(feats), dim=-1))  # [C, D]
    clip_model.train(was_training)
    mean = torch.stack(per_template).mean(dim=0)  # [C, D]
    return F.normalize(mean, dim=-1)


class ClassFeatureCache:
    """On-disk cache of class text features.

    Key: (model name and architecture, hash of the text-tower weights, class names, templates). Files are
    safetensors written atomically under ``directory`` (default ``$MERGEKIT_VIDEO_CACHE`` or
    ``~/.cache/mergekit_video``), in ``text_features/``.
    """

    def __init__(self, *, directory: str | os.PathLike | None = None) -> None:
        root = directory or os.environ.get("MERGEKIT_VIDEO_CACHE") or Path.home() / ".cache" / "mergekit_video"
        self.directory = Path(root) / "text_features"
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(
        model_name: str,
        weights_hash: str,
        class_names: Sequence[str],
        templates: Sequence[str],
        *,
        architecture: Mapping[str, Any] | None = None,
    ) -> str:
        """The cache key (a hex digest) of one feature set.

        ``architecture`` is what the weights do not pin down: the open_clip config (heads,
        activation, context length...) and the text tower's module classes.
        """
        payload = json.dumps(
            [model_name, weights_hash, list(class_names), list(templates), architecture or {}],
            ensure_ascii=False,
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get_or_compute(
        self,
        clip_model: nn.Module,
        class_names: Sequence[str],
        *,
        model_name: str,
        templates: Sequence[str] = MOTE_TEMPLATES,
        weights_hash: str | None = None,
        model_cfg: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Load cached features or compute and store them. Returns ``[C, D]`` float32 on CPU.

        ``model_cfg`` is the open_clip architecture config the model was built from (it enters
        the key with the text tower's module classes, so that QuickGELU and GELU builds of the
        same weights never share an entry).
        """
        from safetensors.torch import load_file

        weights_hash = weights_hash or tensors_hash(text_tower_state(clip_model))
        modules = sorted({type(m).__name__ for n, m in clip_model.named_modules() if not n.startswith("visual")})
        architecture = {"model_cfg": dict(model_cfg or {}), "text_modules": modules}
        key = self.key(model_name, weights_hash, class_names, templates, architecture=architecture)
        path = self.directory / f"{key}.safetensors"
        if path.is_file():
            try:
                feats = load_file(str(path))["class_features"]
                if feats.shape[0] == len(class_names):
                    self.hits += 1
                    return feats
            except Exception as exc:  # noqa: BLE001 - a bad cache file is recomputed, not fatal
                log.warning("ignoring unreadable text-feature cache %s: %s", path, exc)
        self.misses += 1
        feats = encode_class_names(clip_model, class_names, templates=templates, model_name=model_name, device=device).cpu()
        meta = {"model_name": model_name, "weights_hash": weights_hash, "num_classes": str(len(class_names))}
        remove_stale_atomic_temps(path)  # a write of this entry that a kill cut short (the cache is shared by runs)
        atomic_save_safetensors(path, {"class_features": feats}, metadata=meta)
        return feats
