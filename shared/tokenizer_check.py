"""Every teacher must share the student's tokenizer: a fingerprint, published and checked.

The teacher scores the student's token ids and the learner matches the teacher's top-k ids
against its own vocabulary, so a teacher with another tokenizer would produce plausible
looking but meaningless scores. The learner publishes the student tokenizer's fingerprint
(vocabulary size and a SHA-256 of the sorted token -> id map, special tokens included) to
the run's `tokenizer` key at start; a teacher computes its own and refuses to start, with
one line saying what differs, when they disagree. Vocabularies equal up to added tokens
differ too: an added token shifts which ids mean what.

    from shared.tokenizer_check import fingerprint
    fingerprint(tokenizer)  # {'vocab_size': 15, 'sha256': '...'}
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import redis

from shared.keys import Keys


class TokenizerMismatch(SystemExit):
    """This teacher's tokenizer is not the student's: exit with one line saying how."""


def fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Vocabulary size and a hash of the whole token -> id map (added tokens included)."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return {"vocab_size": len(vocab), "sha256": hashlib.sha256(blob).hexdigest()}


def publish(client: redis.Redis, keys: Keys, tokenizer: Any, model: str) -> None:
    """Learner: the student's fingerprint, for the teachers to compare against."""
    client.set(keys.tokenizer, json.dumps({**fingerprint(tokenizer), "model": model}))


def student_fingerprint(client: redis.Redis, keys: Keys) -> dict[str, Any] | None:
    raw = client.get(keys.tokenizer)
    return None if raw is None else json.loads(raw)


def mismatch(mine: dict[str, Any], student: dict[str, Any]) -> str | None:
    """Why a teacher's fingerprint is not the student's (None when they match)."""
    if mine["vocab_size"] != student["vocab_size"]:
        return f"vocabulary size {mine['vocab_size']} != the student's {student['vocab_size']}"
    if mine["sha256"] != student["sha256"]:
        return f"same size ({mine['vocab_size']}) but different tokens or ids (vocabulary hash differs)"
    return None


def wait_and_check(client: redis.Redis, keys: Keys, tokenizer: Any, who: str,
                   stop: Callable[[], bool] = lambda: False,
                   on_wait: Callable[[], None] = lambda: None, poll_s: float = 0.2) -> bool:
    """Teacher start: wait for the learner's fingerprint, then compare; TokenizerMismatch if
    they differ. False if stopped while waiting."""
    mine = fingerprint(tokenizer)
    while (student := student_fingerprint(client, keys)) is None:
        if stop():
            return False
        on_wait()
        time.sleep(poll_s)
    why = mismatch(mine, student)
    if why:
        raise TokenizerMismatch(f"{who}: its tokenizer is not the student's ({student.get('model', '?')}): {why}. "
                                "Every teacher must use the student's tokenizer; start it with a model that does.")
    return True
