"""A device bundle: the chosen artifact, ready to hand over.

The folder holds the model file(s), `manifest.json` (hashes, the provenance chain
teacher -> student -> artifact, metrics, the target and each constraint met or not),
a README model card, an Ollama `Modelfile` for GGUF bundles and `run.py`, a minimal run
example in the runtime's own API. `shrink verify BUNDLE` re-checks every hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.tables import human_bytes, pct

EXAMPLE_PROMPT_FALLBACK = "Hello"


def write_bundle(folder: Path, name: str, student: Path, target, chosen, candidates, baseline: dict,
                 source_manifest: dict | None, *, targets_file: Path, eval_data: Path,
                 thread_note: str | None) -> dict[str, Any]:
    """Write the bundle's own files into the staging `folder` (which already holds the
    model files), then the manifest, last. `name`: the bundle folder's final name."""
    from shrink.tasks import load_task

    prompt = load_task(eval_data)[0].prompt
    target_section = {
        **target.to_dict(),
        "file": str(targets_file),
        "file_sha256": artifact.sha256_file(targets_file),
        "constraints": chosen.checks,
        "met": chosen.met,
        "measured_threads_note": thread_note,
    }
    provenance = _provenance(student, source_manifest, chosen)
    metrics = {
        **chosen.figures,
        "weights_bytes": chosen.size_bytes,
        "teacher_accuracy": baseline["teacher_accuracy"],
        "student_accuracy": baseline["student_accuracy"],
        "eval_data_sha256": artifact.sha256_file(eval_data),
        "parity": chosen.parity,
        "candidates": [{"format": c.format, "quant": c.quant, "size_bytes": c.size_bytes, **c.figures,
                        "met": c.met, "failed": c.failures()} for c in candidates],
    }
    settings = {"target": target.name, "format": chosen.format, "quant": chosen.quant, **chosen.settings}
    model_files = sorted(p.name for p in folder.iterdir())
    if chosen.format == "gguf":
        (folder / "Modelfile").write_text(modelfile(_gguf_name(folder), target), encoding="utf-8")
    (folder / "run.py").write_text(run_example(chosen.format, folder, prompt, target), encoding="utf-8")
    (folder / "README.md").write_text(
        model_card(name, target_section, provenance, metrics, chosen, model_files, prompt), encoding="utf-8")
    return artifact.finish(folder, kind="bundle", format=chosen.format, source=student, settings=settings,
                           metrics=metrics, valid=bool(chosen.parity and chosen.parity["passed"]),
                           extra={"target": target_section, "provenance": provenance})


def _gguf_name(folder: Path) -> str:
    return next(p.name for p in folder.glob("*.gguf"))


def _provenance(student: Path, source_manifest: dict | None, chosen) -> list[dict[str, Any]]:
    """teacher -> student -> artifact, each with what identifies it."""
    s = (source_manifest or {}).get("settings") or {}
    teacher = ((source_manifest or {}).get("source") or {}).get("path")
    chain = []
    if teacher:
        chain.append({"stage": "teacher", "path": teacher, "cached_folder": s.get("teacher_folder")})
    chain.append({"stage": "student", "path": str(student), "manifest_sha256": artifact.manifest_hash(student),
                  "layers_kept": s.get("layers_kept"), "steps": s.get("steps"), "data": s.get("data"),
                  "data_sha256": s.get("data_sha256")})
    chain.append({"stage": "artifact", "format": chosen.format, "quant": chosen.quant})
    return chain


def modelfile(gguf: str, target) -> str:
    """Ollama: `ollama create NAME -f Modelfile`. The prompt is passed through as is
    (the student was trained on raw task prompts, not a chat template); greedy decoding."""
    lines = [f"FROM ./{gguf}", 'TEMPLATE """{{ .Prompt }}"""', "PARAMETER temperature 0"]
    if target.context_length:
        lines.append(f"PARAMETER num_ctx {target.context_length}")
    if target.threads:
        lines.append(f"PARAMETER num_thread {target.threads}")
    return "\n".join(lines) + "\n"


