"""Checkpoints: exact resume, optimizer state round trip, atomicity, pruning, tied tensors, resume paths."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mergekit_video.utils.io as uio
from mergekit_video.training.checkpoint import CheckpointManager, CheckpointState
from mergekit_video.training.optim import build_optimizer, build_param_groups
from mergekit_video.training.rng import capture_rng_state, restore_rng_state, seed_everything
from mergekit_video.training.schedule import cosine_with_warmup


# ---------------------------------------------------------------------------------------------
# a small run: MLP with dropout (global torch RNG), data from a named generator, target noise
# from Python's random and NumPy, AdamW with two param groups, cosine schedule with warm-up
# ---------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, seed: int) -> None:
        seed_everything(seed)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))
        groups = build_param_groups(self.model, groups=[{"name": "first", "match": "0.*", "lr": 3e-3}],
                                    lr=1e-2, weight_decay=0.2, no_decay_norm_bias_embedding=True)
        self.opt = build_optimizer(groups, lr=1e-2, weight_decay=0.2, betas=(0.9, 0.999))
        self.sched = cosine_with_warmup(self.opt, warmup_steps=3, total_steps=12, min_lr_ratio=0.1)
        self.data_gen = torch.Generator().manual_seed(seed + 100)

    def steps(self, start: int, end: int) -> list[float]:
        losses = []
        self.model.train()
        for _ in range(start, end):
            x = torch.randn(8, 6, generator=self.data_gen)  # [B, 6]
            noise = 1e-2 * (random.random() + float(np.random.randn()))
            y = x.sum(1, keepdim=True) + noise  # [B, 1]
            loss = nn.functional.mse_loss(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            losses.append(loss.item())
        return losses

    def generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_gen}


def test_resume_auto_reproduces_uninterrupted_losses_exactly(tmp_path):
    full = _Run(seed=0)
    reference = full.steps(0, 12)

    first = _Run(seed=0)
    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=2)
    losses = first.steps(0, 3)
    mgr.save(step=3, epoch=0, model_state=first.model.state_dict(), optimizer=first.opt, scheduler=first.sched,
             rng=capture_rng_state(first.generators()))
    losses += first.steps(3, 5)
    mgr.save(step=5, epoch=1, model_state=first.model.state_dict(), optimizer=first.opt, scheduler=first.sched,
             rng=capture_rng_state(first.generators()), extra={"samples_seen": 40})
    first.steps(5, 7)  # "crash": these steps are lost

    second = _Run(seed=123)  # fresh process: other weights, other RNG streams
    mgr2 = CheckpointManager(directory=tmp_path / "ckpt", keep_last=2)
    path = mgr2.resolve_resume("auto")
    assert path == tmp_path / "ckpt" / "step_00000005"
    state = mgr2.load(path)
    assert (state.step, state.epoch, state.extra) == (5, 1, {"samples_seen": 40})
    state.restore(model=second.model, optimizer=second.opt, scheduler=second.sched, generators=second.generators())
    losses += second.steps(5, 12)

    assert losses == reference  # bit-identical floats
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert second.sched.get_last_lr() == full.sched.get_last_lr()


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("kind", ["adamw_groups", "sgd_momentum", "adam_amsgrad"])
def test_optimizer_and_scheduler_state_dicts_round_trip_exactly(tmp_path, kind):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    if kind == "adamw_groups":
        groups = build_param_groups(model, groups=[{"name": "a", "match": ["0.*"], "lr": 0.5}], lr=0.1,
                                    weight_decay=0.2, no_decay_norm_bias_embedding=True)
        opt = build_optimizer(groups, lr=0.1, weight_decay=0.2)
    elif kind == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.1, amsgrad=True, betas=(0.8, 0.9))
    sched = cosine_with_warmup(opt, warmup_steps=1, total_steps=5)
    for _ in range(2):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
    mgr = CheckpointManager(directory=tmp_path)
    state = mgr.load(mgr.save(step=2, epoch=0, model_state=model.state_dict(), optimizer=opt, scheduler=sched))
    _assert_same(opt.state_dict(), state.optimizer_state, "optimizer")
    _assert_same(sched.state_dict(), state.scheduler_state, "scheduler")
    _assert_same(model.state_dict(), state.model_state, "model")
    assert state.model_state._metadata == model.state_dict()._metadata  # module versions kept


def test_rng_state_survives_the_checkpoint_for_every_source(tmp_path):
    g = torch.Generator().manual_seed(7)
    mgr = CheckpointManager(directory=tmp_path)
    path = mgr.save(step=0, epoch=0, model_state={"w": torch.zeros(1)}, rng=capture_rng_state({"router": g}))

    def draws():
        return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.rand(2, generator=g).tolist())

    expected = draws()
    draws()  # move every stream on
    mgr.load(path).restore(generators={"router": g})
    assert draws() == expected


def test_crash_mid_save_keeps_previous_checkpoint_latest(tmp_path, monkeypatch):
    import re

    import safetensors.torch

    mgr = CheckpointManager(directory=tmp_path)
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    first = mgr.save(step=100, epoch=0, model_state=model.state_dict(), optimizer=opt)

    real_save = safetensors.torch.save_file
    calls = []

    def dying_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # model file written, crash while writing the optimizer file
            with open(filename, "wb") as f:
                f.write(b"\x00" * 10)
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(step=200, epoch=1, model_state=model.state_dict(), optimizer=opt)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert mgr.latest() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step_")] == ["step_00000100"]
    assert not list(tmp_path.glob(".tmp-*"))  # cleaned up on the way out

    # a hard crash (no cleanup) leaves a temp folder; a bogus step folder and a dangling pointer
    (tmp_path / ".tmp-step_00000300-abc").mkdir()
    (tmp_path / ".tmp-step_00000300-abc" / "state.json").write_text("{")
    (tmp_path / "step_00000400").mkdir()
    (tmp_path / "step_00000400" / "state.json").write_text(json.dumps({"format": "mergekit_video.checkpoint"}))
    assert mgr.latest() == first and mgr.checkpoints() == [first]
    (tmp_path / "latest").write_text("step_00000999\n")
    assert mgr.latest() == first  # pointer broken: newest complete checkpoint
    with pytest.raises(ValueError, match="incomplete"):
        mgr.load(tmp_path / "step_00000400")
    third = mgr.save(step=500, epoch=2, model_state=model.state_dict())
    assert mgr.latest() == third and (tmp_path / "latest").read_text().strip() == "step_00000500"
    assert not list(tmp_path.glob(".tmp-*"))  # the stale temp folder is removed by the next save


@pytest.mark.parametrize(
    "keep_last, keep_best, mode, metric, expected",
    [
        (2, True, "max", "acc", [2, 5, 6]),
        (2, False, "max", "acc", [5, 6]),
        (2, True, "min", "loss", [4, 5, 6]),
        (None, True, "max", "acc", [1, 2, 3, 4, 5, 6]),
        (1, True, "max", None, [6]),
    ],
)
def test_pruning_keeps_last_k_and_best(tmp_path, keep_last, keep_best, mode, metric, expected):
    mgr = CheckpointManager(directory=tmp_path, keep_last=keep_last, keep_best=keep_best, best_metric=metric, best_mode=mode)
    accs = [0.1, 0.9, 0.3, 0.2, 0.4, 0.5]
    losses = [3.0, 2.0, 2.5, 1.0, 1.5, 1.2]
    for step, (a, lo) in enumerate(zip(accs, losses), start=1):
        mgr.save(step=step, epoch=step, model_state={"w": torch.full((2,), float(step))},
                 metrics={"acc": a, "loss": torch.tensor(lo)})
    assert [int(p.name.split("_")[1]) for p in mgr.checkpoints()] == expected
    assert mgr.latest().name == "step_00000006"
    if metric == "acc":  # best among the checkpoints that still exist
        assert mgr.best().name == ("step_00000002" if keep_best else "step_00000006")
    if metric == "loss":
        assert mgr.best().name == "step_00000004"


def test_tied_and_overlapping_tensors(tmp_path):
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    sd = model.state_dict()
    base = torch.arange(12.0)
    sd["qkv.q"], sd["qkv.k"] = base[:4], base[4:8]  # views of one storage
    mgr = CheckpointManager(directory=tmp_path)
    state = mgr.load(mgr.save(step=1, epoch=0, model_state=sd))
    assert state.model_state["head.weight"] is state.model_state["emb.weight"]
    assert torch.equal(state.model_state["emb.weight"], emb.weight)
    assert state.model_state["qkv.k"].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert list(state.model_state) == list(sd)
    fresh = nn.ModuleDict({"emb": nn.Embedding(5, 3), "head": nn.Linear(3, 5, bias=False)})
    fresh.load_state_dict({k: v for k, v in state.model_state.items() if not k.startswith("qkv")})
    assert torch.equal(fresh["head"].weight, emb.weight)


def test_resolve_resume_paths(tmp_path):
    mgr = CheckpointManager(directory=tmp_path / "ckpt")
    assert mgr.resolve_resume("auto") is None  # nothing yet: start fresh
    for off in (None, "none", False, "null"):
        assert mgr.resolve_resume(off) is None
    a = mgr.save(step=1, epoch=0, model_state={"w": torch.zeros(1)})
    b = mgr.save(step=2, epoch=0, model_state={"w": torch.ones(1)})
    assert mgr.resolve_resume("auto") == b
    assert mgr.resolve_resume(str(a)) == a
    assert mgr.resolve_resume(tmp_path / "ckpt") == b
    assert mgr.resolve_resume(tmp_path / "ckpt" / "latest") == b  # the pointer file
    run = CheckpointManager(directory=tmp_path / "run" / "checkpoints")
    c = run.save(step=5, epoch=1, model_state={"w": torch.ones(1)})
    assert mgr.resolve_resume(tmp_path / "run") == c  # another run's output_dir
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        mgr.resolve_resume(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a complete checkpoint .*: give a run's output_dir, its checkpoints/ folder"):
        mgr.resolve_resume(tmp_path / "empty")


def test_restore_errors_and_saving_same_step_replaces(tmp_path):
    mgr = CheckpointManager(directory=tmp_path)
    model = nn.Linear(2, 1)
    p = mgr.save(step=3, epoch=0, model_state=model.state_dict())
    state = mgr.load(p)
    assert isinstance(state, CheckpointState) and state.optimizer_state is None and state.rng is None
    with pytest.raises(ValueError, match="no optimizer state"):
        state.restore(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no RNG state"):
        state.restore(generators={})
    mgr.save(step=3, epoch=1, model_state={"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})
    assert mgr.load(p).epoch == 1 and mgr.checkpoints() == [p]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(directory=tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManager(directory=tmp_path, best_mode="maximum")


def test_update_state_rewrites_only_the_json_and_reprunes(tmp_path):
    """The end-of-epoch validation's metrics, history and RNG join the checkpoint saved before it."""
    mgr = CheckpointManager(directory=tmp_path, keep_last=1, best_metric="acc")
    model, gen = nn.Linear(3, 2), torch.Generator().manual_seed(0)
    opt = build_optimizer(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    mgr.save(step=4, epoch=0, model_state=model.state_dict(), metrics={"acc": 0.5})
    p = mgr.save(step=8, epoch=1, model_state=model.state_dict(), optimizer=opt, rng=capture_rng_state({"g": gen}),
                 extra={"batches_in_epoch": 4, "history": []})
    assert [c.name for c in mgr.checkpoints()] == ["step_00000004", "step_00000008"]  # 4 is the best so far
    tensors = {f: (p / f).stat() for f in ("model.safetensors", "optimizer.safetensors")}
    torch.randn(5, generator=gen)  # the validation draws from an RNG stream
    after_validation = capture_rng_state({"g": gen})
    assert mgr.update_state(8, epoch=2, rng=after_validation, extra={"batches_in_epoch": 0, "history": [{"acc": 0.75}]},
                            metrics={"acc": torch.tensor(0.75)}) == p
    assert {f: ((p / f).stat().st_ino, (p / f).stat().st_mtime_ns) for f in tensors} == {f: (st.st_ino, st.st_mtime_ns) for f, st in tensors.items()}
    state = mgr.load(p)
    assert (state.step, state.epoch, state.metrics, state.extra) == (8, 2, {"acc": 0.75}, {"batches_in_epoch": 0, "history": [{"acc": 0.75}]})
    assert torch.equal(state.rng["generators"]["g"], after_validation["generators"]["g"])
    assert torch.equal(state.model_state["weight"], model.weight) and state.optimizer_state["state"][0]["step"].item() == 1.0
    assert [c.name for c in mgr.checkpoints()] == ["step_00000008"] and mgr.best() == p  # the new best: 4 was pruned
    assert sorted(f.name for f in p.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint .*step_00000005 to update"):
        mgr.update_state(5, metrics={})


def test_rng_restore_strict_names():
    state = capture_rng_state({"a": torch.Generator()})
    with pytest.raises(ValueError, match=r"in the checkpoint only \['a'\], in the running model only \['b'\]"):
        restore_rng_state(state, {"b": torch.Generator()})
    restore_rng_state(state, {"b": torch.Generator()}, strict=False)


def test_load_resume_auto_falls_back_past_an_unreadable_checkpoint(tmp_path, caplog):
    from mergekit_video.training.checkpoint import _MODEL_FILE

    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=5)
    paths = [mgr.save(step=s, epoch=0, model_state={"w": torch.full((64,), float(s))}) for s in (1, 2, 3)]
    assert mgr.load_resume(None) is None
    path, state = mgr.load_resume("auto")
    assert path == paths[-1] and state.step == 3
    # the newest tensor file is truncated (a full disk, a copy cut short): its JSON still says complete
    model_file = paths[-1] / _MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="mergekit_video.training.checkpoint"):
        path, state = mgr.load_resume("auto")
    assert path == paths[1] and state.step == 2 and torch.equal(state.model_state["w"], torch.full((64,), 2.0))
    assert f"checkpoint {paths[-1]} is unreadable" in caplog.text
    assert model_file.exists()  # left in place for the user to inspect
    # an explicit path is read as given: refused, its damage told from the file's header and size
    with pytest.raises(ValueError, match=r"^train.resume='.*step_00000003' is not a readable checkpoint "
                                         r"\(model.safetensors is truncated or not a safetensors file \(40 bytes\)\)$"):
        mgr.load_resume(str(paths[-1]))
    # cut inside the tensor data (the header whole): the size says so too
    whole = (paths[1] / _MODEL_FILE).read_bytes()
    (paths[1] / _MODEL_FILE).write_bytes(whole[:-10])
    assert mgr.unreadable()[0] == (paths[1], f"model.safetensors is truncated ({len(whole) - 10} of {len(whole)} bytes)")
    (paths[1] / _MODEL_FILE).write_bytes(whole)
    for p in paths[:2]:
        (p / _MODEL_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=r"^resume=auto: no readable checkpoint in .*step_00000003: .*set train.resume=null"):
        mgr.load_resume("auto")


