"""What bench/teacher_reviews.py and bench/teacher_messages.py share: the teacher as served
(its GGUF in llama.cpp) continues prompts, and texts that are short, long, repeated, or a
copy or near copy of a demo example are dropped and counted."""

from __future__ import annotations

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

    threads = threads or os.cpu_count() or 1
    with quiet.llama_errors():
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
