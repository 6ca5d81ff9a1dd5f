"""The ``mote`` runner: build, train and evaluate a MoTE (or baseline) video model from a recipe."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..config import instantiate
from .common import (
    check_short_side,
    class_features,
    class_names_from,
    delete_set_aside,
    eval_num_workers,
    eval_precision,
    eval_suite,
    head_positions,
    read_clip_blend_base,
    resolve_input_size,
    run_eval_suite,
    start_run,
)

log = logging.getLogger(__name__)

#: Environment variable naming a folder where every rank dumps its final weights (see ``MoTERunner.save``).
DUMP_RANK_STATE_ENV = "MERGEVID_DUMP_RANK_STATE"


class MoTERunner:
    """Recipe runner: ``setup`` → ``train`` → ``save`` → ``evaluate`` → ``cleanup``.

    Everything the run produces lands under ``output_dir``: ``recipe.yaml``,
    ``metrics.jsonl``, ``checkpoints/``, ``model/`` (and ``model_dense/``), ``results.json``,
    ``tradeoff.png``.
    """

    def __init__(self, *, cfg: dict[str, Any], overwrite: bool = False, console: Any = None) -> None:
        self.cfg = cfg
        self.overwrite = overwrite
        self.console = console
        self.results: dict[str, Any] = {}
        self._best_hint = False  # trained with validation: name a better checkpoint after the final evaluation

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything the run needs: output folder, data, model, class features, loaders, trainer."""
        from ..training.checkpoint import CheckpointManager
        from ..training.metrics import MetricsLogger

        cfg = self.cfg
        ctx = start_run(cfg, overwrite=self.overwrite)
        self.dist, self.main, self.device, self.output_dir = ctx.dist, ctx.main, ctx.device, ctx.output_dir
        self.data_cfg = ctx.data_cfg  # synthetic data written, every named path checked

        self.train_class_names = class_names_from(self.data_cfg["class_csv"])
        from ..data.datasets import flip_label_pair_errors

        errors = flip_label_pair_errors(self.data_cfg.get("flip_label_pairs"), len(self.train_class_names))
        beyond = sorted(c for _, kind, c in errors if kind == "beyond")
        if beyond:  # said before the model is built
            raise ValueError(f"data.flip_label_pairs: class id {beyond[0]}, but data.class_csv {self.data_cfg['class_csv']} "
                             f"has {len(self.train_class_names)} classes (ids 0..{len(self.train_class_names) - 1})")
        # model + frozen class text features
        self.model = instantiate(cfg["model"], _path="model")
        self._check_built_model()
        if cfg["train"].get("grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        self.model.to(self.device)
        self.input_size = resolve_input_size("data.input_size", self.data_cfg.get("input_size"), self.model.input_size)
        positions = head_positions(self.model)
        if positions is not None and self.data_cfg.get("num_frames", 8) > positions:
            raise ValueError(f"data.num_frames={self.data_cfg.get('num_frames', 8)}, but the model's temporal head has {positions} "
                             f"frame position embeddings (model.num_positions): use at most {positions} frames")
        # every evaluation dataset is checked now (sizes, frame counts, class lists), not after training
        eval_suite(cfg.get("eval") or {}, self.data_cfg, model_input_size=self.model.input_size, model_num_positions=positions, check_labels=True)
        self.class_features = class_features(self.model, self.train_class_names, cfg.get("text") or {})
        self.model.head.set_source_class_features(self.class_features)  # y_f of TFM, saved with the model
        if cfg["train"].get("freeze_visual"):
            for p in self.model.visual.parameters():
                p.requires_grad_(False)
        self.objective = instantiate(cfg["objective"], _path="objective")

        # data
        self.train_loader = self._train_loader()
        if self.data_cfg.get("val_list"):
            self._val_dataset = self._build_val_dataset()
        # optimisation
        self.optimizer, self.scheduler = self._optimizer()
        self.checkpoints = CheckpointManager(
            directory=self.output_dir / "checkpoints",
            keep_last=cfg["train"].get("keep_last", 2),
            keep_best=True,
            best_metric="top1",
            best_mode="max",
        )
        self.trainer = self._trainer()
        self.clip_blend_base = read_clip_blend_base(self.model, cfg)  # eval.clip_blend: a problem shows before training
        resume = cfg["train"].get("resume", "auto")
        resume = self._own_checkpoints_first(resume)
        found = self.checkpoints.load_resume(resume) if resume else None
        from ..utils.io import is_within

        if not self.overwrite and (found is None or not is_within(found[0], self.checkpoints.directory)):
            # starting over (train.resume=null: prepare_output_dir refused already) or from another run's checkpoint
            self._refuse_retraining_a_finished_run(None if found is None else found[0])
        ckpt_path = None if found is None else found[0]
        if found is not None:
            self.trainer.resume(found[1])
            if self.main:
                self._warn_other_settings(Path(ckpt_path), found[1])
            if self.main and self.console is not None:
                self.console.print(f"[bold]resumed[/] from {ckpt_path} (step {self.trainer.state.step})")
        self.metrics = MetricsLogger(
            output_dir=self.output_dir,
            tensorboard=cfg["train"].get("tensorboard", False),
            enabled=self.main,
            resume_step=self.trainer.state.step,  # a fresh start (0) drops the lines of an attempt that left no checkpoint
        )
        self.trainer.metrics = self.metrics
        delete_set_aside(self.output_dir, main=self.main)  # set up: what --overwrite set aside goes now

    def _warn_other_settings(self, ckpt_path: Path, ckpt: Any) -> None:
        """A checkpoint of another run (``train.resume=<path>``) trained with other model or objective
        settings than this recipe's (its run's recipe.yaml; else its model config): named in a warning,
        since this run continues it with the new ones (weights of another shape are refused before)."""
        from ..utils.io import is_within
        from .common import describe_change, recipe_changes

        if is_within(ckpt_path, self.checkpoints.directory):
            return  # this run's own: prepare_output_dir compared the recipes
        recorded = ckpt_path.parent.parent / "recipe.yaml" if ckpt_path.parent.name == "checkpoints" else None
        changes: list[tuple[str, Any, Any]] = []
        try:
            import yaml

            earlier = yaml.safe_load(recorded.read_text(encoding="utf-8")) if recorded is not None and recorded.is_file() else None
        except (OSError, yaml.YAMLError):
            earlier = None
        if isinstance(earlier, dict):
            for section in ("model", "objective"):
                changes += recipe_changes(earlier.get(section) or {}, self.cfg.get(section) or {}, prefix=section)
        else:
            saved = (ckpt.extra or {}).get("model_config") or {}
            changes = recipe_changes(saved.get("head") or {}, self.model.config.get("head") or {}, prefix="model config head") if saved else []
        changes = [c for c in changes if not c[0].endswith((".pretrained", ".cache_dir"))]  # initial weights: loaded over
        if changes:
            shown = "; ".join(describe_change(*c) for c in changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            log.warning("train.resume: checkpoint %s was trained with other settings (%s); this run continues it with this recipe's",
                        ckpt_path, shown)

    def _check_built_model(self) -> None:
        """What validation could not check for a model component other than ``build_video_clip`` (its expert
        count and containers are known only once built): each ``eval.compare.merges`` entry is dry-run
        for every container's expert count (the CLIP tower's too), per-expert evaluation needs one count,
        an eval merge relative to a base (which a saved model does not hold) is refused, and
        ``train.grad_checkpointing`` is refused where the CLIP tower holds
        stochastic or stateful routers (open_clip recomputes its blocks with a plain checkpoint, which
        would draw other experts in backward) — both before training, naming the key."""
        from ..experts import checkpoints_plainly, find_containers, router_keeps_state
        from ..models.checkpoint import refuse_unsaved_merge_base
        from ..evaluation.evaluator import differing_expert_counts
        from .schema import compare_merge_problems

        refuse_unsaved_merge_base(self.model)  # a ties/dare/task-arithmetic eval merge: the saved model could not hold its base
        compare = self.cfg.get("eval", {}).get("compare") or {}
        differing = differing_expert_counts(self.model)  # the head's and any a model component put in the CLIP tower
        if differing and (compare.get("experts") or compare.get("logit_ensemble")):
            (a, n), (b, m) = differing[:2]
            raise ValueError(f"eval.compare.experts / eval.compare.logit_ensemble: per-expert evaluation runs expert i in every "
                             f"container, but {a} has {n} experts and {b} {m}; set both to false, or give every container one count")
        one_per_count = differing or [(name, c.num_experts) for name, c in find_containers(self.model)[:1]]
        for shown, count in one_per_count:
            problems = compare_merge_problems(self.cfg, count)
            if problems:
                raise ValueError(f"{problems[0].path}: {problems[0].message} (container {shown}, {count} experts)")
        key = "train.grad_checkpointing=true" if self.cfg["train"].get("grad_checkpointing") else None
        if key is None and any(checkpoints_plainly(m) for m in self.model.clip.modules()):
            key = "model.grad_checkpointing=true (the model component turned the CLIP tower's checkpointing on)"
        if key is not None:
            routed = [name for name, c in find_containers(self.model.clip) if c.router.stochastic or router_keeps_state(c.router)]
            if routed:
                raise ValueError(
                    f"{key}, but the CLIP tower holds experts with stochastic or stateful routers "
                    f"({routed[0]}{' and more' if len(routed) > 1 else ''}): open_clip's checkpointing would recompute them with "
                    "other experts in backward. Turn that checkpointing off, or route them deterministically (fixed, topk)"
                )

    def _refuse_retraining_a_finished_run(self, started_from: Path | None = None) -> None:
        """No checkpoint of its own to resume from, but the folder holds a trained model or results of this
        recipe (its ``checkpoints/`` deleted to save space, say): training again, from step 1 or from the other
        run's checkpoint ``started_from`` that ``train.resume`` names, would replace them and drop the metrics
        history, so that needs ``--overwrite``. (A run that crashed before its first checkpoint left neither
        and starts again.)"""
        done = [name for name in ("model", "model_dense", "results.json") if (self.output_dir / name).exists()]
        if done:
            shown = ", ".join(n + ("/" if (self.output_dir / n).is_dir() else "") for n in done)
            again = "from step 1" if started_from is None else f"from train.resume's checkpoint {started_from}"
            history = " and its metrics.jsonl history" if (self.output_dir / "metrics.jsonl").exists() else ""
            raise FileExistsError(
                f"output_dir {self.output_dir} holds a trained run of this recipe ({shown}) but no checkpoint to "
                f"resume from ({self.output_dir / 'checkpoints'} is {'empty' if (self.output_dir / 'checkpoints').is_dir() else 'gone'}): "
                f"training again {again} would replace them{history}. Evaluate the saved model with "
                f"mergevid eval {self.output_dir / 'model'} ..., use another output_dir, or pass --overwrite to train again"
            )

    def _own_checkpoints_first(self, resume: Any) -> Any:
        """``train.resume`` naming another run's checkpoint starts this run; once this run has
        checkpoints of its own (it was interrupted), a rerun of the same command continues from them."""
        from ..training.checkpoint import resume_kind
        from ..utils.io import is_within

        if resume_kind(resume) != "path":
            return resume
        own = self.checkpoints.checkpoints()
        if not own or is_within(resume, self.checkpoints.directory):
            return resume
        if self.main:
            log.info("train.resume=%s started this run; it has checkpoints of its own now (latest: %s): resuming from them",
                     resume, own[-1].name)
        return "auto"

    def _train_loader(self) -> Any:
        from ..data import VideoDataset, build_loader, few_shot_subset

        d, cfg = self.data_cfg, self.cfg
        world = self.dist.world_size
        accum = cfg["train"].get("grad_accumulation", 1)
        total = d.get("batch_size", 144)
        if total % (world * accum):
            raise ValueError(
                f"data.batch_size={total} is the total batch; it must be divisible by processes ({world}) "
                f"× train.grad_accumulation ({accum})"
            )
        ds = VideoDataset(
            list_file=d["train_list"],
            root=d["root"],
            num_frames=d.get("num_frames", 8),
            train=True,
            class_names=self.train_class_names,
            list_format=d.get("list_format", "video"),
            backend=d.get("backend", "decord"),
            frame_index_base=d.get("frame_index_base", 1),
            sampling=d.get("sampling", "segment"),
            stride=d.get("stride", 8),
            input_size=self.input_size,
            decode_short_side=d.get("decode_short_side"),
            flip=d.get("flip", True),
            flip_label_pairs=d.get("flip_label_pairs"),
            grayscale_p=d.get("grayscale_p", 0.2),
            normalize=False,  # uint8 out of the workers; normalised on the device in one op
            on_error=d.get("on_error", "resample"),
            read_timeout_s=d.get("read_timeout_s", 60.0),
            seed=cfg.get("seed", 0),
        )
        if d.get("few_shot"):
            fs = d["few_shot"]
            try:
                ds = few_shot_subset(ds, shots=fs["shots"], seed=fs.get("seed", 0), repeat_to_full=fs.get("repeat_to_full", True))
            except ValueError as err:  # "few_shot_subset: class 0 has 2 videos, fewer than shots=16": name the key
                detail = str(err).removeprefix("few_shot_subset: ")
                raise ValueError(f"data.few_shot.shots={fs['shots']}: {detail} (training list {d.get('train_list')}); lower "
                                 "data.few_shot.shots (each class needs that many videos)") from None
        per_rank = total // (world * accum)
        if len(ds) < total:  # not one optimizer step per epoch: nothing would train
            raise ValueError(
                f"the training list has {len(ds)} videos, fewer than one optimizer step's batch: data.batch_size={total}"
                + (f" (train.grad_accumulation={accum} micro-batches of {per_rank * world})" if accum > 1 else "")
                + "; lower data.batch_size"
            )
        return build_loader(
            ds,
            batch_size=per_rank,
            num_workers=d.get("num_workers", 8),
            shuffle=True,
            seed=cfg.get("seed", 0),
            drop_last=True,
            num_replicas=world,
            rank=self.dist.rank,
        )

    def _optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        from ..training.optim import build_optimizer, build_param_groups
        from ..training.schedule import cosine_with_warmup
        from ..training.trainer import steps_per_epoch, warmup_steps

        o, s, t = self.cfg["optimizer"], self.cfg["schedule"], self.cfg["train"]
        groups = build_param_groups(
            self.model,
            groups=[{"name": "clip", "match": ["clip.*"], "lr": o.get("clip_lr", 3e-6)}] if any(
                p.requires_grad for n, p in self.model.named_parameters() if n.startswith("clip.")
            ) else [],
            lr=o.get("lr", 5e-5),
            weight_decay=o.get("weight_decay", 0.2),
            no_decay_norm_bias_embedding=o.get("no_decay_norm_bias_embedding", False),
        )
        optimizer = build_optimizer(
            groups, name=o.get("name", "adamw"), lr=o.get("lr", 5e-5), weight_decay=o.get("weight_decay", 0.2),
            betas=tuple(o.get("betas", (0.9, 0.999))), eps=o.get("eps", 1e-8),
        )
        per_epoch = steps_per_epoch(len(self.train_loader), t.get("grad_accumulation", 1))
        total = per_epoch * s["epochs"]
        if t.get("max_steps"):
            total = min(total, t["max_steps"])
        scheduler = cosine_with_warmup(
            optimizer,
            warmup_steps=min(warmup_steps(s.get("warmup_epochs", 5), per_epoch), max(total - 1, 0)),
            total_steps=max(total, 1),
            min_lr_ratio=s.get("min_lr_ratio", 0.0),
        )
        return optimizer, scheduler

    def _trainer(self) -> Any:
        from ..training.trainer import Trainer

        t = self.cfg["train"]
        return Trainer(
            model=self.model,
            objective=self.objective,
            loader=self.train_loader,
            class_features=self.class_features,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            device=self.device,
            precision=self.cfg.get("precision", "auto"),
            epochs=self.cfg["schedule"]["epochs"],
            max_steps=t.get("max_steps"),
            grad_accumulation=t.get("grad_accumulation", 1),
            clip_grad_norm=t.get("clip_grad_norm"),
            log_every=t.get("log_every", 10),
            checkpoints=self.checkpoints,
            save_every_steps=t.get("save_every_steps"),
            evaluate_fn=self._validate if self.data_cfg.get("val_list") else None,
            eval_every_epochs=t.get("eval_every_epochs", 1),
            best_metric="top1",
            metrics=None,
            console=self.console,
            dist=self.dist,
            compile=t.get("compile", False),
            routing_draws=t.get("routing_draws", "global"),
            variable_batch=self.data_cfg.get("on_error", "resample") == "skip",  # skipped clips: batches shrink
            resume_hint=("Rerun the same command to resume." if t.get("resume", "auto")
                         else "Rerun the same command with train.resume=auto to resume from it."),
        )

    def _build_val_dataset(self) -> Any:
        """The ``data.val_list`` dataset, built at setup: a list that does not fit the training classes is refused before training."""
        from ..data import VideoDataset

        d = self.data_cfg
        clips, crops = self.cfg["train"].get("val_views", [1, 1])
        return VideoDataset(
            list_file=d["val_list"], root=d["root"], num_frames=d.get("num_frames", 8), train=False,
            class_names=self.train_class_names, list_format=d.get("list_format", "video"),
            backend=d.get("backend", "decord"), frame_index_base=d.get("frame_index_base", 1),
            sampling=d.get("sampling", "segment"), stride=d.get("stride", 8), num_clips=clips, num_crops=crops,
            test_offsets=(self.cfg.get("eval") or {}).get("test_offsets") or "centre",
            input_size=self.input_size,
            short_side=check_short_side("data.short_side", d.get("short_side"), self.input_size,
                                        "data.input_size" if d.get("input_size") else "the model's visual tower"),
            normalize=False,  # uint8 out of the workers; normalised on the device in one op
            on_error="skip", read_timeout_s=d.get("read_timeout_s", 60.0), seed=self.cfg.get("seed", 0),
        )

    def _validate(self, epoch: int) -> dict[str, float]:
        """Close-set accuracy on ``data.val_list`` (merged experts, TFM off, single view) for model selection."""
        from ..data import build_loader
        from ..evaluation.evaluator import NoVideoEvaluatedError, evaluate

        clips, crops = self.cfg["train"].get("val_views", [1, 1])
        if not hasattr(self, "_val_loader"):
            ds = self._val_dataset if hasattr(self, "_val_dataset") else self._build_val_dataset()
            ev = self.cfg.get("eval") or {}
            self._val_loader = build_loader(
                ds, batch_size=ev.get("batch_size", 16), num_workers=eval_num_workers(ev, self.data_cfg), shuffle=False,
                seed=self.cfg.get("seed", 0), drop_last=False, num_replicas=self.dist.world_size, rank=self.dist.rank,
                persistent_workers=False,
            )
        try:
            res = evaluate(self.model, self._val_loader, self.class_features, device=self.device,
                           precision=self.cfg["train"].get("val_precision") or eval_precision(self.cfg), dataset_name="val",
                           views=(clips, crops))
        except NoVideoEvaluatedError as e:  # a validation never stops training: this epoch has no val accuracy
            if self.main:
                log.warning("epoch %d: %s; no validation accuracy for this epoch (training goes on)", epoch + 1, e)
            return {"failed": float(len(e.failed))}
        v = next(iter(res.variants.values()))
        if self.main and self.console is not None:
            total = self.cfg["schedule"]["epochs"]  # shown 1-based, as the schedule counts them (metrics.jsonl: 0-based)
            top5 = "" if v.top5 is None else f"  top-5 {v.top5:.2f}"  # None: 5 classes or fewer
            self.console.print(f"epoch {epoch + 1}/{total}: val top-1 {v.top1:.2f}{top5}  ({res.num_videos} videos, {res.num_failed} failed)")
        return {"top1": v.top1, **({} if v.top5 is None else {"top5": v.top5}), "failed": float(res.num_failed)}

    # -- phases -----------------------------------------------------------------------------
    def train(self) -> None:
        """Train (resuming where the recipe says) and print the per-epoch validation summary."""
        start = time.perf_counter()
        first_step = self.trainer.state.step  # > 0 when resumed
        if self.main and self.console is not None:
            from ..experts import find_containers

            n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            tower = find_containers(self.model.clip)  # a model component's experts in the CLIP tower
            tower_note = f", {len(tower)} expert layer{'s' if len(tower) != 1 else ''} in the CLIP tower" if tower else ""
            self.console.print(
                f"[bold]training[/] {self.model.model_name} + {self.model.config['head']['layers']}-layer head "
                f"({self.model.config['head']['num_experts']} experts){tower_note}, {n / 1e6:.2f}M trainable params, "
                f"{self.trainer.total_steps} steps on {self.device}"
            )
        state = self.trainer.fit()
        self.train_seconds = time.perf_counter() - start
        bad = self.trainer.bad_video_paths_of_all_ranks()  # a collective: every rank calls it
        if self.main and self.console is not None and bad:
            how = "skipped" if self.data_cfg.get("on_error", "resample") == "skip" else "replaced by other videos of the list"
            self.console.print(f"[yellow]{len(bad)} training video{'s' if len(bad) > 1 else ''} could not be read[/] and "
                               f"{'were' if len(bad) > 1 else 'was'} {how} (data.on_error); the first: {bad[0]}; each is named in the log")
        if self.main and self.console is not None and state.history:
            from ..training.metrics import print_summary

            rows = [{"epoch": h["epoch"] + 1, "step": h["step"], "val top-1": h.get("top1"), "val top-5": h.get("top5")} for h in state.history]
            done = state.step - first_step
            steps = (f"{state.step} steps, finished before (nothing left to train)" if done == 0 and state.step > 0
                     else f"{state.step} steps ({done} in this run, resumed at step {first_step})" if first_step > 0
                     else f"{state.step} steps")
            title = f"training: {steps} in {self.train_seconds:.0f} s" if done else f"training: {steps}"
            if state.best_metric is not None:
                title += f", best val top-1 {state.best_metric:.2f}"
            print_summary(rows, title, console=self.console)
            self._best_hint = True  # printed after the final evaluation, the last thing the user reads
        if self.main and self.console is not None and state.step == first_step > 0 and (self.output_dir / "results.json").is_file():
            # a rerun of a finished run: say that the (long) final evaluation is about to be redone
            self.console.print(f"[bold]this run was finished before[/]: its final evaluation runs again and replaces "
                               f"{self.output_dir / 'results.json'} (to evaluate the model otherwise: mergevid eval "
                               f"{self.output_dir / 'model'} --list LIST --classes CSV)")

    def _print_best_checkpoint_hint(self) -> None:
        """Name the best checkpoint and a ready ``mergevid eval`` command when it scored strictly better than the last."""
        best, latest = self.checkpoints.best(), self.checkpoints.latest()
        if best is None or latest is None or best == latest:
            return
        best_v, last_v = self.checkpoints.metric_of(best), self.checkpoints.metric_of(latest)
        if best_v is None or (last_v is not None and best_v <= last_v):  # a tie: the last weights are as good
            return
        import shlex

        # the final evaluation scores the last weights; the official code also keeps its best epoch's
        data = self.data_cfg
        command = ["mergevid", "eval", str(best)]
        if data.get("val_list") and data.get("class_csv"):
            command += ["--list", str(data["val_list"]), "--classes", str(data["class_csv"])]
            if data.get("root"):
                command += ["--root", str(data["root"])]
        else:
            command += ["--list", "LIST", "--classes", "CSV", "--root", "ROOT"]
        # the validation's own settings, so that the command scores what the validation did (TFM off: 'merged')
        clips, crops = self.cfg["train"].get("val_views", [1, 1])
        command += ["--frames", str(data.get("num_frames", 8)), "--views", f"{clips}x{crops}"]
        if data.get("list_format", "video") != "video":
            command.append(f"eval.datasets.0.list_format={data['list_format']}")
        if data.get("sampling", "segment") != "segment":
            command += [f"eval.datasets.0.sampling={data['sampling']}", f"eval.datasets.0.stride={data.get('stride', 8)}"]
        command.append("eval.datasets.0.on_error=skip")  # as the validation: bad videos skipped, and counted
        precision = eval_precision(self.cfg)
        if precision != "auto":
            command.append(f"eval.precision={precision}")
        offsets = (self.cfg.get("eval") or {}).get("test_offsets") or "centre"
        if offsets != "centre":
            command.append(f"eval.test_offsets={offsets}")
        if data.get("backend", "decord") != "decord":
            command.append(f"data.backend={data['backend']}")
        last = "" if last_v is None else f" (last: {last_v:.2f})"
        self.console.print(f"best val top-1 {best_v:.2f} at {best.name}{last}: evaluate those weights with "
                           f"{' '.join(shlex.quote(c) for c in command)}")

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the trained model on ``eval.datasets`` (merge variants, TFM on/off); return the results."""
        self.results = run_eval_suite(
            self.model, cfg=self.cfg, data_cfg=self.data_cfg, device=self.device, dist=self.dist,
            output_dir=self.output_dir, console=self.console if self.main else None, title=f"{self.cfg.get('runner')} results",
            clip_blend_base=self.clip_blend_base,
        )
        if self._best_hint:
            self._print_best_checkpoint_hint()
        return self.results

    def save(self) -> None:
        """Write ``model/`` (and ``model_dense/``) on the main process.

        Debug hook: with ``MERGEVID_DUMP_RANK_STATE=<dir>`` every rank also writes the weights it
        holds to ``<dir>/rank<r>.safetensors`` (the DDP test checks that the ranks agree).
        """
        from ..models.checkpoint import export_dense, save_model

        dump = os.environ.get(DUMP_RANK_STATE_ENV)
        if dump:
            from ..utils.io import atomic_save_safetensors

            state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}  # clone: no shared storage
            Path(dump).mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors(Path(dump) / f"rank{self.dist.rank}.safetensors", state)
        if not self.main:
            return
        save_model(self.model, self.output_dir / "model", overwrite=True, own_folder=True)  # the run's own folders
        if self.cfg["train"].get("export_dense", True) and self.model.head.has_experts:
            export_dense(self.model, self.output_dir / "model_dense", overwrite=True, own_folder=True)
        if self.console is not None:
            self.console.print(f"model: {self.output_dir / 'model'}")

    def cleanup(self) -> None:
        """Close the metrics files, stop the loader workers, leave the process group and the output folder."""
        from ..training.distributed import cleanup
        from .common import release_output_dir

        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        _stop_workers(getattr(self, "train_loader", None))
        _stop_workers(getattr(self, "_val_loader", None))
        cleanup()
        release_output_dir(self.cfg["output_dir"])


def _stop_workers(loader: Any) -> None:
    """Shut down a DataLoader's persistent workers now.

    Left to the garbage collector (the runner and its trainer form a reference cycle), the
    worker queues may be finalised before the iterator, and each worker then waits out
    DataLoader's 5 s join timeout before being killed.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None
