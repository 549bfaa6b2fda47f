"""Where the teacher holds the demo's sentiment: a linear probe on each layer's hidden state.

    pip install -e '.[bench]'
    python bench/layer_probe.py [--cut 6:0.25 ...] [--json]

For every layer of the demo teacher (Gemma 3 270M, its GGUF dequantized in torch, the
student's prompt without the teacher's few-shot prefix), the hidden state of each review
is taken at the prompt's last token (where a causal student answers) and averaged over
the prompt's tokens. A logistic regression (scikit-learn, standardized features) is
fitted on the training split's labels and scored on the dev split; nothing is tuned on
test, which this script never reads. `--cut LAYERS:FFN_RATIO[:HIDDEN][:heads=R]` also
probes the last layer of a student cut from the teacher's first LAYERS layers, narrowed
as `shrink distill --layer-selection first --ffn-ratio R [--hidden-size H] [--heads-ratio
R]` narrows it (`--refit`: with --ffn-refit; `--scores fisher`: --width-scores fisher), before any training: what width pruning
leaves for distillation to recover. `--no-teacher` skips the teacher's own layers.
`--student-vocab TOP` probes the teacher's layers again, reading each review in the
pieces of a student's pruned vocabulary (`--prune-vocab --vocab-top TOP` on the training
split): what the vocabulary alone costs the reading, before any layer is cut.

It answers where a cut student's layers should come from (issue 15): a probe reads a
layer's state with nothing trained below it, so a layer that scores high already holds
the task. Writes bench/results/layer-probe-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

C_GRID = (0.01, 0.1)  # both reported: the probe's regularization is not chosen on anything


def parse_cut(text: str) -> tuple[int, float, int | None, float]:
    """LAYERS:FFN_RATIO[:HIDDEN][:heads=R] -> (layers, ffn ratio, hidden size or None, heads ratio)."""
    parts = text.split(":")
    heads = 1.0
    if parts and parts[-1].startswith("heads="):
        heads = float(parts.pop()[len("heads="):])
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--cut {text!r}: LAYERS:FFN_RATIO[:HIDDEN][:heads=R], say 6:0.25")
    return int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else None, heads


def features(model, tokenizer, prompts: list[str], label: str, encode=None):
    """(reviews, layers + 1, 2, hidden): each layer's state, averaged and at the last token.
    `encode`: prompt -> the model's token ids, instead of `tokenizer`'s (a pruned student
    vocabulary's pieces, pruned_encoder)."""
    import numpy as np
    import torch

    from shrink.console import progress

    out = []
    with torch.no_grad(), progress("reviews") as bar:
        task = bar.add_task(label, total=len(prompts))
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt") if encode is None else {"input_ids": torch.tensor([encode(prompt)])}
            states = model.model(**ids, output_hidden_states=True).hidden_states
            out.append(np.stack([np.stack([h[0].mean(0).numpy(), h[0, -1].numpy()]) for h in states]))
            bar.advance(task)
    return np.stack(out)


def probe(train_x, train_y, dev_x, dev_y) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = {}
    for c in C_GRID:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(train_x, train_y)
        scores[f"C={c}"] = round(float(clf.score(dev_x, dev_y)), 4)
    return scores


def probe_layers(model, tokenizer, train, dev, label: str, only_last: bool = False, encode=None) -> list[dict]:
    ytr, ydv = [r["completion"] for r in train], [r["completion"] for r in dev]
    ftr = features(model, tokenizer, [r["prompt"] for r in train], f"{label}: training reviews", encode)
    fdv = features(model, tokenizer, [r["prompt"] for r in dev], f"{label}: dev reviews", encode)
    layers = [ftr.shape[1] - 1] if only_last else range(ftr.shape[1])
    return [{"layer": k, "mean": probe(ftr[:, k, 0], ytr, fdv[:, k, 0], ydv),
             "last_token": probe(ftr[:, k, 1], ytr, fdv[:, k, 1], ydv)} for k in layers]


def pruned_encoder(tokenizer, examples, eos_token_id, top: int, folder: Path):
    """prompt -> the teacher's ids of the pieces a student's pruned vocabulary gives it
    (`shrink distill --prune-vocab --vocab-top TOP` on `examples`, the training split:
    never dev or test), and that vocabulary's size. Words the training text lacks come
    in smaller pieces, as the student reads them."""
    from shrink.distill.prune_vocab import plan_pruning, save_pruned_tokenizer
    from shrink.distill.vocab_sources import task_texts

    plan = plan_pruning(tokenizer, task_texts(examples), eos_token_id, top=top)
    student_tokenizer = save_pruned_tokenizer(tokenizer, plan, folder)
    kept = plan.kept
    return (lambda prompt: [kept[i] for i in student_tokenizer(prompt).input_ids]), len(kept)


def cut_model(teacher, tokenizer, examples, layers: int, ffn_ratio: float, hidden: int | None, heads: float = 1.0,
              refit: bool = False, width_scores: str = "activation"):
    from shrink.distill.hidden_width import channel_scores, prune_hidden
    from shrink.distill.importance import task_batches
    from shrink.distill.student import cut_student, first_layers
    from shrink.distill.student import width_scores as scores_for
    from shrink.distill.width import prune_width, target_widths, widths_of

    keep = first_layers(len(teacher.model.layers), layers)
    student = cut_student(teacher, keep).eval()
    if ffn_ratio < 1.0 or heads < 1.0:
        scores = scores_for(student, teacher, keep, tokenizer, examples, "cpu", 512, width_scores,
                            refit and ffn_ratio < 1.0)
        student = prune_width(student, target_widths(widths_of(student), ffn_ratio, heads), scores).eval()
    if hidden is not None:
        student, _ = prune_hidden(student, hidden, channel_scores(student, task_batches(tokenizer, examples, "cpu")))
        student.eval()
    return student


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cut", action="append", type=parse_cut, default=[],
                    help="also probe a pruned cut, LAYERS:FFN_RATIO[:HIDDEN][:heads=R] (repeatable)")
    ap.add_argument("--refit", action="store_true",
                    help="width-prune the cuts with down_proj re-fitted by least squares (--ffn-refit)")
    ap.add_argument("--scores", choices=("activation", "fisher"), default="activation",
                    help="how the cuts rank channels and heads (--width-scores)")
    ap.add_argument("--no-teacher", action="store_true", help="probe only the --cut students, not the teacher's layers")
    ap.add_argument("--student-vocab", action="append", type=int, default=[], metavar="TOP",
                    help="also probe the teacher's layers reading the pieces of a pruned student vocabulary "
                         "(--prune-vocab on the training split, --vocab-top TOP; 0: the training text's tokens "
                         "only); repeatable")
    ap.add_argument("--out", type=Path, default=Path("bench/probe-run"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrink.demo.pipeline import demo_teacher
    from shrink.demo.task import write_task_files
    from shrink.tasks import load_task
    from shrink.teacher_gguf import resolve_teacher

    files = write_task_files(args.out / "data")
    rows = {s: [json.loads(line) for line in files[s].read_text(encoding="utf-8").splitlines()] for s in ("train", "dev")}
    folder = resolve_teacher(demo_teacher())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    started = time.perf_counter()
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "train": len(rows["train"]), "dev": len(rows["dev"]), "split_scored": "dev",
              "teacher": [] if args.no_teacher else probe_layers(teacher, tokenizer, rows["train"], rows["dev"], "teacher")}
    examples = load_task(files["train"])
    record["cuts"] = []
    for layers, ratio, hidden, heads in args.cut:
        model = cut_model(teacher, tokenizer, examples, layers, ratio, hidden, heads, args.refit, args.scores)
        width = {"layers": layers, "ffn_ratio": ratio, "hidden_size": hidden, "heads_ratio": heads, "refit": args.refit,
                 "scores": args.scores}
        record["cuts"].append({**width, **probe_layers(model, tokenizer, rows["train"], rows["dev"],
                                                       f"cut {layers}:{ratio}", only_last=True)[0]})
    record["student_vocab"] = []
    for top in args.student_vocab:
        encode, size = pruned_encoder(tokenizer, examples, teacher.generation_config.eos_token_id, top,
                                      args.out / f"vocab-top-{top}")
        pieces = sum(len(encode(r["prompt"])) for r in rows["dev"]) / len(rows["dev"])
        record["student_vocab"].append({"vocab_top": top, "vocab_size": size, "dev_tokens_per_prompt": round(pieces, 2),
                                        "layers": probe_layers(teacher, tokenizer, rows["train"], rows["dev"],
                                                               f"teacher, vocabulary {size:,}", encode=encode)})
    record["seconds"] = round(time.perf_counter() - started, 1)
    path = Path("bench/results") / f"layer-probe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record))
    else:
        print("| state | mean, C=0.01 | mean, C=0.1 | last token, C=0.01 | last token, C=0.1 |\n|---|---|---|---|---|")
        for r in record["teacher"] + record["cuts"]:
            name = f"teacher layer {r['layer']}" if "layers" not in r else \
                f"first {r['layers']} layers, ffn {r['ffn_ratio']}" + (f", hidden {r['hidden_size']}" if r["hidden_size"] else "") \
                + (f", heads {r['heads_ratio']}" if r.get("heads_ratio", 1.0) < 1.0 else "") \
                + (", down_proj re-fitted" if r.get("refit") else "") \
                + (f", {r['scores']} scores" if r.get("scores", "activation") != "activation" else "")
            cells = [f"{r[k][c]:.1%}" for k in ("mean", "last_token") for c in (f"C={x}" for x in C_GRID)]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for v in record["student_vocab"]:
            for r in v["layers"]:
                cells = [f"{r[k][c]:.1%}" for k in ("mean", "last_token") for c in (f"C={x}" for x in C_GRID)]
                print(f"| teacher layer {r['layer']}, student vocabulary of {v['vocab_size']:,} (--vocab-top "
                      f"{v['vocab_top']}) | " + " | ".join(cells) + " |")
        print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
