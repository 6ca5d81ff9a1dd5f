"""Training infrastructure: RNG, schedule, param groups, optimizer, precision, distributed, metrics."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import socket

import numpy as np
import pytest
import torch
from torch import nn

from mergekit_video.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    is_main_process,
)
from mergekit_video.experts import find_containers
from mergekit_video.training.metrics import MetricsLogger, TrainProgress, print_summary, read_metrics, summary_table
from mergekit_video.training.optim import build_optimizer, build_param_groups, describe_param_groups
from mergekit_video.training.precision import autocast_context, make_grad_scaler, resolve_precision
from mergekit_video.training.rng import (
    capture_rng_state,
    rank_stream_seed,
    restore_rank_streams,
    restore_rng_state,
    seed_everything,
    split_streams_by_rank,
)
from mergekit_video.training.schedule import cosine_with_warmup

# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def _draw(g: torch.Generator) -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(2).tolist(), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randint(0, 1000, (2,), generator=g).tolist())


def test_rng_capture_restore_reproduces_every_source():
    g = torch.Generator().manual_seed(3)
    seed_everything(11)
    _draw(g)  # leaves a cached gaussian in random and numpy
    state = capture_rng_state({"router": g})
    first = _draw(g)
    second = _draw(g)
    assert first != second
    restore_rng_state(state, {"router": g})
    assert _draw(g) == first
    assert _draw(g) == second
    json.dumps({k: v for k, v in state.items() if k in ("python", "numpy")})  # JSON-ready parts


def test_seed_everything_rank_offsets():
    assert seed_everything(5, rank=2) == 7
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    seed_everything(7)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == a
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def _rank_generators(seed: int = 7) -> dict[str, torch.Generator]:
    return {"router:a": torch.Generator().manual_seed(seed), "objective:wmr": torch.Generator().manual_seed(seed + 1)}


def _draws(gens: dict[str, torch.Generator], n: int = 4) -> dict[str, list[int]]:
    return {k: torch.randint(0, 2**31, (n,), generator=g).tolist() for k, g in sorted(gens.items())}


def test_per_rank_streams_keep_rank_0_and_differ_elsewhere():
    assert rank_stream_seed(123, 0) == 123
    seeds = {rank_stream_seed(123, r) for r in range(64)} | {rank_stream_seed(124, r) for r in range(1, 64)}
    assert len(seeds) == 127 and all(0 <= s < 2**63 for s in seeds)  # distinct for every (seed, rank)
    draws = []
    for rank in range(3):
        gens = _rank_generators()
        split_streams_by_rank(gens, rank)
        draws.append(_draws(gens))
    assert draws[0] == _draws(_rank_generators())  # rank 0 draws as a single process does
    assert draws[0] != draws[1] != draws[2] != draws[0]
    assert draws[1]["router:a"] != draws[1]["objective:wmr"]


def test_restore_rank_streams_exact_and_for_another_world_size(caplog):
    ranks = [_rank_generators() for _ in range(2)]
    for r, gens in enumerate(ranks):
        split_streams_by_rank(gens, r)
        _draws(gens)
    saved = [capture_rng_state(g)["generators"] for g in ranks]  # what a checkpoint gathers
    expected = [_draws(g) for g in ranks]
    for r in range(2):  # each rank restores its own stream, exactly
        live = _rank_generators(seed=99)
        restore_rng_state({**capture_rng_state(), "generators": saved[0]}, live)  # rank 0's states first
        assert restore_rank_streams(saved, live, rank=r, world_size=2) is True
        assert _draws(live) == expected[r]
    # 3 ranks now: rank 0 continues its stream, the others get new distinct ones, with a warning
    got = []
    for r in range(3):
        live = _rank_generators(seed=99)
        restore_rng_state({**capture_rng_state(), "generators": saved[0]}, live)
        with caplog.at_level("WARNING", logger="mergekit_video.training.rng"):
            assert restore_rank_streams(saved, live, rank=r, world_size=3) is False
        got.append(_draws(live))
    assert got[0] == expected[0] and len({str(d) for d in got}) == 3
    assert "the streams of 2 ranks, this run has 3 ranks" in caplog.text
    # a checkpoint of a run whose ranks shared one stream: split from rank 0's state, deterministically
    again = []
    for _ in range(2):
        live = _rank_generators(seed=99)
        restore_rng_state({**capture_rng_state(), "generators": saved[0]}, live)
        restore_rank_streams(None, live, rank=1, world_size=2)
        again.append(_draws(live))
    assert again[0] == again[1] != expected[0]


def test_checkpoint_round_trips_per_rank_generator_states(tmp_path):
    from mergekit_video.training.checkpoint import CheckpointManager

    model = nn.Linear(2, 2)
    ranks = [_rank_generators() for _ in range(2)]
    split_streams_by_rank(ranks[1], 1)
    rng = capture_rng_state(ranks[0])
    rng["rank_generators"] = [capture_rng_state(g)["generators"] for g in ranks]
    manager = CheckpointManager(directory=tmp_path / "ckpt")
    path = manager.save(step=1, epoch=0, model_state=model.state_dict(), rng=rng)
    loaded = manager.load(path).rng["rank_generators"]
    assert len(loaded) == 2
    for got, want in zip(loaded, rng["rank_generators"]):
        assert set(got) == set(want) and all(torch.equal(torch.as_tensor(got[k]), want[k]) for k in want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_cuda_states():
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    x = torch.rand(4, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), x)


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_with_warmup(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = _lrs(sched, opt, 131)
    assert lrs[0] == pytest.approx(2.0 / 11)  # from ~0, never exactly 0
    assert lrs[9] == pytest.approx(2.0 * 10 / 11)
    assert lrs[10] == pytest.approx(2.0)  # end of warm-up: the base lr
    assert lrs[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way through the cosine
    assert lrs[35] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))))
    assert lrs[110] == pytest.approx(0.2) and lrs[130] == pytest.approx(0.2)  # end and beyond: min lr
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))


def test_cosine_schedule_state_dict_round_trip_and_errors():
    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, cosine_with_warmup(opt, warmup_steps=3, total_steps=20)

    opt, sched = make()
    _lrs(sched, opt, 7)
    state = sched.state_dict()
    assert state["lr_lambdas"] == [{"warmup_steps": 3, "total_steps": 20, "min_lr_ratio": 0.0}]
    expected = _lrs(sched, opt, 5)
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())  # keeps lrs consistent with the scheduler
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = state["_last_lr"][0]
    assert _lrs(sched2, opt2, 5) == expected
    for kw, needle in [({"warmup_steps": 30, "total_steps": 20}, "warmup_steps"),
                       ({"warmup_steps": 0, "total_steps": 0}, "total_steps"),
                       ({"warmup_steps": 0, "total_steps": 5, "min_lr_ratio": 1.5}, "min_lr_ratio")]:
        with pytest.raises(ValueError, match=needle):
            cosine_with_warmup(opt, **kw)


# ---------------------------------------------------------------------------------------------
# param groups and optimizer
# ---------------------------------------------------------------------------------------------
class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(3, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = _Tower()
        self.temporal = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_build_param_groups_assignment_and_no_decay():
    model = _Model()
    groups = build_param_groups(model, groups=[{"name": "clip", "match": "visual.*", "lr": 3e-6},
                                               {"name": "head", "match": ["head.*"], "weight_decay": 0.05}],
                                lr=5e-5, weight_decay=0.2, no_decay_norm_bias_embedding=True)
    got = {g["name"]: (sorted(g["param_names"]), g["lr"], g["weight_decay"]) for g in groups}
    assert got == {
        "clip": (["visual.proj.weight"], 3e-6, 0.2),
        "clip/no_decay": (["visual.norm.bias", "visual.norm.weight", "visual.positional_embedding",
                           "visual.proj.bias", "visual.tok.weight"], 3e-6, 0.0),
        "head": (["head.weight"], 5e-5, 0.05),
        "head/no_decay": (["head.bias"], 5e-5, 0.0),
        "default": (["temporal.weight"], 5e-5, 0.2),
        "default/no_decay": (["temporal.bias"], 5e-5, 0.0),
    }
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_groups) == sorted(trainable)  # every trainable param exactly once, frozen ones out
    rows = describe_param_groups(groups)
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in model.parameters() if p.requires_grad)

    plain = build_param_groups(model, lr=1e-3, weight_decay=0.1)
    assert [(g["name"], len(g["params"]), g["weight_decay"]) for g in plain] == [("default", 10, 0.1)]


def test_build_param_groups_first_match_wins_and_errors():
    model = _Model()
    groups = build_param_groups(model, groups=[{"name": "a", "match": "visual.proj.*"}, {"name": "b", "match": "visual.*"}],
                                lr=1.0, weight_decay=0.0)
    assert sorted(next(g for g in groups if g["name"] == "a")["param_names"]) == ["visual.proj.bias", "visual.proj.weight"]
    with pytest.raises(ValueError, match=r"param group 'x': pattern 'visaul\.\*' matches no trainable parameter"):
        build_param_groups(model, groups=[{"name": "x", "match": "visaul.*"}], lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="frozen"):  # frozen params do not count as matches
        build_param_groups(model, groups=[{"name": "x", "match": "frozen.*"}], lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"groups\[0\]: unknown key\(s\) \['lrr'\]"):
        build_param_groups(model, groups=[{"name": "x", "match": "head.*", "lrr": 1}], lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"groups\[1\].name: 'x' is used twice"):
        build_param_groups(model, groups=[{"name": "x", "match": "head.*"}, {"name": "x", "match": "temporal.*"}],
                           lr=1.0, weight_decay=0.0)


def test_no_weight_decay_hook():
    model = _Model()
    model.no_weight_decay = lambda: {"temporal.weight"}
    groups = build_param_groups(model, lr=1.0, weight_decay=0.1, no_decay_norm_bias_embedding=True)
    nd = next(g for g in groups if g["name"] == "default/no_decay")
    assert "temporal.weight" in nd["param_names"] and "visual.proj.weight" not in nd["param_names"]


def test_build_optimizer_kernels_and_groups():
    model = _Model()
    groups = build_param_groups(model, groups=[{"name": "clip", "match": "visual.*", "lr": 3e-6}], lr=5e-5, weight_decay=0.2)
    opt = build_optimizer(groups, lr=5e-5, weight_decay=0.2, betas=(0.9, 0.999))
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["lr"], g["weight_decay"], g["betas"]) for g in opt.param_groups] == [
        ("clip", 3e-6, 0.2, (0.9, 0.999)), ("default", 5e-5, 0.2, (0.9, 0.999))]
    assert opt.defaults["fused"] is True  # fused kernels exist on the CPU too
    forced = build_optimizer(groups, lr=5e-5, weight_decay=0.2, fused=False)
    assert forced.defaults["foreach"] is True and not forced.defaults["fused"]
    # fused and foreach AdamW agree on a step
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    fused_result = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ref[n])
    forced.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p, fused_result[n], atol=1e-7), n
    sgd = build_optimizer(model.head.parameters(), name="SGD", lr=0.1, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamx'; did you mean 'adam'\?"):
        build_optimizer(model.head.parameters(), name="adamx", lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(model.head.parameters(), lr=0.1, betas=(0.9, 1.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_optimizer_fused_on_cuda():
    p = nn.Parameter(torch.zeros(4, device="cuda"))
    assert build_optimizer([p], lr=0.1).defaults["fused"] is True


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
def test_precision_on_cpu():
    assert resolve_precision("cpu", "auto") == "fp32"
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("cpu", "auto"):
        assert (a @ b).dtype == torch.float32
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert make_grad_scaler("cpu", "auto") is None
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        resolve_precision("cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32, got 'fp8'"):
        resolve_precision("cpu", "fp8")


class _DtypeProbe(torch.nn.Module):
    """A stand-in VideoCLIP whose features and logits are matmuls: their dtype shows the autocast in force."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)
        self.head = _ProbeHead(self)
        self.dtypes: list[torch.dtype] = []

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        e = self.proj(frames.flatten(2)[..., :3])  # [N, T, 2]
        self.dtypes.append(e.dtype)
        return e


