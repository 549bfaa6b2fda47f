"""Parity: an export measured against the Hugging Face student it was made from.

On the evaluation rows, both runtimes read the same token ids (the student's) and their
next-token distributions are compared: top-1 agreement and mean KL(student || export).
The judged positions are the answer positions, the ones serving the task reads: each
row's prompt followed by its completion, or by each of its choices (as evaluation
scores them), from the prompt's last token on. The prompt's own positions are compared
too and recorded (`prompt_positions`), not judged: a student trained on completions
alone never learned to predict its prompts' tokens, and near-ties there flip under any
quantization without changing one answer (measured in bench/RESULTS.md, issue 15). A
row without an answer is judged on its prompt's positions. Separately, the export's own
tokenizer must give the student's ids. The figures go into the manifest; below the
thresholds the export is not valid.

The evaluation prompts are one task's text; a tokenizer can agree on all of them and
still split other text differently (llama.cpp's SentencePiece adds a '▁' before a text
that already starts with a space, Hugging Face's Metaspace does not). So the export's
tokenizer is also compared with the student's on DRIFT_SUITE, texts chosen for where
tokenizer implementations part ways; a difference there is a warning unless the
threshold `min_suite_match` (1.0 with `shrink export --strict-tokenizer`) says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shrink.errors import ShrinkError

MAX_PROMPTS = 64  # evaluation prompts compared (parity is about the math, not coverage)
# Top-1 agreement: the export's pick agrees when the student gives it within this many
# nats of its own best token (a tie the student itself does not decide).
TIE_NATS = 0.01

# (text, what it probes). Token ids only: each text through both tokenizers, no model.
DRIFT_SUITE = (
    ("  two leading spaces", "SentencePiece adds '▁' before any text; HF's Metaspace not before a space"),
    (" one leading space", "the same, one space"),
    ("trailing spaces   ", "a run of spaces at the end (no word after it)"),
    ("repeated   spaces  between    words", "runs of spaces: '▁▁' pieces, or the split regex's \\s+(?!\\S)"),
    ("tabs\tbetween\t\twords", "tabs, single and repeated"),
    ("first line\n\nafter a blank line\n", "newlines and a blank line"),
    ("  \n\t \n", "whitespace only"),
    ("café naïve Ünïcödé façade", "precomposed accents (NFC)"),
    ("cafe\u0301 nai\u0308ve", "decomposed accents (NFD): an NFC normalizer (Qwen) composes them, llama.cpp does not"),
    ("日本語のテキストと中文字符", "CJK, no spaces"),
    ("emoji 🙂🚀 👍🏽 👨\u200d👩\u200d👧", "emoji, a skin-tone modifier, a zero-width-joiner sequence"),
    ("digits 7 42 3.14159 -0.5", "short numbers, decimals, signs"),
    ("123456789012345678901234567890", "a long number: split per digit or in groups, by the pre-tokenizer"),
    ("def f(x):\n    return x ** 2  # square\n", "code: indentation, operators, a comment"),
    ('<div class="note">Tom &amp; Jerry</div>', "HTML: tags, attributes, an entity"),
    ('{"key": [1, 2.5, null], "ok": true}', "JSON"),
    ("I'm sure YOU'LL see it's DON'T we've", "contractions in mixed case (the split regexes match 's 'LL ...)"),
    ("<s> </s> <unk> <pad> <bos> <eos>", "SentencePiece families' special tokens as plain text"),
    ("<|endoftext|><|im_start|>user\nhi<|im_end|>", "Qwen's special tokens as plain text"),
    ("<start_of_turn>user hi<end_of_turn>", "Gemma's turn markers as plain text"),
    ("<|user|>hi<|end|><|assistant|>", "Phi-3's special tokens as plain text"),
    ("[INST] hi [/INST]", "Llama 2 / Mistral's instruction markers"),
)


@dataclass(frozen=True)
class Thresholds:
    min_top1: float  # fraction of positions whose argmax agrees
    max_kl: float  # mean KL(student || export) per position, nats
    min_token_match: float = 1.0  # fraction of prompts whose ids equal the student's
    min_suite_match: float = 0.0  # fraction of drift-suite texts whose ids equal the student's (0: a warning)


class ParityError(ShrinkError):
    """The export does not compute what its source computes. Exit code 1: a failed check,
    not a user error."""

    exit_code = 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def suite_texts(tokenizer=None) -> list[str]:
    """DRIFT_SUITE's texts, and with a tokenizer its own special tokens as plain text."""
    texts = [text for text, _ in DRIFT_SUITE]
    specials = [t for t in (tokenizer.all_special_tokens if tokenizer is not None else ()) if t]
    if specials:
        texts.append(" ".join(specials) + " " + "".join(specials))
    return texts


def drift(reference, candidate, texts: list[str]) -> dict:
    """Whether `candidate`'s tokenizer gives `reference`'s token ids, text by text."""
    results = [{"text": text, "ids_equal": candidate.encode(text) == reference.encode(text)} for text in texts]
    equal = sum(r["ids_equal"] for r in results)
    return {"texts": results, "equal": equal, "total": len(results),
            "token_id_match": round(equal / len(results), 4) if results else 1.0}


