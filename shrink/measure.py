"""Accuracy, speed and peak memory of an artifact, each measured in a process of its own.

Peak resident memory is what a device target's `max_ram_mb` limits, and it must be what
a user running the bundle's `run.py` sees. So it is read from a process that runs that
very script and nothing else (`serve`): the parent starts `python -m
shrink.measure serve run.py RESULT`, which runs the script as `python run.py`
would (as __main__, no arguments: its default prompt) and then reports its own
high-water mark (VmHWM in /proc/self/status, which starts afresh at exec). Not the
parent's view of the child's ru_maxrss: Linux carries the forked parent's peak across
exec into it, so a parent holding a model in memory would inflate every figure. The
figure includes the Python interpreter and the runtime's libraries, as serving has them;
the only addition is this module's import (the standard library and shrink.errors).

Accuracy is measured in a second process (`score`), with the same context length and
threads. It needs what serving does not: llama.cpp's logits at every continuation
position (logits_all, an (n_ctx, vocab) buffer) and shrink's evaluation code. Its own
peak is reported apart (what evaluating takes, not what serving does), and it cannot
share the serving process: VmHWM never goes down, so whatever ran first in a process
would set the figure of what ran after it.

A child's progress bar and errors go to the inherited stderr; its result comes back as
JSON in a file named on its command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shrink.errors import ShrinkError


@dataclass(frozen=True)
class Measurement:
    accuracy: float
    examples_per_s: float
    examples: int
    runtime: str
    # Peak resident set of the scoring process, MB (10^6 bytes): evaluation code and, in
    # llama.cpp, every position's logits included. Not what serving takes: that is
    # serving_peak_ram_mb, of a process running the bundle's run.py.
    peak_ram_mb: float
    threads: int | None
    context_length: int | None  # tokens the runtime was set up for (None: its default)


def measure_artifact(path: Path, data: Path, threads: int | None, device: str = "cpu",
                     label: str = "evaluating", context_length: int | None = None) -> Measurement:
    """Evaluate `path` on the task file `data` in a child process; raise ShrinkError with the
    child's last stderr line when it fails."""
    args = ["score", str(path), str(data), "--device", device, "--label", label]
    if threads:
        args += ["--threads", str(threads)]
    if context_length:
        args += ["--context-length", str(context_length)]
    out = _child(args, f"measuring {path}")
    return Measurement(accuracy=out["accuracy"], examples_per_s=out["examples_per_s"], examples=out["examples"],
                       runtime=out["runtime"], peak_ram_mb=round(out["peak_rss_bytes"] / 1e6, 1), threads=threads,
                       context_length=context_length)


def serving_peak_ram_mb(script: Path) -> float:
    """Peak resident memory, MB (10^6 bytes), of a process that runs `script` (a bundle's
    run.py) as `python script` would."""
    out = _child(["serve", str(script)], f"running {script}")
    return round(out["peak_rss_bytes"] / 1e6, 1)


def _child(args: list[str], what: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="shrink-measure-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "shrink.measure", *args, str(result)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None, env=_same_shrink())
        if proc.returncode != 0 or not result.is_file():
            raise ShrinkError(f"{what} failed (exit code {proc.returncode}; see the error above)")
        return json.loads(result.read_text())


def _same_shrink() -> dict[str, str]:
    """The environment, with the folder this shrink was imported from first on PYTHONPATH:
    the child measures with the parent's code, not with another installed copy."""
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def peak_rss_bytes() -> int:
    """This process's peak resident set since exec: VmHWM on Linux, else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; others: KiB


def _serve(script: Path) -> dict:
    import runpy

    sys.argv = [str(script)]
    sys.path[0] = str(script.resolve().parent)  # as `python script` sets it
    runpy.run_path(str(script), run_name="__main__")
    return {"peak_rss_bytes": peak_rss_bytes()}


def _score(args) -> dict:
    from shrink.evaluate import evaluate
    from shrink.runtime import open_runtime
    from shrink.tasks import load_task_for

    examples = load_task_for(args.data, args.artifact)
    rt = open_runtime(args.artifact, device=args.device, threads=args.threads, context_length=args.context_length)
    try:
        res = evaluate(rt, examples, args.label)
    finally:
        rt.close()
    return {**res.to_dict(), "peak_rss_bytes": peak_rss_bytes()}


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m shrink.measure")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a script (a bundle's run.py); report the peak resident memory")
    serve.add_argument("script", type=Path)
    serve.add_argument("result", type=Path)
    score = sub.add_parser("score", help="evaluate an artifact on a task file")
    score.add_argument("artifact", type=Path)
    score.add_argument("data", type=Path)
    score.add_argument("result", type=Path)
    score.add_argument("--threads", type=int)
    score.add_argument("--context-length", type=int)
    score.add_argument("--device", default="cpu")
    score.add_argument("--label", default="evaluating")
    args = p.parse_args(argv)
    try:
        out = _serve(args.script) if args.command == "serve" else _score(args)
    except ShrinkError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    args.result.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