class _ProbeHead(torch.nn.Module):
    def __init__(self, owner: _DtypeProbe) -> None:
        super().__init__()
        self.owner = [owner]

    def forward(self, e: torch.Tensor, cls: torch.Tensor, modulation: bool = False) -> torch.Tensor:
        logits = e.mean(1) @ cls.t()  # [N, C]
        self.owner[0].dtypes.append(logits.dtype)
        return logits


def test_evaluation_takes_the_trainers_precision_decision(monkeypatch):
    """The evaluator resolves ``precision`` like the trainer: auto is fp32 on the CPU (and on a GPU
    without bf16), an explicit bf16 autocasts on the CPU too, fp16 without CUDA is refused."""
    from mergekit_video.evaluation.evaluator import evaluate

    batch = {"frames": torch.randn(2, 4, 3, 2, 2), "label": torch.tensor([0, 1]), "index": torch.tensor([0, 1]), "failed": []}
    cls = torch.randn(2, 2)
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        probe = _DtypeProbe()
        res = evaluate(probe, [batch], cls, precision=precision)
        assert res.num_videos == 2 and probe.dtypes == [dtype, dtype], precision
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        evaluate(_DtypeProbe(), [batch], cls, precision="fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    assert resolve_precision("cuda", "auto") == "fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precision_on_cuda():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("cuda", "auto") == expected
    a = torch.randn(4, 4, device="cuda")
    with autocast_context("cuda", "fp16"):
        assert (a @ a).dtype == torch.float16
    assert isinstance(make_grad_scaler("cuda", "fp16"), torch.amp.GradScaler)
    assert make_grad_scaler("cuda", "bf16") is None


# ---------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------
def test_distributed_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    assert info.is_main and not info.is_distributed and is_main_process()
    barrier()
    out = all_reduce_mean({"loss": torch.tensor(1.5), "acc": 0.25, "n": 3})
    assert out == {"acc": 0.25, "loss": 1.5, "n": 3.0} and all(type(v) is float for v in out.values())
    assert broadcast_object({"a": [1]}) == {"a": [1]}
    with pytest.raises(ValueError, match="'x' has 2 elements"):
        all_reduce_mean({"x": torch.ones(2)})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed()
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    info = init_distributed(timeout_s=60)
    try:
        mean = all_reduce_mean({"loss": torch.tensor(1.0 + 2 * rank), "acc": 0.5 + 0.2 * rank})
        obj = broadcast_object({"from": rank, "seed": 1234} if rank == 0 else None)
        barrier()
        from mergekit_video.training import distributed

        host = [distributed.any_rank(rank == 1), distributed.any_rank(False), distributed.all_reduce_sum_int(3 + rank)]
        real = distributed.dist.get_backend
        distributed.dist.get_backend = lambda *a: "nccl"  # as under NCCL: the host scalars go through a gloo group of their own
        try:
            group = distributed.host_group()
            host += [group is not None and group is distributed.host_group(), distributed.any_rank(rank == 0),
                     distributed.all_reduce_sum_int(10 * (rank + 1))]
        finally:
            distributed.dist.get_backend = real
        result = {"info": [info.rank, info.world_size, info.backend, str(info.device)], "mean": mean, "obj": obj,
                  "main": is_main_process(), "host": host}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        cleanup()


def test_two_process_gloo(tmp_path):
    import torch.multiprocessing as mp

    # fork is ~50x faster than spawn (no torch re-import); spawn once CUDA is initialised (fork-unsafe)
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["info"] == [0, 2, "gloo", "cpu"] and r1["info"] == [1, 2, "gloo", "cpu"]
    assert r0["mean"] == r1["mean"] == {"acc": pytest.approx(0.6), "loss": 2.0}
    assert r0["obj"] == r1["obj"] == {"from": 0, "seed": 1234}
    assert (r0["main"], r1["main"]) == (True, False)
    # stop flags and clip counts: host-side collectives (a gloo group of their own under NCCL, made once)
    assert r0["host"] == r1["host"] == [True, False, 7, True, True, 30]


def _class_features_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it hangs there)
    from mergekit_video.models import build_video_clip, clip as clip_module
    from mergekit_video.runners.common import class_features

    encoded = []
    real = clip_module.encode_class_names

    def counting(*args, **kwargs):
        encoded.append(rank)
        return real(*args, **kwargs)

    clip_module.encode_class_names = counting
    torch.manual_seed(0)  # the same random weights on both ranks, as after a checkpoint load
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=0)
    init_distributed(timeout_s=60)
    try:
        feats = class_features(model, ["archery", "bowling", "cycling"], {"cache_dir": os.path.join(out_dir, "cache"),
                                                                          "templates": "single"})
        torch.save(feats, os.path.join(out_dir, f"feats{rank}.pt"))
        with open(os.path.join(out_dir, f"encoded{rank}.json"), "w") as f:
            json.dump(len(encoded), f)
    finally:
        cleanup()


