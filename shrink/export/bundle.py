"""A device bundle: the chosen artifact, ready to hand over.

The folder holds the model file(s), `manifest.json` (hashes, the provenance chain
teacher -> student -> artifact, metrics, the target and each constraint met or not),
a README model card (for a .pte, how an Android or iOS app loads it), an Ollama
`Modelfile` for GGUF bundles and `run.py`, a minimal run example in the runtime's own API.
`shrink verify BUNDLE` re-checks every hash.

run.py is written into every candidate's folder before it is measured, since its peak
RAM is the peak of a process running that run.py; the chosen one ships as measured. Its
settings (context length, threads, logits) come from one `Serving` value, which the
Modelfile and the manifest record too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.manifest import Manifest
from shrink.tables import human_bytes, pct

RUN_SCRIPT = "run.py"


@dataclass(frozen=True)
class Serving:
    """How a bundle's run.py sets up its runtime, and so what its peak RAM is measured with."""

    runtime: str  # llama.cpp | onnxruntime | torch | executorch
    # Tokens of context: llama.cpp's n_ctx (its KV cache is allocated for all of them when
    # the model loads), onnxruntime's longest sequence (its past grows with the tokens
    # held), a .pte's static KV cache (exported with it); transformers has no fixed one.
    context_length: int
    threads: int | None  # CPU threads (None: the runtime's default)
    device: str  # torch (GPTQ): cpu | cuda
    # llama.cpp: keep every position's logits (False: the last one's, all generation needs);
    # None for the other runtimes, which have no such setting.
    logits_all: bool | None = None
    max_tokens: int = 16  # tokens run.py generates

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def serving(target) -> Serving:
    """The target's serving settings; without a context_length, llama.cpp runtime's default."""
    from shrink.runtime.llama_cpp import DEFAULT_CONTEXT

    return Serving(runtime=target.runtime, context_length=target.context_length or DEFAULT_CONTEXT,
                   threads=target.threads, device=target.device,
                   logits_all=False if target.runtime == "llama.cpp" else None)


def write_run_script(folder: Path, fmt: str, prompt: str, serve: Serving) -> Path:
    """run.py for the artifact in `folder`, whose default prompt is `prompt`."""
    path = folder / RUN_SCRIPT
    path.write_text(run_example(fmt, folder, prompt, serve), encoding="utf-8")
    return path


def write_bundle(folder: Path, name: str, student: Path, target, chosen, candidates, baseline: dict,
                 source_manifest: Manifest | None, *, serve: Serving, targets_file: Path, eval_data: Path,
                 thread_note: str | None) -> Manifest:
    """Write the bundle's own files into the staging `folder` (which already holds the
    model files and the run.py that was measured), then the manifest, last. `name`: the
    bundle folder's final name."""
    from shrink.tasks import parse_row

    first = next(line for line in Path(eval_data).read_text(encoding="utf-8").splitlines() if line.strip())
    row = parse_row(first, f"{eval_data}:1")
    prompt = row["prompt"] if "prompt" in row else row["messages"][0]["content"]  # what a user types
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
        "candidates": [{"format": c.format, "quant": c.quant, "size_bytes": c.size_bytes,
                        **({"embedding_type": c.settings["embedding_type"]} if c.settings.get("embedding_type") else {}),
                        **c.figures,
                        "met": c.met, "failed": c.failures()} for c in candidates],
    }
    settings = {"target": target.name, "format": chosen.format, "quant": chosen.quant, **chosen.settings}
    model_files = sorted(p.name for p in folder.iterdir())
    if chosen.format == "gguf":
        (folder / "Modelfile").write_text(modelfile(_gguf_name(folder), serve), encoding="utf-8")
    (folder / "README.md").write_text(
        model_card(name, target_section, provenance, metrics, chosen, model_files, prompt), encoding="utf-8")
    return artifact.finish(folder, kind="bundle", format=chosen.format, source=student, settings=settings,
                           metrics=metrics, valid=bool(chosen.parity and chosen.parity["passed"]),
                           target=target_section, provenance=provenance)


def _gguf_name(folder: Path) -> str:
    return next(p.name for p in folder.glob("*.gguf"))


def _provenance(student: Path, source_manifest: Manifest | None, chosen) -> list[dict[str, Any]]:
    """teacher -> student -> artifact, each with what identifies it."""
    s = source_manifest.settings if source_manifest else {}
    teacher = source_manifest.source.path if source_manifest and source_manifest.source else None
    chain = []
    if teacher:
        chain.append({"stage": "teacher", "path": teacher, "cached_folder": s.get("teacher_folder")})
    chain.append({"stage": "student", "path": str(student), "manifest_sha256": artifact.manifest_hash(student),
                  "layers_kept": s.get("layers_kept"), "steps": s.get("steps"), "data": s.get("data"),
                  "data_sha256": s.get("data_sha256")})
    chain.append({"stage": "artifact", "format": chosen.format, "quant": chosen.quant})
    return chain


