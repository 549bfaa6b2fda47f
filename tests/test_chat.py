"""Chat rows rendered by a chat template, from a model folder, a GGUF file or a Jinja file."""

import json

import pytest

from shrink.chat import ChatTemplate, check_messages, model_chat_template, render, resolve_template
from shrink.errors import ShrinkError, TaskDataError

GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Order #12?"},
        {"role": "assistant", "content": "shipped"}]


def test_render_splits_prompt_completion_and_end_of_turn():
    r = render(ChatTemplate(GEMMA, "t", "<bos>", "<eos>"), check_messages(CHAT, "t:1"))
    # The leading BOS is the runtime's to add, as for raw prompts.
    assert r.prompt == ("<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nOrder #12?<end_of_turn>\n"
                        "<start_of_turn>model\n")
    assert r.completion == "shipped<end_of_turn>"
    assert r.reference == "shipped"
    assert r.end_of_turn == "<end_of_turn>"


def test_render_without_an_answer_is_a_prompt_only():
    r = render(ChatTemplate(GEMMA, "t", "<bos>"), check_messages(CHAT[:2], "t:1"))
    assert r.prompt.endswith("<start_of_turn>model\n") and r.completion is r.reference is None


@pytest.mark.parametrize("messages, error", [
    ([], "t:3: 'messages' must be a non-empty list of {\"role\", \"content\"} objects"),
    ("hi", "t:3: 'messages' must be a non-empty list of {\"role\", \"content\"} objects"),
    ([{"role": "bot", "content": "x"}], "t:3: messages[0] has role 'bot' (expected one of system, user, assistant)"),
    ([{"role": "user", "content": 3}], "t:3: messages[0] content must be a string, got int"),
    (["x"], "t:3: messages[0] must be an object, got str"),
    ([{"role": "assistant", "content": "x"}], "t:3: 'messages' holds only an assistant turn (nothing to prompt with)"),
])
def test_bad_messages_name_the_line(messages, error):
    with pytest.raises(TaskDataError) as e:
        check_messages(messages, "t:3")
    assert str(e.value) == error


def test_template_of_a_model_folder(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<bos>"}, "eos_token": "<eos>", "chat_template": GEMMA}))
    bos, eos, tpl = model_chat_template(tmp_path)
    assert (bos, eos, tpl.text) == ("<bos>", "<eos>", GEMMA)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert resolve_template("auto", tmp_path).text == "{{ messages[0]['content'] }}"  # the newer file wins
    assert resolve_template("none", tmp_path) is None


def test_template_of_a_gguf_file(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "a"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_chat_template(GEMMA)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tpl = resolve_template("auto", path)
    assert (tpl.text, tpl.bos_token, tpl.eos_token) == (GEMMA, "<bos>", "<eos>")


def test_auto_without_a_template_and_a_missing_file_are_errors(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ShrinkError) as e:
        resolve_template("auto", tmp_path)
    assert str(e.value) == (f"--chat-template auto: {tmp_path} has no chat template "
                            "(give a Jinja file, or --chat-template none for raw prompts)")
    with pytest.raises(ShrinkError) as e:
        resolve_template(str(tmp_path / "nope.jinja"), tmp_path)
    assert str(e.value) == f"--chat-template: no such file {tmp_path / 'nope.jinja'} (expected auto, none or a Jinja file)"
    (tmp_path / "t.jinja").write_text(GEMMA)
    assert resolve_template(str(tmp_path / "t.jinja"), None).text == GEMMA


def test_a_broken_template_is_an_error_naming_it():
    with pytest.raises(ShrinkError, match=r"^chat template bad.jinja: "):
        render(ChatTemplate("{% for %}", "bad.jinja"), check_messages(CHAT, "t:1"))
