"""The ``evaluate`` and ``compare`` runners: evaluate a saved model (or a built one) on a suite of datasets."""

from __future__ import annotations

from typing import Any

from ..config import instantiate
from .common import delete_set_aside, eval_suite, head_positions, read_clip_blend_base, run_eval_suite, start_run
from .schema import DEFAULT_COMPARE_MERGES  # noqa: F401  (re-exported: the compare runner's default merges)


class EvaluateRunner:
    """Evaluate ``checkpoint`` (a model directory, dense export or trainer checkpoint) on ``eval.datasets``."""

    compare_defaults = False

    def __init__(self, *, cfg: dict[str, Any], overwrite: bool = False, console: Any = None) -> None:
        self.cfg = cfg
        self.overwrite = overwrite
        self.console = console
        self.results: dict[str, Any] = {}

    def setup(self) -> None:
        """Prepare the output folder and the data, and load the model (``checkpoint``) or build it (``model``)."""
        from ..models.checkpoint import load

        cfg = self.cfg
        ctx = start_run(cfg, overwrite=self.overwrite)
        self.dist, self.main, self.device, self.output_dir = ctx.dist, ctx.main, ctx.device, ctx.output_dir
        self.data_cfg = ctx.data_cfg  # synthetic data written, every named path checked
        if cfg.get("checkpoint"):
            self.model = load(cfg["checkpoint"], device=self.device)
        elif cfg.get("model"):
            self.model = instantiate(cfg["model"], _path="model").to(self.device).eval()
        else:
            raise ValueError("set 'checkpoint' (a saved model) or 'model' (a _component_ that builds one)")
        self._check_compare_merges()
        # every evaluation dataset is checked now (sizes, frame counts, class lists), before the first one runs
        eval_suite(cfg.get("eval") or {}, self.data_cfg, model_input_size=getattr(self.model, "input_size", None),
                   model_num_positions=head_positions(self.model), check_labels=True)
        self.clip_blend_base = read_clip_blend_base(self.model, cfg)
        if self.compare_defaults:  # a validated recipe has them already (schema); a recipe dict built in Python may not
            ev = dict(cfg.get("eval") or {})
            compare = dict(ev.get("compare") or {})
            compare.setdefault("merges", [dict(m) for m in DEFAULT_COMPARE_MERGES])  # absent: the defaults; []: none
            compare.setdefault("experts", True)
            compare.setdefault("logit_ensemble", True)
            ev["compare"] = compare
            self.cfg = {**cfg, "eval": ev}
        delete_set_aside(self.output_dir, main=self.main)  # set up: what --overwrite set aside goes now

    def _check_compare_merges(self) -> None:
        """Dry-run every ``eval.compare.merges`` entry for the loaded model's expert count (validation
        cannot: the count is in the checkpoint); raise ValueError naming the entry."""
        from ..experts import find_containers
        from .schema import compare_merge_problems

        containers = find_containers(self.model)
        problems = compare_merge_problems(self.cfg, containers[0][1].num_experts) if containers else []
        if problems:
            raise ValueError(f"{problems[0].path}: {problems[0].message}")

    def train(self) -> None:
        """Nothing to train."""

    def evaluate(self) -> dict[str, Any]:
        """Run every dataset of ``eval.datasets``; write ``results.json`` and the plot; return the results."""
        self.results = run_eval_suite(
            self.model, cfg=self.cfg, data_cfg=self.data_cfg, device=self.device, dist=self.dist,
            output_dir=self.output_dir, console=self.console if self.main else None,
            title=f"{self.cfg.get('runner')} results", clip_blend_base=self.clip_blend_base,
        )
        return self.results

    def save(self) -> None:
        """Results are written by :meth:`evaluate`."""

    def cleanup(self) -> None:
        """Leave the process group (DDP) and the output folder."""
        from ..training.distributed import cleanup
        from .common import release_output_dir

        cleanup()
        release_output_dir(self.cfg["output_dir"])


class CompareRunner(EvaluateRunner):
    """Compare merge strategies on one model: each expert, the configured merge, other merges, ensembles."""

    compare_defaults = True
