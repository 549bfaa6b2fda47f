"""What bench/teacher_reviews.py, bench/teacher_messages.py, bench/augment_reviews.py and
bench/swap_reviews.py share: the teacher as served (its GGUF in llama.cpp) continues
prompts, texts that are short, long, repeated, or a copy or near copy of a demo example
are dropped and counted, and new reviews are labeled with the sentiment demo's prompt."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# Word-set Jaccard similarity at or above which a written text is a near copy of an example
# of that split: stricter against what the demo evaluates on.
NEAR_COPY = {"train": 0.8, "dev": 0.6, "test": 0.6}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def write_texts(gguf: Path, prompts: list[str], max_tokens: int, seed: int, threads: int | None,
                what: str, unit: str) -> list[str]:
    """The teacher continues each prompt (temperature 1.0, top-p 0.95, cut at the first
    newline, seeded per prompt), with a progress bar counting `unit`s; the texts, stripped."""
    import os

    import llama_cpp

    from shrink import quiet
    from shrink.console import progress
    from shrink.runtime.llama_cpp import plain_weight_buffers

    threads = threads or os.cpu_count() or 1
    with quiet.llama_errors(), plain_weight_buffers():
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                              seed=seed, verbose=False)
    out = []
    with progress(unit) as bar:
        task = bar.add_task(f"teacher writing {what}s (llama.cpp)", total=len(prompts))
        for i, prompt in enumerate(prompts):
            res = llm.create_completion(prompt, max_tokens=max_tokens, temperature=1.0, top_p=0.95, top_k=0,
                                        min_p=0.0, stop=["\n"], seed=seed * 1_000_003 + i)
            out.append(res["choices"][0]["text"].strip())
            bar.advance(task)
    return out


def keep_novel(texts: list[str], splits: dict[str, list[str]], lengths: tuple[int, int], what: str,
               reject: Callable[[str, set[str]], str | None] = lambda text, w: None) -> tuple[list[int], Counter]:
    """The indices of the texts kept: those of `lengths` words (inclusive), not a repeat of
    one kept before, not a copy (the same words) or near copy (NEAR_COPY) of a split's text,
    and that `reject(text, word set)` does not name a reason for; every drop counted by why."""
    why: Counter = Counter()
    seen = {" ".join(words(t)) for part in splits.values() for t in part}
    sets = {name: [set(words(t)) for t in part] for name, part in splits.items()}
    kept, own = [], set()
    for i, text in enumerate(texts):
        w = words(text)
        key = " ".join(w)
        if not lengths[0] <= len(w) <= lengths[1]:
            why["length"] += 1
        elif key in own:
            why["repeat"] += 1
        elif key in seen:
            why[f"copy of a {what}"] += 1
        elif any(jaccard(set(w), s) >= NEAR_COPY[name] for name, part in sets.items() for s in part):
            why[f"near copy of a {what}"] += 1
        elif reason := reject(text, set(w)):
            why[reason] += 1
        else:
            own.add(key)
            kept.append(i)
    return kept, why


def keep_edited(cands: list[dict], splits: dict[str, list[dict]],
                reject: Callable[[str, set[str]], str | None] = lambda text, w: None) -> tuple[list[dict], Counter]:
    """keep_novel for review texts edited from the training reviews (recombined, words
    swapped): short, long and repeated texts, copies of any review and near copies of a dev
    or test review are dropped, and counted; being near a training review is the point, so
    that is not filtered. `reject(text, word set)` may name another reason to drop."""
    train = {" ".join(words(r["text"])) for r in splits["train"]}

    def why(text: str, w: set[str]) -> str | None:
        return "copy of a review" if " ".join(words(text)) in train else reject(text, w)

    held_out = {name: [r["text"] for r in splits[name]] for name in ("dev", "test")}
    kept, counts = keep_novel([c["text"] for c in cands], held_out, (4, 60), "review", why)
    return [cands[i] for i in kept], counts


def label_reviews(teacher: Path, kept: list[dict], work: Path, min_confidence: float,
                  threads: int | None) -> tuple[list[dict], dict]:
    """`shrink label` with the sentiment demo's teacher prefix on the reviews `kept` (each a
    dict with "text", its other fields carried along): writes WORK/prefix.txt,
    WORK/inputs.jsonl and WORK/labeled.jsonl, and returns the labeled rows (those at
    `min_confidence` or over) and the labeling summary."""
    from shrink.demo.task import CHOICES, TEACHER_PREFIX, TEMPLATE
    from shrink.label import LabelConfig, label

    work.mkdir(parents=True, exist_ok=True)
    inputs, labeled, prefix = work / "inputs.jsonl", work / "labeled.jsonl", work / "prefix.txt"
    prefix.write_text(TEACHER_PREFIX, encoding="utf-8")
    inputs.write_text("".join(json.dumps({"prompt": TEMPLATE.format(text=c["text"]), "choices": list(CHOICES), **c})
                              + "\n" for c in kept), encoding="utf-8")
    summary = label(LabelConfig(teacher=teacher, data=inputs, out=labeled, teacher_prefix=prefix,
                                min_confidence=min_confidence, threads=threads)).metrics
    rows = [json.loads(line) for line in labeled.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows, summary
