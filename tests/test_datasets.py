"""Prompt datasets: JSONL and Parquet rows (text and chat) parse; bad rows name file, line/row and field;
chat prompts go through the student tokenizer's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.datasets import DatasetError, Example, check_encodable, load, prompt_ids, render_chat
from shared.models import load_tokenizer

# only characters the built-in tokenizer knows (digits, + and =), so every rendered char is a token
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ sys_prefix }}{% endif %}"
            "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("builtin:student")
    tok.chat_template = TEMPLATE
    return tok


def test_text_and_chat_rows_parse(tmp_path: Path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "1+2=", "answer": "3"}, "",
        {"messages": [{"role": "user", "content": "2+2"}], "answer": 4, "teacher_id": "math", "extra": 1},
        {"prompt": "5+5="}])
    text, chat, bare = load(str(path))
    assert text == Example(prompt="1+2=", answer="3", where=f"{path}:1")
    assert chat.is_chat and chat.messages == (("user", "2+2"),) and chat.answer == "4"
    assert chat.teacher_id == "math" and chat.where == f"{path}:3"
    assert bare.answer == "" and bare.teacher_id == "" and not bare.is_chat


def test_parquet_rows_parse(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "system", "content": "9"}, {"role": "user", "content": "1+1"}],
                                          [{"role": "user", "content": "3+4"}]],
                             "answer": ["2", "7"], "teacher_id": ["a", None]}), path)
    first, second = load(str(path))
    assert first.messages == (("system", "9"), ("user", "1+1")) and first.teacher_id == "a"
    assert second.answer == "7" and second.teacher_id == "" and second.where == f"{path}:row 1"


@pytest.mark.parametrize("row, field", [
    ('{"prompt": "1+1=", ', "not valid JSON"),
    ('[1, 2]', "need a JSON object"),
    ({"answer": "2"}, "field 'prompt'/'messages'"),
    ({"prompt": "1", "messages": [{"role": "user", "content": "1"}]}, "field 'prompt'/'messages'"),
    ({"prompt": ""}, "field 'prompt'"),
    ({"prompt": "1", "answer": [2]}, "field 'answer'"),
    ({"prompt": "1", "teacher_id": 3}, "field 'teacher_id'"),
    ({"messages": []}, "field 'messages'"),
    ({"messages": [{"role": "robot", "content": "1"}]}, r"field 'messages\[0\].role'"),
    ({"messages": [{"role": "user", "content": "1"}, {"role": "user"}]}, r"field 'messages\[1\].content'"),
])
def test_bad_jsonl_row_names_file_line_and_field(tmp_path: Path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, "", row])
    with pytest.raises(DatasetError, match=f"^{path}:3: {field}"):
        load(str(path))


def test_bad_parquet_row_and_file(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", None], "answer": ["2", "3"]}), path)
    with pytest.raises(DatasetError, match=f"^{path}:row 1: field 'prompt'/'messages'"):
        load(str(path))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="cannot read as Parquet"):
        load(str(tmp_path / "junk.parquet"))
    with pytest.raises(DatasetError, match="no rows"):
        load(str(write_jsonl(tmp_path / "empty.jsonl", [""])))


def test_chat_prompt_goes_through_the_template(tokenizer):
    ex = Example(messages=(("system", "7"), ("user", "12+3")), where="f:1")
    assert render_chat(tokenizer, ex, {"sys_prefix": "99"}) == "<bos>99712+3="
    ids = prompt_ids(tokenizer, ex, {"sys_prefix": "99"})
    # the template writes the only <bos>; the tokenizer adds no second one
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "9", "9", "7", "1", "2", "+", "3", "="]
    assert prompt_ids(tokenizer, Example(prompt="12+3=")) == tokenizer("12+3=")["input_ids"]


def test_chat_rows_without_a_template_fail_at_the_check(tokenizer):
    bare = load_tokenizer("builtin:student")
    rows = [Example(prompt="1+1="), Example(messages=(("user", "1+1"),), where="data.jsonl:2")]
    check_encodable(tokenizer, rows)
    with pytest.raises(DatasetError, match="^data.jsonl:2: field 'messages': the student tokenizer has no chat template"):
        check_encodable(bare, rows)
    tokenizer_raising = load_tokenizer("builtin:student")
    tokenizer_raising.chat_template = "{{ raise_exception('only one turn') }}"
    with pytest.raises(DatasetError, match="data.jsonl:2: field 'messages': the chat template failed: only one turn"):
        check_encodable(tokenizer_raising, rows)


def test_held_out_rows_grade_like_the_builtin_task(tokenizer):
    from shared.evaluate import accuracy, dataset_accuracy
    from shared.models import load_model
    from shared.task import make_problems
    from shared.verifiers import exact, numeric

    model = load_model("builtin:teacher")
    problems = make_problems(24, seed=5, split="eval")
    text = [Example(prompt=p.prompt, answer=p.answer) for p in problems]
    # the same prompts as chat rows: TEMPLATE renders "<bos>" + content + "=", the text prompt exactly
    chat = [Example(messages=(("user", p.prompt[:-1]),), answer=p.answer) for p in problems]
    want = accuracy(model, tokenizer, problems)
    assert want > 0.5  # the teacher is good at its task: the comparison means something
    assert dataset_accuracy(model, tokenizer, text, exact, batch_size=5) == want
    assert dataset_accuracy(model, tokenizer, chat, numeric, batch_size=7) == want