def test_ddp_class_features_are_encoded_by_rank_0_and_read_from_the_cache_by_the_others(tmp_path):
    import torch.multiprocessing as mp

    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_class_features_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    encoded = [json.loads((tmp_path / f"encoded{r}.json").read_text()) for r in (0, 1)]
    assert encoded == [1, 0]  # rank 1 waited for rank 0's cache entry instead of encoding the same prompts
    f0, f1 = torch.load(tmp_path / "feats0.pt"), torch.load(tmp_path / "feats1.pt")
    assert f0.shape == (3, f0.shape[1]) and torch.equal(f0, f1)
    assert len(list((tmp_path / "cache" / "text_features").glob("*.safetensors"))) == 1


# ---------------------------------------------------------------------------------------------
# metrics and progress
# ---------------------------------------------------------------------------------------------
def test_metrics_logger_jsonl_and_resume(tmp_path, caplog):
    with MetricsLogger(output_dir=tmp_path) as log:
        for step in (10, 20, 30):
            log.log({"loss": torch.tensor(step / 10), "lr": 1e-4, "split": "train"}, step=step, epoch=step // 20)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["epoch"], r["loss"], r["lr"], r["split"]) for r in recs] == [
        (10, 0, 1.0, 1e-4, "train"), (20, 1, 2.0, 1e-4, "train"), (30, 1, 3.0, 1e-4, "train")]
    assert all(isinstance(r["time"], float) for r in recs)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # torn line from a crash
    with MetricsLogger(output_dir=tmp_path, resume_step=20) as log:  # resumed from the step-20 checkpoint
        log.log({"loss": 9.0}, step=30)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(10, 1.0), (20, 2.0), (30, 9.0)]
    # a damaged line inside the file is not the torn end of a crash: kept and named, not deleted by the resume
    text = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text(text[0] + '{"step": 15, bad json\n' + "".join(text[1:]))
    with caplog.at_level(logging.WARNING, logger="mergekit_video.training.metrics"):
        MetricsLogger(output_dir=tmp_path, resume_step=20).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1] == '{"step": 15, bad json'
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [10, 20]
    assert "metrics.jsonl: line 2 is not a JSON record; kept as it is (readers skip it)" in caplog.text
    with pytest.raises(ValueError, match="reserved"):
        MetricsLogger(output_dir=tmp_path).log({"step": 1}, step=1)
    MetricsLogger(output_dir=tmp_path / "off", enabled=False).log({"loss": 1.0}, step=1)
    assert not (tmp_path / "off").exists()


def test_metrics_logger_removes_the_temp_file_of_a_rewrite_a_kill_cut_short(tmp_path):
    """A kill at the rename of the resume's rewrite of metrics.jsonl left ``.metrics.jsonl.XXXX.tmp`` for good:
    the next logger removes it once its writer is gone."""
    import signal
    import subprocess
    import sys

    with MetricsLogger(output_dir=tmp_path) as log:
        log.log({"loss": 1.0}, step=1)
        log.log({"loss": 2.0}, step=2)
    code = ("import os, signal\nfrom mergekit_video.training.metrics import MetricsLogger\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"MetricsLogger(output_dir={str(tmp_path)!r}, resume_step=1)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == -signal.SIGKILL
    assert [p.name.startswith(".metrics.jsonl.") for p in tmp_path.iterdir() if p.name != "metrics.jsonl"] == [True]
    with MetricsLogger(output_dir=tmp_path, resume_step=1) as log:
        log.log({"loss": 3.0}, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 3.0)]


