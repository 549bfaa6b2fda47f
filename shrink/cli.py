"""The `shrink` command line: thin commands over the library.

Every command parses its options, calls one library function and prints the result.
Library errors (ShrinkError) become one line `Error: ...` on stderr with exit code 2;
set SHRINK_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from shrink import __version__
from shrink.errors import ShrinkError

DEBUG_ENV = "SHRINK_DEBUG"


class ShrinkGroup(click.Group):
    """One error boundary for every command: typed errors and usage errors become a single
    `Error: ...` line; anything else is a bug and keeps its traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ShrinkError as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:  # `shrink` alone: show the help
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=ShrinkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shrink")
def cli() -> None:
    """Compile a large language model into a small, task-specific one.

    \b
    shrink distill --teacher ./teacher --data train.jsonl --out student --layers 4
    shrink export student --target gguf --quant Q4_K_M --out student-q4
    shrink eval student-q4 --data eval.jsonl --teacher ./teacher
    shrink run student-q4 "Review: works great\\nSentiment:"
    """


@cli.command()
@click.option("--teacher", required=True, type=Path, help="Teacher: a Hugging Face model folder or a GGUF file (converted once, then cached).")
@click.option("--data", required=True, type=Path, help="Training task data (JSONL).")
@click.option("--eval", "eval_data", type=Path, help="Held-out task data; student and teacher accuracy go into the manifest.")
@click.option("--out", required=True, type=Path, help="Student folder to write.")
@click.option("--layers", required=True, type=int, help="Decoder layers the student keeps (evenly spaced).")
@click.option("--steps", type=int, help="Optimizer steps (instead of --epochs).")
@click.option("--epochs", type=float, help="Passes over the training data.  [default: 2]")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per step.")
@click.option("--lr", default=2e-4, show_default=True, help="Peak learning rate (AdamW, warm-up then cosine).")
@click.option("--temperature", default=2.0, show_default=True, help="Softens teacher and student distributions in the KL term.")
@click.option("--alpha", default=0.9, show_default=True, help="Weight of the KL term; 1 - alpha weights cross-entropy on the reference.")
@click.option("--max-length", default=512, show_default=True, help="Tokens per sequence; longer prompts are trimmed on the left.")
@click.option("--save-every", default=200, show_default=True, help="Steps between checkpoints.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--teacher-prefix", type=Path, help="Text file put before every prompt for the teacher only (few-shot examples the student should not need).")
@click.option("--prune-vocab", is_flag=True, help="Keep only the tokens the task data needs (plus special and byte tokens).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint an interrupted run left (OUT.checkpoint).")
@click.option("--force", is_flag=True, help="Replace an existing output folder or stale checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
def distill(teacher, data, eval_data, out, layers, steps, epochs, batch_size, lr, temperature, alpha,
            max_length, save_every, device, seed, teacher_prefix, prune_vocab, resume, force, as_json):
    """Train a smaller student that imitates the teacher on a task.

    The student is the teacher with LAYERS evenly spaced decoder layers kept. It learns
    from the teacher's token distributions on the completion tokens (KL at TEMPERATURE)
    mixed with cross-entropy on the reference completions. --prune-vocab shrinks the
    vocabulary to the tokens the task needs.

    \b
    Example:
      shrink distill --teacher ./teacher --data train.jsonl --eval eval.jsonl \\
          --out student --layers 4 --epochs 3
    """
    from shrink.distill.train import DistillConfig, distill as run_distill

    if steps is not None and epochs is not None:
        raise click.UsageError("--steps and --epochs cannot be used together")
    cfg = DistillConfig(
        teacher=teacher, data=data, out=out, layers=layers, eval_data=eval_data, steps=steps,
        epochs=2.0 if epochs is None else epochs, batch_size=batch_size, lr=lr,
        temperature=temperature, alpha=alpha, max_length=max_length, save_every=save_every,
        device=device, seed=seed, teacher_prefix=teacher_prefix, prune_vocab=prune_vocab, resume=resume, force=force,
    )
    manifest = run_distill(cfg)
    _report_artifact(out, manifest, as_json)


@cli.command()
@click.argument("student", type=Path)
@click.option("--target", required=True, type=click.Choice(["gguf", "onnx", "gptq"]), help="Output format.")
@click.option("--quant", help="GGUF type (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, ...; default Q4_K_M) or ONNX weights (fp32, int8, int4; default int8).")
@click.option("--bits", type=click.Choice(["4", "8"]), help="GPTQ bits per weight.  [default: 4]")
@click.option("--group-size", type=int, help="GPTQ: weights sharing one scale (-1: one per output channel).  [default: 128]")
@click.option("--desc-act", is_flag=True, default=None, help="GPTQ: quantize columns by decreasing activation (more accurate, slower kernels).")
@click.option("--calibration", type=Path, help="GPTQ: task data to calibrate on.  [default: the student's training data, else --eval]")
@click.option("--eval", "eval_data", type=Path, help="Task data to evaluate the export on, through its runtime.")
@click.option("--out", required=True, type=Path, help="Artifact folder to write.")
@click.option("--threads", type=int, help="CPU threads for quantizing and evaluating.  [default: all cores]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where GPTQ quantizes and runs.")
@click.option("--min-top1", type=float, help="Parity: least top-1 agreement with the student.  [default: per type]")
@click.option("--max-kl", type=float, help="Parity: largest mean KL(student || export).  [default: per type]")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
def export(student, target, quant, bits, group_size, desc_act, calibration, eval_data, out, threads, device,
           min_top1, max_kl, force, as_json):
    """Quantize a student for deployment and package it as an artifact.

    \b
    gguf  llama.cpp's converter and quantizer (--quant Q4_K_M, ...); runs in llama.cpp.
    onnx  an ONNX graph with past key/values (--quant fp32|int8|int4); runs in onnxruntime.
    gptq  GPTQModel, calibrated on the task (--bits, --group-size); runs in transformers.

    With --eval the artifact is evaluated through its runtime and checked against the
    student (token ids, top-1 agreement, KL); an export that fails the check is marked
    not valid and the command exits 1.

    \b
    Examples:
      shrink export student --target gguf --quant Q4_K_M --eval eval.jsonl --out student-q4
      shrink export student --target onnx --quant int8 --eval eval.jsonl --out student-onnx
      shrink export student --target gptq --bits 4 --eval eval.jsonl --out student-gptq
    """
    from shrink.export.flow import ExportOptions, export as run_export

    opts = ExportOptions(target=target, quant=quant, bits=None if bits is None else int(bits), group_size=group_size,
                         desc_act=desc_act, calibration=calibration, threads=threads, device=device)
    manifest = run_export(student, out, opts, eval_data=eval_data, force=force, min_top1=min_top1, max_kl=max_kl)
    _report_artifact(out, manifest, as_json)


@cli.command("eval")
@click.argument("artifact", type=Path)
@click.option("--data", required=True, type=Path, help="Task data (JSONL).")
@click.option("--teacher", type=Path, help="Teacher folder or GGUF file: also measure its accuracy and the retention.")
@click.option("--teacher-prefix", type=Path, help="Text file put before every prompt for the teacher only (as in distill).")
@click.option("--threads", type=int, help="CPU threads for llama.cpp and onnxruntime.  [default: all cores]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="For torch models.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def eval_cmd(artifact, data, teacher, teacher_prefix, threads, device, as_json):
    """Measure task accuracy through the artifact's own runtime.

    A Hugging Face folder runs in torch (a GPTQ one through GPTQModel's kernels), a GGUF
    artifact in llama.cpp, an ONNX one in onnxruntime. Examples with
    choices are scored by log-probability; others by exact match of the greedy output.

    \b
    Example:
      shrink eval student-q4 --data eval.jsonl --teacher ./teacher --json
    """
    from shrink.evaluate import evaluate_path

    result = evaluate_path(artifact, data, teacher=teacher, teacher_prefix=teacher_prefix, threads=threads, device=device)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from shrink.tables import print_eval_table

        print_eval_table(result)


@cli.command()
@click.argument("artifact", type=Path)
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, help="Most tokens to generate.")
@click.option("--threads", type=int, help="CPU threads for llama.cpp and onnxruntime.  [default: all cores]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="For torch models.")
def run(artifact, prompt, max_tokens, threads, device):
    """Generate a completion of PROMPT greedily with the artifact's runtime.

    \b
    Example:
      shrink run student-q4 "Review: the battery died in a day\\nSentiment:" --max-tokens 4
    """
    from shrink.runtime import open_runtime

    if max_tokens < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-tokens")
    rt = open_runtime(artifact, device=device, threads=threads)
    try:
        click.echo(rt.generate(prompt, max_tokens))
    finally:
        rt.close()


@cli.command()
@click.option("--out", default="demo-out", show_default=True, type=Path, help="Folder for the data, models and results.")
@click.option("--teacher", type=Path, help="Use another teacher (folder or GGUF).  [default: Gemma 3 270M from its PyPI package]")
@click.option("--layers", default=3, show_default=True, help="Decoder layers the student keeps.")
@click.option("--epochs", default=4.0, show_default=True, help="Passes over the 1,501 training reviews.")
@click.option("--threads", type=int, help="CPU threads for llama.cpp.  [default: all cores]")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def demo(out, teacher, layers, epochs, threads, force, as_json):
    """Run the whole pipeline on the built-in example.

    Gemma 3 270M is distilled into a small student for the sentiment of customer
    reviews (a dataset shipped with shrink), with its vocabulary pruned to the task.
    The student is exported to GGUF Q8_0 and Q4_K_M, and the teacher, the student and
    each GGUF are evaluated through their own runtimes. Writes results.json and
    accuracy_vs_size.png into OUT. Needs: pip install 'shrink[demo]'.

    \b
    Example:
      shrink demo --out demo-out
    """
    from shrink.demo.pipeline import DemoConfig, run_demo
    from shrink.demo.report import print_table

    result = run_demo(DemoConfig(out=out, teacher=teacher, layers=layers, epochs=epochs, threads=threads, force=force))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    print_table(result)
    console_note = f"results: {out / 'results.json'}, plot: {out / 'accuracy_vs_size.png'}"
    click.echo(console_note, err=True)


def _report_artifact(out: Path, manifest: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    from shrink.tables import print_artifact_summary

    print_artifact_summary(out, manifest)


def main() -> None:
    cli(prog_name="shrink")


if __name__ == "__main__":
    main()
