"""Clip transforms on uint8 tensors, batched over the T frames of a clip (no per-frame PIL).

Frames arrive from the readers as ``[T, H, W, 3]``; viewing them as ``[T, 3, H, W]`` is free and
leaves them channels-last in memory, the layout torch's uint8 antialiased resize is fastest on.
Train: RandomResizedCrop shared by all frames, horizontal flip, grayscale (MoTE Table 6).
Test: short-side resize then one centre crop or three crops along the long side.
"""

from __future__ import annotations

import math
from typing import Any

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def to_tchw(frames: torch.Tensor) -> torch.Tensor:
    """``[T, H, W, 3]`` or ``[T, 3, H, W]`` -> ``[T, 3, H, W]`` (a view; no copy).

    A tensor whose last dimension is 3 is read as ``[T, H, W, 3]`` (the readers' layout).
    """
    if frames.dim() != 4:
        raise ValueError(f"expected frames [T,H,W,3] or [T,3,H,W], got shape {tuple(frames.shape)}")
    if frames.shape[-1] == 3:
        return frames.permute(0, 3, 1, 2)
    if frames.shape[1] == 3:
        return frames
    raise ValueError(f"expected frames [T,H,W,3] or [T,3,H,W], got shape {tuple(frames.shape)}")


_constants: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _normalization_constants(device: torch.device, dtype: torch.dtype, mean: tuple[float, ...], std: tuple[float, ...],
                             from_uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-mean/std, 1/std)`` as ``[3, 1, 1]`` tensors on ``device`` (``1/(255·std)`` for uint8 input), made
    once per device: building them with ``torch.tensor(..., device=cuda)`` is a blocking copy, which in
    every training step made the CPU wait for the GPU queue to drain."""
    key = (device, dtype, mean, std, from_uint8)
    if key not in _constants:
        with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
            m = torch.tensor(mean, dtype=dtype).view(3, 1, 1)
            s = torch.tensor(std, dtype=dtype).view(3, 1, 1)
            scale = 1.0 / s
            if from_uint8:
                scale = scale / 255.0
            _constants[key] = ((-m / s).to(device), scale.to(device))
    return _constants[key]


def normalize_frames(
    x: torch.Tensor,
    *,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """CLIP normalisation of ``[..., 3, H, W]`` frames: uint8 is scaled by 1/255 first.

    Runs on whatever device ``x`` lives on, so a trainer can ship uint8 batches to the GPU and
    normalise there (4x less host-to-device traffic and no CPU float work).
    """
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize_frames expects [..., 3, H, W], got shape {tuple(x.shape)}")
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    shift, scale = _normalization_constants(x.device, compute, tuple(mean), tuple(std), x.dtype == torch.uint8)
    # One pass converts dtype and layout (channels-last views become contiguous), one more scales and shifts.
    out = x.to(compute, memory_format=torch.contiguous_format)
    if out.data_ptr() == x.data_ptr():
        out = out.clone()  # never modify the caller's float tensor
    out = torch.addcmul(shift, out, scale, out=out)  # (x/255 - mean) / std
    return out.to(dtype) if compute != dtype else out


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64).item())


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high, (1,), generator=generator).item())


def random_resized_crop_params(
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box, with torchvision's algorithm.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; then a
    centre crop with the ratio clamped to ``ratio``.
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_r[0], log_r[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(height - h + 1, generator), _randint(width - w + 1, generator), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _warm_import() -> None:
    # torchvision's functional API takes ~1 s to import: pay it when a transform is built (in the main
    # process, before DataLoader workers fork), not on the first clip of every worker.
    import torchvision.transforms.v2.functional  # noqa: F401


def _resize(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    from torchvision.transforms.v2.functional import resize

    if list(x.shape[-2:]) == size:
        return x
    return resize(x, size, antialias=True)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma replicated on 3 channels; ``[T, 3, H, W]`` uint8 -> uint8 (float stays float)."""
    luma = x[:, 0:1].float().mul_(_LUMA[0]).add_(x[:, 1:2].float(), alpha=_LUMA[1]).add_(x[:, 2:3].float(), alpha=_LUMA[2])
    if x.dtype == torch.uint8:
        luma = luma.round_().clamp_(0, 255).to(torch.uint8)
    return luma.expand(-1, 3, -1, -1)