def test_metrics_logger_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were absent
    with pytest.raises(ImportError, match=r"tensorboard=True needs the 'tensorboard' package \(pip install 'mergekit_video\[tensorboard\]'\)"):
        MetricsLogger(output_dir=tmp_path, tensorboard=True)


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_logger_tensorboard_scalars_and_resume_purge(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(output_dir=tmp_path, tensorboard=True) as log:
        for step in range(1, 6):
            log.log({"loss": float(step), "lr": 0.1, "note": "text", "flag": True}, step=step, epoch=0.5)
    # the run is resumed from its step-3 checkpoint and logs steps 4..5 again, with other values
    with MetricsLogger(output_dir=tmp_path, tensorboard=True, resume_step=3) as log:
        for step in (4, 5):
            log.log({"loss": 10.0 * step, "lr": 0.1}, step=step)
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss", "lr"}  # strings and booleans are JSONL-only
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]  # no duplicate steps
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 3.0, 40.0, 50.0]


def test_train_progress_plain_lines_when_not_a_tty():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with TrainProgress(total_steps=4, description="train", console=console, log_every=2, enabled=True) as prog:
        for step in range(1, 5):
            prog.update(step=step, loss=1.0 / step, lr=5e-5, clips=8)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train step 2/4 loss 0.5 lr 5e-05 ")
    assert lines[1].startswith("train step 4/4 loss 0.25 lr 5e-05 ")
    assert "clips/s eta 0:00:00" in lines[1]
    assert prog.clips_per_s > 0
    off = TrainProgress(total_steps=4, enabled=False)
    off.update(step=1, loss=1.0)  # no console, no output, no error


def test_train_progress_rich_bar_on_a_terminal():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160)
    with TrainProgress(total_steps=3, description="mote", console=console, enabled=True) as prog:
        for step in range(1, 4):
            prog.update(step=step, loss=0.125, lr=1e-3, clips=4)
    out = buf.getvalue()
    assert "mote" in out and "3/3" in out and "loss 0.125" in out and "lr 0.001" in out


@pytest.mark.parametrize("width", [60, 80])
def test_train_progress_narrow_terminal_keeps_step_loss_rate_and_eta_whole(width):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=width, color_system=None)
    with TrainProgress(total_steps=60000, description="train", console=console, enabled=True) as prog:
        prog.update(step=3000, loss=1.23456, lr=5e-5, clips=144)
        prog.update(step=3001, loss=1.23456, lr=5e-5, clips=144)
    last = buf.getvalue().split("\r")[-1]
    assert "…" not in last and "3001/60000" in last and "loss 1.2346" in last and "clips/s eta" in last
    assert ("lr 5e-05" in last) == (width >= 72)
    assert "━" not in last  # no bar below 100 columns


def test_summary_table():
    from rich.console import Console

    rows = [{"model": "expert 0", "top1": 81.25, "zs_hm": 60.123456},
            {"model": "merged", "top1": 83.5, "zs_hm": None, "note": True}]
    table = summary_table(rows, "results")
    assert [c.header for c in table.columns] == ["model", "top1", "zs_hm", "note"]
    buf = io.StringIO()
    print_summary(rows, "results", console=Console(file=buf, width=120))
    out = buf.getvalue()
    for cell in ("results", "expert 0", "81.25", "60.1235", "83.5", "yes"):
        assert cell in out
    assert out.count(" - ") >= 2  # missing cells


def test_cpu_allocator_tuning_is_opt_out_and_idempotent(monkeypatch):
    import sys

    from mergekit_video.utils import cpu

    monkeypatch.setattr(cpu, "_tuned", False)
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert cpu.tune_cpu_allocator() is False and cpu._tuned is False
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert cpu.tune_cpu_allocator() is False  # a preloaded allocator is left alone
    monkeypatch.delenv("LD_PRELOAD")
    applied = cpu.tune_cpu_allocator()
    assert applied is sys.platform.startswith("linux")  # glibc's mallopt accepts both settings
    assert cpu.tune_cpu_allocator() is applied  # once per process


def test_time_interleaved_alternates_and_returns_medians():
    from mergekit_video.training.benchmark import time_interleaved

    calls: list[str] = []
    res = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, device=torch.device("cpu"), steps=3, warmup=2)
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]  # warm-up each, then rounds
    assert set(res) == {"a", "b"} and all(v >= 0 for v in res.values())


def test_select_device(monkeypatch):
    from mergekit_video.utils.device import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu") and select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^device='cuda:1' was requested but CUDA is not available \(set device=auto or cpu\)$"):
        select_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto", local_rank=3) == torch.device("cuda:3")  # one GPU per torchrun process
    assert select_device("cuda", local_rank=2) == torch.device("cuda:2") and select_device("cuda:0", local_rank=2) == torch.device("cuda:0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device='mps' was requested but MPS \(Apple GPUs\) is not available"):
        select_device("mps")


def test_model_flops_leave_out_checkpoint_recomputation_and_scale_with_the_batch():
    import torch.nn.functional as F

    from mergekit_video.data import normalize_frames
    from mergekit_video.models import MoTEObjective, build_video_clip
    from mergekit_video.training.benchmark import _count_model_flops, count_step_flops
    from mergekit_video.training.trainer import TrainStep

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=2, num_experts=2).train()
    step_module = TrainStep(model=model, objective=MoTEObjective())
    frames = torch.randint(0, 256, (3, 4, 3, 32, 32), dtype=torch.uint8)
    labels, classes = torch.tensor([0, 1, 2]), F.normalize(torch.randn(5, 64), dim=-1)

    def step(clips: int = 3) -> None:
        step_module(normalize_frames(frames[:clips]), labels[:clips], classes).loss.backward()
        model.zero_grad(set_to_none=True)

    plain = count_step_flops(step)
    model.set_grad_checkpointing(True, head=True)
    recomputing = count_step_flops(step)
    assert recomputing > 1.1 * plain  # the counter sees the recomputed forwards
    assert _count_model_flops(model, step, batch_size=3) == plain  # model FLOPs: without them, per clip x batch
    assert model.clip.visual.transformer.grad_checkpointing and model.head.transformer.grad_checkpointing  # switched back on


def test_peak_flops_by_card_name_takes_the_longest_matching_fragment():
    from mergekit_video.training.benchmark import peak_flops_for

    cards = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 NVL": 835.5e12, "NVIDIA H100 PCIe": 756.0e12, "NVIDIA H200": 989.4e12,
             "NVIDIA GH200 480GB": 989.4e12, "NVIDIA L40": 181.0e12, "NVIDIA L40S": 362.0e12, "NVIDIA L4": 121.0e12, "Tesla T4": None}
    assert {name: peak_flops_for(name) for name in cards} == cards