def modelfile(gguf: str, serve: Serving) -> str:
    """Ollama: `ollama create NAME -f Modelfile`. The prompt is passed through as is
    (the student was trained on raw task prompts, not a chat template); greedy decoding."""
    lines = [f"FROM ./{gguf}", 'TEMPLATE """{{ .Prompt }}"""', "PARAMETER temperature 0",
             f"PARAMETER num_ctx {serve.context_length}"]
    if serve.threads:
        lines.append(f"PARAMETER num_thread {serve.threads}")
    return "\n".join(lines) + "\n"


def run_example(fmt: str, folder: Path, prompt: str, serve: Serving) -> str:
    """A minimal script in the serving runtime's own API (shrink itself for ONNX, whose
    generation loop with past key/values is shrink.runtime.onnx_runtime; for a .pte,
    ExecuTorch's Python runtime and the tokenizers library, as an app runs it), with
    `serve`'s settings: the ones its peak RAM is measured with."""
    threads = serve.threads or "None"
    head = ('"""Run this bundle: python run.py ["PROMPT"]\n\nThe settings below are the ones the bundle\'s '
            'peak RAM was measured with."""\nimport sys\nfrom pathlib import Path\n\n'
            f"here = Path(__file__).parent\nprompt = sys.argv[1] if len(sys.argv) > 1 else {prompt!r}\n")
    if fmt == "gguf":
        return head + GGUF_AMX + (
            f"llm = Llama(model_path=str(here / {_gguf_name(folder)!r}), n_ctx={serve.context_length}, "
            f"n_threads={threads}, n_threads_batch={threads}, logits_all={serve.logits_all}, verbose=False)\n"
            f'out = llm(prompt, max_tokens={serve.max_tokens}, temperature=0.0, stop=["\\n"])\n'
            'print(out["choices"][0]["text"])\n')
    if fmt == "pte":
        return head + PTE_RUN.format(threads=threads, max_tokens=serve.max_tokens)
    if fmt == "gptq":
        return head + (
            "from transformers import AutoModelForCausalLM, AutoTokenizer  # needs gptqmodel and optimum\n\n"
            "tok = AutoTokenizer.from_pretrained(here)\n"
            f"model = AutoModelForCausalLM.from_pretrained(here, device_map={serve.device!r})\n"
            "ids = tok(prompt, return_tensors='pt').to(model.device)\n"
            f"out = model.generate(**ids, max_new_tokens={serve.max_tokens}, do_sample=False)\n"
            "print(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))\n")
    return head + (
        "from shrink.runtime.onnx_runtime import OnnxRuntime  # onnxruntime with past key/values\n\n"
        f"rt = OnnxRuntime(here, threads={threads}, context_length={serve.context_length})\n"
        f"print(rt.generate(prompt, max_tokens={serve.max_tokens}, stop=('\\n',)))\n")


# run.py of a GGUF bundle starts with this: on an Intel CPU with AMX (Xeon Sapphire Rapids and
# later) llama.cpp's AMX weight buffers segfault on some models (ggml-org/llama.cpp#20824), and
# Llama() takes no argument to avoid them, so the default parameters it starts from are wrapped
# (shrink.runtime.llama_cpp.plain_weight_buffers does the same for shrink's own runs).
GGUF_AMX = """import llama_cpp
from llama_cpp import Llama

# llama.cpp's AMX weight buffers segfault on some models (ggml-org/llama.cpp#20824):
# on a CPU with AMX, keep the weights in plain CPU buffers (llama.cpp's --no-repack).
if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
    _defaults = llama_cpp.llama_cpp.llama_model_default_params

    def _plain_buffers():
        params = _defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = _plain_buffers

"""


