"""Clip transforms: one crop for all frames, flip/grayscale, CLIP normalisation, test crops and positions."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_video.data import CLIP_MEAN, CLIP_STD, TestTransform, TrainTransform, normalize_frames
from mergekit_video.data.transforms import crop_offsets, random_resized_crop_params


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def offset_clip(t: int = 6, h: int = 60, w: int = 80, step: int = 12, seed: int = 0) -> torch.Tensor:
    """[T, H, W, 3] uint8: one random picture, frame t brightened by t*step (no clipping)."""
    base = torch.randint(0, 160, (h, w, 3), generator=gen(seed), dtype=torch.uint8)
    return torch.stack([base + step * i for i in range(t)])


def test_random_resized_crop_params_respect_area_and_ratio():
    g = gen(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_params(120, 160, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=g)
        assert 0 <= top <= 120 - h and 0 <= left <= 160 - w and h > 0 and w > 0
        area = h * w / (120 * 160)
        assert 0.08 * 0.9 <= area <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1  # rounding to whole pixels
    # the fallback (scale larger than the frame allows) is a centre crop with the ratio clamped
    assert random_resized_crop_params(100, 400, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g) == (0, 150, 100, 100)


def test_same_crop_and_flip_on_every_frame():
    clip = offset_clip()
    for seed in range(6):
        out = TrainTransform(size=32, grayscale_p=0.0, normalize=False)(clip, gen(seed)).int()  # [T, 3, 32, 32]
        assert out.shape == (6, 3, 32, 32) and out.dtype == torch.int32
        for i in range(1, 6):
            # a resize is linear: the same crop of (base + c) is (crop of base) + c, up to rounding
            assert (out[i] - out[0] - 12 * i).abs().max().item() <= 1


def test_flip_and_grayscale_follow_their_coins():
    clip = offset_clip(t=3)
    params = TrainTransform(size=32).params(60, 80, gen(1))
    tr = TrainTransform(size=32, normalize=False)
    plain = tr.apply(clip, {**params, "flip": False, "grayscale": False})
    flipped = tr.apply(clip, {**params, "flip": True, "grayscale": False})
    assert torch.equal(flipped, plain.flip(-1))
    gray = tr.apply(clip, {**params, "flip": False, "grayscale": True}).int()
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    assert (gray[:, :1] - rgb_to_grayscale(plain.contiguous()).int()).abs().max().item() <= 1
    # probabilities: flip_p=0 never flips, grayscale_p=1 always greys
    never = TrainTransform(size=32, flip_p=0.0, grayscale_p=1.0)
    assert all(not never.params(60, 80, gen(s))["flip"] and never.params(60, 80, gen(s))["grayscale"] for s in range(20))
    rate = sum(TrainTransform().params(60, 80, gen(s))["flip"] for s in range(400)) / 400
    assert 0.4 < rate < 0.6


def test_train_transform_is_deterministic_and_layout_agnostic():
    clip = offset_clip()
    tr = TrainTransform(size=40)
    a, b = tr(clip, gen(5)), tr(clip, gen(5))
    assert a.dtype == torch.float32 and a.shape == (6, 3, 40, 40) and a.is_contiguous()
    assert torch.equal(a, b)
    assert torch.equal(tr(clip.permute(0, 3, 1, 2).contiguous(), gen(5)), a)  # [T,3,H,W] input gives the same clip
    assert not torch.equal(tr(clip, gen(6)), a)


def test_normalize_frames_matches_the_clip_formula():
    x = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(normalize_frames(x), expected, rtol=0, atol=1e-5)
    unit = x.float() / 255
    kept = unit.clone()
    torch.testing.assert_close(normalize_frames(unit), expected, rtol=0, atol=1e-5)
    assert torch.equal(unit, kept)  # the input is not modified
    assert normalize_frames(x, dtype=torch.bfloat16).dtype == torch.bfloat16
    cl = x[0].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last uint8, as the train path gives
    out = normalize_frames(cl)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        normalize_frames(torch.zeros(4, 8, 8))


def test_normalize_frames_builds_its_constants_once_per_device():
    """torch.tensor(mean, device=cuda) in every call was a blocking copy: each training step waited for the GPU."""
    from mergekit_video.data import transforms

    x = torch.randint(0, 256, (1, 2, 3, 4, 4), dtype=torch.uint8)
    with torch.inference_mode():  # first made under inference mode (an evaluation) ...
        first = normalize_frames(x)
    made = dict(transforms._constants)
    calls = []
    real = torch.tensor
    try:
        torch.tensor = lambda *a, **k: calls.append(a) or real(*a, **k)
        again = normalize_frames(x)  # ... reused outside it, with no new tensor built
    finally:
        torch.tensor = real
    assert calls == [] and transforms._constants == made and torch.equal(first, again)
    w = torch.ones(1, requires_grad=True)
    (normalize_frames(x) * w).sum().backward()  # the cached constants are ordinary tensors
    assert w.grad is not None


def column_coded(t: int, h: int, w: int, axis: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 whose value is the column (axis=1) or row (axis=0) number."""
    ramp = torch.arange(w if axis == 1 else h, dtype=torch.uint8)
    img = ramp.view(1, -1).expand(h, w) if axis == 1 else ramp.view(-1, 1).expand(h, w)
    return img.unsqueeze(-1).expand(h, w, 3).unsqueeze(0).expand(t, h, w, 3).contiguous()


