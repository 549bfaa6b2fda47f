"""The teacher writes more support messages for the extract demo, then labels them (issue 15,
"more data"). The training split has 12 phrasings; the teacher's own messages bring others.

    python bench/teacher_messages.py [--count 1200] [--seed 0]

Writes WORK/labeled.jsonl (shrink's task format: prompt, the teacher's JSON answer,
confidence), which `python bench/demo_tune.py --task extract --extra-train WORK/labeled.jsonl`
trains on beside the training split's labels (`shrink demo` does not), and
WORK/teacher_messages.json, every count. How the rows are made, so that a reader can check
that no evaluation data shaped them:

1. Writing. Gemma 3 270M (the demo's teacher as served: its Q4_K_M GGUF in llama.cpp)
   continues a prompt of three messages drawn from the **training split** only (never dev
   or test) and writes the next one: sampling at temperature 1.0, top-p 0.95, at most 64
   tokens, cut at the first newline.
2. Filtering. Texts of fewer than 5 or more than 70 words, repeats, copies and near copies
   of a demo message (the same words after lowercasing and removing punctuation, or a
   word-set Jaccard similarity of 0.6 or more with a dev or test message, 0.8 with a
   training one), texts holding any first name, last name or city word of the dev or
   test pools (the demo keeps those out of training), and texts without an order number
   in the shop's format (a capital letter and four digits) are dropped and counted.
3. Labeling. `shrink label` with the demo's teacher as served and its 3-shot prefix writes
   the JSON answer greedily, as it labels the training split. Rows whose answer is not a
   JSON object of non-empty name, city and order strings, each found in the message, are
   left out and counted (the teacher did not copy the three fields: the message lacks one).
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
from teacher_writing import keep_novel, write_texts  # noqa: E402

MAX_NEW_TOKENS = 64
FIELDS = ("name", "city", "order")
ORDER = re.compile(r"\b[A-Z][0-9]{4}\b")  # the shop's order numbers (shrink/demo/extract.py)


def message_text(prompt: str) -> str:
    """The message of an extract row's prompt ("Message: ...\\nJSON:")."""
    return prompt.removeprefix("Message: ").removesuffix("\nJSON:")


def prompt_for(examples: list[str]) -> str:
    shots = "".join(f"Message: {t}\n\n" for t in examples)
    return f"Customer support messages.\n\n{shots}Message:"


def write_candidates(gguf: Path, train: list[str], count: int, seed: int, threads: int | None) -> list[str]:
    """The teacher as served continues `count` prompts of three training messages."""
    rng = random.Random(seed)
    prompts = [prompt_for(rng.sample(train, 3)) for _ in range(count)]
    return write_texts(gguf, prompts, MAX_NEW_TOKENS, seed, threads, "message", "msg")


def keep_new(cands: list[str], splits: dict[str, list[str]], held_out: set[str]) -> tuple[list[str], Counter]:
    """Drops short, long, repeated, copied and near-copied texts, then texts holding a
    held-out (dev or test) name or city word and texts without an order number; counts why."""
    banned = {w.lower() for w in held_out}

    def reject(text: str, w: set[str]) -> str | None:
        if banned & w:
            return "a dev or test name or city"
        return None if ORDER.search(text) else "no order number"

    kept, why = keep_novel(cands, splits, (5, 70), "message", reject)
    return [cands[i] for i in kept], why


def copied_fields(text: str, completion: str) -> bool:
    """The teacher's answer is a JSON object whose name, city and order are non-empty
    strings found in the message."""
    try:
        answer = json.loads(completion)
    except ValueError:
        return False
    return isinstance(answer, dict) and all(
        isinstance(answer.get(k), str) and answer[k].strip() and answer[k] in text for k in FIELDS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1200, help="messages to write before filtering")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("bench/teacher-messages-run"))
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    args = ap.parse_args()

    from shrink.demo import extract
    from shrink.demo.pipeline import TASKS, demo_teacher
    from shrink.label import LabelConfig, label

    started = time.perf_counter()
    splits = {s: [message_text(r["prompt"]) for r in extract.rows(s)] for s in extract.SIZES}
    held_out = set(extract.DEV_FIRST + extract.DEV_LAST + extract.DEV_CITIES
                   + extract.TEST_FIRST + extract.TEST_LAST + extract.TEST_CITIES)
    teacher = demo_teacher()
    cands = write_candidates(teacher, splits["train"], args.count, args.seed, args.threads)
    written_s = time.perf_counter() - started
    kept, dropped = keep_new(cands, splits, held_out)

    args.work.mkdir(parents=True, exist_ok=True)
    inputs, answered, prefix = args.work / "inputs.jsonl", args.work / "answered.jsonl", args.work / "prefix.txt"
    prefix.write_text(extract.TEACHER_PREFIX, encoding="utf-8")
    inputs.write_text("".join(json.dumps({"prompt": extract.TEMPLATE.format(text=t)}) + "\n" for t in kept),
                      encoding="utf-8")
    summary = label(LabelConfig(teacher=teacher, data=inputs, out=answered, teacher_prefix=prefix,
                                max_new_tokens=TASKS["extract"].max_new_tokens, threads=args.threads)).metrics
    rows = [json.loads(line) for line in answered.read_text(encoding="utf-8").splitlines() if line.strip()]
    good = [r for r in rows if copied_fields(message_text(r["prompt"]), r["completion"])]
    dropped["answer does not copy name, city and order"] = len(rows) - len(good)
    (args.work / "labeled.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good),
                                             encoding="utf-8")
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed, "written": len(cands),
        "dropped": dict(dropped), "labeled": summary, "kept": len(good),
        "writing_seconds": round(written_s, 1), "seconds": round(time.perf_counter() - started, 1),
    }
    (args.work / "teacher_messages.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
