"""The MoTE training loop: device-agnostic, DDP, accumulation, exact resume.

One optimizer step = ``grad_accumulation`` micro-batches. Checkpoints are taken on step
boundaries and record the model, optimizer, scheduler, scaler, every RNG (global, the
routers' and WMR's generators), the step, the epoch and how many micro-batches of the
epoch were consumed, so ``resume`` continues with exactly the batches, routing draws and
τ draws an uninterrupted run would have used. An epoch's end is checkpointed before its
validation; a resume inside an epoch whose steps are done but whose end did not run (a stop
right after its last step, a failed validation) runs that validation first.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.failures import note_batch_failures
from ..experts import collect_aux_losses, find_containers, router_keeps_state
from ..models.objective import MoTEObjective, MoTEStepOutput
from .precision import autocast_context, make_grad_scaler

log = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """Model + objective as one module (what DDP wraps): frames → MoTE loss (Eq. 10)."""

    def __init__(self, *, model: nn.Module, objective: MoTEObjective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        visual = getattr(model, "visual", None)
        # experts a model component put in the CLIP tower: their routers' auxiliary losses (topk) join the loss
        self._tower_experts = isinstance(visual, nn.Module) and bool(find_containers(visual))

    def forward(self, frames: torch.Tensor, labels: torch.Tensor, class_features: torch.Tensor) -> MoTEStepOutput:
        """Frames [B,T,3,H,W] → frame features → the objective's losses (MoTE Eq. 10), plus the auxiliary
        losses of routers in the CLIP tower, weighted as the head's (``objective.aux_weight``)."""
        e = self.model.encode_frames(frames).float()  # [B, T, D]
        out = self.objective(self.model.head, e, class_features, labels, self.model.logit_scale.exp())
        if self._tower_experts and collect_aux_losses(self.model.visual):
            tower_aux = self.objective.aux(self.model.visual)
            out.loss = out.loss + tower_aux
            out.terms["aux"] = out.terms["aux"] + tower_aux.detach() if "aux" in out.terms else tower_aux.detach()
        return out