def test_three_crops_left_centre_right_and_top_middle_bottom():
    # landscape 224 x 250: no resize; crops start at columns 0, 13, 26
    land = column_coded(2, 224, 250, axis=1)
    out = TestTransform(short_side=224, crop=224, num_crops=3, normalize=False)(land)
    assert out.shape == (3, 2, 3, 224, 224)
    assert [int(out[v, 0, 0, 0, 0]) for v in range(3)] == [0, 13, 26]
    assert [int(out[v, 1, 2, 100, -1]) for v in range(3)] == [223, 236, 249]
    # portrait 250 x 224: the crops slide down the rows
    port = column_coded(2, 250, 224, axis=0)
    out = TestTransform(short_side=224, crop=224, num_crops=3, normalize=False)(port)
    assert [int(out[v, 0, 0, 0, 5]) for v in range(3)] == [0, 13, 26]
    # one crop is the centre one of three
    one = TestTransform(short_side=224, crop=224, num_crops=1, normalize=False)(land)
    assert one.shape == (1, 2, 3, 224, 224) and torch.equal(one[0], TestTransform(num_crops=3, normalize=False)(land)[1])
    assert crop_offsets(300, 224, 3) == [0, 38, 76] and crop_offsets(300, 224, 1) == [38]


def test_test_transform_resizes_the_short_side_first():
    x = torch.randint(0, 256, (3, 96, 128, 3), dtype=torch.uint8)
    out = TestTransform(short_side=48, crop=40, num_crops=1)(x)
    assert out.shape == (1, 3, 3, 40, 40) and out.dtype == torch.float32
    from torchvision.transforms.v2.functional import resize

    ref = resize(x.permute(0, 3, 1, 2).contiguous(), [48, 64], antialias=True)[:, :, 4:44, 12:52]
    torch.testing.assert_close(out[0], normalize_frames(ref), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        TestTransform(short_side=200, crop=224)
    with pytest.raises(ValueError):
        TestTransform(num_crops=2)


def test_train_transform_validates_arguments():
    for kw in ({"size": 0}, {"scale": (0.5, 0.2)}, {"ratio": (0.0, 1.0)}, {"flip_p": 1.5}, {"grayscale_p": -0.1}):
        with pytest.raises(ValueError):
            TrainTransform(**kw)
    assert math.isclose(TrainTransform().ratio[1], 4 / 3)
