"""Prompt datasets: JSONL or Parquet rows -> validated `Example`s, and their prompt token ids.

A row holds either `prompt` (text) or `messages` (chat turns: a list of {"role", "content"}
string maps), plus optional `answer` (the reference the verifier grades against; a number
is accepted and kept as its text) and `teacher_id` (the teacher pool that scores it: its
trajectories go to that pool's stream, shared/teacher_pools.py; `""` = the default pool). Unknown columns are ignored. `.parquet` files are read with
pyarrow, anything else as JSONL (one JSON object a line, blank lines skipped). Every row is
validated when the file is loaded; a bad one raises `DatasetError` naming the file, the
line (JSONL) or row (Parquet, 0-based) and the field.

Token ids: a text prompt is `tokenizer(text)` (the tokenizer's own BOS convention); a chat
prompt is rendered with the tokenizer's chat template,
`apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)`, and
tokenised without adding special tokens again (the template writes its own).

    python -m shared.datasets prompts.jsonl    # validate a file, print its first rows
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.keys import check_teacher_id

ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """A dataset file or row that cannot be used: the message names file, line/row and field."""


@dataclass(frozen=True)
class Example:
    """One dataset row: text prompt or chat messages, the reference answer, the teacher asked for."""

    prompt: str = ""
    answer: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) turns; empty for a text prompt
    teacher_id: str = ""
    where: str = ""  # file:line or file:row N, for errors about this row later on

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


def _messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DatasetError(f"{where}: field 'messages': need a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: field 'messages[{i}]': need a {{role, content}} map, got {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DatasetError(f"{where}: field 'messages[{i}].role': {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: field 'messages[{i}].content': need a string, got {type(content).__name__}")
        turns.append((role, content))
    return tuple(turns)


def _answer(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{where}: field 'answer': need a string or a number, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def parse_row(row: Any, where: str) -> Example:
    """One row (a mapping) -> Example, or DatasetError naming `where` and the field."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: need a JSON object per row, got {type(row).__name__}")
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        raise DatasetError(f"{where}: field 'prompt'/'messages': need exactly one of them")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise DatasetError(f"{where}: field 'prompt': need a non-empty string")
    teacher_id = row.get("teacher_id") or ""
    if not isinstance(teacher_id, str):
        raise DatasetError(f"{where}: field 'teacher_id': need a string, got {type(teacher_id).__name__}")
    try:
        check_teacher_id(teacher_id)
    except ValueError as e:
        raise DatasetError(f"{where}: field 'teacher_id': {e}") from None
    return Example(prompt=prompt or "", answer=_answer(row.get("answer"), where),
                   messages=_messages(messages, where) if messages is not None else (),
                   teacher_id=teacher_id, where=where)


def _jsonl_rows(path: Path) -> list[Example]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append(parse_row(row, f"{path}:{n}"))
    return out


def _parquet_rows(path: Path) -> list[Example]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's own errors: not a Parquet file, a broken footer
        raise DatasetError(f"{path}: cannot read as Parquet: {e}") from e
    return [parse_row(row, f"{path}:row {i}") for i, row in enumerate(rows)]


def load(path: str) -> list[Example]:
    """Every row of a JSONL or Parquet file, validated; DatasetError on the first bad one."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{path}: no such file")
    rows = _parquet_rows(p) if p.suffix == ".parquet" else _jsonl_rows(p)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def render_chat(tokenizer: Any, example: Example, template_kwargs: dict[str, Any] | None = None) -> str:
    """The chat prompt as text, through the tokenizer's chat template (generation prompt added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(f"{example.where}: field 'messages': the student tokenizer has no chat template "
                           "(set one with the learner's --chat-template)")
    messages = [{"role": r, "content": c} for r, c in example.messages]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
    except Exception as e:  # a Jinja error or a template's raise_exception: name the row
        raise DatasetError(f"{example.where}: field 'messages': the chat template failed: {e}") from e


def prompt_ids(tokenizer: Any, example: Any, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a text prompt (`tokenizer(text)`) or a chat one (rendered, no extra specials).

    `example` is an Example or anything with a `.prompt` (the built-in task's Problem)."""
    if getattr(example, "messages", ()):
        ids = tokenizer(render_chat(tokenizer, example, template_kwargs), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(example.prompt)["input_ids"]
    if not ids:
        raise DatasetError(f"{getattr(example, 'where', '')}: the prompt tokenises to no tokens")
    return list(ids)


def check_encodable(tokenizer: Any, examples: list[Example], template_kwargs: dict[str, Any] | None = None) -> None:
    """Tokenise every row once, so a template or tokenizer problem fails at start, not mid-run."""
    for example in examples:
        prompt_ids(tokenizer, example, template_kwargs)


def main(argv: list[str] | None = None) -> None:
    """Validate a dataset file and print its first rows."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m shared.datasets FILE.jsonl|FILE.parquet")
    rows = load(args[0])
    chat = sum(r.is_chat for r in rows)
    print(f"{args[0]}: {len(rows)} rows ({chat} chat, {len(rows) - chat} text)")
    for r in rows[:3]:
        print(f"  {r.where}: {r.messages or r.prompt!r} -> {r.answer!r} teacher={r.teacher_id!r}")


if __name__ == "__main__":
    main()
