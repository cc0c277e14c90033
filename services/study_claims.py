"""The AsyncOPD paper's five claims, each answered yes / no from the study's runs and gradients.

Claim 4 compares the largest MC sample count with N = 1 at every staleness (cases where an
intermediate N is not lower are listed). A difference counts when it exceeds max(0.03, 2 standard errors) of the two cells' final
accuracies (seeds as samples); "same accuracy" means the difference does not count. Used by
services/study_report.py; the numbers behind each answer are printed with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from services.study import StudySettings


def _cell(s: StudySettings, runs, spec: str, k: int) -> list[float]:
    from services.study_report import cell_runs, final

    return [final(r) for r in cell_runs(s, runs, spec, k)]


def margin(a: list[float], b: list[float]) -> float:
    var = sum(np.var(x, ddof=1) / len(x) for x in (a, b) if len(x) > 1)
    return max(0.03, 2 * float(np.sqrt(var)))


def _fmt(cells: dict[Any, list[float]]) -> str:
    return ", ".join(f"{k}: {np.mean(v):.3f}" for k, v in cells.items() if v)


def forward_kl_robust(s: StudySettings, runs) -> tuple[bool, str]:
    cells = {k: _cell(s, runs, "fkl_topk", k) for k in s.staleness}
    base = cells.get(0) or []
    worse = [k for k, v in cells.items() if k and v and base and np.mean(base) - np.mean(v) > margin(base, v)]
    return bool(base) and not worse, f"fkl_topk by staleness {_fmt(cells)}; worse than s=0 at {worse or 'none'}"


def stale_degrades(s: StudySettings, runs, grads) -> tuple[bool, str]:
    cells = {k: _cell(s, runs, "rkl_stale", k) for k in s.staleness}
    if not cells.get(0):
        return False, "no rkl_stale runs at staleness 0"
    hi = max(k for k, v in cells.items() if v)
    acc_drop = np.mean(cells[0]) - np.mean(cells[hi]) > margin(cells[0], cells[hi])
    text = f"rkl_stale accuracy by staleness {_fmt(cells)}"
    cos_drop = True
    if grads and "rkl_stale" in grads["rows"]:
        cos = {k: grads["rows"]["rkl_stale"][str(k)]["cos_mean"] for k in grads["staleness"]}
        cos_drop = cos[max(cos)] < cos[min(cos)]
        text += "; gradient cosine " + ", ".join(f"{k}: {c:.3f}" for k, c in cos.items())
    return bool(acc_drop and cos_drop), text


def recompute_beats_stabilisers(s: StudySettings, runs) -> tuple[bool, str]:
    stabs = [e for e in s.estimators if e.startswith("rkl_stale+")]
    losses, compared = [], 0
    for k in s.staleness:
        rec = _cell(s, runs, "rkl_recompute", k)
        for st in stabs:
            other = _cell(s, runs, st, k)
            if rec and other:
                compared += 1
                if np.mean(other) - np.mean(rec) > margin(rec, other):
                    losses.append(f"{st}@s={k} ({np.mean(other):.3f} vs {np.mean(rec):.3f})")
    return compared > 0 and not losses, f"{compared} (stabiliser, staleness) cells compared; " \
        f"recompute clearly worse in: {losses or 'none'}"


def mc_reduces_variance(grads) -> tuple[bool, str]:
    if not grads:
        return False, "no gradient analysis"
    mc = sorted((int(n.split("@")[1]), n) for n in grads["rows"] if n.startswith("rkl_mc@"))
    var = {n: [grads["rows"][name][str(k)]["rel_var"] for k in grads["staleness"]] for n, name in mc}
    ns, ks = list(var), grads["staleness"]
    ok = all(var[ns[-1]][i] < var[ns[0]][i] for i in range(len(ks)))  # largest N vs N = 1, every staleness
    bumps = [f"N={b} > N={a} at s={ks[i]}" for a, b in zip(ns, ns[1:]) for i in range(len(ks)) if var[b][i] >= var[a][i]]
    return ok, f"relative gradient variance by N (per staleness {ks}): " + \
        "; ".join(f"N={n}: " + ", ".join(f"{v:.2f}" for v in vs) for n, vs in var.items()) + \
        f"; not monotone in N: {bumps or 'none'}"


def async_vs_sync(s: StudySettings, runs, spec: str = "fkl_topk", k: int = 4) -> tuple[bool, str]:
    from services.study_report import cell_runs

    sync, asyn = cell_runs(s, runs, spec, 0), cell_runs(s, runs, spec, k)
    if not sync or not asyn:
        return False, f"no {spec} runs at staleness 0 and {k}"
    a0, ak = [r["curve"][-1]["accuracy"] for r in sync], [r["curve"][-1]["accuracy"] for r in asyn]
    same = abs(np.mean(a0) - np.mean(ak)) <= margin(a0, ak)
    t_async = float(np.mean([r["curve"][-1]["async_s"] for r in asyn]))
    xs = np.mean([[p["sync_s"] for p in r["curve"]] for r in sync], axis=0)
    ys = np.mean([[p["accuracy"] for p in r["curve"]] for r in sync], axis=0)
    sync_at_t = float(np.interp(t_async, xs, ys))
    faster = np.mean(ak) > sync_at_t
    return bool(same and faster), (f"{spec}: final accuracy s=0 {np.mean(a0):.3f} vs s={k} {np.mean(ak):.3f} at equal "
                                   f"steps; after the async run's {t_async:.0f} modelled s the sync run is at "
                                   f"{sync_at_t:.3f} (sync total {xs[-1]:.0f} s)")


def claims(s: StudySettings, runs, grads) -> list[tuple[str, bool, str]]:
    """(claim, answer, numbers) for the five claims."""
    return [("Forward KL is robust to staleness", *forward_kl_robust(s, runs)),
            ("Stale sampled reverse KL degrades as staleness grows", *stale_degrades(s, runs, grads)),
            ("Learner-time recompute is at least as good as every RL stabiliser",
             *recompute_beats_stabilisers(s, runs)),
            ("Multi-sample MC reduces variance", *mc_reduces_variance(grads)),
            ("Async reaches sync's accuracy at equal steps and more per wall-second", *async_vs_sync(s, runs))]


def claims_markdown(s: StudySettings, runs, grads) -> str:
    return "\n".join(f"{i}. **{c}**: {'yes' if ok else 'no'}. {why}." for i, (c, ok, why)
                     in enumerate(claims(s, runs, grads), 1)) + "\n"