@dataclass
class TrainState:
    """Progress counters saved in checkpoints."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


#: ``train.routing_draws`` values (see :class:`Trainer`).
ROUTING_DRAWS = ("global", "per_rank")


def named_generators(model: nn.Module, objective: MoTEObjective) -> dict[str, torch.Generator]:
    """Every RNG the training step draws from, by a stable name."""
    gens = {f"router:{name}": c.router.generator for name, c in find_containers(model)}
    gens.update({f"objective:{k}": g for k, g in objective.generators().items()})
    return gens


def _per_step_draws(model: nn.Module, generators: dict[str, torch.Generator]) -> dict[str, torch.Generator]:
    """The generators whose draws are one per optimizer step: the objective's (WMR's τ per layer) and those
    of routers that send a whole batch to one expert (``granularity: batch``, MoTE's). Per-sample and
    per-token routers draw for each clip or token, so their micro-batches draw on as the whole batch would."""
    batch_routers = {f"router:{name}" for name, c in find_containers(model) if c.router.granularity == "batch"}
    return {name: g for name, g in generators.items() if not name.startswith("router:") or name in batch_routers}


def _draw_state(model: nn.Module, generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Where the per-step draws stand: the states of ``generators`` (:func:`_per_step_draws`), and the extra
    state of batch routers that keep their own (:func:`~mergekit_video.experts.router_keeps_state`)."""
    extra = {name: copy.deepcopy(c.router.get_extra_state()) for name, c in find_containers(model)
             if c.router.granularity == "batch" and router_keeps_state(c.router)}
    return {name: g.get_state() for name, g in generators.items()}, extra


def _restore_draw_state(model: nn.Module, generators: dict[str, torch.Generator],
                        state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
    """Put the draws back where :func:`_draw_state` found them: the next forward draws the same experts and τ."""
    gens, extra = state
    for name, g in generators.items():
        g.set_state(gens[name])
    for name, c in find_containers(model):
        if name in extra:
            c.router.set_extra_state(copy.deepcopy(extra[name]))


def _malformed_extra(extra: dict[str, Any]) -> str | None:
    """The first entry of a checkpoint's ``extra`` that is not of the kind the trainer saved (``"key is ..."``), or None."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks = {
        "batches_in_epoch": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
        "best_metric": (lambda v: v is None or number(v), "a number or null"),
        "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of mappings"),
        "bad_videos": (lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of paths"),
        "loss_window": (lambda v: isinstance(v, dict) and isinstance(v.get("count", 0), int) and isinstance(v.get("sums", {}), dict)
                        and all(number(x) for x in v.get("sums", {}).values()), "a mapping of a count and loss sums"),
        "data_layout": (lambda v: isinstance(v, dict), "a mapping"),
    }
    for key, (ok, kind) in checks.items():
        if key in extra and not ok(extra[key]):
            return f"{key} is {json.dumps(extra[key], default=str)[:60]}, not {kind}"
    return None


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM right after an optimizer step, whose checkpoint was saved.

    A ``KeyboardInterrupt``, so callers that do not know it still stop; ``mergevid`` prints its
    message and exits with 130 (SIGINT) or 143 (SIGTERM). Rerunning the same command resumes from that checkpoint.
    """

    def __init__(self, message: str, *, step: int, signal_name: str) -> None:
        super().__init__(message)
        self.step, self.signal_name = step, signal_name


class NoClipReadError(ValueError):
    """A whole training epoch read no clip (every video failed under ``on_error: skip``): the run stops
    instead of ending with an untrained model. A ``ValueError``: ``mergevid`` prints it and exits with 1."""


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; training stopped without writing a checkpoint of it.

    A ``ValueError``, so ``mergevid`` prints its one-line message (the step and the last
    checkpoint before it) and exits with 1.
    """

    def __init__(self, message: str, *, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class Trainer:
    """Runs epochs of MoTE training.

    SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption notice) stop training gracefully:
    the step in progress finishes, a checkpoint is written at that step (resumable exactly, like
    any mid-epoch checkpoint) and :class:`TrainingInterrupted` is raised. Under DDP the ranks
    agree on the step to stop at. A second signal stops at once.

    A NaN or infinite loss stops training with :class:`NonFiniteLossError`. The loss is read on
    the host only where it already is (every ``log_every`` steps and at each checkpoint, as the
    mean of the micro-batches since the previous read), so no step waits for the device; a
    checkpoint is never written after a non-finite loss. Only the loss counts: with fp16 a step
    the GradScaler skips (inf/NaN *gradients*) has a finite loss and goes on, its ``grad_norm``
    logged as null.

    Args:
        model: the (unwrapped) VideoCLIP on ``device``.
        objective: the MoTE objective.
        loader: training DataLoader whose ``sampler`` supports ``set_epoch`` / ``set_start``.
        class_features: ``[C, D]`` training class text features (frozen).
        optimizer, scheduler: stepped once per optimizer step.
        device / precision: ``auto`` = bf16 autocast on CUDA, fp32 on CPU.
        epochs: epochs to train; ``max_steps`` stops earlier.
        grad_accumulation: micro-batches per optimizer step.
        checkpoints: a ``CheckpointManager`` (None: no checkpoints).
        save_every_steps: checkpoint period in optimizer steps (besides every epoch end, which
            is written before the epoch's validation and then given its metrics).
        evaluate_fn: ``epoch -> {metric: value}`` called every ``eval_every_epochs``.
        best_metric: key of ``evaluate_fn``'s result that selects the best checkpoint.
        metrics: a ``MetricsLogger`` (JSONL / TensorBoard); ``show_progress``: a rich progress
            bar (loss, lr, clips/s, ETA) on the main process.
        dist: ``DistInfo`` for DDP (None: single process).
        compile: ``torch.compile`` the visual tower.
        routing_draws: under DDP, ``global``: every rank draws the same expert and τ per layer, so
            the whole global batch goes to one expert (the paper's description); ``per_rank``: each
            rank's sub-batch draws its own (the official code, which seeds each GPU differently).
            Per-rank streams are gathered into checkpoints, so resumes stay exact.
        stop_on_signals: handle SIGINT/SIGTERM as above (main thread only).
        variable_batch: the loader may yield micro-batches with fewer clips (``on_error: skip``
            drops bad ones), even none: each micro-step's loss is then the mean over the clips
            of all ranks together (one integer all-reduce per micro-step under DDP), as one
            process with the whole batch computes it, and a rank left with no clip runs a zero
            clip at weight 0, which keeps DDP's gradient all-reduce and the routing draws in step.
        resume_hint: how to continue, at the end of the message of a run stopped by a signal.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        objective: MoTEObjective,
        loader: Any,
        class_features: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        device: torch.device,
        precision: str = "auto",
        epochs: int,
        max_steps: int | None = None,
        grad_accumulation: int = 1,
        clip_grad_norm: float | None = None,
        log_every: int = 10,
        checkpoints: Any = None,
        save_every_steps: int | None = None,
        evaluate_fn: Callable[[int], dict[str, float]] | None = None,
        eval_every_epochs: int = 1,
        best_metric: str | None = None,
        metrics: Any = None,
        show_progress: bool = True,
        console: Any = None,
        dist: Any = None,
        compile: bool = False,
        routing_draws: str = "global",
        extra_state: Callable[[], dict[str, Any]] | None = None,
        stop_on_signals: bool = True,
        variable_batch: bool = False,
        resume_hint: str = "Rerun the same command to resume.",
    ) -> None:
        if grad_accumulation < 1:
            raise ValueError(f"train.grad_accumulation must be >= 1, got {grad_accumulation}")
        if routing_draws not in ROUTING_DRAWS:
            raise ValueError(f"train.routing_draws must be one of {list(ROUTING_DRAWS)}, got {routing_draws!r}")
        self.model = model
        self.objective = objective
        self.loader = loader
        self.class_features = class_features.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.precision = precision
        self.scaler = make_grad_scaler(device, precision)
        self.epochs = int(epochs)
        self.grad_accumulation = int(grad_accumulation)
        self.steps_per_epoch = max(1, len(loader) // self.grad_accumulation)
        self.total_steps = self.epochs * self.steps_per_epoch if max_steps is None else min(int(max_steps), self.epochs * self.steps_per_epoch)
        self.clip_grad_norm = clip_grad_norm
        self.log_every = max(1, int(log_every))
        self.checkpoints = checkpoints
        self.save_every_steps = save_every_steps
        self.evaluate_fn = evaluate_fn
        self.eval_every_epochs = max(1, int(eval_every_epochs))
        self.best_metric = best_metric
        self.metrics = metrics
        self.show_progress = show_progress
        self.console = console
        self.progress: Any = None
        self.dist = dist
        self.extra_state = extra_state
        self.stop_on_signals = bool(stop_on_signals)
        self.variable_batch = bool(variable_batch)
        self.resume_hint = resume_hint  # how to continue, in the message of a run stopped by a signal
        self._stop_signal: int | None = None
        self._saved_step: int | None = None  # the step whose checkpoint holds the current state
        self.state = TrainState()
        self.bad_videos: set[str] = set()  # distinct bad files met (skipped or resampled), logged once each
        # loss terms summed over the micro-batches since the last metrics line; saved in checkpoints
        # so that the first line after a resume averages the same micro-batches as without one
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_count = 0
        self._checked_step = 0  # the losses of the steps up to this one were read and finite
        self._carried_window_step: int | None = None  # set by a resume with another log_every
        # (step, folder, whether this run verified it) of the last checkpoint written or resumed from
        self._last_checkpoint: tuple[int, Path, bool] | None = None
        self.generators = named_generators(model, objective)
        # each rank draws from its own streams (only meaningful with several ranks)
        self.routing_draws = routing_draws
        self._videos_digest: str | None = None  # of the training list, for checkpoints (computed once)
        self.per_rank_draws = routing_draws == "per_rank" and dist is not None and dist.world_size > 1
        if self.per_rank_draws:
            from .rng import split_streams_by_rank

            split_streams_by_rank(self.generators, dist.rank)
        if compile:
            model.visual.compile()
        self.step_module: nn.Module = TrainStep(model=model, objective=objective)
        if dist is not None and dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # experts left unused by the routed path need find_unused_parameters when no WMR path runs
            unused = bool(find_containers(model)) and not objective.uses_wmr_path
            self.step_module = DDP(
                self.step_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=unused,
                gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy in and out each step
            )

    # -- checkpoints --------------------------------------------------------------------
    def checkpoint_payload(self, *, loss_window: dict[str, Any], rng: dict[str, Any], bad_videos: list[str] | None = None) -> dict[str, Any]:
        """Everything a checkpoint stores besides the metrics.

        ``loss_window`` holds the loss sums not yet logged, from ``_loss_window()``, and ``rng``
        the RNG states from ``_rng_state()`` (both collectives under DDP, so every rank computes them).
        """
        return {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "model_state": self.model.state_dict(),
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "rng": rng,
            "extra": self._extra(loss_window, bad_videos),
        }

    def _extra(self, loss_window: dict[str, Any], bad_videos: list[str] | None = None) -> dict[str, Any]:
        """The progress a checkpoint keeps besides the step and epoch (JSON-able)."""
        extra = {
            # the distinct bad files met so far (all ranks): a resumed run counts on and logs none again
            "bad_videos": sorted(self.bad_videos) if bad_videos is None else bad_videos,
            "batches_in_epoch": self.state.batches_in_epoch,
            "best_metric": self.state.best_metric,
            "history": self.state.history,
            "model_config": self.model.config,
            "loss_window": loss_window,
            "data_layout": self._data_layout(),
        }
        if self.extra_state is not None:
            extra.update(self.extra_state())
        return extra

    def _data_layout(self) -> dict[str, Any]:
        """What ``batches_in_epoch`` counts in: micro-batches of ``micro_batch`` videos (all ranks
        together), ``grad_accumulation`` per step, over ``dataset_size`` videos; and what orders them:
        the sampler's ``shuffle_seed`` (the epoch's order) and a digest of the training list
        (``videos``: its paths and labels, in order)."""
        world = getattr(self.dist, "world_size", 1) if self.dist is not None else 1
        dataset = getattr(self.loader, "dataset", None)
        layout: dict[str, Any] = {
            "grad_accumulation": self.grad_accumulation,
            "micro_batch": int(getattr(self.loader, "batch_size", None) or 1) * int(world),
            "dataset_size": len(dataset) if hasattr(dataset, "__len__") else -1,
        }
        seed = getattr(getattr(self.loader, "sampler", None), "seed", None)
        if isinstance(seed, int):
            layout["shuffle_seed"] = seed
        records = getattr(dataset, "records", None)
        if isinstance(records, list) and records:
            if self._videos_digest is None:
                import hashlib

                h = hashlib.sha1()
                for r in records:
                    h.update(f"{getattr(r, 'path', r)}\t{getattr(r, 'label', '')}\n".encode())
                self._videos_digest = h.hexdigest()[:16]
            layout["videos"] = self._videos_digest
        return layout

    def save_checkpoint(self, metrics: dict[str, float] | None = None) -> Any:
        """Write a checkpoint; returns its path on the main process, None elsewhere.

        Every rank must call it (the unlogged loss sums are averaged over ranks first); only the
        main process writes.
        """
        if self.checkpoints is None:
            return None
        loss_window = self._loss_window()  # a collective under DDP: every rank calls save_checkpoint
        if loss_window["count"]:  # identical on every rank: all of them stop together
            self._check_finite_loss(loss_window["sums"].get("loss"), read=f" (read before the checkpoint of step {self.state.step}, not written)")
        rng = self._rng_state()  # a collective too with per-rank routing draws
        bad = self.bad_video_paths_of_all_ranks()  # and this one
        self._saved_step = self.state.step
        self._last_checkpoint = (self.state.step, self.checkpoints.path_of(self.state.step), True)
        if not _is_main(self.dist):
            return None
        return self.checkpoints.save(**self.checkpoint_payload(loss_window=loss_window, rng=rng, bad_videos=bad), metrics=metrics)

    def _record_closed_epoch(self, metrics: dict[str, float] | None) -> None:
        """Bring the checkpoint of this step (saved before the validation) up to date.

        Validation changes neither the model nor the optimizer, so only the checkpoint's JSON
        is rewritten (:meth:`CheckpointManager.update_state`): the next epoch, the metrics, the
        history and the RNG streams as they are after the validation.
        """
        if self.checkpoints is None:
            return
        loss_window = self._loss_window()  # a collective under DDP, as in save_checkpoint
        rng = self._rng_state()
        bad = self.bad_video_paths_of_all_ranks()
        if not _is_main(self.dist):
            return
        self.checkpoints.update_state(self.state.step, epoch=self.state.epoch, rng=rng,
                                      extra=self._extra(loss_window, bad), metrics=metrics or {})

    def _rng_state(self) -> dict[str, Any]:
        """This process's RNG states; with per-rank routing draws also every rank's named
        generators (``rank_generators``, gathered: a collective under DDP)."""
        from .distributed import all_gather_object
        from .rng import capture_rng_state

        state = capture_rng_state(self.generators)
        if self.per_rank_draws:
            state["rank_generators"] = all_gather_object(state["generators"])
        return state

    def _check_finite_loss(self, value: float | None, *, read: str) -> None:
        """Raise :class:`NonFiniteLossError` when ``value`` (the loss, or a sum of it, over the steps
        since the last check, as read at this step) is NaN or infinite; otherwise mark those steps checked.
        ``read`` says where it was read, for the message."""
        step = self.state.step
        if value is None or math.isfinite(value):
            self._checked_step = step
            return
        first = min(self._checked_step + 1, step)
        steps = f"at step {step}" if first == step else f"in steps {first}-{step}"
        if self._last_checkpoint is None:
            where = "no checkpoint was written before it" if self.checkpoints is not None else "checkpoints are off"
            path = None
        else:
            at, path, verified = self._last_checkpoint
            where = f"the last checkpoint before it is step {at}, {path}"
            if not verified and self._checked_step <= at:
                where += " (the run resumed from it and has read no finite loss since: it may be damaged)"
        raise NonFiniteLossError(
            f"training stopped: the loss is {value} {steps}{read}; {where}",
            step=step, checkpoint=path,
        )

    def _loss_window(self) -> dict[str, Any]:
        """The loss sums not yet logged, averaged over ranks (identical on every rank after a resume)."""
        from .distributed import all_reduce_mean

        return {"count": self._loss_count, "sums": all_reduce_mean(self._loss_sums) if self._loss_sums else {},
                "log_every": self.log_every}

    def resume(self, ckpt: Any) -> None:
        """Restore from a loaded ``CheckpointState``.

        A checkpoint that this run cannot continue as saved is refused with a ``ValueError`` that
        names what differs (the data units of an unfinished epoch, the model, the optimizer class,
        its parameter groups or hyper-parameters, the lr schedule); apart from another model, whose
        keys a failed load names, before anything is loaded.
        """
        from .rng import restore_rank_streams, restore_rng_state
        from .schedule import schedule_differences

        self._check_complete(ckpt)
        extra = ckpt.extra or {}
        layout, now = extra.get("data_layout") or {}, self._data_layout()
        shown = {"videos": "training list (paths and labels)", "shuffle_seed": "seed (the epoch's order)"}
        changed = [f"{shown.get(k, k)} {layout[k]} -> {now[k]}" for k in now if k in layout and layout[k] != now[k]]
        counts = {"dataset_size": "training videos", "micro_batch": "videos per micro-batch", "grad_accumulation": "train.grad_accumulation"}
        recounted = [f"{words} {layout[k]} -> {now[k]}" for k, words in counts.items()
                     if k in layout and k in now and layout[k] != now[k]]  # what sets the steps per epoch
        if changed and int(extra.get("batches_in_epoch", 0)) > 0:
            raise ValueError(
                f"train.resume: checkpoint {ckpt.path} stopped inside an epoch, counting or ordering its data otherwise "
                f"({'; '.join(changed)}); resumed here it would train some videos of the epoch twice and others never. "
                "Resume with the seed, data.batch_size, train.grad_accumulation and training list it was trained with (see its "
                "run's recipe.yaml), or set train.resume=null to start a new run (with --overwrite where this output_dir holds its checkpoints)"
            )
        self._check_model(ckpt)  # first: another model would also show as other parameter groups and base lrs below
        if ckpt.optimizer_state is not None:
            self._check_optimizer(ckpt)
        if ckpt.scheduler_state is not None:
            differences = schedule_differences(ckpt.scheduler_state, self.scheduler.state_dict())
            if differences:
                # the schedule's length is counted in steps: another training list or batch changes it too
                cause = (f" The training data is counted otherwise ({'; '.join(recounted)}), which changes the steps per epoch."
                         if recounted else "")
                raise ValueError(
                    f"train.resume: checkpoint {ckpt.path} was trained with another lr schedule ({'; '.join(differences)}).{cause} "
                    "A resume continues the checkpoint's schedule (a longer run would train at lr 0 past its end): resume "
                    "with the settings it was trained with (schedule.epochs, train.max_steps, schedule.*, optimizer.lr"
                    f"{', data.batch_size, train.grad_accumulation, the training list' if recounted else ''}: see its "
                    "run's recipe.yaml), or set train.resume=null to start a new run (with --overwrite where this output_dir holds its checkpoints)"
                )
        self._load_model(ckpt)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.scheduler_state is not None:
            self.scheduler.load_state_dict(ckpt.scheduler_state)
        if self.scaler is not None and ckpt.scaler_state:
            self.scaler.load_state_dict(ckpt.scaler_state)
        if ckpt.rng:
            restore_rng_state(ckpt.rng, self.generators)  # rank 0's named generators on every rank
            rank_streams = ckpt.rng.get("rank_generators")
            if self.per_rank_draws:
                restore_rank_streams(rank_streams, self.generators, rank=self.dist.rank, world_size=self.dist.world_size)
            elif self.routing_draws == "per_rank" and rank_streams is not None and len(rank_streams) > 1:
                # one process now (per-rank draws need several): rank 0's streams, restored above, go on
                restore_rank_streams(rank_streams, self.generators, rank=0, world_size=1)
        self.state = TrainState(
            step=int(ckpt.step),
            epoch=int(ckpt.epoch),
            batches_in_epoch=int(extra.get("batches_in_epoch", 0)),
            best_metric=extra.get("best_metric"),
            history=list(extra.get("history", [])),
        )
        self.bad_videos = set(extra.get("bad_videos") or ())  # counted on; not logged again
        mark_reported = getattr(getattr(self.loader, "dataset", None), "mark_reported", None)
        if callable(mark_reported):  # read in this process (no workers): the dataset logs its own failures
            mark_reported(self.bad_videos)
        window = extra.get("loss_window") or {}
        self._loss_count = int(window.get("count", 0))
        self._loss_sums = {k: torch.tensor(float(v), dtype=torch.float64, device=self.device) for k, v in window.get("sums", {}).items()}
        self._checked_step = self.state.step - self._loss_count // self.grad_accumulation  # the window's steps are read later
        # another train.log_every: the carried sums get a line of their own (see _log_carried_window)
        self._carried_window_step = self.state.step if self._loss_count and window.get("log_every", self.log_every) != self.log_every else None
        self._last_checkpoint = (self.state.step, Path(ckpt.path), False)
        # a checkpoint of this run's own directory holds this state: closing a finished epoch
        # (batches_in_epoch == its micro-batches: stopped right after its last step, or its
        # validation failed) only updates it; one from elsewhere (train.resume=<path>) is saved anew
        own = self.checkpoints is not None and Path(ckpt.path).resolve().parent == Path(self.checkpoints.directory).resolve()
        self._saved_step = self.state.step if own else None
        log.debug("resumed at step %d (epoch %d, batch %d)", self.state.step, self.state.epoch, self.state.batches_in_epoch)

    #: Entries of ``extra`` that every trainer checkpoint has held (later ones, such as ``loss_window`` and
    #: ``data_layout``, may be absent from older checkpoints and have defaults).
    _ALWAYS_IN_EXTRA = ("batches_in_epoch", "best_metric", "history")

    def _check_complete(self, ckpt: Any) -> None:
        """Refuse a checkpoint that lacks a state the trainer always saves (its state.json was edited or
        damaged): resumed, it would silently restart the lr warm-up, draw other random numbers or lose its
        place in the epoch. Checkpoints that record what was saved (state.json's ``parts``) are checked when
        read, and skipped by ``resume=auto``; this catches older ones, and states built in code."""
        missing = [what for what, value in (("optimizer", ckpt.optimizer_state), ("scheduler", ckpt.scheduler_state),
                                            ("rng", ckpt.rng)) if value is None]
        missing += [f"extra.{k}" for k in self._ALWAYS_IN_EXTRA if k not in (ckpt.extra or {})]
        advice = ("move that checkpoint folder away so that train.resume=auto continues from the one before it, train from an "
                  "earlier checkpoint into another folder (output_dir=NEW train.resume=<its step_* folder>), or set "
                  "train.resume=null to start a new run (with --overwrite where this output_dir holds its checkpoints)")
        if missing:
            raise ValueError(
                f"train.resume: checkpoint {ckpt.path} is damaged: {Path(ckpt.path) / 'state.json'} lacks {', '.join(missing)}, "
                f"which every checkpoint of a training run holds; {advice}"
            )
        wrong = _malformed_extra(ckpt.extra or {})
        if wrong is not None:
            raise ValueError(f"train.resume: checkpoint {ckpt.path} is damaged: {Path(ckpt.path) / 'state.json'}'s extra.{wrong}; {advice}")

    def _check_model(self, ckpt: Any) -> None:
        """Refuse a checkpoint of another model in one line naming the first mismatched keys (from
        shapes alone, before anything is loaded), not torch's multi-kB state_dict list."""
        from ..models.checkpoint import describe_mismatches, state_mismatches

        def shapes(state: Any) -> dict[str, tuple[int, ...] | None]:
            return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}

        live = shapes(self.model.state_dict())
        rows = frozenset(k for k in live if k.endswith("source_class_features"))  # data (a class count), resized on load
        mismatch = describe_mismatches(*state_mismatches(live, shapes(ckpt.model_state), any_rows=rows))
        if mismatch:
            raise ValueError(self._another_model(ckpt, f"it {mismatch}"))

    def _load_model(self, ckpt: Any) -> None:
        try:
            self.model.load_state_dict(ckpt.model_state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ValueError(self._another_model(ckpt, first[1].strip() if len(first) > 1 else first[0])) from exc

    @staticmethod
    def _another_model(ckpt: Any, why: str) -> str:
        return (f"train.resume: checkpoint {ckpt.path} holds another model than this recipe builds ({why}); "
                "resume with the model settings it was trained with (see its run's recipe.yaml), or set train.resume=null")

    def _check_optimizer(self, ckpt: Any) -> None:
        """Refuse a checkpoint whose optimizer state belongs to another optimizer class, parameter-group
        layout or hyper-parameters: ``Optimizer.load_state_dict`` would fail mid-training (another
        class) or silently replace the recipe's betas, eps and weight decay with the checkpoint's."""
        from .checkpoint import optimizer_hyperparameter_differences, optimizer_kind_difference, param_group_differences

        advice = "see its run's recipe.yaml), or set train.resume=null to start a new run (with --overwrite where this output_dir holds its checkpoints)"
        kind = optimizer_kind_difference(ckpt.optimizer_state, ckpt.optimizer_class, self.optimizer)
        if kind is not None:
            raise ValueError(
                f"train.resume: checkpoint {ckpt.path} was trained with another optimizer ({kind}); its state cannot "
                f"continue this one: resume with the optimizer.name it was trained with ({advice}"
            )
        groups = param_group_differences(ckpt.optimizer_state, self.optimizer)
        if groups:
            raise ValueError(
                f"train.resume: checkpoint {ckpt.path} has another layout of optimizer parameter groups ({'; '.join(groups)}); "
                "resume with the settings that split the parameters into groups as it was trained (optimizer.no_decay_norm_bias_embedding, "
                f"train.freeze_visual: {advice}"
            )
        hyper = optimizer_hyperparameter_differences(ckpt.optimizer_state, self.optimizer)
        if hyper:
            raise ValueError(
                f"train.resume: checkpoint {ckpt.path} was trained with other optimizer hyper-parameters ({'; '.join(hyper)}). "
                "A resume would continue with the checkpoint's (its optimizer state replaces them): resume with the optimizer.* "
                f"settings it was trained with ({advice}"
            )

    # -- training -----------------------------------------------------------------------
    def _clip_weight(self, batch: dict[str, Any]) -> tuple[float, int]:
        """(weight of this rank's mean loss, clips of this micro-step on all ranks).

        With a fixed batch every rank holds the same number of clips: weight 1. With
        ``variable_batch``, weight n_rank · W / n_all, so that DDP's gradient average over W ranks is
        the mean over all n_all clips, as one process computes it (0 for a rank with no clip).
        """
        n = int(batch["label"].shape[0])
        world = self.dist.world_size if self.dist is not None else 1
        if not self.variable_batch:
            return 1.0, n * world
        from .distributed import all_reduce_sum_int

        total = all_reduce_sum_int(n) if world > 1 else n
        return (n * world / total if total else 0.0), total

    def _micro_step(self, batch: dict[str, Any], sync: bool, weight: float = 1.0) -> MoTEStepOutput:
        from ..data import normalize_frames

        frames = batch["frames"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        if labels.shape[0] == 0:  # every item failed (on_error: skip): a zero clip at weight 0, see variable_batch
            frames = frames.new_zeros((1, *frames.shape[1:]))
            labels = labels.new_zeros(1)
        if frames.dtype == torch.uint8:
            frames = normalize_frames(frames)
        no_sync = getattr(self.step_module, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast_context(self.device, self.precision):
                out = self.step_module(frames, labels, self.class_features)
            if weight != 1.0:  # the loss and its logged terms, as the mean over every rank's clips
                out = dataclasses.replace(out, loss=out.loss * weight, terms={k: v * weight for k, v in out.terms.items()})
            loss = out.loss / self.grad_accumulation
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return out

    def _skip_optimizer_step(self) -> None:
        """A step no clip of which survived on any rank: the weights stay (AdamW's momentum and weight decay
        would still move them); the schedule moves on, as it counts the steps of the epoch structure."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a first step skipped on purpose: torch's "step() before optimizer.step()" is moot
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
            self.scheduler.step()

    def _optimizer_step(self) -> torch.Tensor | None:
        grad_norm = None  # stays on the device: read only on logging steps (no sync per step)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm).detach()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def _step_lr(self) -> float:
        """Learning rate of the new parameters (the ``default`` group, else the first) for the coming step."""
        groups = self.optimizer.param_groups
        return float(next((g["lr"] for g in groups if g.get("name") == "default"), groups[0]["lr"]))

    def fit(self) -> TrainState:
        """Train until ``epochs`` (or ``max_steps``) are done; returns the final state.

        Raises :class:`TrainingInterrupted` after a stop signal (see the class docstring).
        """
        from .metrics import TrainProgress

        self.model.train()
        self._log_missing_validation()
        self._log_carried_window()
        if self.show_progress and _is_main(self.dist):
            self.progress = TrainProgress(total_steps=max(self.total_steps, 1), start_step=self.state.step, console=self.console, log_every=self.log_every)
            self.progress.start()
        try:
            with self._signals_stop_training():
                self._fit_loop()
        finally:
            if self.progress is not None:
                self.progress.stop()
        return self.state

    def _log_carried_window(self) -> None:
        """After a resume with another ``train.log_every``: the losses the checkpoint carried (the steps
        since the interrupted run's last line, finite: checked before it was written) are logged as a line
        of their own at the checkpoint's step, not averaged into the first line of the new cadence."""
        step, self._carried_window_step = self._carried_window_step, None
        if step is None or not self._loss_count:
            return
        if self.metrics is not None:  # the sums were averaged over ranks when the checkpoint was saved
            self.metrics.log({k: float(v) / self._loss_count for k, v in self._loss_sums.items()}, step=step, epoch=self.state.epoch)
        self._loss_sums, self._loss_count = {}, 0
        self._checked_step = step

    def _log_missing_validation(self) -> None:
        """The validation of the epoch a resume starts after is logged after its checkpoint was
        updated: a process killed in between kept it in the checkpoint's history only. Log it now."""
        from .metrics import read_metrics

        path = getattr(self.metrics, "path", None)
        if not self.state.history or path is None or not getattr(self.metrics, "enabled", False):
            return
        last = self.state.history[-1]
        if last["step"] != self.state.step:
            return
        if any(r.get("step") == last["step"] and any(k.startswith("val/") for k in r) for r in read_metrics(path)):
            return
        self.metrics.log({f"val/{k}": v for k, v in last.items() if k not in ("epoch", "step")}, step=last["step"], epoch=last["epoch"])

    @contextlib.contextmanager
    def _signals_stop_training(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag that the loop reads after each step; a second one stops at once."""
        self._stop_signal = None
        if not self.stop_on_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (one host-side all-reduce per step under DDP: no GPU sync)."""
        flag = self._stop_signal is not None
        if self.dist is not None and self.dist.world_size > 1:
            from .distributed import any_rank

            flag = any_rank(flag)
        return flag

    def _stop_after_step(self, saved: bool) -> None:
        if not saved:
            self.save_checkpoint()
        if self.dist is not None and self.dist.world_size > 1:
            import torch.distributed as torch_dist

            torch_dist.barrier()  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a signal on another rank"
        kept = (
            f"checkpoint saved in {self.checkpoints.directory}. {self.resume_hint}"
            if self.checkpoints is not None
            else "no checkpoint was written (checkpoints are off)."
        )
        raise TrainingInterrupted(f"stopped by {name} after step {self.state.step}; {kept}", step=self.state.step, signal_name=name)

    def _fit_loop(self) -> None:
        from .distributed import all_reduce_mean

        window_clips, window_start = 0, time.perf_counter()  # throughput counts this process's time only
        self._clips_reported = 0
        step_clips = 0  # clips of the optimizer step being accumulated, all ranks together
        usable = self.steps_per_epoch * self.grad_accumulation  # micro-batches used per epoch
        per_step = _per_step_draws(self.model, self.generators)  # replayed across an accumulation cycle
        if self.state.batches_in_epoch >= usable:
            # resumed in an epoch whose steps are all done but whose end (validation, checkpoint
            # with metrics) did not run: stopped right after its last step, or validation failed
            self._close_epoch_or_stop()
        while self.state.epoch < self.epochs and self.state.step < self.total_steps:
            from_start, epoch_clips = self.state.batches_in_epoch == 0, 0  # a whole epoch of unreadable videos fails the run
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.state.epoch)
            if hasattr(sampler, "set_start"):
                sampler.set_start(self.state.batches_in_epoch * self.loader.batch_size)
            for batch in self.loader:
                if self.state.batches_in_epoch >= usable:
                    break  # an incomplete accumulation cycle at the epoch end is dropped
                self.state.batches_in_epoch += 1
                note_batch_failures(batch, self.bad_videos)
                sync = self.state.batches_in_epoch % self.grad_accumulation == 0
                if self.grad_accumulation > 1:  # one draw of experts and τ per optimizer step, as without accumulation
                    if (self.state.batches_in_epoch - 1) % self.grad_accumulation == 0:
                        step_draws = _draw_state(self.model, per_step)
                    else:
                        _restore_draw_state(self.model, per_step, step_draws)
                weight, clips = self._clip_weight(batch)
                step_clips += clips
                epoch_clips += clips
                out = self._micro_step(batch, sync, weight)
                if clips:  # a micro-step without any clip on any rank (all skipped) has no loss to average in
                    sums = self._loss_sums
                    for k, v in {"loss": out.loss.detach(), **out.terms}.items():
                        sums[k] = sums[k] + v if k in sums else v.detach().to(torch.float64)
                    self._loss_count += 1
                window_clips += clips
                if not sync:
                    continue
                lr = self._step_lr()  # the lr this step uses (the scheduler moves on inside _optimizer_step)
                if not step_clips and _is_main(self.dist):
                    log.warning("step %d: no clip of its batch could be read (on_error: skip); the weights are not updated",
                                self.state.step + 1)
                # the same choice on every rank: clips are counted over all of them
                grad_norm = self._optimizer_step() if step_clips else self._skip_optimizer_step()
                step_clips = 0
                self.state.step += 1
                new_clips, self._clips_reported = window_clips - self._clips_reported, window_clips
                logs: dict[str, float] = {}
                if self.state.step % self.log_every == 0 or self.state.step == self.total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    # the same count on every rank (a micro-step is left out on all of them or none)
                    logs = all_reduce_mean({k: v / self._loss_count for k, v in self._loss_sums.items()}) if self._loss_count else {}
                    logs["lr"] = lr
                    logs["clips_per_s"] = window_clips / elapsed
                    if grad_norm is not None:
                        logs["grad_norm"] = float(grad_norm)
                    bad = len(self.bad_video_paths_of_all_ranks())
                    if bad:
                        logs["bad_videos"] = float(bad)  # distinct bad files met so far, by all ranks together
                    if self.metrics is not None:
                        self.metrics.log(logs, step=self.state.step, epoch=self.state.epoch)  # a NaN loss as null
                    self._check_finite_loss(logs.get("loss"), read="" if self.log_every == 1 else f" (read every train.log_every={self.log_every} steps)")
                    self._loss_sums, self._loss_count = {}, 0
                    window_clips, window_start = 0, time.perf_counter()
                    self._clips_reported = 0
                if self.progress is not None:
                    self.progress.update(step=self.state.step, loss=logs.get("loss"), lr=logs.get("lr"), clips=new_clips)
                saved = bool(self.save_every_steps and self.state.step % self.save_every_steps == 0)
                if saved:
                    window_start += self._outside_steps(self.save_checkpoint)
                if self._stop_requested():
                    self._stop_after_step(saved)
                if self.state.step >= self.total_steps:
                    break
            if from_start and not epoch_clips and self.state.batches_in_epoch:
                self._raise_nothing_read()
            if self.state.batches_in_epoch < usable:  # stopped by max_steps inside the epoch
                if self._saved_step != self.state.step:
                    self.save_checkpoint()
                break
            window_start += self._outside_steps(self._close_epoch_or_stop)  # validation and checkpoint: not step time

    def _outside_steps(self, fn: Callable[[], Any]) -> float:
        """Run ``fn`` (a checkpoint write, the epoch's validation) and return how long it took, which the
        throughput windows (``clips_per_s``, the progress bar's rate and ETA) leave out."""
        start = time.perf_counter()
        try:
            fn()
        finally:
            took = time.perf_counter() - start
            if self.progress is not None:
                self.progress.exclude(took)
        return took

    def _close_epoch_or_stop(self) -> None:
        """:meth:`_close_epoch`, then stop (its checkpoint written) if a signal came meanwhile: one during the
        validation was otherwise read only after the next step, or, in the last epoch, never."""
        self._close_epoch()
        if self._stop_requested():
            self._stop_after_step(saved=True)

    def _raise_nothing_read(self) -> None:
        """An epoch (or the run's part of one, up to max_steps) in which no clip of any batch could be read
        (``on_error: skip``): no step updated the weights, and the next epoch would read the same files."""
        bad = self.bad_video_paths_of_all_ranks()  # every rank raises here: the clip counts are global
        first = f"; the first: {bad[0]}" if bad else ""
        raise NoClipReadError(
            f"no video of epoch {self.state.epoch + 1} could be read ({self.state.batches_in_epoch} batches, every clip "
            f"skipped under on_error: skip; {len(bad)} distinct bad files{first}): the weights were never updated. "
            "Check data.root and data.train_list (mergevid validate RECIPE --check-paths)"
        )

    def bad_video_paths_of_all_ranks(self) -> list[str]:
        """The distinct bad files the ranks have met together, sorted; every rank calls it (a collective under DDP)."""
        if self.dist is None or self.dist.world_size <= 1:
            return sorted(self.bad_videos)
        from .distributed import all_gather_object

        return sorted(set().union(*all_gather_object(sorted(self.bad_videos))))

    def _close_epoch(self) -> None:
        """End of an epoch whose steps are done: validation when due, a checkpoint, the next epoch.

        The trained epoch is checkpointed *before* the validation, so a validation that fails
        (or is interrupted) loses no training, and resuming from that checkpoint runs the
        validation again. Afterwards only that checkpoint's JSON is updated (no tensors are
        written twice); without a validation the checkpoint is written once, closed.
        """
        finished = self.state.epoch
        due = self.evaluate_fn is not None and ((finished + 1) % self.eval_every_epochs == 0 or finished + 1 >= self.epochs)
        if due and self._saved_step != self.state.step:
            self.save_checkpoint()
        metrics = None
        if due:
            metrics = self.evaluate_fn(finished)
            self.model.train()
            self.state.history.append({"epoch": finished, "step": self.state.step, **metrics})
            if self.best_metric and self.best_metric in metrics:
                value = metrics[self.best_metric]
                if self.state.best_metric is None or value > self.state.best_metric:
                    self.state.best_metric = value
        self.state.epoch += 1
        self.state.batches_in_epoch = 0
        if self._saved_step == self.state.step and self.checkpoints is not None:
            self._record_closed_epoch(metrics)
        else:
            self.save_checkpoint(metrics)
        if metrics is not None and self.metrics is not None:  # after the checkpoint: a resume never logs them twice
            self.metrics.log({f"val/{k}": v for k, v in metrics.items()}, step=self.state.step, epoch=finished)


def _is_main(dist: Any) -> bool:
    return dist is None or dist.rank == 0


def steps_per_epoch(num_batches: int, grad_accumulation: int) -> int:
    """Optimizer steps in one epoch of ``num_batches`` micro-batches."""
    return max(1, num_batches // max(1, grad_accumulation))


def warmup_steps(warmup_epochs: float, steps_in_epoch: int) -> int:
    """Warm-up length in optimizer steps."""
    return int(math.ceil(warmup_epochs * steps_in_epoch))


def iterate_forever(loader: Iterable[Any]) -> Iterable[Any]:  # pragma: no cover - benchmarking helper
    """Cycle a loader (for benchmarks)."""
    while True:
        yield from loader
