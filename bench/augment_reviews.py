"""The teacher labels reviews recombined from the training reviews (issue 15, "more data").

    python bench/augment_reviews.py [--count 4000] [--seed 0]

Writes WORK/augmented.jsonl (text, label, op, domain, confidence) and WORK/labeled.jsonl
(the same rows in shrink's task format), which `python bench/demo_tune.py --extra-train
WORK/labeled.jsonl` trains on beside the 1,201 human-labeled training reviews. This is
TinyBERT's transfer-set augmentation (Jiao et al. 2020) with edits that add no word: every
text is made of the **training split's** sentences and clauses only, so the student's
pruned vocabulary (built from its training text) stays about the same and its file keeps
its size, and what the student gains is the teacher's answer near each training review:
which part of a review carries its sentiment.

1. Recombining (seeded), one operation per candidate, drawn among those that apply:
   - ``drop``: a training review of two or more sentences with one sentence left out;
   - ``mix``: the first sentences of one training review and the last of another of the
     same domain (either label: the teacher decides what the mix says);
   - ``clause``: a training review cut after one of its clauses (at ", ", "; ", " but ",
     " and "), at least 4 words kept.
2. Filtering: texts of fewer than 4 or more than 60 words, repeats, copies of any review
   (train, dev or test: the same words) and near copies of a dev or test review
   (word-set Jaccard >= 0.6) are dropped and counted. Being near a training review is the
   point, so that is not filtered.
3. Labeling: `shrink label` with the demo's teacher **as served** (its Q4_K_M GGUF in
   llama.cpp, the demo's 4-shot prefix) picks " positive" or " negative"; rows under
   confidence 0.75 are left out (the teacher is unsure). The human labels of the reviews
   the texts came from are not used.

Every count goes into WORK/augmented.json beside the rows.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_writing import keep_edited, label_reviews  # noqa: E402

MIN_CONFIDENCE = 0.75
SENTENCE = re.compile(r"(?<=[.!?])\s+")
CLAUSE = re.compile(r",\s|;\s|\s(?=but\s)|\s(?=and\s)")
OPS = ("drop", "mix", "clause")


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE.split(text.strip()) if s]


def clauses(text: str) -> list[str]:
    """The prefixes of `text` that end at a clause boundary, with a full stop; at least 4 words."""
    cuts = [m.start() for m in CLAUSE.finditer(text)]
    out = []
    for c in cuts:
        head = text[:c].rstrip(" ,;")
        if len(head.split()) >= 4:
            out.append(head + ".")
    return out


def recombine(train: list[dict], count: int, seed: int) -> list[dict]:
    """`count` candidates, each one operation on training reviews (see the module's text)."""
    rng = random.Random(seed)
    by_domain: dict[str, list[dict]] = {}
    for r in train:
        by_domain.setdefault(r["domain"], []).append(r)
    out = []
    while len(out) < count:
        a = rng.choice(train)
        sa = sentences(a["text"])
        ops = [op for op in OPS if (op != "drop" or len(sa) >= 2) and (op != "clause" or clauses(a["text"]))
               and (op != "mix" or len(by_domain[a["domain"]]) >= 2)]
        op = rng.choice(ops)
        if op == "drop":
            i = rng.randrange(len(sa))
            text = " ".join(sa[:i] + sa[i + 1:])
        elif op == "clause":
            text = rng.choice(clauses(a["text"]))
        else:
            b = rng.choice([r for r in by_domain[a["domain"]] if r is not a])
            sb = sentences(b["text"])
            text = " ".join(sa[:rng.randint(1, len(sa))] + sb[-rng.randint(1, len(sb)):])
        out.append({"text": text, "op": op, "domain": a["domain"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=4000, help="candidates to make before filtering")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("bench/augment-run"))
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    args = ap.parse_args()

    from shrink.demo.pipeline import demo_teacher
    from shrink.demo.task import reviews, split_rows

    started = time.perf_counter()
    splits = split_rows(reviews())
    cands = recombine(splits["train"], args.count, args.seed)
    kept, dropped = keep_edited(cands, splits)

    rows, summary = label_reviews(demo_teacher(), kept, args.work, MIN_CONFIDENCE, args.threads)
    out_rows = [{"text": r["text"], "label": r["completion"].strip(), "op": r["op"], "domain": r["domain"],
                 "confidence": round(r["confidence"], 4)} for r in rows]
    out = args.work / "augmented.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed, "made": len(cands),
        "made_by_op": dict(Counter(c["op"] for c in cands)), "dropped": dict(dropped), "labeled": summary,
        "kept": len(out_rows), "kept_by_op": dict(Counter(r["op"] for r in out_rows)),
        "labels": dict(Counter(r["label"] for r in out_rows)), "seconds": round(time.perf_counter() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
