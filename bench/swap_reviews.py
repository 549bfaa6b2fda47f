"""The teacher swaps words of the training reviews, then labels them (issue 15, "more data").

    python bench/swap_reviews.py [--copies 2] [--rate 0.3] [--top 10] [--seed 0]

Writes WORK/swapped.jsonl (text, source, label, domain, confidence) and WORK/labeled.jsonl
(the same rows in shrink's task format), which `python bench/demo_tune.py --extra-train
WORK/labeled.jsonl` trains on beside the 1,201 human-labeled training reviews. This is
TinyBERT's word-replacement augmentation (Jiao et al. 2020: each word replaced with
probability 0.4 by one of a masked LM's 15 best guesses, 20 copies a review), made for a
student with a pruned vocabulary: every new word is one the training reviews already hold
as a whole-word token, so the student's vocabulary and file stay as they are, and what the
student gains is the teacher's verdict on the training reviews' words in new places (the
recombined reviews of bench/augment_reviews.py moved whole sentences only).

1. Guesses. The teacher (the demo's, in transformers, bfloat16: twice float32's speed on
   this CPU, and only a ranking is asked of it) reads each training prompt
   once, which also gives the prompt's own log-likelihood (step 2); at each whole-word token of the review (a word start of 3+ letters that the next
   token does not continue) its `--top` most likely next tokens given the words before,
   among the whole-word tokens of the training reviews, are that word's candidates (the
   word itself left out), with the teacher's probabilities renormalized over them.
2. Copies (seeded). Twice `--copies` drafts a review: each of its whole words (not a
   function word such as "the" or "with") is replaced with probability `--rate` by a
   candidate drawn by those probabilities; at least one is. The guesses read only the
   words before, so a draft can break what follows; the teacher reads every draft whole,
   and the `--copies` drafts whose log-likelihood fell least per swapped word are kept.
3. Filtering: texts whose tokens are not all in the student's vocabulary (planned from the
   training split, as `shrink distill --prune-vocab` plans it), of fewer than 4 or more than
   60 words, repeats, copies of any review and near copies of a dev or test review
   (word-set Jaccard >= 0.6) are dropped and counted.
4. Labeling: `shrink label` with the demo's teacher **as served** (its Q4_K_M GGUF in
   llama.cpp, the demo's 4-shot prefix) picks " positive" or " negative"; rows under
   `--min-confidence` (0.75) are left out. The human labels of the source reviews are not used: a
   swap can turn "great" into "awful", and the teacher says what the copy means.

`--vocab-top N` widens the candidates to the whole words among the teacher's first N token
ids (its most frequent pieces, as `shrink distill --vocab-top N` keeps them in the
student's vocabulary), so copies carry words the training reviews lack, in context and
labeled by the teacher; the student must then be distilled with the same `--vocab-top`.
A piece among them that usually begins a longer word (the teacher, reading "It was" and
the piece, puts more than half its probability on a continuation) is left out.

No dev or test review is read except by the near-copy filter. Every count goes into
WORK/swapped.json beside the rows.
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
WORD_START = "\u2581"  # SentencePiece's space, as Gemma's BPE pieces write it
WHOLE = re.compile(WORD_START + r"[A-Za-z]{3,}")
# Words not swapped and never put in: swapping them mostly breaks the grammar.
FUNCTION_WORDS = frozenset("""
about after again all also and any are because been before being but can could did does doing down during each few
for from further had has have having her here hers herself him himself his how into its itself just more most myself
nor not now off once only other our ours out over own same she should some such than that the their theirs them then
there these they this those through too under until very was were what when where which while who whom why will with
would you your yours yourself one even never way really much many every thing things didn don doesn isn wasn won
""".split())


def word_positions(pieces: list[str]) -> list[int]:
    """The indices of pieces that are a whole word, not a function word: a word start of 3+
    letters that the next piece does not continue (the next starts a word, is punctuation
    other than an apostrophe, or there is none)."""
    out = []
    for i, p in enumerate(pieces):
        nxt = pieces[i + 1] if i + 1 < len(pieces) else ""
        continued = nxt[:1].isalpha() or nxt[:1] in ("'", "\u2019")
        if WHOLE.fullmatch(p) and p[1:].lower() not in FUNCTION_WORDS and not continued:
            out.append(i)
    return out


def continuation_mask(tokenizer):
    """A boolean tensor over the vocabulary: the pieces that continue a word (they start
    with a letter, not with a word start)."""
    import torch

    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([bool(p) and p[0].isalpha() for p in pieces])


def continuation_probability(model, prefix: list[int], candidates: list[int], continues, batch: int = 256) -> list[float]:
    """For each candidate token: the teacher's probability, after `prefix` and the
    candidate, that the next piece continues the candidate's word (`continues`: a mask as
    continuation_mask gives it)."""
    import torch

    rows = model.get_output_embeddings().weight.shape[0]  # the model's rows may outnumber the pieces
    mask = torch.zeros(rows, dtype=torch.bool)
    n = min(len(continues), rows)
    mask[:n] = continues[:n]
    out = []
    with torch.no_grad():
        for b in range(0, len(candidates), batch):
            x = torch.tensor([prefix + [c] for c in candidates[b:b + batch]])  # equal lengths, no padding
            probs = torch.softmax(model(input_ids=x).logits[:, -1].float(), dim=-1)
            out += probs[:, mask].sum(-1).tolist()
    return out


def swap(ids: list[int], cands: dict[int, tuple[list[int], list[float]]], rng: random.Random,
         rate: float) -> list[int] | None:
    """One copy of `ids`: each position of `cands` (position -> (candidate ids, their
    probabilities)) replaced with probability `rate` by a candidate drawn by probability;
    at least one position is replaced. None when no position has a candidate."""
    positions = [p for p, (c, _) in cands.items() if c]
    if not positions:
        return None
    chosen = [p for p in positions if rng.random() < rate] or [rng.choice(positions)]
    out = list(ids)
    for p in chosen:
        c, w = cands[p]
        out[p] = rng.choices(c, w)[0]
    return out


def padded(seqs: list[list[int]], pad_id: int):
    """Right-padded ids and their attention mask, as distillation pads its batches
    (shrink.distill.batches.collate)."""
    from shrink.distill.batches import Sequence, collate

    ids, attn, _ = collate([Sequence(s, start=len(s)) for s in seqs], pad_id, "cpu")
    return ids, attn


def teacher_reads(model, batch_ids: list[list[int]], positions: list[list[int]], allowed, top: int,
                  pad_id: int) -> tuple[list[dict[int, tuple[list[int], list[float]]]], list[float]]:
    """One read of a batch by the teacher gives both what the swaps need: for each
    sequence, position -> the teacher's `top` most likely tokens there among `allowed` (a
    LongTensor of ids) given the tokens before it, the token itself left out, with
    probabilities renormalized over the candidates; and the sequence's negative
    log-likelihood (as sequence_nll gives it), which each draft's is measured against."""
    import torch

    x, mask = padded(batch_ids, pad_id)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits
        out = []
        for i, pos in enumerate(positions):
            guesses = {}
            if pos:
                chosen = logits[i, [p - 1 for p in pos]][:, allowed].float()
                for j, p in enumerate(pos):
                    lj = chosen[j].clone()
                    lj[allowed == batch_ids[i][p]] = float("-inf")
                    best = torch.topk(lj, top)
                    probs = torch.softmax(best.values, dim=0)
                    guesses[p] = (allowed[best.indices].tolist(), probs.tolist())
            out.append(guesses)
        nll = _nll(logits, x, mask)
    return out, nll


