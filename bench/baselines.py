"""What a user could pick instead of a distilled student for the demo's classification
task: TF-IDF features + logistic regression (scikit-learn), fitted on the demo's training
split and measured on its dev and test splits (issue 11).

    pip install -e '.[bench]'
    python bench/baselines.py [--json]

C (the inverse regularization strength) is chosen on the dev split; the test split is
reported. Size is the fitted pipeline serialized (what a service would load); examples/s
is one review at a time, as the student is served, and in one batch. Writes
bench/results/baselines-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)  # tried on dev


def splits() -> dict[str, tuple[list[str], list[str]]]:
    from shrink.demo.task import reviews, split_rows

    return {name: ([r["text"] for r in part], [r["label"] for r in part]) for name, part in split_rows(reviews()).items()}


def fit(texts: list[str], labels: list[str], c: float):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                          LogisticRegression(C=c, max_iter=2000))
    return model.fit(texts, labels)


def accuracy(model, texts: list[str], labels: list[str]) -> float:
    return sum(p == y for p, y in zip(model.predict(texts), labels)) / len(labels)


def speed(model, texts: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    for t in texts:
        model.predict([t])
    one = time.perf_counter() - start
    start = time.perf_counter()
    model.predict(texts)
    batch = time.perf_counter() - start
    return {"examples_per_s_one_at_a_time": round(len(texts) / one, 1), "examples_per_s_batch": round(len(texts) / batch, 1)}


def measure() -> dict:
    """Fit on train, choose C on dev, measure on test: the record."""
    data = splits()
    (tr_x, tr_y), (dev_x, dev_y), (te_x, te_y) = data["train"], data["dev"], data["test"]
    dev_scores = {c: accuracy(fit(tr_x, tr_y, c), dev_x, dev_y) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (dev_scores[c], -abs(c - 1.0)))  # ties: closest to the default
    model = fit(tr_x, tr_y, best)
    return {
        "baseline": "TF-IDF (word 1-2 grams, sublinear tf) + logistic regression, scikit-learn",
        "train_examples": len(tr_x), "dev_accuracy_by_C": {str(c): round(a, 4) for c, a in dev_scores.items()},
        "C": best, "dev_accuracy": round(dev_scores[best], 4), "test_accuracy": round(accuracy(model, te_x, te_y), 4),
        "test_examples": len(te_x), "size_bytes": len(pickle.dumps(model)), **speed(model, te_x),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the record as JSON")
    args = ap.parse_args()
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **measure()}
    best = record["C"]
    path = Path("bench/results") / f"baselines-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    if args.json:
        print(json.dumps(record, indent=2))
    print(f"TF-IDF + logistic regression (C={best}, chosen on dev {record['dev_accuracy']:.1%}): "
          f"test accuracy {record['test_accuracy']:.1%} on {record['test_examples']} reviews, {record['size_bytes'] / 1e6:.2f} MB, "
          f"{record['examples_per_s_one_at_a_time']:,.0f} examples/s one at a time "
          f"({record['examples_per_s_batch']:,.0f} in a batch)")
    print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
