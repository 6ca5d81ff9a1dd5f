"""Results plot: the close-set vs zero-shot scatter keeps its labels readable."""

from __future__ import annotations

import itertools

import pytest

from mergekit_video.evaluation.report import _place_labels, plot_tradeoff

pytest.importorskip("matplotlib")


def test_labels_of_clustered_points_neither_overlap_nor_leave_the_axes() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # four variants within 0.1 point of each other (a merge comparison), plus spread-out experts
    points = [(66.7, 31.2, "merged, mean"), (66.65, 31.15, "temperature_softmax"), (66.68, 31.1, "ensemble"),
              (66.6, 31.2, "weighted"), (65.8, 30.9, "expert_2"), (65.9, 30.1, "expert_0"), (66.2, 29.8, "expert_1")]
    fig, ax = plt.subplots(figsize=(6, 4.8), dpi=120)
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.margins(0.12)
    boxes = _place_labels(fig, ax, points)
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    plt.close(fig)
    assert len(boxes) == len(points)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_plot_tradeoff_writes_one_panel_per_tfm_setting(tmp_path) -> None:
    summary = {}
    for name, (x, y) in {"merged": (66.7, 31.2), "expert_0": (65.9, 30.1), "ensemble": (66.4, 30.8)}.items():
        summary[name] = {"k400": {"top1": x}, "novel": {"top1": y}}
        summary[f"{name}+tfm"] = {"k400": {"top1": x}, "novel": {"top1": y + 0.4}}
    path = plot_tradeoff(summary, tmp_path / "tradeoff.png", close_set="k400", zero_shot=["novel"])
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(path).size
    assert width > 1.8 * height  # two side-by-side panels (TFM off, TFM on)
    assert plot_tradeoff({"x": {"novel": {"top1": 1.0}}}, tmp_path / "none.png", close_set="k400", zero_shot=["novel"]) is None
    assert not (tmp_path / "none.png").exists()


def test_labels_in_a_crowded_row_name_their_own_point_or_draw_a_leader_line() -> None:
    """A row of variants 4 points apart (the quickstart's novel split): a label that would sit nearer another
    point than its own (naming that one) moves away with a leader line to its point, in its marker's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation, Text

    points = [(33.3, 0.0, "merged"), (33.3, 6.25, "expert_2, logit_ensemble"), (37.5, 6.25, "ensemble"),
              (41.7, 6.25, "temperature_softmax(tau=0.6)"), (45.8, 6.25, "temperature_softmax(tau=-0.6),\nexpert_3"),
              (54.2, 6.25, "expert_0"), (45.8, 12.5, "expert_1")]
    fig, ax = plt.subplots(figsize=(6, 4.8), dpi=120)
    colors = [dots.get_facecolor()[0] for dots in (ax.scatter([x], [y]) for x, y, _ in points)]
    ax.margins(0.12)
    boxes = _place_labels(fig, ax, points, colors=colors)
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert [t.get_text() for t in labels] == [p[2] for p in points]
    centres = [ax.transData.transform((x, y)) for x, y, _ in points]
    leaders = 0
    for i, (label, box) in enumerate(zip(labels, boxes)):
        assert tuple(label.get_color()) == tuple(colors[i])
        assert box.bounds == Text.get_window_extent(label, renderer).bounds  # the text's box, not its line's
        if label.arrow_patch is not None:
            leaders += 1
            continue
        gap = [max(box.x0 - px, 0, px - box.x1) ** 2 + max(box.y0 - py, 0, py - box.y1) ** 2 for px, py in centres]
        assert min(range(len(gap)), key=gap.__getitem__) == i, label.get_text()  # beside its own point, nearest to it
    plt.close(fig)
    assert 1 <= leaders < len(points)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)


def test_a_variant_without_hm_zs_is_not_drawn_on_the_hm_zs_axis(tmp_path, monkeypatch) -> None:
    """A variant missing one zero-shot dataset (no HM_ZS) was drawn at its first dataset's top-1 on the HM_ZS axis."""
    from mergekit_video.evaluation import report

    drawn = []
    real = report._place_labels
    monkeypatch.setattr(report, "_place_labels", lambda fig, ax, points, **kw: drawn.extend(points) or real(fig, ax, points, **kw))
    summary = {"a": {"k400": {"top1": 60.0}, "ucf": {"top1": 50.0}, "hmdb": {"top1": 30.0}, "HM_ZS": 37.5},
               "c": {"k400": {"top1": 62.0}, "ucf": {"top1": 50.0}}}
    assert plot_tradeoff(summary, tmp_path / "t.png", close_set="k400", zero_shot=["ucf", "hmdb"]) is not None
    assert [(x, y, label) for x, y, label in drawn] == [(60.0, 37.5, "a")]
