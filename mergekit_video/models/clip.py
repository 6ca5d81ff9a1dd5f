"""CLIP backbones from open_clip, and class text features by prompt ensembling.

- :func:`create_clip` builds any open_clip model by name with weights from an open_clip
  pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a local checkpoint file, or none
  (random weights, offline). OpenAI weights get QuickGELU.
- :func:`encode_class_names` computes class text features with the 28 templates of MoTE
  Table 8: encode every template for every class, L2-normalise per template, average
  over templates, renormalise.
- :class:`ClassFeatureCache` keeps those features on disk, keyed by (model name, text
  weights hash, class names, templates).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.io import atomic_save_safetensors
from .prompts import MOTE_TEMPLATES

log = logging.getLogger(__name__)

_BUNDLED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_configs_registered = False

#: open_clip state-dict prefixes that belong to the text tower (standard CLIP layout).
TEXT_TOWER_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "attn_mask")


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
    """Drops the ERROR records open_clip sends to the root logger while we re-raise its failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "open_clip" in record.pathname)


@contextlib.contextmanager
def _quiet_open_clip_errors() -> Iterator[None]:
    """Silence open_clip's own "Failed to download" log line: the error we raise says it better.

    A NullHandler on the root logger for the duration also keeps ``logging.error`` from calling
    ``basicConfig()`` and changing the process's logging setup.
    """
    root = logging.getLogger()
    drop, null = _DropOpenClipErrors(), logging.NullHandler()
    root.addFilter(drop)
    root.addHandler(null)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(null)


def needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """True when the weights were trained with QuickGELU (OpenAI tags, ``-quickgelu`` names, tags marked so)."""
    if model_name.endswith("-quickgelu") or (pretrained or "").lower() == "openai":
        return True
    if pretrained and not os.path.isfile(pretrained):
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        return bool(cfg.get("quick_gelu", False))
    return False


def model_config(model_name: str, *, quick_gelu: bool = False) -> dict[str, Any]:
    """The open_clip architecture config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of ``model_name``."""
    import open_clip

    register_bundled_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if not m.startswith(("EVA", "coca", "hf-")))[:400]
        raise ValueError(f"unknown open_clip model {model_name!r} (recipe key model.clip_name); known models include: {known} ...")
    cfg = copy.deepcopy(cfg)
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def build_clip_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Instantiate an open_clip ``CLIP`` directly from an architecture config (no name lookup, random weights)."""
    from open_clip.model import CLIP

    cfg = copy.deepcopy(cfg)
    cfg.pop("custom_text", None)
    return CLIP(**cfg)


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
        force_quick_gelu: force QuickGELU on (True) or off (False); None decides from the tag.
        cache_dir: download cache for tags.
        recipe_key: the recipe key to name in error messages.

    Returns:
        The model (fp32, CPU, eval mode) and a JSON-able config that rebuilds its architecture
        with :func:`build_clip_from_config`.
    """
    import open_clip

    register_bundled_model_configs()
    if isinstance(pretrained, str) and pretrained.lower() in ("", "none", "null", "random"):
        pretrained = None
    quick_gelu = needs_quick_gelu(model_name, pretrained) if force_quick_gelu is None else bool(force_quick_gelu)
    cfg = model_config(model_name, quick_gelu=quick_gelu)

    if pretrained is not None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name.removesuffix("-quickgelu"))
        if pretrained not in tags and not open_clip.get_pretrained_cfg(model_name, pretrained):
            if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
                raise FileNotFoundError(f"pretrained weights file {pretrained!r} does not exist (set {recipe_key})")
            raise ValueError(
                f"{pretrained!r} is neither an open_clip pretrained tag for {model_name} nor a file "
                f"(set {recipe_key}); tags for {model_name}: {', '.join(tags) or 'none'}"
            )
    offline = pretrained is not None and not os.path.isfile(pretrained) and not hub_reachable()
    try:
        with _hub_offline() if offline else contextlib.nullcontext(), _quiet_open_clip_errors():
            model = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                force_quick_gelu=quick_gelu,
                cache_dir=cache_dir,
                device="cpu",
                precision="fp32",
            )
    except Exception as exc:  # noqa: BLE001 - rewrap download/load failures for the user
        if pretrained is None:
            raise
        if os.path.isfile(pretrained):
            raise PretrainedWeightsError(
                f"could not load CLIP weights from {pretrained!r} into {model_name}: {exc}. "
                f"Check that the file holds {model_name} weights (set {recipe_key})."
            ) from exc
        raise PretrainedWeightsError(
            f"could not download the {model_name} weights for pretrained tag {pretrained!r} "
            f"({'no network access' if offline else 'download failed'}). Download them on a machine with internet, e.g. "
            f"`open_clip.create_model('{model_name}', pretrained='{pretrained}')` (or the OpenAI .pt file), "
            f"then pass the local file: set {recipe_key}=/path/to/weights.pt "
            f"(on the command line: `mergevid run RECIPE {recipe_key}=/path/to/weights.pt`)."
        ) from exc
    model.eval()
    config = {"name": model_name, "pretrained": pretrained, "quick_gelu": bool(cfg.get("quick_gelu", False)), "model_cfg": cfg}
    return model, config


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
    """The text-tower tensors of a standard open_clip CLIP (everything except ``visual`` and the logit scale)."""
    sd = clip_model.state_dict()
    return {k: v for k, v in sd.items() if k.startswith(TEXT_TOWER_PREFIXES)}


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

    Key: (model name, hash of the text-tower weights, class names, templates). Files are
    safetensors written atomically under ``directory`` (default ``$MERGEKIT_VIDEO_CACHE`` or
    ``~/.cache/mergekit_video``), in ``text_features/``.
    """

    def __init__(self, *, directory: str | os.PathLike | None = None) -> None:
        root = directory or os.environ.get("MERGEKIT_VIDEO_CACHE") or Path.home() / ".cache" / "mergekit_video"
        self.directory = Path(root) / "text_features"
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_name: str, weights_hash: str, class_names: Sequence[str], templates: Sequence[str]) -> str:
        """The cache key (a hex digest) of one feature set."""
        payload = json.dumps([model_name, weights_hash, list(class_names), list(templates)], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get_or_compute(
        self,
        clip_model: nn.Module,
        class_names: Sequence[str],
        *,
        model_name: str,
        templates: Sequence[str] = MOTE_TEMPLATES,
        weights_hash: str | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Load cached features or compute and store them. Returns ``[C, D]`` float32 on CPU."""
        from safetensors.torch import load_file

        weights_hash = weights_hash or tensors_hash(text_tower_state(clip_model))
        key = self.key(model_name, weights_hash, class_names, templates)
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
        atomic_save_safetensors(path, {"class_features": feats}, metadata=meta)
        return feats
