"""Checks that need a CUDA device (skipped without one; see benchmarks/gpu_checks.sh).

``MERGEVID_GPU_TESTS_DEVICE=cpu`` runs the same checks on the CPU, to check the tests themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mergekit_video.experts import find_containers
from mergekit_video.models import MoTEObjective, TemporalHead, build_video_clip, export_dense, load, save_model

DEVICE = os.environ.get("MERGEVID_GPU_TESTS_DEVICE", "cuda")
pytestmark = [] if DEVICE == "cpu" else [pytest.mark.gpu]
REPO = Path(__file__).resolve().parents[1]
TINY = "mergevid-tiny-vit"


def _autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")


def _classes(width: int, n: int = 6) -> torch.Tensor:
    return F.normalize(torch.randn(n, width, device=DEVICE), dim=-1)


def test_fused_paths_equal_separate_forwards_on_device():
    torch.manual_seed(0)
    classes = _classes(128)
    feats = torch.randn(4, 8, 128, device=DEVICE)
    labels = torch.tensor([0, 1, 2, 3], device=DEVICE)
    outs = []
    for fuse in (True, False):
        torch.manual_seed(3)
        head = TemporalHead(width=128, layers=2, num_experts=4, router_kwargs={"seed": 5}).to(DEVICE).train()
        out = MoTEObjective(wmr={"seed": 7}, fuse_paths=fuse)(head, feats, classes, labels, torch.tensor(50.0, device=DEVICE))
        out.loss.backward()
        outs.append((out, head.transformer.resblocks[1].mlp.experts[2].c_proj.weight.grad.clone()))
    (a, ga), (b, gb) = outs
    assert a.taus == b.taus
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.logits_wmr, b.logits_wmr, atol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_bf16_training_lowers_the_loss_and_keeps_fp32_weights():
    torch.manual_seed(1)
    classes = _classes(128)
    head = TemporalHead(width=128, layers=2, num_experts=4, router_kwargs={"seed": 0}).to(DEVICE).train()
    objective = MoTEObjective(wmr={"seed": 0})
    feats = F.normalize(torch.randn(6, 8, 128, device=DEVICE), dim=-1)
    labels = torch.arange(6, device=DEVICE)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, fused=DEVICE == "cuda")
    losses = []
    for _ in range(40):
        with _autocast():
            out = objective(head, feats, classes, labels, torch.tensor(100.0, device=DEVICE))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def test_merged_eval_is_cached_and_equals_the_dense_export_on_device(tmp_path):
    torch.manual_seed(2)
    model = build_video_clip(clip_name=TINY, temporal_layers=2, num_experts=4).to(DEVICE).eval()
    classes = _classes(model.head.width)
    model.head.set_source_class_features(classes[:5])
    frames = torch.randn(2, 8, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        ref = model(frames, classes, modulation=True)
        again = model(frames, classes, modulation=True)
    assert torch.equal(ref, again)
    assert [c.merge_count for _, c in find_containers(model.head)] == [1, 1]  # one merge per container, then the cache
    export_dense(model, tmp_path / "dense")
    dense = load(tmp_path / "dense", device=DEVICE)
    with torch.no_grad():
        assert torch.allclose(dense(frames, classes, modulation=True), ref, atol=1e-5)
        with _autocast():
            bf16 = model(frames, classes, modulation=True)
    assert torch.allclose(bf16.float(), ref, atol=5e-2)
    save_model(model, tmp_path / "mote")
    on_cpu = load(tmp_path / "mote", device="cpu")  # a CUDA-trained model reloads anywhere
    assert next(on_cpu.parameters()).device.type == "cpu"


def test_quickstart_end_to_end_on_device(tmp_path):
    from mergekit_video.cli.commands import _load_validated
    from mergekit_video.runners import run_recipe

    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", f"device={DEVICE}", "data.synthetic.videos_per_class=4", "data.synthetic.val_per_class=2",
        "data.synthetic.frames=16", "data.synthetic.size=[32,32]", "data.batch_size=6", "data.num_workers=2",
        "schedule.epochs=3", "schedule.warmup_epochs=1", "train.log_every=1", "eval.num_workers=0",
    ]
    run_recipe(_load_validated(REPO / "recipes" / "quickstart.yaml", overrides))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]  # close-set and zero-shot summary scores were computed
    assert (out / "model" / "head.safetensors").is_file() and (out / "tradeoff.png").is_file()


def test_bench_train_reports_mfu_on_device():
    from mergekit_video.cli.commands import _load_validated
    from mergekit_video.training.benchmark import bench_train

    cfg = _load_validated(REPO / "recipes" / "quickstart.yaml", ["output_dir=unused", f"device={DEVICE}"])
    res = bench_train(cfg, steps=3, warmup=1, batch_size=8)
    for label in ("mote", "baseline"):
        run = res["runs"][label]
        assert run["clips_per_s"] > 0
        if DEVICE == "cuda":
            assert run["flops_per_step"] > 0 and run["max_memory_gib"] > 0
            if "H100" in res["device"] or "H200" in res["device"]:
                assert 0 < run["mfu"] < 1