# ---------------------------------------------------------------------------------------------
# the trainer on a tiny VideoCLIP: what a resume refuses, non-finite losses, per-rank streams
# ---------------------------------------------------------------------------------------------
def _tiny_trainer(ckpt_dir, *, name="adamw", weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, no_decay=False,
                  nan_batch=None, log_every=1, save_every_steps=None, metrics=None, routing_draws="global"):
    """A 1-epoch, 4-step run (8 clips of 4 frames at 32 px, batch 2) of the tiny CLIP with a 1-layer, 2-expert head;
    ``nan_batch``: that micro-batch's frames are NaN."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from mergekit_video.models import MoTEObjective, build_video_clip
    from mergekit_video.training.checkpoint import CheckpointManager
    from mergekit_video.training.trainer import Trainer

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    groups = build_param_groups(model, groups=[{"name": "clip", "match": ["clip.*"], "lr": 1e-4}], lr=1e-3,
                                weight_decay=weight_decay, no_decay_norm_bias_embedding=no_decay)
    opt = build_optimizer(groups, name=name, lr=1e-3, weight_decay=weight_decay, betas=betas, eps=eps)
    gen = torch.Generator().manual_seed(1)
    data = [{"frames": torch.randn(4, 3, 32, 32, generator=gen), "label": torch.tensor(i % 3)} for i in range(8)]  # [T, C, H, W]
    if nan_batch is not None:
        for item in data[2 * nan_batch:2 * nan_batch + 2]:
            item["frames"].fill_(float("nan"))
    return Trainer(model=model, objective=MoTEObjective(), loader=DataLoader(data, batch_size=2),
                   class_features=F.normalize(torch.randn(3, 64, generator=gen), dim=-1), optimizer=opt,
                   scheduler=cosine_with_warmup(opt, warmup_steps=1, total_steps=4), device=torch.device("cpu"),
                   epochs=1, log_every=log_every, save_every_steps=save_every_steps, metrics=metrics,
                   checkpoints=CheckpointManager(directory=ckpt_dir, keep_last=None), show_progress=False,
                   stop_on_signals=False, routing_draws=routing_draws)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The checkpoint after step 2 of a tiny AdamW run (weight decay 0.05, betas [0.9, 0.999], eps 1e-8)."""
    directory = tmp_path_factory.mktemp("tiny") / "ckpt"
    trainer = _tiny_trainer(directory, save_every_steps=2)
    trainer.fit()
    return directory / "step_00000002"


def test_resume_refuses_other_optimizer_hyperparameters_class_and_groups(tiny_checkpoint, tmp_path):
    """Optimizer.load_state_dict would put the checkpoint's betas, eps and weight decay over the recipe's,
    and SGD's step would fail on Adam's state ('momentum'): each is refused, naming both values."""
    from mergekit_video.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.optimizer_class == "AdamW"
    prefix = f"train.resume: checkpoint {tiny_checkpoint} "
    cases = [
        (dict(weight_decay=0.5, betas=(0.8, 0.99)), "was trained with other optimizer hyper-parameters (weight_decay "
         "(optimizer.weight_decay): 0.05 in the checkpoint, 0.5 now; betas (optimizer.betas): [0.9, 0.999] in the checkpoint, "
         "[0.8, 0.99] now). A resume would continue with the checkpoint's"),
        (dict(eps=1e-6), "was trained with other optimizer hyper-parameters (eps (optimizer.eps): 1e-08 in the checkpoint, 1e-06 now)."),
        (dict(name="adam"), "was trained with another optimizer (AdamW in the checkpoint, Adam now); its state cannot continue this one"),
        (dict(name="sgd"), "was trained with another optimizer (AdamW in the checkpoint, SGD now)"),
    ]
    for changed, message in cases:
        trainer = _tiny_trainer(tmp_path / "ckpt", **changed)
        with pytest.raises(ValueError) as info:
            trainer.resume(ckpt)
        assert str(info.value).startswith(prefix + message), str(info.value)
        assert str(info.value).endswith("or set train.resume=null to start a new run (with --overwrite where this output_dir holds its checkpoints)")
        assert not any(torch.equal(v, trainer.model.state_dict()[k]) for k, v in ckpt.model_state.items()
                       if k.startswith("head.") and v.numel())  # nothing was loaded
    ckpt.optimizer_class = None  # a checkpoint from before the class was saved: told by its param groups
    with pytest.raises(ValueError, match=r"another optimizer \(AdamW in the checkpoint, SGD now\)"):
        _tiny_trainer(tmp_path / "ckpt", name="sgd").resume(ckpt)
    # norms, biases and embeddings in their own groups: the layout is named, not "another lr schedule"
    trainer = _tiny_trainer(tmp_path / "ckpt", no_decay=True)
    now = ", ".join(f"{g['name']}: {len(g['params'])} tensors" for g in trainer.optimizer.param_groups)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["clip", "clip/no_decay", "default", "default/no_decay"]
    with pytest.raises(ValueError) as info:
        trainer.resume(ckpt)
    was = ", ".join(f"{g['name']}: {len(g['params'])} tensors" for g in ckpt.optimizer_state["param_groups"])
    assert str(info.value).startswith(f"{prefix}has another layout of optimizer parameter groups ([{was}] in the checkpoint, "
                                      f"[{now}] now); resume with the settings that split the parameters into groups")
    assert "lr schedule" not in str(info.value)
    # the same settings resume, and train on to the end
    trainer = _tiny_trainer(tmp_path / "same")
    trainer.resume(ckpt)
    assert trainer.fit().step == 4