def test_damaged_bytes_of_the_same_size_are_caught_by_the_recorded_checksums(tmp_path, caplog):
    """Bytes flipped inside a tensor file (size kept: a bad disk, a botched copy) were loaded silently and training
    continued from altered weights."""
    from mergekit_video.training.checkpoint import _MODEL_FILE, _OPTIM_FILE, file_checksum

    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=5)
    w = torch.nn.Parameter(torch.zeros(64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    paths = []
    for s in (1, 2):
        w.grad = torch.ones(64)
        opt.step()
        paths.append(mgr.save(step=s, epoch=0, model_state={"w": w.detach().clone()}, optimizer=opt))
    meta = json.loads((paths[-1] / "state.json").read_text())
    assert meta["checksums"] == {f: file_checksum(paths[-1] / f) for f in (_MODEL_FILE, _OPTIM_FILE)}
    for name in (_MODEL_FILE, _OPTIM_FILE):
        target = paths[-1] / name
        whole = target.read_bytes()
        damaged = bytearray(whole)
        damaged[-8] ^= 0xFF  # inside the tensor data: header and size unchanged
        target.write_bytes(bytes(damaged))
        assert mgr.unreadable() == []  # the cheap listing checks header and size only
        with caplog.at_level("WARNING", logger="mergekit_video.training.checkpoint"):
            path, state = mgr.load_resume("auto")
        assert path == paths[0] and state.step == 1, name
        assert f"{target} does not hold the bytes it was saved with" in caplog.text
        with pytest.raises(ValueError, match=r"does not hold the bytes it was saved with \(checksum crc32:[0-9a-f]{8}, saved crc32:[0-9a-f]{8}\): "
                                             r"the file is damaged$"):
            mgr.load(paths[-1])  # an explicit path: refused
        target.write_bytes(whole)
        caplog.clear()
    assert mgr.load_resume("auto")[0] == paths[-1]
    # a checkpoint saved before checksums were recorded is read unchecked
    meta.pop("checksums")
    (paths[-1] / "state.json").write_text(json.dumps(meta))
    assert mgr.load(paths[-1]).step == 2


def test_loading_a_model_from_a_trainer_checkpoint_reads_no_optimizer_state(tmp_path, monkeypatch):
    import mergekit_video.training.checkpoint as tc
    from mergekit_video.models import build_video_clip, load

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    opt.step()
    path = CheckpointManager(directory=tmp_path).save(step=1, epoch=0, model_state=model.state_dict(), optimizer=opt, extra={"model_config": model.config})
    reads = []
    read = tc.read_safetensors
    monkeypatch.setattr(tc, "read_safetensors", lambda p, *a, **k: reads.append(Path(p).name) or read(p, *a, **k))
    back = load(path)
    assert reads == ["model.safetensors"]
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_with_a_truncated_state_json_is_warned_about_once_skipped_and_pruned_in_turn(tmp_path, caplog):
    """Checkpoints are published by a rename, so a step_* folder whose state.json cannot be read is damage:
    resume=auto names it and takes the previous one; it is pruned once keep_last newer ones exist."""
    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=2)
    paths = [mgr.save(step=s, epoch=0, model_state={"w": torch.full((4,), float(s))}) for s in (1, 2, 3)]
    assert [p.name for p in mgr.checkpoints()] == ["step_00000002", "step_00000003"]
    state_json = paths[2] / "state.json"
    with open(state_json, "r+b") as f:
        f.truncate(100)
    why = f"state.json: JSONDecodeError: {_json_error(state_json)}"
    assert mgr.unreadable() == [(paths[2], why)]
    with caplog.at_level("WARNING", logger="mergekit_video.training.checkpoint"):
        for _ in range(2):
            path, state = mgr.load_resume("auto")
            assert path == paths[1] and state.step == 2
    assert [r.getMessage() for r in caplog.records] == [f"checkpoint {paths[2]} is unreadable ({why}); resuming from the previous one, step_00000002"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_video.training.checkpoint"):
        assert CheckpointManager(directory=tmp_path / "ckpt").resolve_resume(str(tmp_path / "ckpt")) == paths[1]  # a folder given
    assert f"checkpoint {paths[2]} is unreadable" in caplog.text
    with pytest.raises(ValueError, match=rf"^train.resume='{paths[2]}' is not a readable checkpoint \(state.json: JSONDecodeError: "):
        mgr.load_resume(str(paths[2]))
    mgr.save(step=4, epoch=0, model_state={"w": torch.zeros(4)})
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_00000002", "step_00000003", "step_00000004"]
    mgr.save(step=5, epoch=0, model_state={"w": torch.zeros(4)})  # two complete checkpoints newer than step 3 now
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_00000004", "step_00000005"]
    # nothing readable at all: an error naming it, not a silent fresh start
    alone = CheckpointManager(directory=tmp_path / "alone")
    (alone.save(step=7, epoch=0, model_state={"w": torch.zeros(4)}) / "state.json").write_text("{")
    with pytest.raises(ValueError, match=r"^resume=auto: no readable checkpoint in .*alone \(step_00000007: state.json: JSONDecodeError: .*set train.resume=null"):
        alone.load_resume("auto")


def _edit_state_json(path: Path, edit) -> None:
    meta = json.loads((path / "state.json").read_text())
    edit(meta)
    (path / "state.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, why", [
    (lambda m: m.pop("rng"), "state.json lacks 'rng', which every checkpoint's state.json has"),
    (lambda m: m.update(scheduler=None), "state.json has no 'scheduler' state, though the checkpoint was saved with one"),
    (lambda m: m.update(extra={}), "state.json has no 'extra' state, though the checkpoint was saved with one"),
    (lambda m: m["extra"].pop("batches_in_epoch"), "state.json's 'extra' lacks 'batches_in_epoch', which the checkpoint was saved with"),
    (lambda m: m["rng"].pop("torch"), "state.json's 'rng' lacks 'torch', which the checkpoint was saved with"),
])
def test_a_state_json_that_lacks_a_part_it_was_saved_with_is_a_damaged_checkpoint(tmp_path, caplog, edit, why):
    """A valid state.json without the RNG states, the scheduler's or the place in the epoch resumed silently
    and not exactly: it is damaged, skipped by resume=auto with a warning, and refused when named."""
    run = _Run(seed=0)
    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=5)
    paths = [mgr.save(step=s, epoch=0, model_state=run.model.state_dict(), optimizer=run.opt, scheduler=run.sched,
                      rng=capture_rng_state(run.generators()), extra={"batches_in_epoch": s, "history": []}) for s in (1, 2, 3)]
    _edit_state_json(paths[2], edit)
    assert mgr.unreadable() == [(paths[2], why)]
    with caplog.at_level("WARNING", logger="mergekit_video.training.checkpoint"):
        path, state = mgr.load_resume("auto")
    assert path == paths[1] and state.step == 2
    assert [r.getMessage() for r in caplog.records] == [f"checkpoint {paths[2]} is unreadable ({why}); resuming from the previous one, step_00000002"]
    with pytest.raises(ValueError) as info:
        mgr.load_resume(str(paths[2]))
    assert str(info.value) == f"train.resume='{paths[2]}' is not a readable checkpoint ({why})"
    with pytest.raises(ValueError, match=rf"^checkpoint {paths[2]} is incomplete or not a mergekit_video checkpoint \({why}\)$"):
        mgr.load(paths[2])


def test_parts_never_saved_are_not_missing_and_older_checkpoints_without_the_record_still_load(tmp_path):
    mgr = CheckpointManager(directory=tmp_path, keep_last=None)
    bare = mgr.save(step=1, epoch=0, model_state={"w": torch.zeros(2)})  # no optimizer, scheduler, scaler, RNG or extra
    assert json.loads((bare / "state.json").read_text())["parts"] == dict.fromkeys(["optimizer", "scheduler", "scaler", "rng", "extra"])
    state = mgr.load(bare)
    assert (state.optimizer_state, state.scheduler_state, state.scaler_state, state.rng, state.extra) == (None, None, None, None, {})
    # update_state replaces extra and rng: the record follows them
    mgr.update_state(1, rng={"python": 1}, extra={"a": 1})
    mgr.update_state(1, extra={"b": 2})
    assert json.loads((bare / "state.json").read_text())["parts"]["extra"] == ["b"] and mgr.load(bare).extra == {"b": 2}
    # a checkpoint written before the record: only what every state.json has is required
    older = mgr.save(step=2, epoch=0, model_state={"w": torch.zeros(2)}, extra={"a": 1})
    _edit_state_json(older, lambda m: (m.pop("parts"), m.update(extra={})))
    assert mgr.load(older).extra == {} and mgr.unreadable() == []
    mgr.update_state(2, extra={"c": 3})
    assert "parts" not in json.loads((older / "state.json").read_text())
    _edit_state_json(older, lambda m: m.pop("scheduler"))
    assert mgr.unreadable() == [(older, "state.json lacks 'scheduler', which every checkpoint's state.json has")]


def _json_error(path: Path) -> str:
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return str(exc)
    raise AssertionError(f"{path} parses")


def test_the_optimizer_class_is_saved_with_a_live_optimizer(tmp_path):
    model = nn.Linear(2, 2)
    mgr = CheckpointManager(directory=tmp_path)
    for opt, want in ((torch.optim.SGD(model.parameters(), lr=0.1), "SGD"), (torch.optim.AdamW(model.parameters()), "AdamW")):
        assert mgr.load(mgr.save(step=1, epoch=0, model_state=model.state_dict(), optimizer=opt)).optimizer_class == want
        assert mgr.load(mgr.save(step=1, epoch=0, model_state=model.state_dict(), optimizer=opt.state_dict())).optimizer_class is None


# ---------------------------------------------------------------------------------------------
# mergekit_video.load: configs and tensor files checked against each other before any tensor is read
# ---------------------------------------------------------------------------------------------
def _tiny_model(seed: int = 0):
    from mergekit_video.models import build_video_clip

    torch.manual_seed(seed)
    return build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_load_refuses_weights_and_configs_that_do_not_fit_in_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import mergekit_video.utils.io as uio
    from mergekit_video.cli.main import main as cli_main
    from mergekit_video.models import load, save_model
    from safetensors.torch import load_file, save_file

    src = save_model(_tiny_model(), tmp_path / "model")
    reads = []
    read = uio.read_safetensors
    monkeypatch.setattr(uio, "read_safetensors", lambda p, *a, **k: reads.append(Path(p).name) or read(p, *a, **k))

    def set_head(key, value):
        return lambda c: c["head"].__setitem__(key, value)

    cases = {
        "experts": (set_head("num_experts", 3), "head.safetensors holds 2 experts per layer, config.json says 3: it lacks 4 tensors "
                    "('transformer.resblocks.0.mlp.experts.2.c_fc.bias', 'transformer.resblocks.0.mlp.experts.2.c_fc.weight', "
                    "'transformer.resblocks.0.mlp.experts.2.c_proj.bias' (and 1 more))"),
        "layers": (set_head("layers", 2), "head.safetensors holds 1 temporal layers, config.json says 2: it lacks 16 tensors "
                   "('transformer.resblocks.1.attn.in_proj_bias', 'transformer.resblocks.1.attn.in_proj_weight', "
                   "'transformer.resblocks.1.attn.out_proj.bias' (and 13 more))"),
        "width": (set_head("width", 32), "head.safetensors holds a head of width 64, config.json says 32: it has 18 tensors of another shape "
                  "('frame_position_embeddings.weight' [77, 64], expected [77, 32], 'source_class_features' [0, 64], expected [0, 32], "
                  "'transformer.resblocks.0.attn.in_proj_bias' [192], expected [96] (and 15 more))"),
        "clip": (lambda c: c["clip"]["model_cfg"]["vision_cfg"].__setitem__("layers", 3),
                 "clip.safetensors holds 2 vision layers, config.json says 3: it lacks 12 tensors "
                 "('visual.transformer.resblocks.2.attn.in_proj_bias', 'visual.transformer.resblocks.2.attn.in_proj_weight', "
                 "'visual.transformer.resblocks.2.attn.out_proj.bias' (and 9 more))"),
        "no head": (lambda c: c.pop("head"), "config.json is not a valid mergekit_video model config: key 'head' is missing"),
        "layers two": (set_head("layers", "two"), 'config.json is not a valid mergekit_video model config: key \'head.layers\' must be an integer, not "two"'),
        "bool": (set_head("num_experts", True), "config.json is not a valid mergekit_video model config: key 'head.num_experts' must be an integer, not true"),
        "unknown": (set_head("dropout", 0.1), "config.json is not a valid mergekit_video model config: key 'head.dropout' is not an argument of the "
                    "temporal head (those are width, layers, num_experts, heads, num_positions, router, router_kwargs, expert_init, merge, "
                    "merge_kwargs, tfm_k, tfm_gamma, num_source_classes)"),
        "empty": (lambda c: c.clear(), "config.json is not a valid mergekit_video model config: key 'format' is missing"),
        "no model_cfg": (lambda c: c["clip"].pop("model_cfg"), "config.json is not a valid mergekit_video model config: key 'clip.model_cfg' is missing"),
    }
    for label, (edit, message) in cases.items():
        d = _edited_copy(src, tmp_path / label.replace(" ", "_"), edit)
        with pytest.raises(ValueError) as info:
            load(d)
        assert str(info.value) == f"{d}/{message}", label
    assert reads == []  # refused from the config and the safetensors headers: no tensor was read
    # damaged tensor files: a missing, an unexpected and a wrong-shaped key; a head file from another model
    for label, change, message in (
        ("missing", lambda sd: sd.pop("transformer.resblocks.0.ln_2.bias"), "lacks 1 tensor ('transformer.resblocks.0.ln_2.bias')"),
        ("unexpected", lambda sd: sd.__setitem__("bogus.weight", torch.zeros(2)), "has 1 unexpected tensor ('bogus.weight')"),
        ("shape", lambda sd: sd.__setitem__("transformer.resblocks.0.ln_1.bias", torch.zeros(65)),
         "has 1 tensor of another shape ('transformer.resblocks.0.ln_1.bias' [65], expected [64])"),
    ):
        d = _edited_copy(src, tmp_path / label, lambda c: c.pop("checksums"))  # a hand-edited file: no checksum to match
        sd = load_file(d / "head.safetensors")
        change(sd)
        save_file(sd, d / "head.safetensors")
        with pytest.raises(ValueError) as info:
            load(d)
        assert str(info.value) == f"{d}/head.safetensors does not fit the temporal head config.json describes: it {message}", label
        assert load(d, strict=False) if label != "shape" else True  # strict=False allows missing/unexpected keys, never shapes
    # the CLI: one line
    d = tmp_path / "experts"
    capsys.readouterr()
    assert cli_main(["export", str(d), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"error: {d}/{cases['experts'][1]}"


def test_a_model_folder_whose_tensor_file_changed_is_refused_by_load_eval_and_export(tmp_path, capsys):
    """config.json records a CRC32 of each tensor file: one byte changed (a bad disk, a botched copy) moved an
    expert weight silently through eval and export; a model saved before checksums loads unchecked."""
    import json

    from mergekit_video.cli.main import main as cli_main
    from mergekit_video.models import load, save_model

    src = save_model(_tiny_model(), tmp_path / "model")
    sums = json.loads((src / "config.json").read_text())["checksums"]
    assert set(sums) == {"clip.safetensors", "head.safetensors"} and all(v.startswith("crc32:") for v in sums.values())
    load(src)
    data = bytearray((src / "head.safetensors").read_bytes())
    data[-3] ^= 0x40  # a tensor byte: the header, size and keys still fit
    (src / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(src / 'head.safetensors'))} does not hold the bytes it was saved with "
                                         r"\(checksum crc32:[0-9a-f]{8}, saved crc32:[0-9a-f]{8}\): the file is damaged"):
        load(src)
    assert cli_main(["export", str(src), str(tmp_path / "out"), "--dense"]) == 1
    assert "does not hold the bytes it was saved with" in capsys.readouterr().err and not (tmp_path / "out").exists()
    config = json.loads((src / "config.json").read_text())
    del config["checksums"]  # saved before checksums were recorded
    (src / "config.json").write_text(json.dumps(config))
    load(src)


def test_load_of_a_trainer_checkpoint_needs_only_state_json_and_model_tensors(tmp_path):
    import shutil

    from mergekit_video.models import load
    from safetensors.torch import load_file, save_file

    model = _tiny_model(seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    step = CheckpointManager(directory=tmp_path / "ckpt").save(step=1, epoch=0, model_state=model.state_dict(), optimizer=opt,
                                                                extra={"model_config": model.config})

    def variant(name, change):
        d = tmp_path / name
        shutil.copytree(step, d)
        change(d)
        return d

    d = variant("no_optimizer", lambda d: (d / "optimizer.safetensors").unlink())
    back = load(d)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    d = variant("no_state", lambda d: (d / "state.json").unlink())
    with pytest.raises(FileNotFoundError) as info:
        load(d)
    assert str(info.value) == (f"{d} is a trainer checkpoint without its state.json (which holds its model config and key list): "
                               "it cannot be loaded; load another checkpoint")
    d = variant("no_model", lambda d: (d / "model.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match=rf"^{d}/model.safetensors is missing$"):
        load(d)

    def extra_tensor(d):
        sd = load_file(d / "model.safetensors")
        sd["head.bogus"] = torch.zeros(3)
        save_file(sd, d / "model.safetensors")

    d = variant("extra", extra_tensor)
    with pytest.raises(ValueError) as info:
        load(d)
    assert str(info.value) == f"checkpoint {d} is inconsistent: model.safetensors holds 1 tensor its state.json does not list ('head.bogus')"
    # a stray config.json: the same as state.json's model_config is harmless, another one is refused
    d = variant("stray_same", lambda d: (d / "config.json").write_text(json.dumps(model.config)))
    assert load(d).head.config == model.head.config
    other = {**model.config, "head": {**model.config["head"], "num_experts": 4}}
    d = variant("stray_other", lambda d: (d / "config.json").write_text(json.dumps(other)))
    with pytest.raises(ValueError) as info:
        load(d)
    assert str(info.value) == (f"{d} holds a config.json that differs from its state.json's extra.model_config, which describes the "
                               f"checkpoint's tensors: remove the stray {d}/config.json")


def test_save_model_replaces_a_folder_atomically_and_recovers_from_an_interrupted_replace(tmp_path, monkeypatch, caplog):
    import os

    import mergekit_video.models.checkpoint as mc
    from mergekit_video.models import load, save_model

    a, b = _tiny_model(seed=2), _tiny_model(seed=3)

    def holds(model):
        return torch.equal(load(tmp_path / "model").head.frame_position_embeddings.weight, model.head.frame_position_embeddings.weight)

    d = save_model(a, tmp_path / "model")
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    exchanges = uio.exchange_paths(tmp_path / "x", tmp_path / "y")  # renameat2(RENAME_EXCHANGE) on this platform and file system
    real_replace, moves = os.replace, []
    monkeypatch.setattr(os, "replace", lambda src, dst: (Path(dst).parent == tmp_path and moves.append(Path(dst).name)) or real_replace(src, dst))
    save_model(b, d, overwrite=True)
    assert holds(b) and (moves == [] if exchanges else (len(moves) == 2 and moves[1] == "model"
                                                         and mc._backup_pattern(d).match(moves[0])))  # exchanged: never moved aside
    # the fallback (two renames): a failed second rename puts the previous model back
    monkeypatch.setattr(uio, "exchange_paths", lambda x, y: False)

    def failing(src, dst):
        if Path(src).name.startswith(".model.mergevid-tmp-"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        save_model(a, d, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert holds(b) and sorted(p.name for p in tmp_path.iterdir()) == ["model", "x", "y"]
    save_model(a, d, overwrite=True)
    assert holds(a) and sorted(p.name for p in tmp_path.iterdir()) == ["model", "x", "y"]
    # killed between the two renames: model/ gone, only its backup .model.mergevid-old-<pid>-<host>-XXXXXXXX
    _killed_while(f"""
import mergekit_video.models.checkpoint as mc
import mergekit_video.utils.io as uio
from mergekit_video.models import build_video_clip, save_model
uio.exchange_paths = lambda a, b: False
real_replace = os.replace
os.replace = lambda src, dst: die() if os.path.basename(src).startswith(".model.mergevid-tmp-") else real_replace(src, dst)
save_model(build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2), {str(d)!r}, overwrite=True)
""", tmp_path)
    backup = [p for p in tmp_path.iterdir() if p.name.startswith(".model.mergevid-old-")]
    assert len(backup) == 1 and not d.exists() and mc._backup_pattern(d).match(backup[0].name)
    backup = backup[0]
    with pytest.raises(FileNotFoundError) as info:
        load(d)
    assert str(info.value) == (f"model path {d} does not exist; {backup} holds the model an interrupted save with "
                               f"overwrite was replacing: rename it back to model (the next save_model to {d} restores it)")
    with caplog.at_level("WARNING", logger="mergekit_video.models.checkpoint"), pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        save_model(b, d)  # the restored model is not replaced without overwrite
    assert [r.getMessage() for r in caplog.records if r.name == mc.__name__] == [f"restored {d} from {backup.name}, left by a save with overwrite that was interrupted"]
    assert holds(a) and not backup.exists()
    # killed after them: a stale backup beside the model is removed by the next save
    backup.mkdir()
    save_model(b, d, overwrite=True)
    assert holds(b) and sorted(p.name for p in tmp_path.iterdir()) == ["model", "x", "y"]


def test_save_model_never_takes_a_users_dot_old_folder_for_its_backup(tmp_path, monkeypatch, caplog):
    """The backup of an overwriting save was ``.NAME.old``: a user's folder of that name beside an export target was
    moved onto the target by the next save (restored as an interrupted save's), or deleted by a save with overwrite.
    The backup's name is now one only mergekit_video makes, with its writer; only a gone writer's is restored or removed."""
    import os

    import mergekit_video.models.checkpoint as mc
    from mergekit_video.models import load, save_model
    from mergekit_video.utils.io import _host_tag, temp_owner

    a, b = _tiny_model(seed=2), _tiny_model(seed=3)
    d = tmp_path / "model"
    users = tmp_path / ".model.old"
    users.mkdir()
    (users / "mine.txt").write_text("a user's folder")
    live = tmp_path / f".model.mergevid-old-{temp_owner()}-abcd1234"  # a save between its renames, in this process
    live.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load(d)
    assert str(info.value) == f"model path {d} does not exist"  # neither is offered as the model
    with caplog.at_level("WARNING", logger=mc.__name__):
        save_model(a, d)  # a fresh model: nothing restored
    assert not [r for r in caplog.records if r.name == mc.__name__]
    assert sorted(p.name for p in (d).iterdir()) == ["clip.safetensors", "config.json", "head.safetensors", "open_clip_config.json"]
    monkeypatch.setattr(uio, "exchange_paths", lambda x, y: False)  # the two-rename fallback, which makes a backup
    for overwrite_with in (b, a):
        save_model(overwrite_with, d, overwrite=True)
        assert torch.equal(load(d).head.frame_position_embeddings.weight, overwrite_with.head.frame_position_embeddings.weight)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".model.old", live.name, "model"])
    assert (users / "mine.txt").read_text() == "a user's folder"
    dead = tmp_path / f".model.mergevid-old-{_dead_pid()}-{_host_tag()}-abcd5678"
    dead.mkdir()
    save_model(b, d, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".model.old", live.name, "model"])  # only the gone writer's
    os.rmdir(live)


def test_save_model_refuses_a_symlinked_folder_before_writing(tmp_path):
    """export/convert --overwrite onto OUT -> real/ moved the user's link aside to .OUT.mergevid-tmp-..., wrote the
    model, then failed with "Cannot call rmtree on a symbolic link"."""
    import os

    from mergekit_video.models import load, save_model

    a, b = _tiny_model(seed=2), _tiny_model(seed=3)
    real = save_model(a, tmp_path / "real")
    link, dangling = tmp_path / "out", tmp_path / "dangling"
    link.symlink_to("real")
    dangling.symlink_to("nowhere")
    for target, to in ((link, "real"), (dangling, "nowhere")):
        for overwrite in (False, True):
            with pytest.raises(FileExistsError) as info:
                save_model(b, target, overwrite=overwrite)
            assert str(info.value) == f"{target} is a symbolic link (to {to}); give the folder itself or another path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "out", "real"]
    assert link.is_symlink() and dangling.is_symlink() and os.readlink(link) == "real"
    assert torch.equal(load(real).head.frame_position_embeddings.weight, a.head.frame_position_embeddings.weight)


def test_save_model_names_the_file_it_could_not_write_and_leaves_the_previous_model(tmp_path, monkeypatch):
    """A full disk during the final model export said only "SafetensorError: Error while serializing: I/O error:
    No space left on device (os error 28)", without a path."""
    import safetensors.torch

    from mergekit_video.models import load, save_model

    a, b = _tiny_model(seed=2), _tiny_model(seed=3)
    out = save_model(a, tmp_path / "model")

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        save_model(b, out, overwrite=True)
    assert str(info.value) == (f"could not write {out / 'clip.safetensors'} (RuntimeError: Error while serializing: I/O error: "
                               f"No space left on device (os error 28)); nothing was replaced at {out}")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folder left
    assert torch.equal(load(out).head.frame_position_embeddings.weight, a.head.frame_position_embeddings.weight)


def test_a_dense_export_of_a_dense_export_keeps_the_original_provenance(tmp_path):
    from mergekit_video.models import export_dense, load

    model = _tiny_model(seed=4)
    dense = load(export_dense(model, tmp_path / "dense", strategy="weighted", weights=[3.0, 1.0]))
    again = load(export_dense(dense, tmp_path / "dense2"))
    assert dense.config["exported_from"] == again.config["exported_from"] == {"num_experts": 2, "merge": "weighted", "merge_kwargs": {"weights": [3.0, 1.0]}}
    assert again.head.config["num_experts"] == 0
    assert all(torch.equal(a, b) for a, b in zip(dense.head.state_dict().values(), again.head.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# leftovers of writes killed midway (SIGKILL: no cleanup runs) are removed by the next writer
# ---------------------------------------------------------------------------------------------
def _killed_while(code: str, cwd: Path) -> None:
    """Run ``code`` in a fresh Python process that SIGKILLs itself where ``code`` calls ``die()``."""
    import signal
    import subprocess
    import sys

    prelude = "import os, signal\ndef die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)


def test_the_temp_files_of_atomic_writes_a_kill_cut_short_are_removed_once_their_writer_is_gone(tmp_path):
    """A kill at the rename of ``latest`` or of a state.json left ``.latest.XXXX.tmp`` / ``.state.json.XXXX.tmp``
    for good (only the .tmp-step_* folders were swept): their names carry the writer, and a later save, update or
    resume removes them once it is gone; a live writer's, or an unnamed one's under ten minutes old, are kept."""
    import os

    from mergekit_video.utils.io import _host_tag, temp_owner

    ckpt = tmp_path / "ckpt"
    _killed_while(f"""
import torch
from mergekit_video.training.checkpoint import CheckpointManager
mgr = CheckpointManager(directory={str(ckpt)!r})
mgr.save(step=1, epoch=0, model_state={{"w": torch.zeros(2)}})
os.replace = die
mgr.save(step=2, epoch=0, model_state={{"w": torch.ones(2)}})
""", tmp_path)
    left = [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".latest.") and left[0].endswith(".tmp"), sorted(p.name for p in ckpt.iterdir())
    _killed_while(f"""
from mergekit_video.training.checkpoint import CheckpointManager
os.replace = die
CheckpointManager(directory={str(ckpt)!r}).update_state(2, metrics={{"top1": 0.5}})
""", tmp_path)
    assert len([p for p in (ckpt / "step_00000002").iterdir() if p.name.startswith(".state.json.")]) == 1
    # beside them: a write in progress (this process), another host's and an older unnamed one, both recent,
    # an unnamed one older than ten minutes, and one whose pid now belongs to a process that started after it
    live = ckpt / f".latest.{temp_owner()}.abcd1234.tmp"
    other_host = ckpt / f".latest.{_dead_pid()}-{'0' * 8 if _host_tag() != '0' * 8 else '1' * 8}.abcd1234.tmp"
    unnamed, old_unnamed, reused = (ckpt / ".latest.abcd1234.tmp", ckpt / ".latest.abcd5678.tmp",
                                    ckpt / "step_00000001" / f".state.json.{temp_owner()}.abcd5678.tmp")
    for p in (live, other_host, unnamed, old_unnamed, reused):
        p.write_text("step_00000002\n")
    os.utime(old_unnamed, (0, 0))
    os.utime(reused, (0, 0))  # written in 1970: not by this process, which has its pid now
    mgr = CheckpointManager(directory=ckpt, keep_last=None)
    assert mgr.load_resume("auto")[1].step == 1  # the rename of latest was cut short: it still names step 1
    assert sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")) == sorted(p.name for p in (live, other_host, unnamed))
    for step in ("step_00000001", "step_00000002"):
        assert sorted(p.name for p in (ckpt / step).iterdir()) == ["model.safetensors", "state.json"]
    mgr.save(step=3, epoch=0, model_state={"w": torch.ones(2)})
    assert sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")) == sorted(p.name for p in (live, other_host, unnamed))
    live.unlink()
    mgr.save(step=4, epoch=0, model_state={"w": torch.ones(2)})  # a plain save sweeps them too
    assert sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")) == sorted(p.name for p in (other_host, unnamed))


def test_save_model_removes_the_temp_folder_of_a_killed_save_at_once(tmp_path):
    """A kill during the final model save left ``.model.mergevid-tmp-XXXX/`` (a model's size) that a rerun kept for
    ten minutes: its name carries the writer, and the next save removes it as soon as that process is gone."""
    import os

    from mergekit_video.models import save_model
    from mergekit_video.utils.io import temp_owner

    _killed_while(f"""
import safetensors.torch as st
from mergekit_video.models import build_video_clip, save_model
model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
st.save_file = die
save_model(model, {str(tmp_path / "model")!r})
""", tmp_path)
    killed = [p for p in tmp_path.iterdir() if p.name.startswith(".model.mergevid-tmp-")]
    assert len(killed) == 1 and killed[0].is_dir() and not (tmp_path / "model").exists()
    running = tmp_path / f".model.mergevid-tmp-{temp_owner()}-abcd1234"  # a save in progress in this process
    running.mkdir()
    save_model(_tiny_model(), tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", running.name])
    os.rmdir(running)



def test_resaving_a_step_never_leaves_it_missing(tmp_path, monkeypatch, caplog):
    """Saving a step that exists (a run resumed from an older checkpoint of its folder saves step_N again) deleted the
    old step_N before renaming the new one in: a Ctrl-C between lost both. Now the new one is swapped in (an atomic
    exchange, else the old one is renamed aside first and put back on failure) and the old one deleted only after
    ``latest`` is written; one a kill left aside is put back by the next resume or save."""
    import os
    import shutil

    import mergekit_video.training.checkpoint as tc

    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=None)
    d = mgr.directory
    mgr.save(step=5, epoch=0, model_state={"w": torch.zeros(2)})
    mgr.save(step=10, epoch=0, model_state={"w": torch.ones(2)})

    def holds(value: float) -> bool:
        return torch.equal(mgr.load(mgr.path_of(10)).model_state["w"], torch.full((2,), value))

    def listing() -> list[str]:
        return sorted(p.name for p in d.iterdir())

    real_rename, real_rmtree = os.rename, shutil.rmtree

    def interrupt(when):
        def rename(src, dst):
            if when(Path(src).name, Path(dst).name):
                raise KeyboardInterrupt
            return real_rename(src, dst)
        return rename

    value = 1.0
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(uio, "exchange_paths", lambda a, b: False)  # the two-rename fallback
        # Ctrl-C at either rename of the fallback: the old step_10 stays (with the exchange: nothing is renamed)
        for when in ((lambda src, dst: src == "step_00000010"), (lambda src, dst: src.startswith(".tmp-step_00000010"))):
            monkeypatch.setattr(os, "rename", interrupt(when))
            try:
                mgr.save(step=10, epoch=0, model_state={"w": torch.full((2,), 7.0)})
                value = 7.0  # the exchange renames nothing: saved
            except KeyboardInterrupt:
                pass
            monkeypatch.setattr(os, "rename", real_rename)
            assert holds(value) and listing() == ["latest", "step_00000005", "step_00000010"]
        # Ctrl-C while the replaced one is deleted: the new one is in place and latest, the old one goes with the next save
        monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            mgr.save(step=10, epoch=0, model_state={"w": torch.full((2,), value + 1)})
        monkeypatch.setattr(shutil, "rmtree", real_rmtree)
        value += 1
        assert holds(value) and mgr.latest() == mgr.path_of(10) and len(listing()) == 4
        mgr.save(step=5, epoch=0, model_state={"w": torch.zeros(2)})
        assert listing() == ["latest", "step_00000005", "step_00000010"] and mgr.latest() == mgr.path_of(5)

    value += 1
    mgr.save(step=10, epoch=0, model_state={"w": torch.full((2,), value)})
    assert mgr.latest() == mgr.path_of(10)
    # a kill between the two renames of the fallback: step_10 is aside, put back by the next resume (before latest is read)
    _killed_while(f"""
import torch
import mergekit_video.utils.io as uio
from mergekit_video.training.checkpoint import CheckpointManager
uio.exchange_paths = lambda a, b: False
real_rename = os.rename
os.rename = lambda src, dst: die() if os.path.basename(src).startswith(".tmp-step_") else real_rename(src, dst)
CheckpointManager(directory={str(d)!r}, keep_last=None).save(step=10, epoch=0, model_state={{"w": torch.full((2,), 9.0)}})
""", tmp_path)
    aside = [n for n in listing() if n.startswith(".old-step_00000010-")]
    assert len(aside) == 1 and "step_00000010" not in listing() and tc._ASIDE.match(aside[0])
    with caplog.at_level("WARNING", logger=tc.__name__):
        path, state = mgr.load_resume("auto")
    assert path == mgr.path_of(10) and state.step == 10 and holds(value)
    assert [r.getMessage() for r in caplog.records if r.name == tc.__name__] == [
        f"restored {mgr.path_of(10)} from {aside[0]}, left by a save that was replacing it when it was killed"]
    mgr.save(step=10, epoch=0, model_state={"w": torch.full((2,), 3.0)})  # the new one's temp folder is swept
    assert holds(3.0) and listing() == ["latest", "step_00000005", "step_00000010"]


def test_truncated_newer_checkpoints_do_not_take_the_keep_last_slots(tmp_path):
    """After resuming past two truncated newer checkpoints, keep_last=2 deleted the valid step 8 and kept the damage."""
    from mergekit_video.training.checkpoint import _MODEL_FILE

    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=2, best_metric="acc")
    for s in (6, 16, 18):  # step 6 the best: kept
        mgr.save(step=s, epoch=0, model_state={"w": torch.full((8,), float(s))}, metrics={"acc": 0.9 if s == 6 else 0.5})
    for s in (16, 18):
        (tmp_path / "ckpt" / f"step_{s:08d}" / _MODEL_FILE).write_bytes(b"")
    assert mgr.load_resume("auto")[0].name == "step_00000006"
    for s in (8, 10):  # the resumed run saves on
        mgr.save(step=s, epoch=0, model_state={"w": torch.full((8,), float(s))})
    assert [c.name for c in mgr.checkpoints()] == ["step_00000006", "step_00000008", "step_00000010"]
    assert [p.name for p, _ in mgr.unreadable()] == ["step_00000016", "step_00000018"]  # left for the user, pruned later


def test_a_failed_checkpoint_write_names_it_and_the_checkpoint_that_survives(tmp_path, monkeypatch):
    """A full disk showed 'SafetensorError: Error while serializing: I/O error: No space left on device', naming nothing."""
    import re

    import safetensors.torch

    from mergekit_video.training.checkpoint import CheckpointWriteError
    from mergekit_video.utils.io import atomic_save_safetensors

    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=3)
    first = mgr.save(step=1, epoch=0, model_state={"w": torch.ones(4)})

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        mgr.save(step=2, epoch=0, model_state={"w": torch.ones(4)})
    assert str(info.value) == (f"checkpoint {tmp_path / 'ckpt' / 'step_00000002'} could not be written (RuntimeError: Error while "
                               f"serializing: I/O error: No space left on device (os error 28)); the previous checkpoint, {first}, "
                               "is intact: free the space (or fix the folder) and rerun to resume from it")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_00000001"]  # no half-written folder
    with pytest.raises(OSError, match=rf"^could not write {re.escape(str(tmp_path / 'm.safetensors'))} \(RuntimeError: .*os error 28\)\)$"):
        atomic_save_safetensors(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    assert not list(tmp_path.glob("*m.safetensors*"))


def test_save_model_refuses_a_merge_relative_to_an_unsaved_base(tmp_path):
    """The base of a ties/dare/task_arithmetic merge lives in memory only: the loaded model merged relative to a
    fresh random initialisation (0.8 off), silently. The dense export keeps the merge."""
    from mergekit_video.models import build_video_clip, export_dense, load, save_model

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2,
                             expert_init="copy_noise", merge="ties", merge_kwargs={"density": 0.5}).eval()
    with pytest.raises(ValueError, match=r"^head\.transformer\.resblocks\.0\.mlp merges its experts with 'ties', relative to a base "
                                         r"model that a saved model does not store"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    export_dense(model, tmp_path / "dense")
    frames = torch.randn(2, 4, 64)
    with torch.no_grad():
        assert torch.equal(model.head.video_features(frames), load(tmp_path / "dense").head.video_features(frames))


def test_a_step_folder_renamed_by_hand_is_no_complete_checkpoint(tmp_path, caplog):
    """latest and prune order checkpoints by folder name and a resume restores state.json's step: a
    step_N folder that records another step (copied or renamed by hand) is refused, naming both steps,
    and resume=auto takes the newest consistent one."""
    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=3)
    first = mgr.save(step=1, epoch=0, model_state={"w": torch.ones(2)})
    second = mgr.save(step=2, epoch=0, model_state={"w": torch.zeros(2)})
    copied = tmp_path / "ckpt" / "step_00000009"
    shutil.copytree(first, copied)
    why = "state.json records step 1, but the folder is named for step 9 (renamed or copied by hand? its name would be step_00000001)"
    assert mgr.unreadable() == [(copied, why)] and mgr.checkpoints() == [first, second]
    with caplog.at_level("WARNING", logger="mergekit_video.training.checkpoint"):
        path, state = mgr.load_resume("auto")
    assert path == second and state.step == 2 and why in caplog.text
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {copied} is incomplete or not a mergekit_video checkpoint ({why})")):
        mgr.load(copied)


def test_a_state_json_that_lost_a_key_is_inconsistent_and_resume_auto_takes_the_previous_checkpoint(tmp_path, caplog):
    """A key missing from state.json's model list dropped that tensor silently, and the resume then blamed the recipe."""
    mgr = CheckpointManager(directory=tmp_path / "ckpt", keep_last=3)
    first = mgr.save(step=1, epoch=0, model_state={"a": torch.ones(2), "b": torch.zeros(3)})
    second = mgr.save(step=2, epoch=0, model_state={"a": torch.ones(2) * 2, "b": torch.zeros(3)})
    meta = json.loads((second / "state.json").read_text())
    meta["model"]["keys"].remove("b")
    (second / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {second} is inconsistent: model.safetensors holds 'b', which its state.json does not list")):
        mgr.load(second)
    with caplog.at_level("WARNING", logger="mergekit_video.training.checkpoint"):
        path, state = mgr.load_resume("auto")
    assert path == first and state.step == 1 and "which its state.json does not list" in caplog.text
