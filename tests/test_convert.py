"""Import of official MoTE checkpoints: key mapping, shape inference, logits equal to the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mergekit_video.models import load, save_model
from mergekit_video.models.convert import ConversionError, convert_official, infer_architecture, load_official_checkpoint
from official_reference import official_checkpoint as _official_checkpoint


def _compare(model, clip, head, classes=9, atol=1e-4):
    grid = int(round((clip.visual.positional_embedding.shape[0] - 1) ** 0.5))
    size = clip.visual.conv1.weight.shape[-1] * grid
    frames = torch.randn(3, 8, 3, size, size)
    cls = F.normalize(torch.randn(classes, head.frame_position_embeddings.weight.shape[1]), dim=-1)
    with torch.no_grad():
        e_ref = clip.encode_image(frames)
        e_ours = model.encode_frames(frames)
        assert (e_ref - e_ours).abs().max() < atol
        for tfm in (True, False):
            ref = head(e_ref, cls, modulation=tfm)
            ours = model(frames, cls, modulation=tfm)
            assert (ref - ours).abs().max() <= atol, f"TFM={tfm}: max diff {(ref - ours).abs().max():.2e}"
    assert torch.allclose(model.logit_scale, clip.logit_scale)


def test_convert_round_trip_matches_official_logits(tmp_path):
    ckpt, clip, head = _official_checkpoint()
    path = tmp_path / "mote_official.pt"
    torch.save(ckpt, path)
    model = convert_official(load_official_checkpoint(path))
    arch = infer_architecture(
        {k[7:]: v for k, v in ckpt["model_state_dict"].items()}, {k[7:]: v for k, v in ckpt["fusion_model_state_dict"].items()}
    )
    assert (arch.image_size, arch.patch_size, arch.vision_width, arch.vision_layers, arch.embed_dim) == (32, 8, 64, 2, 64)
    assert (arch.temporal_layers, arch.num_experts, arch.num_source_classes) == (2, 4, 7)
    assert model.config["clip"]["name"] == "mergevid-tiny-vit"
    assert model.config["converted_from"]["epoch"] == 19
    _compare(model, clip, head)
    # save → load keeps everything, including the 7 source classes
    save_model(model, tmp_path / "converted")
    again = load(tmp_path / "converted")
    assert again.head.source_class_features.shape == (7, 64)
    _compare(again, clip, head)
    with pytest.raises(ValueError, match="no text-tower weights"):
        again.class_features(["x"])


def test_convert_nonzero_fusion_weights_and_baseline(tmp_path):
    ckpt, clip, head = _official_checkpoint(fusion=[0.5, -1.0, 2.0, 0.0], seed=1)
    model = convert_official(ckpt)
    assert model.config["head"]["merge"] == "weighted"
    _compare(model, clip, head)
    ckpt0, clip0, head0 = _official_checkpoint(experts=0, seed=2)
    base = convert_official(ckpt0)
    assert base.config["head"]["num_experts"] == 0
    _compare(base, clip0, head0)


def test_convert_infers_other_sizes_without_a_matching_open_clip_config():
    ckpt, clip, head = _official_checkpoint(width=128, layers=1, image=48, patch=16, embed=96, t_layers=3, experts=2, classes=5, seed=3)
    model = convert_official(ckpt)
    cfg = model.config["clip"]["model_cfg"]
    assert cfg["vision_cfg"] == {"image_size": 48, "layers": 1, "width": 128, "patch_size": 16, "head_width": 64}
    assert model.config["head"]["layers"] == 3 and model.config["head"]["num_experts"] == 2
    _compare(model, clip, head)
    # a tower narrower than 64 gets one head (width // 64 = 0 heads could not be built)
    narrow, _, _ = _official_checkpoint(width=48, embed=48, seed=4)
    model = convert_official(narrow)
    assert model.config["clip"]["model_cfg"]["vision_cfg"]["head_width"] == 48
    assert model.clip.visual.transformer.resblocks[0].attn.num_heads == 1


def test_convert_rejects_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ConversionError, match="not an official MoTE checkpoint"):
        load_official_checkpoint(bad)
    ckpt, _, _ = _official_checkpoint()
    ckpt["fusion_model_state_dict"]["module.extra.thing"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="unexpected key 'extra.thing'"):
        convert_official(ckpt)


def test_convert_names_unreadable_files_in_one_line(tmp_path, capsys):
    """Random bytes, an empty file and a pickle with a foreign class: one line, weights_only stays on."""
    import argparse

    from mergekit_video.cli.main import main as cli_main

    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes([171]) + bytes(range(64)))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, foreign)
    expect = {
        noise: "UnpicklingError: Unsupported operand 171",
        empty: "EOFError",
        foreign: "UnpicklingError: Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default",
    }
    for path, why in expect.items():
        with pytest.raises(ConversionError) as info:
            load_official_checkpoint(path)
        if path is foreign:  # a real checkpoint with objects besides tensors: the safety refusal is the reason
            assert str(info.value) == (f"{path} is a PyTorch checkpoint holding objects other than tensors, which cannot be "
                                       f"loaded safely (weights_only=True): {why}")
        else:
            assert str(info.value) == f"{path} is not a PyTorch checkpoint file ({why})"
    assert cli_main(["convert", "mote-official", str(noise), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: {noise} is not a PyTorch checkpoint file ({expect[noise]})"
    assert "weights_only` set to `False`" not in err and not (tmp_path / "out").exists()


def test_official_test_time_clip_blend_in_convert_and_in_evaluation(tmp_path):
    """The official test.py evaluates 0.99·θ_finetuned + 0.01·θ_CLIP (visual tower, logit_scale)."""
    from mergekit_video.models import build_video_clip
    from mergekit_video.models.clip import clip_blended_with_pretrained, create_clip, interpolate_weights, pretrained_clip_state

    a, b = {"w": torch.ones(2), "i": torch.tensor([3]), "only_a": torch.zeros(1)}, {"w": torch.zeros(2), "i": torch.tensor([5])}
    mixed = interpolate_weights(a, b, 0.99)
    assert torch.allclose(mixed["w"], torch.full((2,), 0.99)) and mixed["i"].item() == 3 and mixed["only_a"] is a["only_a"]
    # CLIP weights on disk, as model.pretrained / --clip-pretrained name them
    clip, _ = create_clip("mergevid-tiny-vit", force_quick_gelu=True)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), weights)
    pre = clip.state_dict()
    # convert --interpolate-alpha 0.99
    ckpt, _, _ = _official_checkpoint()
    blended = convert_official(ckpt, clip_pretrained=str(weights), interpolate_alpha=0.99).clip.state_dict()
    raw = convert_official(ckpt, clip_pretrained=str(weights)).clip.state_dict()
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.allclose(blended[key], 0.99 * raw[key] + 0.01 * pre[key], atol=1e-6)
    assert torch.equal(blended["text_projection"], raw["text_projection"])  # the text tower is CLIP's own either way
    assert convert_official(ckpt, clip_pretrained=str(weights), interpolate_alpha=0.99).config["converted_from"]["interpolate_alpha"] == 0.99
    # eval.clip_blend: blended for the evaluation, restored after
    model = build_video_clip(clip_name="mergevid-tiny-vit", pretrained=str(weights), temporal_layers=1, num_experts=2)
    p = model.clip.visual.transformer.resblocks[0].mlp.c_fc.weight
    with torch.no_grad():
        p.add_(1.0)  # "fine-tuned"
    tuned = p.detach().clone()
    base = pretrained_clip_state(model)
    assert set(base) == {k for k in model.clip.state_dict() if k.startswith("visual.") or k == "logit_scale"}
    with clip_blended_with_pretrained(model, 0.99, base):
        assert torch.allclose(p, 0.99 * tuned + 0.01 * pre[key], atol=1e-6)
    assert torch.equal(p, tuned)
    with pytest.raises(RuntimeError, match="inside"), clip_blended_with_pretrained(model, 0.5, base):
        raise RuntimeError("inside")
    assert torch.equal(p, tuned)  # restored after an error too
    with clip_blended_with_pretrained(model, None, base):
        assert torch.equal(p, tuned)
    # no weights to blend with, or a model that holds a blend already: said when the runner is set up
    random_init = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    with pytest.raises(ValueError, match=r"^eval.clip_blend blends the fine-tuned CLIP with the pretrained weights it started from"):
        pretrained_clip_state(random_init)
    assert set(pretrained_clip_state(random_init, weights=str(weights))) == set(base)  # eval.clip_blend_weights
    with pytest.raises(ValueError, match=r"holds a blend already \(converted with --interpolate-alpha 0.99\)"):
        pretrained_clip_state(convert_official(ckpt, clip_pretrained=str(weights), interpolate_alpha=0.99))


_VISUAL = "model_state_dict does not fit the vision tower its shapes describe (2 layers of width 64, patch 8, image 32, embedding 64): it "
_HEAD = "fusion_model_state_dict does not fit the 2-layer temporal head of width 64 with 4 experts per layer that its shapes describe: it "


def _pop(entry, *keys):
    return lambda c: [c[entry].pop(f"module.{k}") for k in keys]


def _set(entry, key, value):
    return lambda c: c[entry].__setitem__(key, value)


_FC3 = [f"transformer.resblocks.1.mlp.{m}.3.{p}" for m in ("fc_up", "fc_dn") for p in ("weight", "bias")]
_MALFORMED = {
    "missing visual tensor": (_pop("model_state_dict", "visual.transformer.resblocks.1.attn.in_proj_weight"),
                              _VISUAL + "lacks 1 tensor ('visual.transformer.resblocks.1.attn.in_proj_weight')"),
    "missing ln_post and logit_scale": (_pop("model_state_dict", "visual.ln_post.weight", "logit_scale"),
                                        _VISUAL + "lacks 2 tensors ('logit_scale', 'visual.ln_post.weight')"),
    "extra visual layer": (_set("model_state_dict", "module.visual.transformer.resblocks.5.ln_1.weight", torch.zeros(64)),
                           "the visual tower's layers (visual.transformer.resblocks.N) must be numbered 0..n-1 without gaps; the checkpoint holds [0, 1, 5]"),
    "extra visual tensor": (_set("model_state_dict", "module.visual.foo", torch.zeros(1)), _VISUAL + "has 1 unexpected tensor ('visual.foo')"),
    "wrong-shaped ln_pre": (_set("model_state_dict", "module.visual.ln_pre.weight", torch.zeros(10)),
                            _VISUAL + "has 1 tensor of another shape ('visual.ln_pre.weight' [10], expected [64])"),
    "missing expert 3 of layer 1": (_pop("fusion_model_state_dict", *_FC3),
                                    _HEAD + "lacks 4 tensors ('transformer.resblocks.1.mlp.fc_dn.3.bias', 'transformer.resblocks.1.mlp.fc_dn.3.weight', "
                                    "'transformer.resblocks.1.mlp.fc_up.3.bias' (and 1 more))"),
    "wrong-shaped fc_up": (_set("fusion_model_state_dict", "module.transformer.resblocks.0.mlp.fc_up.1.weight", torch.zeros(10, 64)),
                           _HEAD + "has 1 tensor of another shape ('transformer.resblocks.0.mlp.fc_up.1.weight' [10, 64], expected [256, 64])"),
    "frame positions of width 32": (_set("fusion_model_state_dict", "module.frame_position_embeddings.weight", torch.zeros(77, 32)),
                                    _HEAD + "has 1 tensor of another shape ('frame_position_embeddings.weight' [77, 32], expected [77, 64])"),
    "fusion weight of 3 for 4 experts": (_set("fusion_model_state_dict", "module.transformer.resblocks.0.mlp.mote_fusion_weight", torch.zeros(3)),
                                         "fusion_model_state_dict's 'transformer.resblocks.0.mlp.mote_fusion_weight' has shape [3]; "
                                         "the head has 4 experts per layer, so [4] is expected"),
    "a non-tensor value": (_set("model_state_dict", "module.visual.conv1.weight", 5),
                           "model_state_dict entry 'module.visual.conv1.weight' is an object of type int, not a tensor"),
    "model_state_dict a tensor": (lambda c: c.__setitem__("model_state_dict", torch.zeros(3)),
                                  "the checkpoint's model_state_dict is a Tensor, not a dict of tensors: not an official MoTE checkpoint"),
    "fusion a list": (lambda c: c.__setitem__("fusion_model_state_dict", [1, 2]),
                      "the checkpoint's fusion_model_state_dict is a list, not a dict of tensors: not an official MoTE checkpoint"),
    "with and without module.": (_set("fusion_model_state_dict", "transformer.resblocks.0.ln_1.weight", torch.ones(64)),
                                 "fusion_model_state_dict holds 1 key both with and without DDP's 'module.' prefix "
                                 "('transformer.resblocks.0.ln_1.weight'): which of the two to convert is ambiguous; keep one of each"),
}


def test_convert_refuses_checkpoints_that_do_not_supply_the_model_exactly(tmp_path, capsys):
    """Nothing of the visual tower or the head is left from a random init: a missing, extra or wrong-shaped
    tensor, a gap in the layer numbering, a foreign container or an ambiguous key is one ConversionError."""
    import copy

    from mergekit_video.cli.main import main as cli_main

    ckpt, clip, head = _official_checkpoint()
    model = convert_official(ckpt)
    ours = model.clip.state_dict()
    official = {k[7:]: v for k, v in ckpt["model_state_dict"].items()}
    assert {k for k in ours if k.startswith("visual.") or k == "logit_scale"} == set(official)
    assert all(torch.equal(ours[k], v) for k, v in official.items())  # every visual tensor is the checkpoint's
    for label, (mutate, message) in _MALFORMED.items():
        bad = copy.deepcopy(ckpt)
        mutate(bad)
        with pytest.raises(ConversionError) as info:
            convert_official(bad)
        assert str(info.value) == message, label
    with pytest.raises(ConversionError) as info:  # another architecture named: its shapes, not a torch dump
        convert_official(ckpt, clip_name="ViT-B-16")
    assert str(info.value).startswith("model_state_dict does not fit open_clip ViT-B-16's vision tower (--clip-name): it lacks 120 tensors "
                                      "('visual.transformer.resblocks.2.attn.in_proj_bias', ") and "32 tensors of another shape" in str(info.value)
    with pytest.raises(ValueError, match=r"^unknown open_clip model 'NoSuch' \(--clip-name\); "):  # said model.clip_name, a recipe key
        convert_official(ckpt, clip_name="NoSuch")
    # the CLI: one line, exit 1, no output folder
    bad = copy.deepcopy(ckpt)
    _MALFORMED["missing ln_post and logit_scale"][0](bad)
    torch.save(bad, tmp_path / "bad.pt")
    capsys.readouterr()
    assert cli_main(["convert", "mote-official", str(tmp_path / "bad.pt"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines()[0] == "error: " + _MALFORMED["missing ln_post and logit_scale"][1]
    assert not (tmp_path / "out").exists()


def test_interpolate_alpha_without_clip_weights_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
    from mergekit_video.cli.main import main as cli_main

    assert cli_main(["convert", "mote-official", str(tmp_path / "never_read.pt"), str(tmp_path / "out"), "--interpolate-alpha", "0.99"]) == 1
    assert capsys.readouterr().err.startswith("error: --interpolate-alpha needs --clip-pretrained: the CLIP weights to interpolate")
    assert cli_main(["convert", "mote-official", str(tmp_path / "x.pt"), str(tmp_path / "out"), "--interpolate-alpha", "2"]) == 2  # out of [0, 1]
