"""Each metric against values computed by hand."""

import pytest

from shrink.errors import ShrinkError, TaskDataError
from shrink.metrics import METRICS, default_metric, get_metric


def score(name, predictions, references):
    return METRICS[name].score(predictions, references)


def test_exact_ignores_case_spacing_and_final_period():
    assert score("exact", [" Positive.", "neg", "a  b"], ["positive", "negative", "A b"]) == pytest.approx(2 / 3)


def test_f1_is_squads_token_f1():
    # pred tokens [eiffel, tower, paris] (article and comma gone), ref [in, paris]:
    # 1 common, precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4.
    assert score("f1", ["The Eiffel Tower, Paris"], ["in Paris"]) == pytest.approx(0.4)
    assert score("f1", ["Paris", "x"], ["paris!", "y"]) == pytest.approx(0.5)
    assert score("f1", ["the"], ["a"]) == 1.0  # both empty after normalisation


def test_chrf_is_sacrebleus_corpus_chrf():
    # Each of the 6 character n-gram orders matches all but the n-grams holding the last
    # character: precision = recall = (k-1)/k for k = 7..2 n-grams, so F = their mean.
    expected = (6 / 7 + 5 / 6 + 4 / 5 + 3 / 4 + 2 / 3 + 1 / 2) / 6
    assert score("chrf", ["abcdefg"], ["abcdefh"]) == pytest.approx(expected, abs=1e-6)
    assert score("chrf", ["same text"], ["same text"]) == pytest.approx(1.0)
    assert score("chrf", ["xyz"], ["abc"]) == 0.0


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6.
    assert score("rouge-l", ["the cat sat on the mat"], ["The cat lay on the mat"]) == pytest.approx(5 / 6)
    assert score("rouge-l", ["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)


def test_json_counts_reference_fields_reproduced():
    refs = ['{"name": "Ann", "age": 3}', '{"city": "Rome"}']
    # "name" matches (case and spaces do not count), "age" differs, the second does not parse.
    assert score("json", ['{"name": " ann ", "age": 4}', "not json"], refs) == pytest.approx(1 / 3)
    assert score("json", ['{"age": 3, "name": "Ann", "extra": 1}', '{"city": "rome"}'], refs) == 1.0
    assert score("json", ["[1, 2]", '"Rome"'], refs) == 0.0  # not objects


def test_json_reference_must_be_an_object():
    check = METRICS["json"].check_reference
    check('{"a": 1}', "t.jsonl:1")
    with pytest.raises(TaskDataError, match=r"^t.jsonl:2: --metric json needs a JSON object as the reference, "
                                            r"and this one is not JSON \(Expecting value at column 1\)$"):
        check("Rome", "t.jsonl:2")
    with pytest.raises(TaskDataError, match=r"^t.jsonl:3: .*got list$"):
        check("[1]", "t.jsonl:3")


def test_unknown_metric_names_the_option():
    with pytest.raises(ShrinkError, match=r"^--metric: unknown metric 'bleu' \(choose from choice, exact, f1, chrf, rouge-l, json\)$"):
        get_metric("bleu")
    assert default_metric(True) == "choice" and default_metric(False) == "exact"
