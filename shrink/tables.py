"""Rich tables for the terminal (stderr; stdout is kept for --json)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from shrink.console import console
from shrink.manifest import Manifest


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_eval_table(result: dict) -> None:
    metric = result.get("metric", "choice")
    against = " against the teacher's answers" if result.get("reference") == "teacher" else ""
    score = "accuracy" if metric in ("choice", "exact") else metric
    table = Table(title=f"{score} ({metric}) on {result['data']}{against}")
    for col in ("model", "runtime", "size", score, "examples/s"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for row in result["results"]:
        counted = f" ({row['correct']}/{row['examples']})" if row.get("correct") is not None else ""
        value = "reference" if against and row["role"] == "teacher" else f"{pct(row['accuracy'])}{counted}"
        table.add_row(f"{row['role']}: {row['path']}", row["runtime"], human_bytes(row["size_bytes"]), value,
                      f"{row['examples_per_s']:.2f}")
    console.print(table)
    if against:
        console.print(f"agreement with the teacher ({metric}): [bold]{pct(result['results'][0]['accuracy'])}[/bold]")
    elif "retention" in result:
        console.print(f"retention (artifact / teacher {score}): [bold]{pct(result['retention'])}[/bold]")


def print_artifact_summary(out: Path, manifest: Manifest) -> None:
    m = manifest.metrics
    table = Table(title=f"{manifest.kind} written to {out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("format", manifest.format)
    table.add_row("size", human_bytes(m.get("size_bytes")))
    for key, label in [("accuracy", "accuracy"), ("teacher_accuracy", "teacher accuracy"), ("retention", "retention")]:
        if m.get(key) is not None:
            table.add_row(label, pct(m[key]))
    if m.get("examples_per_s") is not None:
        table.add_row("examples/s", f"{m['examples_per_s']:.2f} ({m.get('eval_runtime', '')})")
    if (p := m.get("parity")) is not None:
        table.add_row("parity", f"top-1 {pct(p['top1_agreement'])}, mean KL {p['mean_kl']}, "
                                f"{'passed' if p.get('passed') else 'FAILED'}")
    if (t := manifest.target) is not None:
        table.add_row("target", f"{t['name']}: {'all constraints met' if t['met'] else 'NOT met'}")
    if m.get("peak_ram_mb") is not None:
        table.add_row("peak RAM", f"{m['peak_ram_mb']:,.0f} MB")
    if m.get("final_loss") is not None:
        table.add_row("final loss", f"{m['final_loss']:.4f}")
    console.print(table)


def print_targets(targets: dict) -> None:
    table = Table(title="device targets")
    for col in ("target", "description", "runtime", "ladder", "constraints", "threads"):
        table.add_column(col)
    for t in targets.values():
        ladder = ", ".join(q for _, q in t.ladder())
        constraints = "\n".join(f"{k} = {v:g}" for k, v in t.constraints.items())
        table.add_row(t.name, t.description, t.runtime, ladder, constraints, str(t.threads or "all"))
    console.print(table)
