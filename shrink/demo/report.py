"""The demo's table (terminal) and plot (PNG): accuracy against size, on a log axis."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from shrink.console import console
from shrink.tables import human_bytes, pct


def print_table(result: dict) -> None:
    """One row per model. Ratios are against the teacher in transformers (bf16 weights,
    fp32 speed) and, when the teacher is a GGUF file, against it as served (its own file
    in llama.cpp): "a / b" reads "vs transformers / vs served"."""
    rows = result["rows"]
    served = any(r["model"] == "teacher as served" for r in rows)
    split = result.get("eval_split", "held-out")
    table = Table(title=f"{result['task']}: {result['eval_examples']} {split} examples")
    for col in ("model", "runtime", "size", "smaller", score_name(result), "retention", "examples/s", "faster"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")

    def pair(r: dict, key: str, fmt) -> str:
        return f"{fmt(r[key])} / {fmt(r[key + '_vs_served'])}" if served else fmt(r[key])

    for r in rows:
        table.add_row(r["model"], r["runtime"], human_bytes(r["size_bytes"]), pair(r, "times_smaller", _times),
                      pct(r["accuracy"]), pair(r, "retention", pct), f"{r['examples_per_s']:.1f}",
                      pair(r, "times_faster", _times))
    console.print(table)
    if served:
        console.print("ratios: against the teacher in transformers / against the teacher as served (its GGUF in llama.cpp)")
    for r in rows:
        if r.get("embedding_type"):
            console.print(f"{r['model']}: its token embedding in {r['embedding_type']} (shrink export --embedding-type)")
    s = result["student"]
    console.print(
        f"student: layers {s['layers_kept']} of the teacher's, vocabulary {s['vocab_kept']:,} of "
        f"{s['teacher_vocab']:,} tokens, {s['parameters'] / 1e6:.1f}M of {s['teacher_parameters'] / 1e6:.1f}M "
        f"parameters; wall time {result['wall_seconds']:.0f} s"
    )


def score_name(result: dict) -> str:
    """accuracy, or the generative metric's name (json: the fraction of fields right)."""
    metric = result.get("metric")
    return "accuracy" if metric in (None, "choice", "exact") else f"{metric} score"


def _times(x: float) -> str:
    return f"{x:g}x"


def write_plot(result: dict, path: Path) -> None:
    """Accuracy (%) against size (MB, log axis), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    markers = {"teacher": ("o", "tab:red"), "teacher as served": ("D", "tab:orange"), "student": ("s", "tab:blue")}
    for i, r in enumerate(result["rows"]):
        marker, color = markers.get(r["model"], ("^", "tab:green"))
        x, y = r["size_bytes"] / 1e6, 100 * r["accuracy"]
        ax.scatter([x], [y], marker=marker, color=color, s=70, zorder=3, label=f"{r['model']} ({r['runtime']})")
        ax.annotate(f"{r['model']}\n{x:,.1f} MB, {y:.1f}%", (x, y), textcoords="offset points",
                    xytext=(8, -22 if i % 2 else 8), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model size (MB, log scale)")
    ax.set_ylabel(f"{score_name(result)} on the {result.get('eval_split', 'held-out')} split (%)")
    ax.set_title(f"shrink demo: {score_name(result)} against size")
    ax.grid(True, which="both", alpha=0.3)
    lo = min(100 * r["accuracy"] for r in result["rows"])
    ax.set_ylim(max(0, lo - 10), 101)
    xs = [r["size_bytes"] / 1e6 for r in result["rows"]]
    ax.set_xlim(min(xs) / 2, max(xs) * 3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
