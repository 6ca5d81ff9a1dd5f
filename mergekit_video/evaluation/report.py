"""Results: summary scores, JSON, rich tables and the close-set vs zero-shot plot (MoTE Figure 3)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.io import atomic_path, atomic_write_json
from .evaluator import EvalResult
from .metrics import harmonic_mean, mean_std, trade_off


def summarize(
    results: Mapping[str, Sequence[EvalResult]],
    *,
    close_set: str | None,
    zero_shot: Sequence[str] = (),
) -> dict[str, Any]:
    """Per-variant summary across datasets.

    ``results`` maps a dataset name to its per-split results (one entry for close-set). For
    every variant: each dataset's top-1 as mean ± std over splits, then HM_ZS (harmonic mean
    over the zero-shot datasets; over one, its top-1) and Trade-off (harmonic mean of the close-set top-1 and HM_ZS).
    """
    variant_names: list[str] = []
    for splits in results.values():
        for r in splits:
            variant_names.extend(v for v in r.variants if v not in variant_names)
    table: dict[str, Any] = {}
    for var in variant_names:
        row: dict[str, Any] = {}
        for ds, splits in results.items():
            top1 = [r.variants[var].top1 for r in splits if var in r.variants]
            top5 = [r.variants[var].top5 for r in splits if var in r.variants]
            if not top1:
                continue
            m, s = mean_std(top1)
            # top-5 is undefined over 5 classes or fewer (None): shown as "-", null in JSON
            row[ds] = {"top1": m, "top1_std": s, "top5": None if None in top5 else mean_std(top5)[0], "splits": top1}
        zs = [row[d]["top1"] for d in zero_shot if d in row]
        if zero_shot and len(zs) == len(zero_shot):
            row["HM_ZS"] = harmonic_mean(zs)
            if close_set and close_set in row:
                row["trade_off"] = trade_off(row[close_set]["top1"], row["HM_ZS"])
        table[var] = row
    return table


def write_results(path: str | Path, payload: Mapping[str, Any], *, overwrite: bool = True) -> Path:
    """Atomically write the results JSON."""
    return atomic_write_json(path, payload, overwrite=overwrite)


def results_table(
    summary: Mapping[str, Any],
    *,
    datasets: Sequence[str],
    close_set: str | None = None,
    zero_shot: Sequence[str] | None = None,
    title: str = "Results",
) -> Any:
    """A rich table: one row per variant, top-1 per dataset (± std over splits), the close-set
    dataset's top-5 too (as Table 4), HM_ZS, Trade-off.

    HM_ZS gets a column only over several zero-shot datasets (``zero_shot``; None: whenever the
    summary has it): over one it is that dataset's top-1, already shown.
    """
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    # narrow terminals: cells fold onto more lines rather than losing digits to "…"
    table.add_column("variant", style="cyan", overflow="fold")
    for d in datasets:
        table.add_column(f"{d} top-1", justify="right", overflow="fold")
        if d == close_set:
            table.add_column(f"{d} top-5", justify="right", overflow="fold")
    show_hm = any("HM_ZS" in r for r in summary.values()) and (zero_shot is None or len(zero_shot) > 1)
    show_to = any("trade_off" in r for r in summary.values())
    if show_hm:
        table.add_column("HM_ZS", justify="right", overflow="fold")
    if show_to:
        table.add_column("Trade-off", justify="right", overflow="fold")
    for var, row in summary.items():
        cells = []
        for d in datasets:
            if d not in row:
                cells.append("-")
            elif len(row[d]["splits"]) > 1:
                cells.append(f"{row[d]['top1']:.1f} ± {row[d]['top1_std']:.1f}")
            else:
                cells.append(f"{row[d]['top1']:.1f}")
            if d == close_set:
                cells.append(f"{row[d]['top5']:.1f}" if d in row and row[d]["top5"] is not None else "-")
        if show_hm:
            cells.append(f"{row['HM_ZS']:.1f}" if "HM_ZS" in row else "-")
        if show_to:
            cells.append(f"{row['trade_off']:.1f}" if "trade_off" in row else "-")
        table.add_row(var, *cells)
    return table


def plot_tradeoff(
    summary: Mapping[str, Any],
    path: str | Path,
    *,
    close_set: str,
    zero_shot: Sequence[str],
    title: str = "Close-set vs zero-shot",
) -> Path | None:
    """PNG scatter of close-set top-1 (x) against zero-shot top-1 (y; HM_ZS over several datasets) per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for var, row in summary.items():
        if close_set not in row:
            continue
        if len(zero_shot) > 1:  # the HM_ZS axis: a variant without it (a dataset missing) is left out
            if "HM_ZS" not in row:
                continue
            y = row["HM_ZS"]
        elif zero_shot and zero_shot[0] in row:
            y = row[zero_shot[0]]["top1"]
        else:
            continue
        points.append((var, row[close_set]["top1"], y))
    if not points:
        return None
    panels = [("TFM off", [p for p in points if not p[0].endswith("+tfm")]), ("TFM on", [p for p in points if p[0].endswith("+tfm")])]
    panels = [(t, pts) for t, pts in panels if pts]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.8), dpi=120, squeeze=False, sharey=True)
    for ax, (panel_title, pts) in zip(axes[0], panels):
        groups: dict[tuple[float, float], list[str]] = {}
        for var, x, y in pts:  # coincident points share one label
            groups.setdefault((round(x, 3), round(y, 3)), []).append(var.removesuffix("+tfm"))
        colors = []
        for (x, y), names in groups.items():
            kinds = {"expert" if n.startswith("expert_") else "merged" if n.startswith(("merged", "model")) else "other" for n in names}
            marker = "*" if "merged" in kinds else ("o" if kinds == {"expert"} else "s")
            dots = ax.scatter([x], [y], marker=marker, s=120 if marker == "*" else 45, zorder=3)
            colors.append(dots.get_facecolor()[0])
        ax.margins(0.12)
        # coincident variants: their names wrapped into lines, so that a long group stays inside the axes
        _place_labels(fig, ax, [(x, y, textwrap.fill(", ".join(names), width=34)) for (x, y), names in groups.items()], colors=colors)
        ax.set_xlabel(f"{close_set} top-1 (%)")
        ax.set_title(f"{title} ({panel_title})" if len(panels) > 1 else title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("HM_ZS (%)" if len(zero_shot) > 1 else f"{zero_shot[0]} top-1 (%)")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# Label offsets (points) tried in order: right, left, above, below, then farther out (ring r: a leader line).
_LABEL_OFFSETS = [
    (dx * r, dy * r, ha, r)
    for r in (1, 2, 3, 4, 5)
    for dx, dy, ha in ((6, 4, "left"), (6, -10, "left"), (-6, 4, "right"), (-6, -10, "right"), (0, 9, "center"), (0, -15, "center"))
] + [(dx, dy * r, ha, r) for r in (6, 7, 8, 9, 10) for dx, dy, ha in ((0, 9, "center"), (0, -15, "center"), (6, 9, "left"),
                                                                     (-6, 9, "right"), (6, -15, "left"), (-6, -15, "right"))]


def _box_distance(box: Any, px: float, py: float) -> float:
    """Pixels from the point (px, py) to the nearest edge of ``box`` (0 inside it)."""
    return math.hypot(max(box.x0 - px, 0.0, px - box.x1), max(box.y0 - py, 0.0, py - box.y1))


def _place_labels(fig: Any, ax: Any, labels: Sequence[tuple[float, float, str]], *, colors: Sequence[Any] | None = None) -> list[Any]:
    """Greedy label placement: each label takes the first offset whose box stays inside the axes,
    overlaps neither a placed label nor another point, and lies nearer its own point than any other
    (beyond the first ring a leader line to its point says whose it is instead); with no such place,
    the least bad one. ``colors``: each label in its marker's colour. Returns the labels' pixel boxes."""
    from matplotlib.text import Text

    fig.canvas.draw()  # fixes the data-to-pixel transform and the renderer's text extents
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marker_px = 7.0
    points_px = [ax.transData.transform((x, y)) for x, y, _ in labels]
    taken: list[Any] = []

    def annotate(i: int, dx: float, dy: float, ha: str, ring: int) -> Any:
        x, y, text = labels[i]
        leader = {"arrowstyle": "-", "lw": 0.6, "color": "0.35", "shrinkA": 0, "shrinkB": 4} if ring > 1 else None
        return ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=7,
                           color=colors[i] if colors is not None else None, arrowprops=leader)

    for i in range(len(labels)):
        best = None  # (penalty, annotation, box): the first clear place, else the least bad one
        for index, (dx, dy, ha, ring) in enumerate(_LABEL_OFFSETS):
            ann = annotate(i, dx, dy, ha, ring)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text alone: an Annotation's own extent holds its leader line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            own = _box_distance(box, *points_px[i])
            covers = sum(j != i and box.x0 - marker_px <= px <= box.x1 + marker_px and box.y0 - marker_px <= py <= box.y1 + marker_px
                         for j, (px, py) in enumerate(points_px))
            # beside its point, a label nearer another point would name that one; a leader line says whose it is
            misleads = ring == 1 and any(j != i and _box_distance(box, px, py) <= own for j, (px, py) in enumerate(points_px))
            penalty = (not inside, sum(box.overlaps(other) for other in taken), covers, misleads, index)
            if best is None or penalty < best[0]:
                if best is not None:
                    best[1].remove()
                best = (penalty, ann, box)
            else:
                ann.remove()
            if penalty[:4] == (False, 0, 0, False):
                break
        taken.append(best[2])
    return taken
