import json

import pytest

from shrink.errors import TaskDataError
from shrink.tasks import Example, load_task, spread


def write(tmp_path, text: str | bytes, name="t.jsonl"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


def test_reads_examples_ignoring_extra_keys_and_blank_lines(tmp_path):
    p = write(tmp_path, '{"prompt": "a", "completion": " b", "id": 7}\n\n'
                        '{"prompt": "c", "completion": " x", "choices": [" x", " y"]}\n')
    assert load_task(p) == [Example("a", " b"), Example("c", " x", (" x", " y"))]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "completion": "b"}\nnot json\n', "t.jsonl:2: not JSON"),
        ('[1, 2]\n', "t.jsonl:1: expected a JSON object, got list"),
        ('{"completion": "b"}\n', "t.jsonl:1: missing key 'prompt'"),
        ('{"prompt": "a"}\n', "t.jsonl:1: missing key 'completion'"),
        ('{"prompt": 3, "completion": "b"}\n', "t.jsonl:1: 'prompt' must be a string, got int"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "", "completion": "b"}\n', "t.jsonl:2: 'prompt' is empty"),
        ('{"prompt": "a", "completion": ""}\n', "t.jsonl:1: 'completion' is empty"),
        ('{"prompt": "a", "completion": "z", "choices": ["x", "y"]}\n', "t.jsonl:1: completion 'z' is not among the choices"),
        ('{"prompt": "a", "completion": "x", "choices": "x"}\n', "t.jsonl:1: 'choices' must be a non-empty list"),
        ("\n\n", "t.jsonl: empty file"),
    ],
)
def test_errors_name_file_and_line(tmp_path, content, message):
    with pytest.raises(TaskDataError) as e:
        load_task(write(tmp_path, content))
    assert message in str(e.value)


def test_not_utf8_names_the_line(tmp_path):
    good = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
    p = write(tmp_path, good.encode() + b'{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(TaskDataError, match=r"t.jsonl:2: not UTF-8"):
        load_task(p)


def test_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match="no such file"):
        load_task(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("length, n, expected", [
    (3, 5, [0, 1, 2]),  # fewer than n: all of them
    (5, 5, [0, 1, 2, 3, 4]),
    (1000, 4, [0, 250, 500, 750]),
    (10, 1, [0]),
])
def test_spread_picks_evenly_spaced_items_in_order(length, n, expected):
    assert spread(list(range(length)), n) == expected


def test_spread_between_n_and_2n_covers_the_whole_file():
    """The case an integer step got wrong: 150 items, 100 wanted. A step of 1 took the
    first 100 and never saw the last third of the file."""
    picked = spread(list(range(150)), 100)
    assert len(picked) == len(set(picked)) == 100 and picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] >= 148  # the first and the last region
    assert all(b - a <= 2 for a, b in zip(picked, picked[1:]))  # no region skipped
    assert spread(list(range(150)), 100) == picked  # deterministic


def test_spread_far_more_items_than_wanted():
    picked = spread(list(range(100_000)), 256)
    gaps = {b - a for a, b in zip(picked, picked[1:])}
    assert len(picked) == 256 and gaps <= {390, 391} and picked[-1] >= 100_000 - 391
    with pytest.raises(ValueError, match="n must be at least 1"):
        spread([1, 2], 0)


def test_gptq_calibration_is_spread_over_the_file():
    """GPTQ's calibration rows: 150 texts, 100 rows; the last text is among them."""
    from shrink.quantize.gptq import calibration_rows

    class Chars:  # a tokenizer: one id per character
        def __call__(self, text):
            return type("Enc", (), {"input_ids": [ord(c) for c in text]})()

    texts = [f"text {i}" for i in range(150)]
    rows = calibration_rows(Chars(), texts, max_rows=100)
    assert ["".join(map(chr, r["input_ids"])) for r in rows] == spread(texts, 100)
    assert rows[-1]["input_ids"] == [ord(c) for c in "text 148"] and rows[-1]["attention_mask"] == [1] * 8
