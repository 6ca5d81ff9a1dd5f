"""Nested state (dicts with any keys, tuples, lists, tensors, numbers) as JSON, and back.

Checkpoints keep optimizer, scheduler, RNG and other non-tensor state this way: tensors go to a
safetensors file under generated keys, or, when small, inline as base64.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import torch

_MARKERS = ("__tensor__", "__tuple__", "__items__")


class StateEncoder:
    """Turns nested state (dicts with any keys, tuples, tensors, numbers) into JSON.

    Tensors go to ``self.tensors`` under generated keys (``inline=False``, for safetensors) or
    are embedded as base64 (``inline=True``, for small states such as RNG byte tensors).
    """

    def __init__(self, *, inline: bool, what: str) -> None:
        self.inline = inline
        self.what = what
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_id: dict[int, str] = {}

    def encode(self, obj: Any, path: str = "") -> Any:
        """JSON-able form of ``obj``; tensors become references into :attr:`tensors` (or base64 with ``inline``)."""
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._tensor(obj, path)}
        if isinstance(obj, (bool, int, float, str)) or obj is None:
            return obj
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
                return {k: self.encode(v, f"{path}.{k}") for k, v in obj.items()}
            return {"__items__": [[self.encode(k, path), self.encode(v, f"{path}.{k}")] for k, v in obj.items()]}
        if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
            return obj.item()
        raise TypeError(f"checkpoint: cannot store {self.what}{path} of type {type(obj).__name__}")

    def _tensor(self, t: torch.Tensor, path: str) -> Any:
        t = t.detach()
        if self.inline:
            flat = t.to("cpu").contiguous().reshape(-1)
            raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
            return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "data": base64.b64encode(raw).decode("ascii")}
        if id(t) in self._by_id:  # the same tensor object twice: store once
            return self._by_id[id(t)]
        key = path.lstrip(".") or "tensor"
        while key in self.tensors:
            key += "_"
        self.tensors[key] = t
        self._by_id[id(t)] = key
        return key


def decode_state(obj: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> Any:
    """The state :class:`StateEncoder` encoded (``tensors``: the stored tensors it refers to by key)."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k == "__tensor__":
                return _decode_tensor(v, tensors)
            if k == "__tuple__":
                return tuple(decode_state(x, tensors) for x in v)
            if k == "__items__":
                return {decode_state(a, tensors): decode_state(b, tensors) for a, b in v}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


def _decode_tensor(ref: Any, tensors: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    if isinstance(ref, str):
        if tensors is None or ref not in tensors:
            raise ValueError(f"checkpoint is inconsistent: tensor {ref!r} is missing from its safetensors file")
        return tensors[ref]
    dtype = getattr(torch, ref["dtype"])
    raw = base64.b64decode(ref["data"])
    if not raw:
        return torch.empty(ref["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(ref["shape"]).clone()


def split_tensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor entries, other entries) of a state dict: the first go to safetensors, the others to JSON."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if k not in tensors}
