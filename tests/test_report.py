"""`shrink report`: report.md and pareto.png for a build; the Pareto front; label placement."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from shrink import report
from shrink.cli import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_check import Q4, Q8, STUDENT, target, write_artifact  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def build(tmp_path):
    b = tmp_path / "build"
    write_artifact(b / "student", **STUDENT)
    write_artifact(b / "exports" / "q8", **Q8)
    write_artifact(b / "exports" / "q4", **{**Q4, "target_record": target(0.9255, 0.07, min_retention=0.95)})
    write_artifact(b / "exports" / "q4-bad", **{**Q4, "accuracy": 0.70, "size": 69_000, "valid": False})
    write_artifact(b / "exports" / "unevaluated", quant="Q6_K", size=90_000)  # exported without --eval
    return b


def test_pareto_front_on_hand_made_points():
    pts = [
        (100, 0.90),  # 0: dominated by 3 (smaller, more accurate)
        (50, 0.80),  # 1: on the front
        (200, 0.95),  # 2: on the front (most accurate)
        (80, 0.92),  # 3: on the front
        (50, 0.80),  # 4: equal to 1: neither dominates the other
        (60, 0.80),  # 5: dominated by 1 (same accuracy, larger)
        (300, 0.95),  # 6: dominated by 2 (same accuracy, larger)
        (10, 0.50),  # 7: the smallest: on the front
    ]
    assert report.pareto_front(pts) == [7, 1, 4, 3, 2]
    assert report.pareto_front([]) == []
    assert report.pareto_front([(1, 0.1)]) == [0]


def test_report_writes_markdown_and_png(build, tmp_path):
    out = tmp_path / "site" / "report"  # created when missing
    r = invoke("report", build, "--out", out)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "report.md"]  # no temporary files left
    assert png_size(out / "pareto.png") == (1000, 600)

    md = (out / "report.md").read_text()
    lines = md.splitlines()
    assert lines[0] == f"# shrink report: {build}"
    assert "![Accuracy against size](pareto.png)" in lines
    header = "| artifact | kind | format | quant | size | accuracy | retention | examples/s | runtime | valid | target |"
    assert header in lines
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| `")}
    assert list(rows) == ["`teacher`", "`exports/q4`", "`exports/q4-bad`", "`exports/q8`", "`exports/unevaluated`",
                          "`student`"]
    assert rows["`teacher`"] == "| `teacher` | teacher | hf | bf16 | 2.0 MB | 94.0% | - | - | torch | - | - |"
    assert rows["`exports/q4`"] == ("| `exports/q4` | export | gguf | Q4_K_M | 70.0 KB | 87.0% | 92.5% | 95.0 | "
                                    "llama.cpp | yes | phone: not met (min_retention) |")
    assert "| **no** |" in rows["`exports/q4-bad`"]
    # the front: the smallest valid artifact, then each more accurate one (q4-bad is smaller but not valid)
    assert ("Pareto front (smallest size for each accuracy; exports not valid left out): "
            "`exports/q4` (70.0 KB, 87.0%), `exports/q8` (120.0 KB, 89.0%), `student` (400.0 KB, 90.0%), "
            "`teacher` (2.0 MB, 94.0%).") in lines
    assert "Not plotted (no accuracy measured; export with `--eval`): `exports/unevaluated`." in lines


def test_report_defaults_to_the_build_folder(build):
    assert invoke("report", build).exit_code == 0
    assert png_size(build / "pareto.png") == (1000, 600)
    assert (build / "report.md").is_file()


def test_report_png_decodes(build, tmp_path):
    import matplotlib.image

    assert invoke("report", build, "--out", tmp_path / "r").exit_code == 0
    img = matplotlib.image.imread(tmp_path / "r" / "pareto.png")
    assert img.shape[:2] == (600, 1000)
    assert img.std() > 0.05  # not blank


def test_labels_do_not_overlap_when_points_crowd():
    """Seven points within a few pixels of each other: every label finds its own place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    xy = [(16.9, 87.0), (17.0, 87.1), (17.1, 86.9), (16.8, 87.2), (17.0, 86.8), (16.95, 87.05), (60.0, 90.0)]
    fig, ax = plt.subplots(figsize=report.FIG_INCHES, dpi=report.DPI)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.1, top=0.92)
    ax.set_xscale("log")
    ax.set_xlim(5, 200)
    ax.set_ylim(75, 95)
    ax.scatter(*zip(*xy))
    anns = report.place_labels(ax, xy, [f"student-q{i}\n{x:.1f} MB, {y:.1f}%" for i, (x, y) in enumerate(xy)])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, renderer) for a in anns]  # the text alone, not its leader line
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, i
        for j, b in enumerate(boxes[:i]):
            assert not a.overlaps(b), (i, j)
    plt.close(fig)


def test_report_of_a_build_without_artifacts(tmp_path):
    (tmp_path / "empty").mkdir()
    r = invoke("report", tmp_path / "empty")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"Error: build folder {tmp_path / 'empty'} holds no shrink artifacts "
                                             "(no manifest.json found)"]
    assert list((tmp_path / "empty").iterdir()) == []


def test_report_without_accuracy_still_writes_a_plot(tmp_path):
    b = tmp_path / "build"
    write_artifact(b / "q4", quant="Q4_K_M", size=1000)
    assert invoke("report", b).exit_code == 0
    assert png_size(b / "pareto.png") == (1000, 600)
    assert "Not plotted (no accuracy measured; export with `--eval`): `q4`." in (b / "report.md").read_text()
