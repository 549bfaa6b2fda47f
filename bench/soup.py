"""Weight-averaged students ("model soups", Wortsman et al., 2022), measured on dev.

    python bench/soup.py STUDENT STUDENT [STUDENT ...] [--embedding-type Q4_0] [--threads N]

Students distilled from the same cut (the same teacher layers, widths and pruned
vocabulary; only the seed, which orders the batches, or a loss setting differs) start
from the same weights, so their average is one model of the same size. Two soups are
measured: the uniform one (every student), and the greedy one (students added in the
order of their own dev accuracy, each kept only if the soup's dev accuracy does not
fall). Every student and every soup is exported as the Q4_K_M GGUF (and, with
`--embedding-type`, as the Q4_K_M with that embedding type) and scored on the demo's
**dev** split in llama.cpp; the greedy choice reads dev only, and test is never read.
Writes bench/results/soup-<time>.json and keeps each soup under OUT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

WEIGHTS = "model.safetensors"


def average(students: list[Path], out: Path) -> Path:
    """`out`: a student folder holding the mean of the students' weights (their shapes and
    tokenizer must agree), the first one's config and tokenizer, and a manifest naming
    every ingredient with the sha256 of its weights."""
    from safetensors.torch import load_file, save_file

    from shrink import artifact
    from shrink.errors import ShrinkError
    from shrink.manifest import Manifest

    first = Manifest.read(students[0])
    tokenizer = artifact.sha256_file(students[0] / "tokenizer.json")
    total = None
    for s in students:
        if artifact.sha256_file(s / "tokenizer.json") != tokenizer:
            raise ShrinkError(f"{s}: another tokenizer than {students[0]}'s; a soup needs one vocabulary")
        weights = load_file(s / WEIGHTS)
        if total is None:
            total = {k: v.double() for k, v in weights.items()}
            continue
        if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in total.items()}:
            raise ShrinkError(f"{s}: its tensors differ from {students[0]}'s in name or shape; not the same cut")
        for k, v in weights.items():
            total[k] += v.double()
    dtypes = {k: v.dtype for k, v in load_file(students[0] / WEIGHTS).items()}
    mean = {k: (v / len(students)).to(dtypes[k]).contiguous() for k, v in total.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with artifact.staged_folder(out, force=True, what="the soup") as tmp:
        for f in students[0].iterdir():
            if f.name not in (WEIGHTS, "manifest.json", "training_log.json") and f.is_file():
                shutil.copy2(f, tmp / f.name)
        save_file(mean, tmp / WEIGHTS, metadata={"format": "pt"})
        ingredients = [{"path": str(s), "weights_sha256": Manifest.read(s).files[WEIGHTS].sha256} for s in students]
        artifact.finish(tmp, kind="student", format="hf", source=Path(first.source.path) if first.source else None,
                        settings={**first.settings, "soup": ingredients}, metrics={})
    return out


def measure(student: Path, out: Path, dev: Path, threads: int | None, embedding: str | None) -> dict:
    """Dev accuracy of the student's Q4_K_M (and of its Q4_K_M with `embedding`) in llama.cpp."""
    from shrink.export.flow import ExportOptions, export

    out.mkdir(parents=True, exist_ok=True)
    q = export(student, out / "Q4_K_M", ExportOptions("gguf", quant="Q4_K_M", threads=threads), eval_data=dev,
               force=True, min_top1=0, max_kl=1e9)
    row = {"dev_q4_k_m": round(q.metrics["accuracy"], 4), "q4_k_m_bytes": q.metrics["size_bytes"],
           "q4_k_m_top1": q.metrics["parity"]["top1_agreement"]}
    if embedding:
        e = export(student, out / "Q4_K_M-embedding", ExportOptions("gguf", quant="Q4_K_M", threads=threads,
                                                                    embedding_type=embedding),
                   eval_data=dev, force=True, min_top1=0, max_kl=1e9)
        row.update(dev_q4_k_m_embedding=round(e.metrics["accuracy"], 4), q4_k_m_embedding_bytes=e.metrics["size_bytes"])
    return row


def greedy(students: list[Path], scores: dict[str, float], make) -> tuple[list[Path], list[dict]]:
    """Wortsman et al.'s greedy soup: students in order of their own dev score, each added
    when the soup with it scores at least the soup without it. `make(list)` -> its score."""
    order = sorted(students, key=lambda s: -scores[str(s)])
    chosen, best, steps = [order[0]], scores[str(order[0])], []
    for s in order[1:]:
        score = make(chosen + [s])
        steps.append({"added": str(s), "dev": score, "kept": score >= best})
        if score >= best:
            chosen, best = chosen + [s], score
    return chosen, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path("bench/soup-run/data"),
                    help="where the demo's task files are written (dev is scored)")
    ap.add_argument("--out", type=Path, default=Path("bench/soup-run"))
    ap.add_argument("--embedding-type", default=None, help="also score each Q4_K_M with this embedding type")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if len(args.students) < 2:
        ap.error("a soup needs two students or more")

    from shrink.demo.task import write_task_files

    dev = write_task_files(args.data)["dev"]
    started = time.perf_counter()
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "split": "dev",
              "students": [], "soups": []}
    key = "dev_q4_k_m_embedding" if args.embedding_type else "dev_q4_k_m"
    for i, s in enumerate(args.students):
        record["students"].append({"path": str(s), **measure(s, args.out / f"student-{i}", dev, args.threads,
                                                             args.embedding_type)})
    scores = {r["path"]: r[key] for r in record["students"]}

    def soup(members: list[Path], name: str) -> dict:
        folder = average(members, args.out / name / "student")
        row = {"name": name, "members": [str(m) for m in members],
               **measure(folder, args.out / name, dev, args.threads, args.embedding_type)}
        record["soups"].append(row)
        return row

    soup(args.students, "uniform")
    tried = {}

    def make(members):
        row = soup(members, f"greedy-{len(tried)}")
        tried[len(tried)] = row
        return row[key]

    chosen, steps = greedy(args.students, scores, make)
    record["greedy"] = {"chosen": [str(c) for c in chosen], "steps": steps, "ranked_by": key}
    record["seconds"] = round(time.perf_counter() - started, 1)
    path = Path("bench/results") / f"soup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print("| model | dev, Q4_K_M" + (f" | dev, Q4_K_M with a {args.embedding_type} embedding" if args.embedding_type else "")
          + " |\n|---|---|" + ("---|" if args.embedding_type else ""))
    for r in record["students"] + record["soups"]:
        name = r.get("name") or r["path"]
        extra = f" | {r['dev_q4_k_m_embedding']:.1%}" if args.embedding_type else ""
        print(f"| {name} | {r['dev_q4_k_m']:.1%}{extra} |")
    print(f"\ngreedy soup: {', '.join(record['greedy']['chosen'])}\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
