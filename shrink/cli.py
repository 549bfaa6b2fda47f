"""The `shrink` command line: thin commands over the library.

Every command parses its options, calls one library function and prints the result.
Library errors (ShrinkError) become one line `Error: ...` on stderr with exit code 2;
set SHRINK_DEBUG=1 (any value but empty or 0) to see the traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from shrink import __version__
from shrink.distill.batches import LOSS_ON
from shrink.errors import ShrinkError
from shrink.manifest import Manifest
from shrink.quiet import debug_enabled


class ShrinkGroup(click.Group):
    """One error boundary for every command: typed errors and usage errors become a single
    `Error: ...` line, and so does a full disk that no writer explained (the last resort:
    shrink.artifact removes its temporary files and raises DiskFullError first); anything
    else is a bug and keeps its traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ShrinkError as e:
            if debug_enabled():
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:  # `shrink` alone: show the help
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            if debug_enabled():
                raise
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except Exception as e:
            from shrink.atomic import is_disk_full

            if debug_enabled() or not is_disk_full(e):
                raise
            where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
            click.echo(f"Error: no space left on device{where} ({type(e).__name__}: {e})", err=True)
            sys.exit(ShrinkError.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=ShrinkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shrink")
def cli() -> None:
    """Compile a large language model into a small, task-specific one.

    \b
    shrink distill --teacher ./teacher --data train.jsonl --out student --layers 4
    shrink export student --target gguf --quant Q4_K_M --out student-q4
    shrink export student --target phone --eval eval.jsonl --out phone-bundle
    shrink eval student-q4 --data eval.jsonl --teacher ./teacher
    shrink run student-q4 "Review: works great\\nSentiment:"
    shrink check build --baseline ci/baseline.json --junit check.xml
    """


def metric_option(command):
    from shrink.metrics import METRIC_NAMES

    return click.option("--metric", type=click.Choice(METRIC_NAMES), default=None,
                        help="How answers are scored.  [default: choice for rows with choices, else exact]")(command)


def generation_options(command):
    """--max-new-tokens, --stop and --chat-template: how answers are written."""
    for option in reversed([
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Most tokens a generated answer may have."),
        click.option("--stop", multiple=True, metavar="TEXT",
                     help="Stop an answer before this text (repeatable; --stop '' for none).  "
                          "[default: a newline for raw prompts; chats stop at their end-of-turn token]"),
        click.option("--chat-template", metavar="auto|none|FILE", default=None,
                     help="Render rows as chats: auto (the teacher's template, else the model's), none (raw prompts), "
                          "or a Jinja file.  [default: auto when rows hold messages]"),
    ]):
        command = option(command)
    return command


def generation(max_new_tokens: int, stop: tuple[str, ...]):
    from shrink.evaluate import Generation

    return Generation(max_new_tokens=max_new_tokens, stop=tuple(stop) if stop else None)


def _config_options(command):
    """One option per field of DistillConfig (shrink.distill.config), in field order:
    `--field-name` (or the field's `flag`), its type, default, choices and help text."""
    from shrink.distill.config import FIELDS, kind

    for f in reversed(FIELDS.values()):  # decorators apply bottom-up
        meta = f.metadata
        if not meta["cli"]:
            continue
        want, required = kind(f.name), f.default is dataclasses.MISSING
        kw: dict = {"help": meta["help"] + ("  [required, here or in --config]" if required else "")}
        if want is bool:
            kw["is_flag"] = True
        elif want is tuple:  # of paths: a repeatable option
            kw.update(type=Path, multiple=True)
        else:
            kw["type"] = click.Choice(meta["choices"]) if meta["choices"] else want
            if f.default not in (None, dataclasses.MISSING):
                kw.update(default=f.default, show_default=True)
        command = click.option(meta["flag"] or "--" + f.name.replace("_", "-"), f.name, **kw)(command)
    return command


@cli.command()
@click.option("--config", "config_file", type=Path,
              help="TOML file of these options by field name (batch_size = 8, eval_data = \"eval.jsonl\"); "
                   "options given here override it; relative paths are relative to its folder.")
@_config_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
def distill(config_file, as_json, **options):
    """Train a smaller student that imitates the teacher on a task.

    The student is the teacher with LAYERS decoder layers kept (evenly spaced, or the
    most important on the task), optionally narrowed (--ffn-ratio, --heads-ratio,
    --hidden-size), or an existing smaller model (--student). --max-size-mb (or
    --for-target) chooses the layers and hidden size that fit a GGUF file size instead. It learns from the teacher's token distributions
    on the completion tokens (--loss at TEMPERATURE) mixed with cross-entropy on the
    reference completions. --prune-vocab shrinks the vocabulary to the tokens of the
    training data (and --vocab-data). --resume continues an interrupted run when its
    inputs are byte for byte the same. --config reads the options from a TOML file
    (keys: the options' names with underscores, --eval's is eval_data), and options
    given on the command line override it.

    \b
    Examples:
      shrink distill --teacher ./teacher --data train.jsonl --eval eval.jsonl \\
          --out student --layers 4 --epochs 3
      shrink distill --teacher ./teacher --data train.jsonl --out student --layers 6 \\
          --layer-selection importance --ffn-ratio 0.5 --loss jsd
      shrink distill --teacher ./teacher --data train.jsonl --out student --layers 4 \\
          --prune-vocab --vocab-data unlabeled-reviews.txt
      shrink distill --teacher ./teacher --data train.jsonl --out student --prune-vocab \\
          --max-size-mb 20 --quant Q4_K_M
      torchrun --nproc_per_node 4 -m shrink distill --teacher ./teacher \\
          --data train.jsonl --out student --layers 4 --batch-size 32
      shrink distill --config distill.toml --steps 20 --out quick-student
    """
    from shrink.distill.config import FIELDS, DistillConfig, merge, read_file
    from shrink.distill.train import distill as run_distill

    ctx = click.get_current_context()
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    if "steps" in given and "epochs" in given:
        raise click.UsageError("--steps and --epochs cannot be used together")
    values = merge(read_file(config_file) if config_file else {}, given)
    for param in ctx.command.params:
        if param.name in FIELDS and FIELDS[param.name].default is dataclasses.MISSING and param.name not in values:
            raise click.MissingParameter(ctx=ctx, param=param)
    cfg = DistillConfig(**values)
    manifest = run_distill(cfg)
    _report_artifact(cfg.out, manifest, as_json)


@cli.command()
@click.option("--teacher", required=True, type=Path, help="Teacher: a Hugging Face model folder or a GGUF file (run in llama.cpp as it is).")
@click.option("--data", required=True, type=Path, help="Inputs (JSONL): rows with a prompt or messages; other keys are kept.")
@click.option("--out", required=True, type=Path, help="Labeled task file to write (JSONL); its manifest goes beside it.")
@click.option("--teacher-prefix", type=Path, help="Text file put before every prompt for the teacher (few-shot examples); the output keeps the prompts as they were.")
@generation_options
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Answers per input (distinct ones kept, each a row), sampled at --temperature: more diverse training data.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy answers; above 0: sampled from softmax(logits / temperature).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Below 1: sample from the most probable tokens that hold this much probability (nucleus sampling).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Leave out rows the teacher is less sure of (choice probability, or its answer's mean token probability).")
@click.option("--copied-only", is_flag=True,
              help="Extraction tasks: leave out answers not copied from their input (a JSON answer with a string "
                   "value the input lacks; any other answer the input lacks whole).")
@click.option("--threads", type=int, help="CPU threads for llama.cpp.  [default: all cores]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="For a torch teacher.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
def label(teacher, data, out, teacher_prefix, max_new_tokens, stop, chat_template, samples, temperature, top_p, seed,
          min_confidence, copied_only, threads, device, as_json):
    """Let the teacher answer the inputs: a task file to distill on.

    Rows with `choices` get the teacher's most probable choice; the others its greedy
    answer (up to --max-new-tokens), or --samples answers sampled at --temperature (and
    --top-p). Each labeled row gets a `confidence`. Stopped runs continue where they
    stopped when started again with the same inputs and settings.

    \b
    Examples:
      shrink label --teacher teacher.gguf --data inputs.jsonl --teacher-prefix shots.txt --out labeled.jsonl
      shrink label --teacher ./chat-teacher --data chats.jsonl --chat-template auto --min-confidence 0.5 --out labeled.jsonl
      shrink label --teacher teacher.gguf --data messages.jsonl --teacher-prefix shots.txt --copied-only --out labeled.jsonl
      shrink distill --teacher teacher.gguf --data labeled.jsonl --layers 4 --out student
    """
    from shrink.label import LabelConfig, label as run_label, label_summary

    cfg = LabelConfig(teacher=teacher, data=data, out=out, teacher_prefix=teacher_prefix, chat_template=chat_template,
                      max_new_tokens=max_new_tokens, stop=tuple(stop) if stop else None, min_confidence=min_confidence,
                      copied_only=copied_only, samples=samples, temperature=temperature, top_p=top_p, seed=seed,
                      threads=threads, device=device)
    manifest = run_label(cfg)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
    else:
        click.echo(label_summary(cfg, manifest), err=True)


@cli.command("teacher-cache")
@click.option("--teacher", required=True, type=Path, help="Teacher: a Hugging Face model folder or a GGUF file.")
@click.option("--data", required=True, type=Path, help="Training task data (JSONL): the file distill will train on.")
@click.option("--out", required=True, type=Path, help="Cache folder to write.")
@click.option("--top-k", default=64, show_default=True, help="Next tokens kept per position (the rest is kept as one mass).")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per teacher forward pass.")
@click.option("--max-length", default=512, show_default=True, help="Tokens per sequence, as distill's --max-length.")
@click.option("--teacher-prefix", type=Path, help="Text file put before every prompt for the teacher, as distill's --teacher-prefix.")
@click.option("--loss-on", type=click.Choice(LOSS_ON), default="completion", show_default=True,
              help="Positions kept, as distill's --loss-on: the completion's, or the prompt's too.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
def teacher_cache(teacher, data, out, top_k, batch_size, max_length, teacher_prefix, loss_on, device, force, as_json):
    """Run the teacher once over the task data and keep its top-k next-token log-probs.

    `shrink distill --teacher-cache OUT` then trains without running the teacher: the
    top-k log-probs are used as they are and the rest of the probability mass is spread
    evenly over the other tokens (exact with --top-k at the vocabulary size). Under
    torchrun every process runs the teacher on its share of the data and writes its own
    shard; OUT must be on a filesystem they all see. The manifest identifies the teacher
    (its weights, config and tokenizer), the data and the prefix by sha256: distill
    refuses a cache made from other bytes, or for another --loss-on.

    \b
    Example:
      shrink teacher-cache --teacher ./teacher --data train.jsonl --top-k 64 --out teacher-cache
      shrink distill --teacher ./teacher --teacher-cache teacher-cache --data train.jsonl \\
          --out student --layers 4
    """
    from shrink.distill.teacher_cache import CacheConfig, build_cache, describe

    cfg = CacheConfig(teacher=teacher, data=data, out=out, top_k=top_k, batch_size=batch_size,
                      max_length=max_length, teacher_prefix=teacher_prefix, loss_on=loss_on, device=device,
                      force=force)
    manifest = build_cache(cfg)
    if manifest is not None and not as_json:
        click.echo(describe(manifest), err=True)
    _report_artifact(out, manifest, as_json)


@cli.command()
@click.argument("student", type=Path)
@click.option("--target", required=True, help="A format (gguf, onnx, gptq, executorch) or a device target from targets.toml (laptop, phone, phone-pte, cpu-server, gpu-server, ...).")
@click.option("--targets", "targets_file", type=Path, help="Device targets file.  [default: the one shipped with shrink]")
@click.option("--quant", help="GGUF type (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, ...; default Q4_K_M), ONNX weights (fp32, int8, int4; default int8) or ExecuTorch (fp32, 8da8w, 8da4w; default 8da4w).")
@click.option("--bits", type=click.Choice(["4", "8"]), help="GPTQ bits per weight.  [default: 4]")
@click.option("--group-size", type=int, help="GPTQ, ExecuTorch 8da4w/8da8w: weights sharing one scale (-1: one per output channel).  [default: GPTQ 128, 8da4w 32, 8da8w -1]")
@click.option("--desc-act", is_flag=True, default=None, help="GPTQ: quantize columns by decreasing activation (more accurate, slower kernels).")
@click.option("--calibration", type=Path, help="GPTQ, GGUF --imatrix: task data to calibrate on.  [default: the student's training data, else --eval]")
@click.option("--imatrix", is_flag=True, default=None, help="GGUF: quantize with an importance matrix computed from the task's data (needed by IQ1/IQ2/IQ3_XXS types).")
@click.option("--embedding-type", help="GGUF: the token embedding's own type (Q4_0, IQ4_NL, Q5_0, Q8_0, ...; llama-quantize's --token-embedding-type) instead of llama.cpp's choice (Q8_0 or Q6_K when tied to the output). Its rows must fit the type's blocks (32 values; 256 for k-quants).")
@click.option("--max-context", type=int, help="ExecuTorch: tokens of the static KV cache, prompt and output together.  [default: 2048, or the model's max_position_embeddings when smaller]")
@click.option("--eval", "eval_data", type=Path, help="Task data to evaluate the export on, through its runtime.")
@metric_option
@click.option("--out", required=True, type=Path, help="Artifact folder to write.")
@click.option("--threads", type=int, help="CPU threads for quantizing and evaluating.  [default: all cores]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where GPTQ quantizes and runs.")
@click.option("--min-top1", type=float, help="Parity: least top-1 agreement with the student.  [default: per type]")
@click.option("--max-kl", type=float, help="Parity: largest mean KL(student || export).  [default: per type]")
@click.option("--strict-tokenizer", is_flag=True, help="Parity: token ids that differ from the student's on the drift suite (texts beyond the evaluation prompts) make the export not valid, instead of a warning.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
def export(student, target, targets_file, quant, bits, group_size, desc_act, calibration, imatrix, embedding_type,
           max_context, eval_data, metric, out, threads, device, min_top1, max_kl, strict_tokenizer, force, as_json):
    """Quantize a student for deployment and package it as an artifact.

    \b
    gguf  llama.cpp's converter and quantizer (--quant Q4_K_M, ...); runs in llama.cpp.
    onnx  an ONNX graph with past key/values (--quant fp32|int8|int4); runs in onnxruntime.
    gptq  GPTQModel, calibrated on the task (--bits, --group-size); runs in transformers.
    executorch  a .pte with a static KV cache (--quant fp32|8da8w|8da4w, --max-context);
          runs in ExecuTorch's runtime (XNNPACK), as in an Android or iOS app.

    With --eval the artifact is evaluated through its runtime and checked against the
    student (token ids, top-1 agreement, KL); an export that fails the check is marked
    not valid and the command exits 1. Token ids are also compared on a fixed drift
    suite of varied texts: a difference there is a warning (--strict-tokenizer: a failure).

    A device target (`shrink targets` lists them) builds every rung of its ladder,
    measures size, peak RAM, examples/s and accuracy through the runtime, and writes a
    bundle of the smallest artifact that meets every constraint (exit 1 when none does).

    \b
    Examples:
      shrink export student --target gguf --quant Q4_K_M --eval eval.jsonl --out student-q4
      shrink export student --target gguf --quant Q4_K_M --embedding-type Q4_0 --eval eval.jsonl --out student-q4e
      shrink export student --target onnx --quant int8 --eval eval.jsonl --out student-onnx
      shrink export student --target gptq --bits 4 --eval eval.jsonl --out student-gptq
      shrink export student --target executorch --quant 8da4w --max-context 1024 --eval eval.jsonl --out student-pte
      shrink export student --target phone --eval eval.jsonl --out phone-bundle
    """
    from shrink.export.flow import TARGETS, ExportOptions, export as run_export

    if target not in TARGETS:
        from shrink.export.device_target import export_for_target
        from shrink.targets import DEFAULT_FILE, get_target

        given = {"--quant": quant, "--bits": bits, "--group-size": group_size, "--desc-act": desc_act,
                 "--calibration": calibration, "--imatrix": imatrix, "--embedding-type": embedding_type,
                 "--max-context": max_context, "--threads": threads,
                 "--min-top1": min_top1, "--max-kl": max_kl}
        clash = [flag for flag, value in given.items() if value is not None]
        device_target = get_target(target, targets_file)
        if strict_tokenizer:
            raise click.UsageError("--strict-tokenizer: for a format target; a device target's parity records "
                                   "the drift suite without failing on it")
        if clash:
            raise click.UsageError(f"{', '.join(clash)}: a device target's ladder and settings decide these "
                                   f"(edit its entry in targets.toml)")
        if metric is not None:
            raise click.UsageError("--metric: for a format target; device targets score with the default metric "
                                   "(choice, or exact for generated answers)")
        manifest = export_for_target(student, out, device_target, eval_data, targets_file or DEFAULT_FILE, force=force)
        _report_artifact(out, manifest, as_json)
        return
    if targets_file is not None:
        raise click.UsageError(f"--targets: --target {target} is a format, not a device target")
    opts = ExportOptions(target=target, quant=quant, bits=None if bits is None else int(bits), group_size=group_size,
                         desc_act=desc_act, calibration=calibration, imatrix=imatrix, embedding_type=embedding_type,
                         threads=threads, device=device,
                         metric=metric, max_context=max_context)
    manifest = run_export(student, out, opts, eval_data=eval_data, force=force, min_top1=min_top1, max_kl=max_kl,
                          strict_tokenizer=strict_tokenizer)
    _report_artifact(out, manifest, as_json)


@cli.command("eval")
@click.argument("artifact", type=Path)
@click.option("--data", required=True, type=Path, help="Task data (JSONL).")
@click.option("--teacher", type=Path, help="Teacher folder or GGUF file: also measure its accuracy and the retention.")
@click.option("--teacher-prefix", type=Path, help="Text file put before every prompt for the teacher only (as in distill).")
@click.option("--teacher-runtime", type=click.Choice(["auto", "torch"]), default="auto", show_default=True,
              help="auto: the teacher as it is served (a GGUF file in llama.cpp, a folder in torch); torch: a GGUF teacher's dequantized copy in torch.")
@click.option("--threads", type=int, help="CPU threads for llama.cpp, onnxruntime and ExecuTorch.  [default: all cores]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="For torch models.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing a shrink artifact's (and teacher's) files against the manifest (trusted builds, for speed).")
@metric_option
@generation_options
@click.option("--reference", type=click.Choice(["labels", "teacher"]), default="labels", show_default=True,
              help="Score against the data's answers, or against the teacher's (agreement: data without answers needs no labels).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def eval_cmd(artifact, data, teacher, teacher_prefix, teacher_runtime, threads, device, no_verify, metric,
             max_new_tokens, stop, chat_template, reference, as_json):
    """Measure the task's score through the artifact's own runtime.

    A Hugging Face folder runs in torch (a GPTQ one through GPTQModel's kernels), a GGUF
    artifact in llama.cpp, an ONNX one in onnxruntime, a .pte in ExecuTorch. Examples with
    choices are scored by log-probability; others by --metric (default exact match) on the
    greedy output.
    The teacher runs the same way: a GGUF teacher in llama.cpp, as its users serve it.
    A shrink artifact (and a --teacher that is one) is first checked against its
    manifest: a changed file exits 1 naming it.

    \b
    Examples:
      shrink eval student-q4 --data eval.jsonl --teacher ./teacher --json
      shrink eval student-q4 --data eval.jsonl --teacher teacher-Q4_K_M.gguf --teacher-prefix shots.txt
      shrink eval student-q4 --data test.jsonl --metric json --max-new-tokens 48
      shrink eval student-q4 --data inputs.jsonl --teacher ./teacher --reference teacher --metric chrf
    """
    from shrink.evaluate import evaluate_path

    result = evaluate_path(artifact, data, teacher=teacher, teacher_prefix=teacher_prefix,
                           teacher_runtime=teacher_runtime, threads=threads, device=device, skip_verify=no_verify,
                           metric=metric, generation=generation(max_new_tokens, stop), chat_template=chat_template,
                           reference=reference)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from shrink.tables import print_eval_table

        print_eval_table(result)


@cli.command()
@click.argument("artifact", type=Path)
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, help="Most tokens to generate.")
@click.option("--threads", type=int, help="CPU threads for llama.cpp, onnxruntime and ExecuTorch.  [default: all cores]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="For torch models.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the artifact's files against its manifest (trusted builds, for speed).")
@click.option("--truncate", is_flag=True, help="Cut a prompt too long for the context from the left, leaving MAX_TOKENS of room (said on stderr), instead of refusing it.")
@click.option("--chat-template", metavar="auto|none|FILE", default="none", show_default=True,
              help="Send PROMPT as a user's chat message, rendered by the artifact's template (auto) or a Jinja file; the answer ends at the template's end of turn.")
def run(artifact, prompt, max_tokens, threads, device, no_verify, truncate, chat_template):
    """Generate a completion of PROMPT greedily with the artifact's runtime.

    Generation ends at the model's end-of-generation tokens (its generation config's
    EOS ids and the tokenizer's EOS), the same in every runtime. A prompt longer than
    the runtime's context (llama.cpp's n_ctx, a .pte's KV cache, else the model's
    max_position_embeddings) is refused unless --truncate. A shrink artifact is first
    checked against its manifest: a changed file exits 1 naming it.

    \b
    Examples:
      shrink run student-q4 "Review: the battery died in a day\\nSentiment:" --max-tokens 4
      shrink run chat-student-q4 "Where is my order K2961?" --chat-template auto
    """
    from shrink.artifact import verify_before_use
    from shrink.chat import check_messages, render, resolve_template, turn_end
    from shrink.evaluate import turn_end_ids
    from shrink.runtime import open_runtime
    from shrink.runtime.base import fit_context

    if max_tokens < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-tokens")
    template = resolve_template(chat_template, artifact)
    verify_before_use(artifact, skip=no_verify)
    rt = open_runtime(artifact, device=device, threads=threads)
    try:
        stop_ids = frozenset()
        if template is not None:
            text = render(template, check_messages([{"role": "user", "content": prompt}], "PROMPT")).prompt
            prompt, stop_ids = rt.encode(text, True), turn_end_ids(rt, turn_end(template))
        ids, note = fit_context(rt, prompt, max_tokens, truncate)
        if note:
            click.echo(f"note: {note}", err=True)
        click.echo(rt.generate(ids, max_tokens, stop_ids=stop_ids))
    finally:
        rt.close()


@cli.command()
@click.option("--out", default="demo-out", show_default=True, type=Path, help="Folder for the data, models and results.")
@click.option("--teacher", type=Path, help="Use another teacher (folder or GGUF).  [default: Gemma 3 270M from its PyPI package]")
@click.option("--task", type=click.Choice(["sentiment", "extract"]), default="sentiment", show_default=True,
              help="sentiment: labeled reviews, a choice; extract: support messages without answers, labeled by the teacher, answered as JSON.")
@click.option("--layers", type=int, help="Decoder layers the student keeps.  [default: the task's recipe]")
@click.option("--epochs", type=float, help="Passes over the training data (1,201 reviews; 1,200 messages).  "
              "[default: the task's recipe]")
@click.option("--threads", type=int, help="CPU threads for llama.cpp.  [default: all cores]")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def demo(out, teacher, task, layers, epochs, threads, force, as_json):
    """Run the whole pipeline on the built-in example.

    Gemma 3 270M is distilled into a small student for the sentiment of customer
    reviews (a dataset shipped with shrink, split into train, dev and test), with its
    vocabulary pruned to the training text. The student is exported to GGUF Q8_0 and
    Q4_K_M, and the teacher (in transformers, and as served: its GGUF in llama.cpp with
    its few-shot prompt), the student and each GGUF are evaluated through their own
    runtimes on the test split, which no setting was tuned on. Writes results.json and
    accuracy_vs_size.png into OUT. Needs: pip install 'shrink[demo]'.

    With --task extract, the training inputs (support messages) have no answers: the
    teacher's GGUF labels them in llama.cpp (`shrink label`), and every model is scored
    field by field on JSON answers (--metric json), on test messages written with other
    phrasings, names and cities than the training ones.

    \b
    Examples:
      shrink demo --out demo-out
      shrink demo --task extract --out demo-extract
    """
    from shrink.demo.pipeline import DemoConfig, run_demo
    from shrink.demo.report import print_table

    result = run_demo(DemoConfig(out=out, teacher=teacher, task=task, layers=layers, epochs=epochs, threads=threads,
                                 force=force))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    print_table(result)
    console_note = f"results: {out / 'results.json'}, plot: {out / 'accuracy_vs_size.png'}"
    click.echo(console_note, err=True)


@cli.command()
@click.argument("build_dir", type=Path)
@click.option("--baseline", required=True, type=Path, help="Baseline file (JSON, committed with the code).")
@click.option("--accuracy-tolerance", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Largest accuracy drop allowed, absolute (0.01 = one percentage point).")
@click.option("--retention-tolerance", type=click.FloatRange(min=0),
              help="Largest retention drop allowed, absolute.  [default: the accuracy tolerance]")
@click.option("--size-tolerance", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Largest size growth allowed, relative (0.05 = 5%).")
@click.option("--speed-tolerance", type=click.FloatRange(min=0, max=1), default=0.2, show_default=True,
              help="Largest examples/s slowdown allowed with --check-speed, relative.")
@click.option("--check-speed", is_flag=True, help="Also fail on slower examples/s (off by default: CI machines are noisy).")
@click.option("--update", is_flag=True, help="Write the baseline from this build instead of checking, and exit 0.")
@click.option("--junit", type=Path, help="Also write the results as JUnit XML to this file.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing each artifact's files against its manifest (trusted builds, for speed).")
@click.option("--json", "as_json", is_flag=True, help="Print the results (or, with --update, the baseline) as JSON on stdout.")
def check(build_dir, baseline, accuracy_tolerance, retention_tolerance, size_tolerance, speed_tolerance,
          check_speed, update, junit, no_verify, as_json):
    """Compare a build's artifacts with a committed baseline: the CI gate.

    Reads the manifest of every artifact under BUILD_DIR, re-hashes its files, and fails
    (exit code 1) when a file differs from its manifest; when an artifact's accuracy was
    measured on another evaluation file than the baseline's; when its accuracy or
    retention fell, or its size grew, by more than the tolerance; when an artifact that
    was valid is not, a device-target constraint that was met is not, or an artifact of
    the baseline is missing. examples/s is compared only with --check-speed. New
    artifacts and metrics measured on one side only are reported, not failed, except an
    accuracy the build no longer measures. A table goes to stderr; with
    $GITHUB_STEP_SUMMARY set, a Markdown summary is appended to it. --update refuses a
    build whose files differ from their manifests.

    \b
    Examples:
      shrink check build --baseline ci/baseline.json --update
      shrink check build --baseline ci/baseline.json --junit check.xml
    """
    from shrink import check as gate

    if update:
        if junit is not None or check_speed:
            raise click.UsageError("--update writes the baseline and checks nothing: leave out --junit and --check-speed")
        new, changes = gate.update_baseline(build_dir, baseline, skip_verify=no_verify)
        if as_json:
            click.echo(json.dumps(new, indent=2))
        for line in changes or ["no change"]:
            click.echo(line, err=True)
        click.echo(f"baseline {baseline} written: {len(new['artifacts'])} artifacts", err=True)
        return
    tol = gate.Tolerances(accuracy=accuracy_tolerance,
                          retention=accuracy_tolerance if retention_tolerance is None else retention_tolerance,
                          size=size_tolerance, speed=speed_tolerance, check_speed=check_speed)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    result = gate.check_build(build_dir, baseline, tol, junit=junit, step_summary=Path(summary) if summary else None,
                              skip_verify=no_verify)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    gate.print_rows(result)
    if not result.passed:
        raise gate.CheckFailed(gate.summary_line(result))


@cli.command()
@click.argument("build_dir", type=Path)
@click.option("--out", type=Path, help="Folder for report.md and pareto.png.  [default: BUILD_DIR]")
def report(build_dir, out):
    """Write a Markdown report and an accuracy-against-size plot of a build.

    report.md holds the plot and a table of every artifact under BUILD_DIR (and the
    teacher, from a student's manifest). pareto.png plots accuracy against size (log
    axis) with the Pareto front: the artifacts no smaller, more accurate one beats.
    Needs matplotlib.

    \b
    Example:
      shrink report build --out build-report
    """
    from shrink.report import write_report

    res = write_report(build_dir, out)
    click.echo(f"report: {res['report']}, plot: {res['plot']}", err=True)


@cli.command()
@click.option("--targets", "targets_file", type=Path, help="Device targets file.  [default: the one shipped with shrink]")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON on stdout.")
def targets(targets_file, as_json):
    """List the device targets: runtime, ladder and constraints.

    \b
    Example:
      shrink targets --targets my-targets.toml
    """
    from shrink.targets import load_targets

    found = load_targets(targets_file)
    if as_json:
        click.echo(json.dumps({name: t.to_dict() for name, t in found.items()}, indent=2))
        return
    from shrink.tables import print_targets

    print_targets(found)


@cli.command()
@click.argument("bundle", type=Path)
@click.option("--json", "as_json", is_flag=True, help="Print the problems found as JSON on stdout.")
def verify(bundle, as_json):
    """Re-check every file of an artifact or bundle against its manifest's sha256.

    Exits 1 naming each changed, missing or unlisted file.

    \b
    Example:
      shrink verify phone-bundle
    """
    from shrink import artifact

    problems = artifact.verify(bundle)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "intact": not problems, "problems": problems}, indent=2))
    if problems:
        raise artifact.VerifyError(f"{bundle}: {len(problems)} problem(s): " + "; ".join(problems))
    if not as_json:
        click.echo(f"{bundle}: all {len(Manifest.read(bundle).files)} files match the manifest", err=True)


def _report_artifact(out: Path, manifest: Manifest | None, as_json: bool) -> None:
    if manifest is None:  # a torchrun process other than rank 0: rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    from shrink.tables import print_artifact_summary

    print_artifact_summary(out, manifest)


def main() -> None:
    cli(prog_name="shrink")


if __name__ == "__main__":
    main()
