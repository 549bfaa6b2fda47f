"""`shrink report`: a build's artifacts in one Markdown page and one plot.

The plot is accuracy (%) against size (MB, log axis) for the teacher, the students and
every export, with the Pareto front: the points no other point beats, that is, none is
as small or smaller and as accurate or more, and strictly better on one of the two.
Exports marked not valid are plotted but left out of the front.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.atomic import atomic_file, write_text_atomic
from shrink.manifest import Manifest
from shrink.tables import human_bytes, pct

REPORT = "report.md"
PLOT = "pareto.png"
FIG_INCHES, DPI = (10, 6), 100  # 1000 x 600 pixels
BF16_BYTES = 2  # the teacher's size: its weights in bf16, as the demo reports it

# Where a label may go around its point, in points: nearest first, then further out on
# the same eight directions. Far labels get a thin line to their point.
_DIRECTIONS = ((1, 0.6), (1, -0.6), (-1, 0.6), (-1, -0.6), (0, 1), (0, -1), (1, 0), (-1, 0))
OFFSETS = [(round(r * dx), round(r * dy)) for r in (8, 20, 34, 50, 70) for dx, dy in _DIRECTIONS]
NEAR = 8  # offsets up to this far need no leader line

STYLE = {  # role -> marker, colour, legend label
    "teacher": ("o", "tab:red", "teacher (bf16 weights)"),
    "student": ("s", "tab:blue", "student"),
    "export": ("^", "tab:green", "export"),
    "invalid": ("X", "tab:gray", "export, not valid"),
}


@dataclass(frozen=True)
class Point:
    label: str  # the artifact's path in the build, or "teacher"
    role: str  # teacher, student, export or invalid
    size_bytes: int
    accuracy: float  # 0..1


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (size, accuracy) points no other point dominates, by size.
    A point is dominated by one that is no larger and no less accurate, and strictly
    better on one of the two; equal points do not dominate each other."""
    front = []
    for i, (size, acc) in enumerate(points):
        if not any(s <= size and a >= acc and (s < size or a > acc) for s, a in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def teacher_rows(manifests: dict[str, Manifest]) -> list[dict[str, Any]]:
    """The teachers the students' manifests describe (accuracy, parameters), one per
    distinct teacher; its size is its bf16 weights."""
    seen: dict[tuple, dict[str, Any]] = {}
    for key, m in manifests.items():
        metrics = m.metrics
        if m.kind != "student" or metrics.get("teacher_parameters") is None:
            continue
        ident = (m.settings.get("teacher_folder"), metrics["teacher_parameters"],
                 metrics.get("teacher_accuracy"))
        seen.setdefault(ident, {
            "artifact": "teacher", "from": key, "kind": "teacher", "format": "hf", "quant": "bf16",
            "size_bytes": BF16_BYTES * metrics["teacher_parameters"], "accuracy": metrics.get("teacher_accuracy"),
            "retention": None, "examples_per_s": metrics.get("teacher_examples_per_s"),
            "runtime": metrics.get("eval_runtime"), "valid": None, "target": None,
        })
    rows = list(seen.values())
    if len(rows) > 1:  # several teachers: name each by its student
        for r in rows:
            r["artifact"] = f"teacher of {r['from']}"
    return rows


def artifact_row(key: str, m: Manifest) -> dict[str, Any]:
    metrics = m.metrics
    return {
        "artifact": key, "kind": m.kind, "format": m.format, "quant": artifact.quant_label(m),
        "size_bytes": metrics.get("size_bytes"), "accuracy": metrics.get("accuracy"), "metric": metrics.get("metric"),
        "retention": metrics.get("retention"), "examples_per_s": metrics.get("examples_per_s"),
        "runtime": metrics.get("eval_runtime"), "valid": m.valid,
        "target": m.target,
    }


def target_text(target: Any) -> str:
    """'phone: met', 'phone: not met (min_retention)', or '-' without a target."""
    if not isinstance(target, dict):
        return "-"
    if target.get("met"):
        return f"{target.get('name')}: met"
    unmet = [c for c, v in (target.get("constraints") or {}).items() if isinstance(v, dict) and not v.get("met")]
    return f"{target.get('name')}: not met" + (f" ({', '.join(unmet)})" if unmet else "")


def plot_points(rows: list[dict[str, Any]]) -> list[Point]:
    """The rows that can be plotted: those with a size and a measured accuracy."""
    points = []
    for r in rows:
        if r["size_bytes"] and r["accuracy"] is not None:
            role = r["kind"] if r["kind"] in ("teacher", "student") else "export" if r["valid"] else "invalid"
            points.append(Point(r["artifact"], role, r["size_bytes"], r["accuracy"]))
    return points


def write_report(build_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write OUT/report.md and OUT/pareto.png (atomically) for the artifacts under
    `build_dir`; returns the paths and the Pareto front's labels."""
    build_dir = Path(build_dir)
    manifests = artifact.collect_artifacts(build_dir)
    out = build_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = teacher_rows(manifests) + [artifact_row(k, manifests[k]) for k in sorted(manifests)]
    points = plot_points(rows)
    candidates = [p for p in points if p.role != "invalid"]  # a failed export is no option
    front = [candidates[i] for i in pareto_front([(p.size_bytes, p.accuracy) for p in candidates])]
    write_pareto_plot(points, front, out / PLOT, title=f"shrink report: {build_dir.name or build_dir}",
                      ylabel=score_label(rows))
    write_text_atomic(out / REPORT, render_markdown(build_dir, rows, points, front))
    return {"report": str(out / REPORT), "plot": str(out / PLOT), "front": [p.label for p in front]}


def score_label(rows: list[dict[str, Any]]) -> str:
    """What the score axis is: accuracy (choice, exact) or the generative metric's name."""
    metrics = {r.get("metric") for r in rows if r.get("metric")}
    if len(metrics) == 1 and (metric := metrics.pop()) not in ("choice", "exact"):
        return metric
    return "accuracy"


def render_markdown(build_dir: Path, rows: list[dict[str, Any]], points: list[Point], front: list[Point]) -> str:
    lines = [f"# shrink report: {build_dir}", "", f"![Accuracy against size]({PLOT})", ""]
    metrics = sorted({r["metric"] for r in rows if r.get("metric")})
    if len(metrics) > 1:
        lines += [f"**The artifacts were scored by different metrics ({', '.join(metrics)}): their figures do not "
                  "compare.** Export them with the same `--metric`.", ""]
    elif metrics and metrics[0] not in ("choice", "exact"):
        lines += [f"Accuracy here is the {metrics[0]} score (`--metric {metrics[0]}`), from 0 to 100%.", ""]
    if front:
        shown = ", ".join(f"`{p.label}` ({human_bytes(p.size_bytes)}, {pct(p.accuracy)})" for p in front)
        lines += [f"Pareto front (smallest size for each accuracy; exports not valid left out): {shown}.", ""]
    lines += ["| artifact | kind | format | quant | size | accuracy | retention | examples/s | runtime | valid | target |",
              "|---|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        speed = "-" if r["examples_per_s"] is None else f"{r['examples_per_s']:,.1f}"
        cells = [f"`{r['artifact']}`", r["kind"], r["format"], r["quant"] or "-", human_bytes(r["size_bytes"]),
                 pct(r["accuracy"]), pct(r["retention"]), speed, r["runtime"] or "-",
                 {True: "yes", False: "**no**", None: "-"}[r["valid"]], target_text(r["target"])]
        lines.append("| " + " | ".join(str(c if c is not None else "-").replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    plotted = {p.label for p in points}
    missing = [r["artifact"] for r in rows if r["artifact"] not in plotted]
    if missing:
        lines += ["Not plotted (no accuracy measured; export with `--eval`): "
                  + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    teachers = [r for r in rows if r["kind"] == "teacher"]
    if teachers:
        lines += ["The teacher's size is its weights in bf16 (2 bytes per parameter) and its figures come "
                  "from the manifest of " + ", ".join(f"`{t['from']}`" for t in teachers) + ".", ""]
    return "\n".join(lines)


def write_pareto_plot(points: list[Point], front: list[Point], path: Path, title: str, ylabel: str = "accuracy") -> None:
    """Accuracy (%) against size (MB, log axis), each point labelled, the front as a step
    line. The figure is FIG_INCHES at DPI, whatever the labels (no tight bounding box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIG_INCHES, dpi=DPI)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.1, top=0.92)  # fixed, so labels can be placed
    ax.set_xscale("log")
    ax.set_xlabel("size (MB, log scale)")
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, "no artifact has a measured accuracy (export with --eval)", transform=ax.transAxes,
                ha="center", va="center")
    else:
        xs = [p.size_bytes / 1e6 for p in points]
        ys = [100 * p.accuracy for p in points]
        ax.set_xlim(min(xs) / 2, max(xs) * 3)
        ax.set_ylim(max(0.0, min(ys) - 10), min(ys) + max(max(ys) - min(ys), 1) * 1.25 + 2)
        fx = [p.size_bytes / 1e6 for p in front]
        fy = [100 * p.accuracy for p in front]
        ax.step(fx + [max(xs) * 3], fy + fy[-1:], where="post", color="black", lw=1.2, alpha=0.6,
                label="Pareto front (smallest size for each accuracy)", zorder=2)
        for role, (marker, colour, label) in STYLE.items():
            mine = [(x, y) for p, x, y in zip(points, xs, ys) if p.role == role]
            if mine:
                ax.scatter(*zip(*mine), marker=marker, color=colour, s=60, zorder=3, label=label)
        place_labels(ax, list(zip(xs, ys)),
                     [f"{p.label}\n{p.size_bytes / 1e6:,.1f} MB, {100 * p.accuracy:.1f}%" for p in points])
        ax.legend(loc="best", fontsize=8)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)


def place_labels(ax, xy: list[tuple[float, float]], texts: list[str], fontsize: int = 8) -> list:
    """Annotate each point, trying OFFSETS in turn and keeping the first position whose
    text overlaps no earlier label and no marker, stays inside the axes and is nearer its
    own point than any other (else the position that does least harm). The axes' limits
    and position must be final. Returns the annotations."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pixels = ax.transData.transform(xy)  # (n, 2) display coordinates
    markers = [Bbox.from_bounds(px - 6, py - 6, 12, 12) for px, py in pixels]
    taken: list = []
    annotations = []
    for i, ((x, y), text) in enumerate(zip(xy, texts)):
        best = None  # (cost, offset, box)
        for dx, dy in OFFSETS:
            ann = _annotate(ax, text, (x, y), (dx, dy), fontsize, leader=False)
            box = ann.get_window_extent(renderer).padded(2)
            ann.remove()
            outside = _area(box) - _overlap(box, frame)
            cost = sum(_overlap(box, b) for b in taken + markers) + 2 * outside
            own = _distance(pixels[i], box)
            if any(_distance(p, box) + 3 < own for j, p in enumerate(pixels) if j != i):
                cost += 400  # it would seem to label another point
            if best is None or cost < best[0]:
                best = (cost, (dx, dy), box)
            if cost == 0:
                break
        _, offset, box = best
        taken.append(box)
        annotations.append(_annotate(ax, text, (x, y), offset, fontsize, leader=max(map(abs, offset)) > NEAR))
    return annotations


def _annotate(ax, text, xy, offset, fontsize, leader: bool):
    dx, dy = offset
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    arrow = dict(arrowstyle="-", color="0.35", lw=0.7, shrinkA=0, shrinkB=5) if leader else None
    return ax.annotate(text, xy, xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                       arrowprops=arrow, zorder=4)


def _distance(p, b) -> float:
    """Pixels from point `p` to box `b` (0 inside)."""
    dx = max(b.x0 - p[0], 0.0, p[0] - b.x1)
    dy = max(b.y0 - p[1], 0.0, p[1] - b.y1)
    return (dx * dx + dy * dy) ** 0.5


def _area(b) -> float:
    return max(0.0, b.width) * max(0.0, b.height)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0
