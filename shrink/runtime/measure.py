"""Accuracy, speed and peak memory of an artifact, measured in a process of its own.

Peak resident memory is what a device target's `max_ram_mb` limits, and the only honest
way to read it is from a process that did nothing but load the artifact in its runtime
and run the task: the parent starts `python -m shrink.runtime.measure`, and the child
reports its own high-water mark (VmHWM in /proc/self/status, which starts afresh at
exec). Not the parent's view of the child's ru_maxrss: Linux carries the forked
parent's peak across exec into it, so a parent holding a model in memory would inflate
every figure. The figure includes the Python interpreter and the runtime's libraries,
as serving it would.

The child's progress bar goes to the inherited stderr; its result comes back as JSON in
a file named on its command line.
"""

from __future__ import annotations

import json
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
    peak_ram_mb: float  # peak resident set of the measuring process, MB (10^6 bytes)
    threads: int | None


def measure_artifact(path: Path, data: Path, threads: int | None, device: str = "cpu",
                     label: str = "evaluating") -> Measurement:
    """Evaluate `path` on the task file `data` in a child process; raise ShrinkError with the
    child's last stderr line when it fails."""
    with tempfile.TemporaryDirectory(prefix="shrink-measure-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "shrink.runtime.measure", str(path), str(data), str(result),
               "--device", device, "--label", label]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None)
        if proc.returncode != 0 or not result.is_file():
            raise ShrinkError(f"measuring {path} failed (exit code {proc.returncode}; see the error above)")
        out = json.loads(result.read_text())
    return Measurement(accuracy=out["accuracy"], examples_per_s=out["examples_per_s"], examples=out["examples"],
                       runtime=out["runtime"], peak_ram_mb=round(out["peak_rss_bytes"] / 1e6, 1), threads=threads)


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


def _main(argv: list[str]) -> int:
    import argparse

    from shrink.evaluate import evaluate
    from shrink.runtime import open_runtime
    from shrink.tasks import load_task

    p = argparse.ArgumentParser(prog="python -m shrink.runtime.measure")
    p.add_argument("artifact", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("result", type=Path)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="evaluating")
    args = p.parse_args(argv)
    try:
        examples = load_task(args.data)
        rt = open_runtime(args.artifact, device=args.device, threads=args.threads)
        try:
            res = evaluate(rt, examples, args.label)
        finally:
            rt.close()
    except ShrinkError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    args.result.write_text(json.dumps({**res.to_dict(), "peak_rss_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
