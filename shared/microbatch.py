"""Token-budget micro-batches: split a step's sequences so each padded batch fits a budget.

A batch of right-padded sequences costs (rows x longest row) tokens of activations. The
planner sorts sequences by length, longest first, and fills each micro-batch while
rows x longest <= max_tokens (first-fit decreasing on padded size), so similar lengths
share a micro-batch and padding stays small. A sequence longer than the budget forms a
micro-batch of its own: it is never dropped.

    >>> microbatches([5, 3, 9, 2], max_tokens=10)
    [[2], [0, 1], [3]]

A multi-rank learner first splits the step's sequences over its ranks (`shards`: about
equal tokens each, longest first to the least-loaded rank), then each rank plans its own.

    >>> shards([5, 3, 9, 2], parts=2)
    [[2], [0, 1, 3]]
"""

from __future__ import annotations

from collections.abc import Sequence


def microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Index groups covering range(len(lengths)) once each; max_tokens <= 0: one group."""
    if max_tokens <= 0 or not lengths:
        return [list(range(len(lengths)))] if lengths else []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * longest <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
            longest = lengths[i]
    return groups


def padded_tokens(lengths: Sequence[int], groups: list[list[int]]) -> int:
    """Tokens the groups cost once right-padded (rows x longest row, summed)."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def shards(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` index lists covering range(len(lengths)) once, with about equal total length:
    longest first, each to the part with the least so far (ties: the lower part); ascending."""
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = min(range(parts), key=lambda j: (loads[j], j))
        out[j].append(i)
        loads[j] += lengths[i]
    return [sorted(part) for part in out]
