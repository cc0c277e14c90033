"""services/study_gradients.py against float64 references on the built-in models."""

from __future__ import annotations

import pytest
import torch

from services.study import Models, StudySettings, parse_variant, scored_batch
from services.study_gradients import (estimator_gradient, exact_gradient, rows, statistics,
                                      truncate)


@pytest.fixture(scope="module")
def setup():
    from shared.models import load_model
    from shared.task import make_problems

    models = Models(StudySettings(eval_n=1))
    student = load_model(models.student_path).double()
    torch.manual_seed(0)
    batch, _, _ = scored_batch(models, student, make_problems(6, seed=3, split="train"), 0, 4, 15)
    return models, student, batch


def reference_gradient(student, batch):
    """Dense float64 reverse KL, one unpadded sequence at a time, by autograd."""
    params = list(student.parameters())
    total, tokens = 0.0, 0
    for b in batch:
        prompt, completion = b.trajectory.prompt.prompt_ids_P, b.trajectory.completion_ids_T
        ids = torch.tensor([*prompt, *completion]).long()[None]
        logp = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
        rows_TV = logp[len(prompt) - 1:len(prompt) - 1 + len(completion)]
        teacher = torch.full_like(rows_TV, 0.0)
        teacher.scatter_(-1, torch.from_numpy(b.scores.topk_ids_TK).long(),
                         torch.from_numpy(b.scores.topk_logprobs_TK).double())
        total = total + (rows_TV.exp() * (rows_TV - teacher)).sum()
        tokens += len(completion)
    grads = torch.autograd.grad(total / tokens, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def test_exact_gradient_matches_dense_float64_reference(setup):
    models, student, batch = setup
    got = exact_gradient(student, batch, models.tokenizer.pad_token_id)
    torch.testing.assert_close(got, reference_gradient(student, batch), rtol=1e-7, atol=1e-10)


def test_exact_estimator_has_cosine_one_and_no_error(setup):
    models, student, batch = setup
    pad = models.tokenizer.pad_token_id
    exact = exact_gradient(student, batch, pad)
    support = estimator_gradient(student, batch, parse_variant("rkl_support")[1], pad)  # k = V: exact
    stats = statistics([support, support], [exact, exact])
    assert stats["cos_mean"] == pytest.approx(1.0, abs=1e-9)
    assert stats["rel_var"] < 1e-12 and stats["rel_bias2"] < 1e-12
    cut = estimator_gradient(student, truncate(batch, k=2), parse_variant("rkl_support")[1], pad)
    assert statistics([cut], [exact])["cos_mean"] < 0.999  # a 2-id cache is biased


def test_rows_cover_variants_and_sweeps():
    table = rows(["fkl_topk", "rkl_mc", "rkl_stale+vcpo", "rkl_stale+tis"], [2, 15], [1, 4], mc_samples=3)
    assert "rkl_stale+vcpo" not in table and table["rkl_stale+tis"] == ("rkl_stale+tis", None, 1)
    assert table["rkl_mc"] == ("rkl_mc", None, 3) and table["rkl_mc@4"] == ("rkl_mc", None, 4)
    assert table["fkl_topk@2"] == ("fkl_topk", 2, 1)