def test_optimizer_comparisons_of_older_checkpoints_and_reordered_groups():
    from mergekit_video.training.checkpoint import (
        optimizer_hyperparameter_differences,
        optimizer_kind_difference,
        param_group_differences,
    )

    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    sgd = torch.optim.SGD([a, b], lr=0.1)
    adam_keys_only = {"param_groups": [{"lr": 0.1, "params": [0, 1]}], "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2)}}}
    assert optimizer_kind_difference(adam_keys_only, None, sgd) == "Adam or AdamW in the checkpoint, SGD now"
    assert optimizer_kind_difference(adam_keys_only, None, torch.optim.Adam([a, b])) is None
    assert optimizer_kind_difference({"param_groups": [{"lr": 0.1, "params": [0]}], "state": {}}, None, sgd) is None  # cannot tell
    saved = torch.optim.AdamW([{"params": [a, b], "param_names": ["a", "b"], "name": "default"}], weight_decay=0.1).state_dict()
    swapped = torch.optim.AdamW([{"params": [b, a], "param_names": ["b", "a"], "name": "default"}], weight_decay=0.1)
    assert param_group_differences(saved, swapped) == ["tensor 0 of group 'default': 'a' in the checkpoint, 'b' now"]
    two = torch.optim.AdamW([{"params": [a], "name": "x", "weight_decay": 0.0}, {"params": [b], "name": "y"}], lr=0.2, weight_decay=0.2)
    was = torch.optim.AdamW([{"params": [a], "name": "x", "weight_decay": 0.0}, {"params": [b], "name": "y"}], lr=0.1, weight_decay=0.1, amsgrad=True)
    assert optimizer_hyperparameter_differences(was.state_dict(), two) == [  # lr is the schedule's; x has no decay in both
        "amsgrad: true in the checkpoint, false now",
        "weight_decay of group 'y' (optimizer.weight_decay): 0.1 in the checkpoint, 0.2 now",
    ]


@pytest.mark.parametrize("log_every, save_every, message", [
    # NaN frames in step 3: read at the log of step 4, after the checkpoint of step 2
    (2, 2, "training stopped: the loss is nan in steps 3-4 (read every train.log_every=2 steps); "
           "the last checkpoint before it is step 2, {ckpt}/step_00000002"),
    # read first by the checkpoint of step 3, which is not written
    (4, 3, "training stopped: the loss is nan in steps 1-3 (read before the checkpoint of step 3, not written); "
           "no checkpoint was written before it"),
])
def test_a_non_finite_loss_stops_training_naming_the_step_and_the_last_checkpoint(tmp_path, log_every, save_every, message):
    from mergekit_video.training.trainer import NonFiniteLossError

    ckpt = tmp_path / "ckpt"
    with MetricsLogger(output_dir=tmp_path) as metrics:
        trainer = _tiny_trainer(ckpt, nan_batch=2, log_every=log_every, save_every_steps=save_every, metrics=metrics)
        with pytest.raises(NonFiniteLossError) as info:
            trainer.fit()
    assert str(info.value) == message.format(ckpt=ckpt) and info.value.step in (3, 4)
    assert sorted(p.name for p in ckpt.glob("step_*")) == (["step_00000002"] if save_every == 2 else [])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in lines]
    if log_every == 2:  # step 2 finite, step 4 logged with null losses before stopping
        assert [r["step"] for r in records] == [2, 4] and math.isfinite(records[0]["loss"])
        assert {k: records[1][k] for k in ("loss", "te", "wmr", "mse")} == {"loss": None, "te": None, "wmr": None, "mse": None}
    else:
        assert records == []


def test_resuming_from_a_damaged_checkpoint_says_so(tiny_checkpoint, tmp_path):
    from mergekit_video.training.checkpoint import load_checkpoint
    from mergekit_video.training.trainer import NonFiniteLossError

    ckpt = load_checkpoint(tiny_checkpoint)
    name = next(k for k, v in ckpt.model_state.items() if k.startswith("head.") and v.dim() == 2 and v.numel())
    ckpt.model_state[name][0, 0] = float("nan")  # a damaged tensor
    trainer = _tiny_trainer(tmp_path / "ckpt")
    trainer.resume(ckpt)
    with pytest.raises(NonFiniteLossError, match=rf"^training stopped: the loss is nan at step 3; the last checkpoint before it is step 2, "
                                                 rf"{tiny_checkpoint} \(the run resumed from it and has read no finite loss since: it may be damaged\)$"):
        trainer.fit()


@pytest.mark.parametrize("edit, lacks", [
    (lambda m: m.update(scheduler=None), "scheduler"),  # resumed, the lr warm-up restarted
    (lambda m: m.update(rng=None), "rng"),  # other random draws from the next step on
    (lambda m: m.update(extra={}), "extra.batches_in_epoch, extra.best_metric, extra.history"),  # the place in the epoch lost
])
def test_resume_refuses_a_checkpoint_without_a_state_the_trainer_always_saves(tiny_checkpoint, tmp_path, edit, lacks):
    """A checkpoint written before state.json recorded its parts passes the reader's check with a part set to
    null or emptied: the trainer, which always saves them, refuses it in one line naming the file."""
    import json
    import shutil

    from mergekit_video.training.checkpoint import load_checkpoint

    copy = tmp_path / "old" / tiny_checkpoint.name
    shutil.copytree(tiny_checkpoint, copy)
    meta = json.loads((copy / "state.json").read_text())
    meta.pop("parts")
    edit(meta)
    (copy / "state.json").write_text(json.dumps(meta))
    trainer = _tiny_trainer(tmp_path / "ckpt")
    with pytest.raises(ValueError) as info:
        trainer.resume(load_checkpoint(copy))
    assert str(info.value) == (f"train.resume: checkpoint {copy} is damaged: {copy / 'state.json'} lacks {lacks}, which every checkpoint "
                               "of a training run holds; move that checkpoint folder away so that train.resume=auto continues from "
                               "the one before it, train from an earlier checkpoint into another folder (output_dir=NEW "
                               "train.resume=<its step_* folder>), or set train.resume=null to start a new run (with --overwrite "
                               "where this output_dir holds its checkpoints)")
    assert trainer.state.step == 0


def test_a_trainer_checkpoint_records_the_parts_it_saved(tiny_checkpoint, tmp_path):
    import json

    meta = json.loads((tiny_checkpoint / "state.json").read_text())
    assert {k for k, v in meta["parts"].items() if v is not None} == {"optimizer", "scheduler", "rng", "extra"}  # no scaler on the CPU
    assert {"batches_in_epoch", "loss_window", "data_layout"} <= set(meta["parts"]["extra"])


def test_metrics_jsonl_writes_non_finite_values_as_null(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.5}\n')  # an older file
    with MetricsLogger(output_dir=tmp_path, resume_step=2) as log:  # the kept lines are rewritten strictly too
        log.log({"loss": 2.0, "grad_norm": float("inf"), "val": [float("-inf"), 1.0], "t": torch.tensor(float("nan"))}, step=3)
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in strict] == [(1, None), (2, 1.5), (3, 2.0)]
    assert (strict[2]["grad_norm"], strict[2]["val"], strict[2]["t"]) == (None, [None, 1.0], None)


def test_a_per_rank_checkpoint_resumed_by_one_process_warns_and_continues_rank_0(tiny_checkpoint, tmp_path, caplog):
    """routing_draws=per_rank: 2 processes -> 1 warns, as 1 -> 2 does; the one process goes on with rank 0's streams."""
    from mergekit_video.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    rank0 = ckpt.rng["generators"]
    rank1 = {k: torch.Generator().manual_seed(rank_stream_seed(5, 1)).get_state() for k in rank0}
    ckpt.rng["rank_generators"] = [rank0, rank1]  # as a 2-process run gathers them
    for draws, warned in (("per_rank", True), ("global", False)):
        trainer = _tiny_trainer(tmp_path / draws, routing_draws=draws)
        caplog.clear()
        with caplog.at_level("WARNING", logger="mergekit_video.training.rng"):
            trainer.resume(ckpt)
        assert ("the checkpoint holds the streams of 2 ranks, this run has 1 process: it continues with rank 0's routing "
                "stream for the whole batch" in caplog.text) is warned
        assert all(torch.equal(trainer.generators[k].get_state(), rank0[k]) for k in rank0)