class TrainTransform:
    """Training augmentation of one clip, with every frame given the same random parameters.

    RandomResizedCrop(``size``, area ``scale``, aspect ``ratio``) -> horizontal flip (``flip_p``;
    0 for direction-sensitive data such as SSv2) -> grayscale (``grayscale_p``) -> CLIP
    normalisation (MoTE Table 6). The random draws come from ``generator`` in a fixed order
    (crop, flip, grayscale), so a seeded generator reproduces the clip exactly.
    """

    def __init__(
        self,
        *,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        grayscale_p: float = 0.2,
        normalize: bool = True,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        for name, p in (("flip_p", flip_p), ("grayscale_p", grayscale_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        _warm_import()
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.flip_p, self.grayscale_p, self.normalize = flip_p, grayscale_p, normalize

    def params(self, height: int, width: int, generator: torch.Generator | None) -> dict:
        """Draw the clip's random parameters: crop box, flip, grayscale."""
        top, left, h, w = random_resized_crop_params(height, width, scale=self.scale, ratio=self.ratio, generator=generator)
        coins = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        return {"top": top, "left": left, "height": h, "width": w, "flip": coins[0] < self.flip_p, "grayscale": coins[1] < self.grayscale_p}

    def apply(self, frames: torch.Tensor, params: dict) -> torch.Tensor:
        """Apply drawn ``params`` to ``[T,H,W,3]`` / ``[T,3,H,W]`` uint8 frames -> ``[T,3,size,size]``."""
        x = to_tchw(frames)
        t, l, h, w = params["top"], params["left"], params["height"], params["width"]
        x = _resize(x[:, :, t : t + h, l : l + w], [self.size, self.size])  # [T, 3, S, S]
        if params["flip"]:
            x = x.flip(-1)
        if params["grayscale"]:
            x = _grayscale(x)
        if self.normalize:
            return normalize_frames(x)  # contiguous float [T, 3, S, S]
        # uint8 stays channels-last in memory (no transpose on the CPU); normalize_frames on the GPU makes it contiguous.
        return x.contiguous(memory_format=torch.channels_last)

    def __call__(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment one clip: uint8 ``[T,H,W,3]`` or ``[T,3,H,W]`` -> ``[T,3,size,size]`` float (uint8 if not normalising)."""
        x = to_tchw(frames)
        return self.apply(x, self.params(x.shape[-2], x.shape[-1], generator))

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, "
                f"flip_p={self.flip_p}, grayscale_p={self.grayscale_p}, normalize={self.normalize})")


def crop_offsets(length: int, crop: int, num_crops: int) -> list[int]:
    """Start offsets of ``num_crops`` crops along one axis: 1 -> centre; 3 -> start, centre, end."""
    if crop > length:
        raise ValueError(f"crop {crop} is larger than the frame side {length}")
    if num_crops == 1:
        return [(length - crop) // 2]
    if num_crops == 3:
        return [0, (length - crop) // 2, length - crop]
    raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")


class TestTransform:
    """Evaluation view of a clip: resize the short side to ``short_side``, then crop.

    One crop is the centre; three crops are left/centre/right along the long side (top/middle/
    bottom for portrait frames), the 3-crop protocol of the 4x3-view close-set test.
    """

    __test__ = False  # not a pytest class

    def __init__(self, *, short_side: int = 224, crop: int = 224, num_crops: int = 1, normalize: bool = True) -> None:
        if crop > short_side:
            raise ValueError(f"crop ({crop}) must not exceed short_side ({short_side})")
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        _warm_import()
        self.short_side, self.crop, self.num_crops, self.normalize = short_side, crop, num_crops, normalize

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T,H,W,3]`` or ``[T,3,H,W]`` -> ``[num_crops, T, 3, crop, crop]`` (float if normalising)."""
        from .readers import resize_dims

        x = to_tchw(frames)
        h, w = resize_dims(x.shape[-2], x.shape[-1], self.short_side)
        x = _resize(x, [h, w])  # [T, 3, h, w]
        c = self.crop
        if w >= h:  # crops slide along the width
            tops = [(h - c) // 2] * self.num_crops
            lefts = crop_offsets(w, c, self.num_crops)
        else:
            tops = crop_offsets(h, c, self.num_crops)
            lefts = [(w - c) // 2] * self.num_crops
        crops = [x[:, :, t : t + c, l : l + c] for t, l in zip(tops, lefts)]
        views = crops[0].unsqueeze(0) if len(crops) == 1 else torch.stack(crops)  # [V, T, 3, c, c]
        return normalize_frames(views) if self.normalize else views.contiguous()

    def __repr__(self) -> str:
        return f"TestTransform(short_side={self.short_side}, crop={self.crop}, num_crops={self.num_crops}, normalize={self.normalize})"
