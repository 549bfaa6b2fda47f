"""Prototype (issue 15): a student whose last layer pools the prompt into its answer token.

    python bench/pool_readout.py --variant uniform --seed 0

The demo's student is the teacher's first 6 layers (MLPs cut to a quarter). A linear
probe reads the sentiment from the teacher's layer-6 state averaged over the prompt far
better (96% on dev) than from its last token (86%), where a causal model answers. This
builds the first 7 layers instead, with layer 6's attention made uniform (its q_norm
weight -1: every query is zero, so the last token receives the mean of the prompt's
values), and distills it with the demo's recipe (`shrink distill --student`). `plain`
keeps layer 6's attention as it was: the control for the extra layer alone. Scored on
the dev split only. Writes bench/results/pool-readout-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402
from layer_probe import cut_model  # noqa: E402


def uniform_attention(layer) -> str:
    """Make `layer`'s attention uniform: every query zero, so each position receives the
    mean of the values of the positions it sees (the last token: the prompt's mean).
    A query norm is scaled to zero (Gemma's scales by 1 + w, so w = -1; others by w, so
    w = 0): its weight still trains, and the projection keeps a finite gradient, which
    zeroing the projection under a norm would not (the norm's gradient at zero is
    1/sqrt(eps)). Without a query norm the projection itself is zeroed. Returns which."""
    import torch

    attn = layer.self_attn
    norm = getattr(attn, "q_norm", None)
    with torch.no_grad():
        if norm is not None:
            norm.weight.zero_()
            gemma_style = bool(norm(torch.ones(1, norm.weight.shape[0])).abs().sum() > 0)
            if gemma_style:
                norm.weight.fill_(-1.0)
            return "q_norm"
        attn.q_proj.weight.zero_()
        if attn.q_proj.bias is not None:
            attn.q_proj.bias.zero_()
        return "q_proj"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("uniform", "plain"), default="uniform")
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", type=json.loads, default={}, help="DistillConfig fields over the recipe")
    ap.add_argument("--gguf", action="store_true", help="also the Q4_K_M (Q4_0 embedding) on dev in llama.cpp")
    ap.add_argument("--out", type=Path, default=Path("bench/pool-run"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrink.demo.pipeline import TASKS, demo_teacher
    from shrink.demo.task import write_task_files
    from shrink.distill.config import DistillConfig
    from shrink.distill.train import distill
    from shrink.evaluate import evaluate
    from shrink.runtime.torch_runtime import TorchRuntime
    from shrink.tasks import load_task
    from shrink.teacher_gguf import resolve_teacher

    out = args.out / f"{args.variant}-{args.layers}-s{args.seed}"
    shutil.rmtree(out, ignore_errors=True)
    files = write_task_files(out / "data")
    gguf_teacher = demo_teacher()
    folder = resolve_teacher(gguf_teacher)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    examples = load_task(files["train"])
    student = cut_model(teacher, tokenizer, examples, args.layers, 0.25, None)
    if args.variant == "uniform":
        uniform_attention(student.model.layers[-1])
    print("layer types:", student.config.layer_types)
    init = out / "init"
    student.generation_config = teacher.generation_config
    student.save_pretrained(init)
    tokenizer.save_pretrained(init)
    del teacher

    recipe = {**TASKS["sentiment"].recipe, "layers": None, "layer_selection": "even", "ffn_ratio": 1.0,
              "seed": args.seed, **args.extra}
    started = time.perf_counter()
    m = distill(DistillConfig(teacher=gguf_teacher, data=files["train"], out=out / "student", prune_vocab=True,
                              teacher_prefix=files["prefix"], student=init, **recipe))
    seconds = time.perf_counter() - started
    dev = load_task(files["dev"])
    res = evaluate(TorchRuntime(out / "student", "cpu"), dev, "student on dev (torch)")
    norm = getattr(AutoModelForCausalLM.from_pretrained(out / "student").model.layers[-1].self_attn, "q_norm", None)
    q_norm = None if norm is None else round(float(norm.weight.abs().mean()), 4)  # Gemma: stays near 1 while uniform
    run = {"variant": args.variant, "layers": args.layers, "seed": args.seed, "extra": args.extra,
           "dev_torch": round(res.accuracy, 4), "parameters": m.metrics["parameters"],
           "distill_seconds": round(seconds, 1), "final_loss": m.metrics["final_loss"],
           "last_q_norm_mean_abs": q_norm}
    if args.gguf:
        from shrink.export.flow import ExportOptions, export

        q = export(out / "student", out / "Q4_K_M", ExportOptions("gguf", quant="Q4_K_M", embedding_type="Q4_0"),
                   eval_data=files["dev"], min_top1=0, max_kl=1e9)
        run.update(dev_q4_k_m=round(q.metrics["accuracy"], 4), q4_k_m_bytes=q.metrics["size_bytes"],
                   q4_k_m_top1=q.metrics["parity"]["top1_agreement"])
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "split": "dev",
              "recipe": recipe, **run}
    path = Path("bench/results") / f"pool-readout-{args.variant}-{args.layers}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