def run_example(fmt: str, folder: Path, prompt: str, target) -> str:
    """A minimal script in the serving runtime's own API (shrink itself for ONNX, whose
    generation loop with past key/values is shrink.runtime.onnx_runtime)."""
    threads = target.threads or "None"
    head = f'"""Run this bundle: python run.py ["PROMPT"]"""\nimport sys\nfrom pathlib import Path\n\n' \
           f"here = Path(__file__).parent\nprompt = sys.argv[1] if len(sys.argv) > 1 else {prompt!r}\n"
    if fmt == "gguf":
        return head + (
            "from llama_cpp import Llama\n\n"
            f"llm = Llama(model_path=str(here / {_gguf_name(folder)!r}), n_ctx={target.context_length or 0}, "
            f"n_threads={threads}, verbose=False)\n"
            'out = llm(prompt, max_tokens=16, temperature=0.0, stop=["\\n"])\n'
            'print(out["choices"][0]["text"])\n')
    if fmt == "gptq":
        return head + (
            "from transformers import AutoModelForCausalLM, AutoTokenizer  # needs gptqmodel and optimum\n\n"
            "tok = AutoTokenizer.from_pretrained(here)\n"
            f"model = AutoModelForCausalLM.from_pretrained(here, device_map={target.device!r})\n"
            "ids = tok(prompt, return_tensors='pt').to(model.device)\n"
            "out = model.generate(**ids, max_new_tokens=16, do_sample=False)\n"
            "print(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))\n")
    return head + (
        "from shrink.runtime.onnx_runtime import OnnxRuntime  # onnxruntime with past key/values\n\n"
        f"rt = OnnxRuntime(here, threads={threads})\n"
        "print(rt.generate(prompt, max_tokens=16, stop=('\\n',)))\n")


def model_card(name: str, target: dict, provenance: list[dict], metrics: dict, chosen, files: list[str],
               prompt: str) -> str:
    teacher = next((p["path"] for p in provenance if p["stage"] == "teacher"), None)
    student = next(p for p in provenance if p["stage"] == "student")
    if student.get("layers_kept"):
        made = (f"- Teacher: `{teacher}`.\n- Student: `{student['path']}`, {len(student['layers_kept'])} decoder "
                f"layers kept, {student.get('steps')} distillation steps on `{student.get('data')}`.")
    else:
        made = f"- Model: `{student['path']}` (not distilled by shrink: no provenance beyond it)."
    rows = [
        ("accuracy", pct(metrics.get("accuracy"))),
        ("teacher accuracy", pct(metrics.get("teacher_accuracy"))),
        ("retention (accuracy / teacher's)", pct(metrics.get("retention"))),
        ("unquantized student accuracy", pct(metrics.get("student_accuracy"))),
        ("model size", human_bytes(metrics.get("weights_bytes"))),
        ("peak RAM of the runtime", f"{metrics.get('peak_ram_mb', 0):,.0f} MB"),
        ("examples/s", f"{metrics.get('examples_per_s', 0):.1f} ({metrics.get('eval_runtime')}, "
                       f"{metrics.get('threads') or 'all'} threads)"),
    ]
    parity = metrics.get("parity") or {}
    if parity:
        rows.append(("parity with the student", f"top-1 {pct(parity.get('top1_agreement'))}, "
                                                 f"mean KL {parity.get('mean_kl')}"))
    constraints = "\n".join(
        f"| `{k}` | {json.dumps(c['limit'])} | {json.dumps(c['value'])} | {'met' if c['met'] else 'NOT met'} |"
        for k, c in target["constraints"].items())
    run = {
        "gguf": f"shrink run {name} \"{_escape(prompt)}\"\npython {name}/run.py\n"
                f"ollama create {name.lower()} -f {name}/Modelfile && ollama run {name.lower()}",
        "onnx": f"shrink run {name} \"{_escape(prompt)}\"\npython {name}/run.py",
        "gptq": f"shrink run {name} \"{_escape(prompt)}\"\npython {name}/run.py",
    }[chosen.format]
    figures = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# {name}

A task-specific student model built by [shrink](https://github.com/) for the
**{target['name']}** target ({target['description']}).

- Format: {chosen.format} {chosen.quant}, served by {target['runtime']}.
{made}

## Measured on the task

Through the runtime that serves it, on {metrics.get('eval_examples')} held-out examples:

| figure | value |
|---|---|
{figures}

## Target constraints

| constraint | limit | measured | |
|---|---|---|---|
{constraints}

## Run it

```bash
{run}
```

The prompt format is the task's: for example `{_escape(prompt)}`.

## Files

{chr(10).join(f'- `{f}`' for f in files)}
- `manifest.json`: sha256 of every file, provenance, settings and all figures;
  `shrink verify {name}` re-checks the hashes.
"""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