def answer_texts(ex) -> list[str]:
    """What follows a row's prompt when the task is served: its choices, else its
    completion (none for an input without an answer)."""
    if ex.choices:
        return list(ex.choices)
    return [ex.completion] if ex.completion else []


class _Positions:
    """Top-1 agreement and KL over one set of positions, pooled per row then averaged."""

    def __init__(self):
        self.agree = self.total = 0
        self.kls: list[float] = []

    def add(self, ref: np.ndarray, cand: np.ndarray, span: slice) -> None:
        ref, cand = ref[span], cand[span]
        if not len(ref):
            return
        p, q = _log_softmax(ref.astype(np.float64)), _log_softmax(cand.astype(np.float64))
        self.kls.append(float((np.exp(p) * (p - q)).sum(-1).mean()))
        picked = np.take_along_axis(p, cand.argmax(-1)[:, None], -1)[:, 0]  # the student's log-prob of the export's pick
        self.agree += int((picked >= p.max(-1) - TIE_NATS).sum())
        self.total += len(ref)

    def add_row(self, row: "_Positions") -> None:
        """Pool one row's positions; the row counts once in the mean KL."""
        self.agree, self.total = self.agree + row.agree, self.total + row.total
        if row.kls:
            self.kls.append(float(np.mean(row.kls)))

    def figures(self) -> dict:
        return {"positions": self.total, "top1_agreement": round(self.agree / self.total, 4) if self.total else 1.0,
                "mean_kl": round(float(np.mean(self.kls)), 5) if self.kls else 0.0}


def measure(reference, candidate, examples, where: list[str], suite: list[str] | None = None) -> dict:
    """Parity figures of `candidate` against `reference` (two Runtimes) on `examples`
    (shrink.tasks.Example), judged at their answer positions (see the module's text), and
    the tokenizers' agreement on the drift suite (`suite`: default DRIFT_SUITE's texts);
    `where[i]` names row i (file:line) for the worst-example report."""
    from shrink.evaluate import split_ids

    rows = list(zip(examples, where))[:MAX_PROMPTS]
    judged, prompts = _Positions(), _Positions()
    worst, token_match, answered = (-1.0, ""), 0, False
    for ex, name in rows:
        prompt_ids = reference.encode(ex.prompt, ex.chat)
        token_match += candidate.encode(ex.prompt, ex.chat) == prompt_ids
        answers = answer_texts(ex)
        answered = answered or bool(answers)
        context, conts = split_ids(reference, ex.prompt, answers, ex.chat) if answers else (prompt_ids, [])
        # (ids, judged span): the prompt's last position once (the choices share it), a
        # completion's last decides whether to stop, a choice's last is never read; no
        # answer: the prompt's own positions
        seqs = [(context + c, slice(max(len(context) - (1 if i == 0 else 0), 0),
                                    len(context) + len(c) - (1 if ex.choices else 0)))
                for i, c in enumerate(c for c in conts if c)] or [(prompt_ids, slice(0, len(prompt_ids)))]
        row = _Positions()
        for i, (ids, span) in enumerate(seqs):
            ref, cand = reference.logits(ids), candidate.logits(ids)  # (seq, vocab) each
            row.add(ref, cand, span)
            if i == 0 and span.start > 0:
                prompts.add(ref, cand, slice(0, span.start))
        judged.add_row(row)
        if row.kls and judged.kls[-1] > worst[0]:
            worst = (judged.kls[-1], name)
    return {
        "prompts": len(rows),
        "judged": "answer positions" if answered else "prompt positions",
        **judged.figures(),
        "prompt_positions": prompts.figures(),
        "token_id_match": round(token_match / len(rows), 4),
        "worst_example": {"where": worst[1], "mean_kl": round(worst[0], 5)},
        "suite": drift(reference, candidate, suite if suite is not None else suite_texts()),
    }


def verdict(figures: dict, t: Thresholds) -> list[str]:
    """The thresholds the figures miss (empty when the export passes)."""
    failed = []
    if figures["token_id_match"] < t.min_token_match:
        failed.append(f"tokenizer ids match on {figures['token_id_match']:.1%} of prompts < {t.min_token_match:.0%}")
    if figures["top1_agreement"] < t.min_top1:
        failed.append(f"top-1 agreement {figures['top1_agreement']:.1%} < {t.min_top1:.0%}")
    if figures["mean_kl"] > t.max_kl:
        failed.append(f"mean KL {figures['mean_kl']:.4f} > {t.max_kl}")
    suite = figures.get("suite")
    if suite and suite["token_id_match"] < t.min_suite_match:
        differ = drifted(figures)
        named = ", ".join(repr(text) for text in differ[:3]) + (", ..." if len(differ) > 3 else "")
        failed.append(f"tokenizer ids differ on {len(differ)} of {suite['total']} drift-suite texts ({named})")
    return failed


def drifted(figures: dict) -> list[str]:
    """The drift-suite texts whose ids differ."""
    return [r["text"] for r in (figures.get("suite") or {}).get("texts", []) if not r["ids_equal"]]