def test_bad_videos_in_the_metrics_count_the_files_every_rank_met(monkeypatch):
    # each rank reads its own shard: the logged count is the union (it was rank 0's own count)
    from types import SimpleNamespace

    from mergekit_video.training import distributed
    from mergekit_video.training.trainer import Trainer

    gathered = [["a.mp4", "b.mp4"], ["b.mp4", "c.mp4"]]
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: gathered)
    ranks = SimpleNamespace(dist=SimpleNamespace(world_size=2), bad_videos={"a.mp4", "b.mp4"})
    assert Trainer.bad_video_paths_of_all_ranks(ranks) == ["a.mp4", "b.mp4", "c.mp4"]
    one = SimpleNamespace(dist=None, bad_videos={"a.mp4"})
    assert Trainer.bad_video_paths_of_all_ranks(one) == ["a.mp4"]


def test_bad_videos_met_before_a_checkpoint_survive_the_resume(tmp_path):
    """The count in metrics.jsonl went down after a resume (2 instead of 6) and every bad file was logged again."""
    from mergekit_video.training.checkpoint import load_checkpoint

    trainer = _tiny_trainer(tmp_path / "ckpt", save_every_steps=2)
    trainer.bad_videos = {"clips/b.mp4", "clips/a.mp4"}  # as note_batch_failures records them
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "ckpt" / "step_00000002")
    assert ckpt.extra["bad_videos"] == ["clips/a.mp4", "clips/b.mp4"]
    resumed = _tiny_trainer(tmp_path / "ckpt2")
    resumed.resume(ckpt)
    assert resumed.bad_videos == {"clips/a.mp4", "clips/b.mp4"}


def test_skipped_clips_weigh_each_rank_by_its_clips_and_an_empty_micro_batch_trains_on(tmp_path, monkeypatch):
    """on_error=skip: a micro-batch whose clips all failed crashed the step ('cannot reshape tensor of 0 elements'), and
    under DDP each rank's mean counted alike whatever its clip count (the loss drifted from one process's)."""
    from types import SimpleNamespace

    from mergekit_video.training import distributed
    from mergekit_video.training.trainer import Trainer

    # two ranks with 2 and 3 clips: weights 2·2/5 and 3·2/5, so DDP's average of the weighted means is the mean of 5 clips
    monkeypatch.setattr(distributed, "all_reduce_sum_int", lambda n: 5)
    ranks = SimpleNamespace(variable_batch=True, dist=SimpleNamespace(world_size=2))
    assert Trainer._clip_weight(ranks, {"label": torch.zeros(2)}) == (0.8, 5)
    assert Trainer._clip_weight(ranks, {"label": torch.zeros(3)}) == (1.2, 5)
    assert Trainer._clip_weight(ranks, {"label": torch.zeros(0)}) == (0.0, 5)
    assert Trainer._clip_weight(SimpleNamespace(variable_batch=False, dist=None), {"label": torch.zeros(2)}) == (1.0, 2)
    monkeypatch.undo()
    # one process: a micro-batch with no clip left runs a zero clip at weight 0 and is left out of the logged mean
    trainer = _tiny_trainer(tmp_path / "ckpt")
    gen = torch.Generator().manual_seed(3)
    batches = [{"frames": torch.randn(n, 4, 3, 32, 32, generator=gen), "label": torch.arange(n) % 3} for n in (2, 0, 1, 2)]
    trainer.loader, trainer.variable_batch = batches, True
    logged, weights = [], []

    def log(logs, step, epoch):
        logged.append((step, logs))
        weights.append([p.detach().clone() for p in trainer.model.parameters() if p.requires_grad])

    trainer.metrics = SimpleNamespace(log=log, enabled=False)
    trainer.fit()
    assert [(step, "loss" in logs) for step, logs in logged] == [(1, True), (2, False), (3, True), (4, True)]  # step 2: no clip, no loss
    # step 2 had no clip: AdamW's momentum and weight decay would still have moved the weights; they stay
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
    # accumulation 2, the first step without any clip: skipped without torch's "scheduler before optimizer" warning
    import warnings

    acc = _tiny_trainer(tmp_path / "ckpt_acc")
    acc.loader = [{"frames": torch.randn(n, 4, 3, 32, 32, generator=gen), "label": torch.arange(n) % 3} for n in (0, 0, 2, 1)]
    acc.variable_batch, acc.grad_accumulation = True, 2
    acc.steps_per_epoch = acc.total_steps = 2
    before = [p.detach().clone() for p in acc.model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.fit()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert acc.state.step == 2 and not all(torch.equal(a, b) for a, b in zip(before, acc.model.parameters()))
    assert all(math.isfinite(logs["loss"]) and logs["loss"] > 0 for _, logs in logged if "loss" in logs)
    assert trainer.state.step == 4 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_an_epoch_that_reads_no_clip_stops_the_run_naming_the_bad_files(tmp_path):
    """on_error=skip with every video unreadable (a wrong data.root): each step was skipped and the run
    ended with rc 0 and an untrained model."""
    from mergekit_video.training.trainer import NoClipReadError

    trainer = _tiny_trainer(tmp_path / "ckpt")
    trainer.loader = [{"frames": torch.zeros(0, 4, 3, 32, 32), "label": torch.zeros(0, dtype=torch.long)} for _ in range(4)]
    trainer.variable_batch = True
    trainer.bad_videos = {"clips/b.mp4", "clips/a.mp4"}
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NoClipReadError, match=r"^no video of epoch 1 could be read \(4 batches, every clip skipped under on_error: skip; "
                                              r"2 distinct bad files; the first: clips/a\.mp4\): the weights were never updated\. "
                                              r"Check data\.root and data\.train_list"):
        trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # one readable clip in the epoch: it trains on
    gen = torch.Generator().manual_seed(0)
    some = _tiny_trainer(tmp_path / "ckpt2")
    some.loader = [{"frames": torch.randn(n, 4, 3, 32, 32, generator=gen), "label": torch.arange(n) % 3} for n in (0, 0, 1, 0)]
    some.variable_batch = True
    some.fit()
    assert some.state.step == 4


def test_a_signal_during_the_validation_stops_at_the_epoch_end(tmp_path):
    """A Ctrl-C during the last epoch's validation was lost (the run finished, evaluated and exited 0); during an
    earlier one it trained one more step first."""
    import signal

    from mergekit_video.training.trainer import TrainingInterrupted

    trainer = _tiny_trainer(tmp_path / "ckpt")

    def validate(epoch):
        trainer._stop_signal = signal.SIGINT  # as the handler sets it
        return {"top1": 50.0}

    trainer.evaluate_fn, trainer.eval_every_epochs = validate, 1
    with pytest.raises(TrainingInterrupted, match=r"^stopped by SIGINT after step 4; checkpoint saved in ") as info:
        trainer.fit()
    assert info.value.step == 4 and trainer.state.epoch == 1  # the epoch closed: its checkpoint holds the validation
    assert (tmp_path / "ckpt" / "step_00000004" / "state.json").is_file()


