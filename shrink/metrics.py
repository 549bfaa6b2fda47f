"""Task metrics: how a model's answers are scored against the references.

One table, one entry per metric; every score is a fraction in [0, 1] over the whole set.

- choice: the choice with the highest log-probability is the reference (rows with `choices`).
- exact: normalized exact match (case, surrounding whitespace, runs of whitespace and a
  final period do not count).
- f1: token F1 as SQuAD defines it (lower case, punctuation and the articles a/an/the
  removed, whitespace tokens), averaged over examples.
- chrf: corpus chrF from sacrebleu (its defaults: character 6-grams, beta 2), / 100.
- rouge-l: ROUGE-L F-measure from rouge-score (no stemming, as Hugging Face `evaluate`
  computes it by default), averaged over examples.
- json: field-level accuracy. The reference is a JSON object; an answer scores the fields
  of the reference it reproduces (strings compared as `exact` does, other values equal),
  over all reference fields of the set. An answer that does not parse as a JSON object
  scores none of its fields.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shrink.errors import ShrinkError, TaskDataError


def normalize(text: str) -> str:
    """`exact`'s normal form: lower case, single spaces, no surrounding space or final period."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean(float(normalize(p) == normalize(r)) for p, r in zip(predictions, references, strict=True))


PUNCTUATION = frozenset(string.punctuation)


def squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1's answer normalisation, split into tokens."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = squad_tokens(prediction), squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean(token_f1(p, r) for p, r in zip(predictions, references, strict=True))


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score / 100


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _mean(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True))


def json_fields(predictions: Sequence[str], references: Sequence[str]) -> float:
    matched = total = 0
    for p, r in zip(predictions, references, strict=True):
        ref = json.loads(r)
        try:
            pred = json.loads(p)
        except json.JSONDecodeError:
            pred = None
        total += len(ref)
        if isinstance(pred, dict):
            matched += sum(key in pred and _same_value(pred[key], value) for key, value in ref.items())
    return matched / total if total else 1.0


def _same_value(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return normalize(a) == normalize(b)
    return a == b


def _check_json_reference(reference: str, where: str) -> None:
    try:
        value = json.loads(reference)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{where}: --metric json needs a JSON object as the reference, "
                            f"and this one is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict) or not value:
        raise TaskDataError(f"{where}: --metric json needs a non-empty JSON object as the reference, "
                            f"got {type(value).__name__ if not isinstance(value, dict) else 'an empty object'}")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class Metric:
    name: str
    score: Callable[[Sequence[str], Sequence[str]], float] | None  # None: scored by log-probabilities
    check_reference: Callable[[str, str], None] | None = None  # (reference, "file:line") -> raises


METRICS = {m.name: m for m in (
    Metric("choice", None),
    Metric("exact", exact),
    Metric("f1", f1),
    Metric("chrf", chrf),
    Metric("rouge-l", rouge_l),
    Metric("json", json_fields, _check_json_reference),
)}
METRIC_NAMES = tuple(METRICS)


def get_metric(name: str, option: str = "--metric") -> Metric:
    if name not in METRICS:
        raise ShrinkError(f"{option}: unknown metric {name!r} (choose from {', '.join(METRIC_NAMES)})")
    return METRICS[name]


def default_metric(has_choices: bool) -> str:
    """choice for rows with `choices`, exact for generated answers."""
    return "choice" if has_choices else "exact"
