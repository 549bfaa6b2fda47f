"""A chat teacher end to end: label -> distill -> GGUF that carries the template ->
eval with each metric, special tokens parsed alike in torch and llama.cpp."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tiny
import tiny_families
from shrink.chat import render, resolve_template
from shrink.manifest import Manifest
from shrink.tasks import load_task

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def invoke(*args):
    r = CliRunner().invoke(cli_app(), [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def cli_app():
    from shrink.cli import cli

    return cli


def chats(n: int, seed: int, answers: bool = True) -> list[dict]:
    rows = []
    for r in tiny.toy_examples(n, seed=seed, choices=False):
        messages = [{"role": "user", "content": r["prompt"].removesuffix("\nSentiment:")}]
        if answers:
            messages.append({"role": "assistant", "content": r["completion"].strip()})
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    """A tiny Qwen2 trained on ChatML-rendered reviews; its generation config lists only
    <|endoftext|>, so the student must learn <|im_end|> from the template."""
    from shrink.chat import ChatTemplate, check_messages

    folder = tmp_path_factory.mktemp("chat") / "teacher"
    tpl = ChatTemplate(CHATML, "t")
    rendered = [render(tpl, check_messages(r["messages"], "t")) for r in chats(300, seed=1)]
    rows = [{"prompt": r.prompt, "completion": r.completion} for r in rendered]
    tok = tiny_families.build_tokenizer(folder, "qwen2", [r["prompt"] + r["completion"] for r in rows] + tiny.PARITY_SUITE)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = tiny_families.build_model("qwen2", tok, layers=2, hidden=128)
    tiny.train_lm(model, tok, rows, steps=300, lr=1e-3)  # 100% on the toy task's test chats
    model.save_pretrained(folder)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def built(chat_teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("chatbuild")
    inputs = tiny.write_jsonl(d / "inputs.jsonl", chats(60, seed=3, answers=False))
    test = tiny.write_jsonl(d / "test.jsonl", chats(24, seed=99))
    invoke("label", "--teacher", chat_teacher, "--data", inputs, "--out", d / "labeled.jsonl", "--max-new-tokens", 8)
    invoke("distill", "--teacher", chat_teacher, "--data", d / "labeled.jsonl", "--eval", test, "--out",
           d / "student", "--layers", 2, "--steps", 40, "--lr", "1e-3", "--device", "cpu")
    invoke("export", d / "student", "--target", "gguf", "--quant", "F16", "--eval", test, "--out", d / "gguf")
    return d, test


def test_label_answers_chats_as_assistant_turns(built):
    d, _ = built
    rows = [json.loads(line) for line in (d / "labeled.jsonl").read_text().splitlines()]
    assert len(rows) == 60
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert "<|im_end|>" not in row["messages"][-1]["content"]  # it stopped at the end of its turn
    assert sum(row["messages"][-1]["content"] in ("positive", "negative") for row in rows) >= 45


def test_the_student_and_its_gguf_carry_the_template_and_stop_at_end_of_turn(built, chat_teacher):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    d, _ = built
    tok = AutoTokenizer.from_pretrained(d / "student")
    assert tok.chat_template == CHATML
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((d / "student" / "generation_config.json").read_text())
    assert im_end in generation["eos_token_id"]
    reader = GGUFReader(next((d / "gguf").glob("*.gguf")))
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    student = Manifest.read(d / "student")
    assert student.settings["chat_template"] is None  # auto: the data holds messages
    assert student.metrics["metric"] == "exact" and student.metrics["accuracy"] >= 0.8


def test_special_tokens_of_a_template_are_tokens_in_every_runtime(built):
    from shrink.runtime import open_runtime

    d, test = built
    prompt = load_task(test, resolve_template("auto", d / "student"))[0].prompt
    torch_rt, llama_rt = open_runtime(d / "student", device="cpu"), open_runtime(d / "gguf")
    try:
        ids = torch_rt.encode(prompt, special=True)
        assert llama_rt.encode(prompt, special=True) == ids
        im_start = torch_rt.tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert ids.count(im_start) == 2  # the user's turn and the assistant's
        assert im_start not in torch_rt.encode(prompt)  # raw text: "<|im_start|>" stays characters
    finally:
        llama_rt.close()


@pytest.mark.parametrize("metric", ["exact", "f1", "chrf", "rouge-l"])
def test_the_gguf_is_scored_by_each_metric_through_llama_cpp(built, metric):
    d, test = built
    res = json.loads(invoke("eval", d / "gguf", "--data", test, "--metric", metric, "--json").stdout)
    art = res["results"][0]
    assert (art["runtime"], art["metric"]) == ("llama.cpp", metric)
    assert res["chat_template"]["source"].endswith("(tokenizer.chat_template)")
    assert 0.8 <= art["accuracy"] <= 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gguf_answers_the_openai_client_through_llama_cpp_server(built):
    """The bundle's serving path: llama-cpp-python's OpenAI-compatible server renders the
    GGUF's own template, and the official client gets the answer shrink's runtime gives."""
    import subprocess
    import sys
    import time

    import openai

    from shrink.evaluate import answer, Generation
    from shrink.runtime import open_runtime

    d, test = built
    gguf = next((d / "gguf").glob("*.gguf"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "256", "--verbose", "False"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "llama_cpp.server did not start"
                time.sleep(0.5)
        ex = load_task(test, resolve_template("auto", gguf))[0]
        messages = [json.loads(line) for line in test.read_text().splitlines()][0]["messages"][:-1]
        reply = client.chat.completions.create(model=str(gguf), messages=messages, max_tokens=8, temperature=0)
        rt = open_runtime(gguf)
        try:
            expected = answer(rt, ex, Generation(max_new_tokens=8))
        finally:
            rt.close()
        assert reply.choices[0].message.content.strip() == expected.strip() != ""
        assert reply.choices[0].finish_reason == "stop"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_run_sends_the_prompt_as_a_chat_message(built):
    from shrink.evaluate import Generation, answer
    from shrink.runtime import open_runtime

    d, test = built
    gguf = d / "gguf"
    ex = load_task(test, resolve_template("auto", gguf))[0]
    user = [json.loads(line) for line in test.read_text().splitlines()][0]["messages"][0]["content"]
    out = invoke("run", gguf, user, "--chat-template", "auto", "--max-tokens", 8).stdout
    rt = open_runtime(gguf)
    try:
        assert out.strip() == answer(rt, ex, Generation(max_new_tokens=8)).strip()
    finally:
        rt.close()


def test_gptq_calibrates_on_chat_rows_with_the_students_template(built, tmp_path):
    d, test = built
    r = invoke("export", d / "student", "--target", "gptq", "--bits", "8", "--group-size", "32",
               "--calibration", d / "labeled.jsonl", "--device", "cpu", "--out", tmp_path / "gptq", "--json")
    m = json.loads(r.stdout)
    assert m["format"] == "gptq" and m["settings"]["calibration"] == str(d / "labeled.jsonl")