def test_gradient_accumulation_draws_one_expert_and_tau_per_layer_per_optimizer_step(tmp_path):
    """MoTE routes the whole batch to one expert per layer (Eq. 5) and draws one τ per layer (Eq. 7): with
    train.grad_accumulation the micro-batches of a step replay the step's draws, so 2 micro-batches of 2
    clips update the weights as one batch of 4 does (SGD, fp32) under multinomial routing and discrete WMR."""
    import torch.nn.functional as F

    from mergekit_video.models import MoTEObjective, build_video_clip
    from mergekit_video.training.trainer import Trainer

    gen = torch.Generator().manual_seed(5)
    frames, labels = torch.randn(8, 4, 3, 32, 32, generator=gen), torch.arange(8) % 3
    classes = F.normalize(torch.randn(3, 64, generator=gen), dim=-1)

    def run(micro: int, accumulation: int, **head: object) -> tuple[list[torch.Tensor], list]:
        torch.manual_seed(0)
        model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=2, num_experts=4, **head)
        drawn: list = []
        for _, c in find_containers(model.head):
            route = c.router.route
            c.router.route = lambda x, route=route: (lambda r: (drawn.append(int(r.indices[0, 0]) if r.indices.shape[0] == 1
                                                                             else r.indices[:, 0].tolist()), r)[1])(route(x))
        opt = build_optimizer(build_param_groups(model, lr=0.5, weight_decay=0.0), name="sgd", lr=0.5, weight_decay=0.0)
        batches = [{"frames": frames[i:i + micro], "label": labels[i:i + micro]} for i in range(0, 8, micro)]
        Trainer(model=model, objective=MoTEObjective(), loader=batches, class_features=classes, optimizer=opt,
                scheduler=cosine_with_warmup(opt, warmup_steps=0, total_steps=2), device=torch.device("cpu"), precision="fp32",
                epochs=1, grad_accumulation=accumulation, show_progress=False, stop_on_signals=False).fit()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad], drawn

    whole, drawn_whole = run(4, 1)
    accumulated, drawn_accumulated = run(2, 2)
    assert len(drawn_whole) == 4 and drawn_accumulated == [d for pair in zip(drawn_whole[0::2], drawn_whole[1::2]) for d in (*pair, *pair)]
    assert max((a - b).abs().max().item() for a, b in zip(whole, accumulated)) < 1e-6
    # per-sample routing draws for each clip: micro-batches go on drawing as the whole batch does (no replay)
    sample = {"router": "random", "router_kwargs": {"granularity": "sample"}}
    _, per_clip_whole = run(4, 1, **sample)
    _, per_clip_accumulated = run(2, 2, **sample)
    for layer in (0, 1):  # each layer's router: its draws for the clips in order
        flat = [e for draws in per_clip_accumulated[layer::2] for e in draws]
        assert flat == [e for draws in per_clip_whole[layer::2] for e in draws] and len(set(flat)) > 1


def test_clips_per_s_leaves_out_the_validation_and_checkpoint_time(monkeypatch):
    """The logged rate is that of the training steps since the previous line: a validation (here 1000 s on a
    shifted clock) between them is left out, and so is a checkpoint write; the progress bar's window too."""
    import time as time_module
    from types import SimpleNamespace

    import torch.nn.functional as F

    from mergekit_video.models import MoTEObjective, build_video_clip
    from mergekit_video.training.trainer import Trainer

    real, shift = time_module.perf_counter, [0.0]
    monkeypatch.setattr(time_module, "perf_counter", lambda: real() + shift[0])

    def validate(epoch: int) -> dict[str, float]:
        shift[0] += 1000.0  # a long validation
        return {"top1": 0.0}

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    opt = build_optimizer(build_param_groups(model, lr=1e-3, weight_decay=0.0), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [{"frames": torch.randn(2, 4, 3, 32, 32, generator=gen), "label": torch.tensor([0, 1])} for _ in range(3)]
    logged = []
    trainer = Trainer(model=model, objective=MoTEObjective(), loader=batches, class_features=F.normalize(torch.randn(3, 64, generator=gen), dim=-1),
                      optimizer=opt, scheduler=cosine_with_warmup(opt, warmup_steps=0, total_steps=6), device=torch.device("cpu"),
                      precision="fp32", epochs=2, log_every=2, evaluate_fn=validate, show_progress=False, stop_on_signals=False,
                      metrics=SimpleNamespace(log=lambda logs, step, epoch: logged.append((step, logs)), enabled=False))
    trainer.progress = TrainProgress(total_steps=6, enabled=False)
    trainer.fit()
    rates = {step: logs["clips_per_s"] for step, logs in logged if "clips_per_s" in logs}
    assert sorted(rates) == [2, 4, 6] and shift[0] == 2000.0
    assert rates[4] > 4 / 100.0  # its window holds the first validation: 4 clips in far less than 100 s, not over 1000 s
    assert trainer.progress.clips_per_s > 4 / 100.0 and trainer.progress.eta_s < 100.0


def test_a_checkpoint_whose_extra_entries_are_of_the_wrong_kind_is_refused_naming_the_entry(tmp_path, tiny_checkpoint):
    """Hand-edited state.json values gave raw Python errors without the file ("invalid literal for int()"),
    or crashed after training ("Unknown format code 'f'")."""
    import shutil

    from mergekit_video.training.checkpoint import load_checkpoint

    for key, value, said in (("batches_in_epoch", "x", 'batches_in_epoch is "x", not a whole number >= 0'),
                             ("best_metric", "abc", 'best_metric is "abc", not a number or null'),
                             ("history", "abc", 'history is "abc", not a list of mappings'),
                             ("bad_videos", 5, "bad_videos is 5, not a list of paths"),
                             ("loss_window", {"count": 1, "sums": {"loss": "x"}}, "loss_window is")):
        copy = tmp_path / key / tiny_checkpoint.name
        shutil.copytree(tiny_checkpoint, copy)
        meta = json.loads((copy / "state.json").read_text())
        meta["extra"][key] = value
        (copy / "state.json").write_text(json.dumps(meta))
        trainer = _tiny_trainer(tmp_path / key / "own")
        with pytest.raises(ValueError) as info:
            trainer.resume(load_checkpoint(copy))
        assert str(info.value).startswith(f"train.resume: checkpoint {copy} is damaged: {copy / 'state.json'}'s extra.{said}"), str(info.value)
