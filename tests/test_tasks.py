import json

import pytest

from shrink.errors import TaskDataError
from shrink.tasks import Example, load_task


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