# run.py of a .pte bundle: ExecuTorch's runtime, the prompt in calls of get_max_seq_len tokens
# (the prefill), then one token a call on top of the KV cache the program keeps.
PTE_RUN = '''import torch  # ExecuTorch's Python bindings take and return torch tensors
import executorch.kernels.quantized  # noqa: F401 - the 8-bit embedding kernel of 8da4w/8da8w
from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
from executorch.runtime import Runtime
from tokenizers import Tokenizer

threads = {threads}
if threads:
    _unsafe_reset_threadpool(threads)
program = Runtime.get().load_program(here / "model.pte")
forward = program.load_method("forward")
meta = {{name: program.load_method(name).execute([]) for name in ("get_max_seq_len", "get_eos_ids")}}
step, eos = meta["get_max_seq_len"][0], set(meta["get_eos_ids"])
tok = Tokenizer.from_file(str(here / "tokenizer.json"))
ids = tok.encode(prompt).ids
for start in range(0, len(ids), step):  # the prompt: logits (1, n, vocab)
    chunk = ids[start:start + step]
    logits = forward.execute([torch.tensor([chunk]), torch.arange(start, start + len(chunk))])[0]
out = []
for _ in range({max_tokens}):
    token = int(logits[0, -1].argmax())
    if token in eos:
        break
    out.append(token)
    logits = forward.execute([torch.tensor([[token]]), torch.tensor([len(ids) + len(out) - 1])])[0]
text = tok.decode(ids + out)[len(tok.decode(ids)):]
print(text.split("\\n")[0])
'''

def pte_apps(metadata: dict) -> str:
    """The model card's section for a .pte: how an Android or iOS app loads it, with
    ExecuTorch's LLM runner, from the metadata the export wrote into it."""
    bos = 1 if metadata.get("get_bos_id", -1) >= 0 else 0
    context = metadata.get("get_max_context_len")
    return f"""
### In an Android or iOS app

`model.pte` is an ExecuTorch program for its XNNPACK CPU backend: the app links ExecuTorch
with XNNPACK and its quantized kernels (the `executorch-android` AAR and the ExecuTorch
Swift package hold both). Beside `forward(tokens, positions) -> logits` the program holds
the metadata ExecuTorch's LLM runner reads (`get_max_context_len` {context}, `get_max_seq_len`,
`get_bos_id`, `get_eos_ids`, `get_vocab_size`, `use_kv_cache`, `enable_dynamic_shape`), so
the runner loads it with `tokenizer.json` and stops at the model's end-of-generation tokens:

- Android (Java or Kotlin, `org.pytorch.executorch.extension.llm`):
  `LlmModule module = new LlmModule(modelPath, tokenizerPath, 0.0f); module.load();` then
  `module.generate(prompt, LlmGenerationConfig.create().echo(false).numBos({bos}).build(), callback)`;
  the tokens arrive in `LlmCallback.onResult`.
- iOS (Swift, `import ExecuTorchLLM`):
  `let runner = TextLLMRunner(modelPath: modelPath, tokenizerPath: tokenizerPath, specialTokens: [])`,
  `try runner.load()`, then
  `try runner.generate(prompt, Config {{ $0.temperature = 0; $0.bosCount = {bos} }}) {{ token in ... }}`.

A prompt and its answer share the {context} tokens of the program's KV cache.
"""


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
        ("peak RAM of the runtime", f"{metrics.get('peak_ram_mb', 0):,.0f} MB ({_ram_settings(metrics)})"),
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
                f"ollama create {name.lower()} -f {name}/Modelfile && ollama run {name.lower()}\n"
                f"# an OpenAI-compatible server (pip install 'llama-cpp-python[server]'), or llama.cpp's own llama-server:\n"
                f"python -m llama_cpp.server --model {name}/{_gguf_name_of(files)} --host 127.0.0.1 --port 8000\n"
                f"llama-server -m {name}/{_gguf_name_of(files)} --port 8000",
        "onnx": f"shrink run {name} \"{_escape(prompt)}\"\npython {name}/run.py",
        "pte": f"shrink run {name} \"{_escape(prompt)}\"\npython {name}/run.py",
        "gptq": f"shrink run {name} \"{_escape(prompt)}\"\npython {name}/run.py",
    }[chosen.format]
    figures = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# {name}

A task-specific student model built by shrink (`shrink export --target`) for the
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

The prompt format is the task's: for example `{_escape(prompt)}`. A chat model's GGUF
carries its chat template: both servers apply it to `/v1/chat/completions` requests,
which the `openai` client sends (`base_url="http://127.0.0.1:8000/v1"`).
{pte_apps(chosen.settings.get("metadata", {})) if chosen.format == "pte" else ""}
## Files

{chr(10).join(f'- `{f}`' for f in files)}
- `manifest.json`: sha256 of every file, provenance, settings and all figures;
  `shrink verify {name}` re-checks the hashes.
"""


def _gguf_name_of(files: list[str]) -> str:
    return next((f for f in files if f.endswith(".gguf")), "model.gguf")


def _ram_settings(metrics: dict) -> str:
    serve = metrics.get("ram_measured_with") or {}
    return f"running run.py: context {serve.get('context_length')} tokens, threads {serve.get('threads') or 'default'}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
