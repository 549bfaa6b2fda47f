"""The teacher writes more reviews for the demo, then labels them (issue 15, "more data").

    python bench/teacher_reviews.py [--count 3000] [--seed 0]

Writes WORK/teacher_reviews.jsonl (text, label, domain, confidence) and WORK/labeled.jsonl
(the same rows in shrink's task format), which `python bench/demo_tune.py --extra-train
WORK/labeled.jsonl` trains on beside the 1,201 human-labeled training reviews (`shrink demo`
does not). How the rows are made, so that a reader can check that no evaluation data
shaped them:

1. Writing. Gemma 3 270M (the demo's teacher as served: its Q4_K_M GGUF in llama.cpp)
   continues a prompt of three reviews of one domain and one
   label, all drawn from the **training split** only (never dev or test), with a line
   "Domain: <domain>" before each, and writes the next review: sampling at temperature
   1.0, top-p 0.95, at most 48 tokens, cut at the first newline. The domain and the label
   of the three examples are drawn at random (seeded), in the training split's
   proportions.
2. Filtering. Texts of fewer than 4 or more than 60 words, repeats, and texts that are a
   copy or a near copy of any review in reviews.jsonl (the same words after lowercasing
   and removing punctuation, or a word-set Jaccard similarity of 0.6 or more with a dev
   or test review, or 0.8 with a training review) are dropped and counted.
3. Labeling. `shrink label` with the demo's teacher **as served** (its Q4_K_M GGUF in
   llama.cpp, with the demo's 4-shot prefix) picks " positive" or " negative" and keeps
   the teacher's probability of it as `confidence`; rows under 0.75 are left out (the
   teacher is unsure; the example labels of step 1 are not used).

Every count goes into WORK/teacher_reviews.json beside the rows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_writing import keep_novel, label_reviews, write_texts  # noqa: E402

MIN_CONFIDENCE = 0.75
MAX_NEW_TOKENS = 48


def prompt_for(examples: list[dict], domain: str) -> str:
    shots = "".join(f"Domain: {domain}\nReview: {r['text']}\n\n" for r in examples)
    return f"Customer reviews.\n\n{shots}Domain: {domain}\nReview:"


def write_candidates(gguf: Path, train: list[dict], count: int, seed: int, threads: int | None) -> list[dict]:
    """The teacher as served (its GGUF in llama.cpp) continues `count` prompts of three
    training reviews; about 0.9 s a review on 2 cores, against 14 s in transformers."""
    rng = random.Random(seed)
    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in train:
        by_key.setdefault((r["domain"], r["label"]), []).append(r)
    keys = [k for k, v in by_key.items() if len(v) >= 3]
    weights = [len(by_key[k]) for k in keys]
    asked, prompts = [], []
    for _ in range(count):
        domain, label = rng.choices(keys, weights)[0]
        asked.append((domain, label))
        prompts.append(prompt_for(rng.sample(by_key[(domain, label)], 3), domain))
    texts = write_texts(gguf, prompts, MAX_NEW_TOKENS, seed, threads, "review", "rev")
    return [{"text": t, "domain": d, "asked_label": a} for t, (d, a) in zip(texts, asked)]


def keep_new(cands: list[dict], splits: dict[str, list[dict]]) -> tuple[list[dict], Counter]:
    """Drops short, long, repeated, copied and near-copied texts; counts why."""
    kept, why = keep_novel([c["text"] for c in cands], {name: [r["text"] for r in part] for name, part in splits.items()},
                           (4, 60), "review")
    return [cands[i] for i in kept], why


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=3000, help="reviews to write before filtering")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("bench/teacher-reviews-run"))
    ap.add_argument("--out", type=Path, default=None, help="default: WORK/teacher_reviews.jsonl")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    args = ap.parse_args()
    args.out = args.out or args.work / "teacher_reviews.jsonl"

    from shrink.demo.pipeline import demo_teacher
    from shrink.demo.task import reviews, split_rows

    started = time.perf_counter()
    splits = split_rows(reviews())
    teacher = demo_teacher()
    cands = write_candidates(teacher, splits["train"], args.count, args.seed, args.threads)
    written_s = time.perf_counter() - started
    kept, dropped = keep_new(cands, splits)

    rows, summary = label_reviews(teacher, kept, args.work, MIN_CONFIDENCE, args.threads)
    out_rows = [{"text": r["text"], "label": r["completion"].strip(), "domain": r["domain"],
                 "confidence": round(r["confidence"], 4)} for r in rows]
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    agree = sum(r["completion"].strip() == r["asked_label"] for r in rows)
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed, "written": len(cands),
        "dropped": dict(dropped), "labeled": summary, "kept": len(out_rows),
        "labels": dict(Counter(r["label"] for r in out_rows)),
        "label_agrees_with_examples": round(agree / max(1, len(rows)), 4),
        "writing_seconds": round(written_s, 1), "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