def _nll(logits, x, mask) -> list[float]:
    """Each row's negative log-likelihood of its own tokens after the first (pads left out)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return (-(logp.gather(-1, x[:, 1:, None])[..., 0] * mask[:, 1:]).sum(1)).tolist()


def sequence_nll(model, seqs: list[list[int]], pad_id: int, batch: int = 16, what: str = "") -> list[float]:
    """The teacher's negative log-likelihood of each sequence (summed over its tokens after
    the first)."""
    import torch

    from shrink.console import progress

    out = []
    with progress("texts") as bar:
        task = bar.add_task(f"teacher reads {what}", total=len(seqs))
        for b in range(0, len(seqs), batch):
            x, mask = padded(seqs[b:b + batch], pad_id)
            with torch.no_grad():
                out += _nll(model(input_ids=x, attention_mask=mask).logits, x, mask)
            bar.advance(task, len(seqs[b:b + batch]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="copies of each training review before filtering")
    ap.add_argument("--rate", type=float, default=0.3, help="probability that a whole word is swapped")
    ap.add_argument("--top", type=int, default=10, help="the teacher's guesses a word is drawn from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-confidence", type=float, default=MIN_CONFIDENCE,
                    help="leave out rows the teacher labels with less probability (0: keep all; a student distilled on "
                         "them learns the teacher's doubt from its soft labels)")
    ap.add_argument("--vocab-top", type=int, default=0,
                    help="also swap in the whole words among the teacher's first N token ids (distill the student "
                         "with --vocab-top N); 0: only the training reviews' own words")
    ap.add_argument("--work", type=Path, default=Path("bench/swap-run"))
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads for labeling (default: all cores)")
    args = ap.parse_args()

    import torch

    from shrink.console import progress
    from shrink.demo.pipeline import demo_teacher
    from shrink.demo.task import CHOICES, TEMPLATE, reviews, split_rows
    from shrink.distill.prune_vocab import plan_pruning
    from shrink.distill.vocab_sources import row_texts
    from shrink.teacher_gguf import resolve_teacher
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    splits = split_rows(reviews())
    train = splits["train"]
    gguf = demo_teacher()
    folder = resolve_teacher(gguf)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()

    def vocab_of(texts: list[str]) -> set[int]:
        plan = plan_pruning(tok, [t for text in texts for t in row_texts(TEMPLATE.format(text=text), None, CHOICES)],
                            tok.eos_token_id, top=args.vocab_top)
        return set(plan.kept)

    kept_vocab = vocab_of([r["text"] for r in train])
    prompts = [tok(TEMPLATE.format(text=r["text"]))["input_ids"] for r in train]
    pieces = [tok.convert_ids_to_tokens(ids) for ids in prompts]
    positions = [word_positions(p) for p in pieces]
    own = {ids[p] for ids, pos in zip(prompts, positions) for p in pos}
    added, fragments = set(), 0
    if args.vocab_top:
        top_pieces = tok.convert_ids_to_tokens(list(range(args.vocab_top)))
        words = [i for i, p in enumerate(top_pieces) if i not in own and p and WHOLE.fullmatch(p)
                 and p[1:].lower() not in FUNCTION_WORDS]
        cont = continuation_probability(model, tok("It was", add_special_tokens=True)["input_ids"], words,
                                        continuation_mask(tok))
        added = {w for w, c in zip(words, cont) if c <= 0.5}
        fragments = len(words) - len(added)
    allowed = torch.tensor(sorted(own | added))
    print(f"{len(train)} training reviews, {sum(map(len, positions))} whole words, {len(own)} distinct "
          f"whole-word tokens, {len(added)} more from the teacher's first {args.vocab_top} ids ({fragments} "
          f"word beginnings left out); student vocabulary {len(kept_vocab)}", flush=True)

    guesses, base = [], []  # base: each training review's own log-likelihood, from the same read
    with progress("reviews") as bar:
        task = bar.add_task("teacher guesses", total=len(prompts))
        for b in range(0, len(prompts), 16):
            g, nll = teacher_reads(model, prompts[b:b + 16], positions[b:b + 16], allowed, args.top, tok.pad_token_id)
            guesses += g
            base += nll
            bar.advance(task, len(g))
    guess_s = time.perf_counter() - started

    rng = random.Random(args.seed)
    drafts, why_none = [], Counter()
    for i, (ids, g) in enumerate(zip(prompts, guesses)):
        for _ in range(2 * args.copies):
            new = swap(ids, g, rng, args.rate)
            if new is None:
                why_none["no whole word to swap"] += 1
            else:
                drafts.append((i, new))
    draft_nll = sequence_nll(model, [d for _, d in drafts], tok.pad_token_id, what="the drafts")
    by_review: dict[int, dict[tuple, float]] = {}
    for (i, new), n in zip(drafts, draft_nll):
        swapped = sum(a != b for a, b in zip(prompts[i], new))
        by_review.setdefault(i, {})[tuple(new)] = (n - base[i]) / swapped
    head, tail = TEMPLATE.split("{text}")
    cands = []
    for i, scored in by_review.items():
        for new in sorted(scored, key=scored.get)[:args.copies]:
            text = tok.decode(list(new), skip_special_tokens=True)
            if not (text.startswith(head) and text.endswith(tail)):
                why_none["template broken"] += 1
                continue
            cands.append({"text": text[len(head):len(text) - len(tail)].strip(), "source": train[i]["text"],
                          "domain": train[i]["domain"], "nll_per_swap": round(scored[new], 3)})

    def outside_vocab(text: str, _words) -> str | None:
        ids = tok(TEMPLATE.format(text=text))["input_ids"]
        return "a token outside the student's vocabulary" if not set(ids) <= kept_vocab else None

    kept, dropped = keep_edited(cands, splits, outside_vocab)
    dropped.update(why_none)

    rows, summary = label_reviews(gguf, kept, args.work, args.min_confidence, args.threads)
    out_rows = [{"text": r["text"], "source": r["source"], "label": r["completion"].strip(), "domain": r["domain"],
                 "confidence": round(r["confidence"], 4)} for r in rows]
    after = vocab_of([r["text"] for r in train] + [r["text"] for r in out_rows])
    out = args.work / "swapped.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    source_label = {r["text"]: r["label"] for r in train}
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed, "copies": args.copies,
        "min_confidence": args.min_confidence, "rate": args.rate, "top": args.top,
        "whole_word_tokens": len(own), "vocab_top": args.vocab_top, "added_whole_words": len(added),
        "added_word_beginnings_left_out": fragments, "drafts": len(drafts), "made": len(cands), "dropped": dict(dropped),
        "labeled": summary, "kept": len(out_rows),
        "labels": dict(Counter(r["label"] for r in out_rows)),
        "label_differs_from_source": sum(r["label"] != source_label[r["source"]] for r in out_rows),
        "student_vocabulary": {"training reviews": len(kept_vocab), "with the kept copies": len(after)},
        "examples": [{"source": r["source"], "copy": r["text"], "label": r["label"]} for r in out_rows[:8]],
        "guess_seconds": round(guess_s, 1), "seconds": round(time.perf_counter() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
