"""The staleness study's report: learning-rate choice, tables, plots and the paper's claims.

Pure functions of the runs that services/study.py records (and of the gradient results of
services/study_gradients.py); `opd study staleness --merge '[dirs]' --out DIR` rewrites a
report from saved results.json files without training anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from services.study import StudySettings


def final(run: dict[str, Any]) -> float:
    return run["curve"][-1]["accuracy"]


def best_lrs(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per estimator swept at staleness 0: the rate with the best mean final accuracy (ties: larger)."""
    by: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        if r.get("phase") == "sweep":
            by.setdefault(r["estimator"], {}).setdefault(r["lr"], []).append(final(r))
    return {est: max(lrs, key=lambda lr: (np.mean(lrs[lr]), lr)) for est, lrs in by.items()}


def cell_runs(s: StudySettings, runs: list[dict[str, Any]], spec: str, k: int) -> list[dict[str, Any]]:
    """The runs of one (variant, staleness) cell at the variant's chosen rate."""
    from services.study import variant_lr

    lr = variant_lr(s, spec, best_lrs(runs))
    return [r for r in runs if r["estimator"] == spec and r["staleness"] == k and r["lr"] == lr]


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def final_table(s: StudySettings, runs: list[dict[str, Any]]) -> str:
    """Markdown: final accuracy mean ± std over seeds, variants x staleness, with each rate and n."""
    from services.study import variant_lr

    chosen = best_lrs(runs)
    lines = ["| variant | lr | " + " | ".join(f"s={k}" for k in s.staleness) + " |",
             "|---|---|" + "---|" * len(s.staleness)]
    for spec in s.estimators:
        cells = []
        for k in s.staleness:
            finals = [final(r) for r in cell_runs(s, runs, spec, k)]
            cells.append(f"{mean_std(finals)} (n={len(finals)})" if finals else "-")
        lines.append(f"| {spec} | {variant_lr(s, spec, chosen):.0e} | " + " | ".join(cells) + " |")
    start = np.mean([r["curve"][0]["accuracy"] for r in runs])
    steps = max(r["curve"][-1]["step"] for r in runs)
    return "\n".join(lines) + f"\n\nInitial student accuracy: {start:.3f}. Final greedy exact-match " \
        f"accuracy on {s.eval_n} held-out problems after {steps} steps of {s.batch_size}; n = seeds.\n"


def sweep_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: staleness-0 sweep, final accuracy mean ± std per (estimator, lr)."""
    sweep = [r for r in runs if r.get("phase") == "sweep"]
    if not sweep:
        return ""
    lrs = sorted({r["lr"] for r in sweep})
    chosen = best_lrs(runs)
    lines = ["| estimator | " + " | ".join(f"lr {lr:.0e}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for est in dict.fromkeys(r["estimator"] for r in sweep):
        cells = []
        for lr in lrs:
            finals = [final(r) for r in sweep if r["estimator"] == est and r["lr"] == lr]
            cell = f"{mean_std(finals)} (n={len(finals)})" if finals else "-"
            cells.append(f"**{cell}**" if finals and chosen[est] == lr else cell)
        lines.append(f"| {est} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_table(s: StudySettings, runs: list[dict[str, Any]]) -> str:
    """Markdown: per-seed accuracy at every evaluation, one table per (variant, staleness) cell."""
    parts = []
    for spec in s.estimators:
        for k in s.staleness:
            cell = sorted(cell_runs(s, runs, spec, k), key=lambda r: r["seed"])
            if not cell:
                continue
            steps = [p["step"] for p in min((r["curve"] for r in cell), key=len)]
            lines = [f"{spec}, staleness {k}:", "", "| step | " + " | ".join(f"seed {r['seed']}" for r in cell)
                     + " | mean |", "|---|" + "---|" * (len(cell) + 1)]
            for i, step in enumerate(steps):
                accs = [r["curve"][i]["accuracy"] for r in cell]
                lines.append(f"| {step} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {np.mean(accs):.3f} |")
            parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def gradient_table(gradients: dict[str, Any] | None) -> str:
    """Markdown: mean cosine with the exact reverse-KL gradient (± std over minibatches) and the
    relative variance, per variant row and staleness column."""
    if not gradients:
        return ""
    ks = gradients["staleness"]
    lines = ["| estimator | " + " | ".join(f"s={k} cos / rel.var" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for name, by_k in gradients["rows"].items():
        cells = [f"{by_k[str(k)]['cos_mean']:.3f} ± {by_k[str(k)]['cos_std']:.3f} / "
                 f"{by_k[str(k)]['rel_var']:.2f}" for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Bias: cosine of the minibatch-averaged gradients / squared bias ||E(g - g*)||^2 / E||g*||^2.", "",
              "| estimator | " + " | ".join(f"s={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, by_k in gradients["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_k[str(k)]['cos_of_mean']:.3f} / {by_k[str(k)]['rel_bias2']:.3f}"
                                                for k in ks) + " |")
    return f"{gradients['minibatches']} minibatches of fixed prefixes; cos mean ± std over minibatches / " \
        "relative variance E||e - Ee||^2 / E||g*||^2 of the error e = g - g*.\n\n" + "\n".join(lines) + "\n"


def plot(s: StudySettings, runs: list[dict[str, Any]], x_key: str, path: Path) -> None:
    """One panel per variant; a line per staleness (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(s.estimators))
    rows = -(-len(s.estimators) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax, spec in zip(axes.flat, s.estimators):
        for i, k in enumerate(s.staleness):
            curves = [r["curve"] for r in cell_runs(s, runs, spec, k)]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(np.mean([[p[x_key] for p in c[:n]] for c in curves], axis=0),
                        np.mean([[p["accuracy"] for p in c[:n]] for c in curves], axis=0),
                        marker="o", ms=3, color=f"C{i}", label=f"staleness {k}")  # one colour per staleness
        ax.set_title(spec, fontsize=10)
        ax.set_xlabel({"step": "optimizer step", "async_s": "modelled wall time (s)"}[x_key])
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(s.estimators):]:
        ax.axis("off")
    axes[0][0].set_ylabel("eval accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_gradients(gradients: dict[str, Any], path: Path) -> None:
    """Cosine with the exact reverse-KL gradient vs staleness: the variants, then the k and N sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, by = gradients["staleness"], gradients["rows"]
    groups = [[n for n in by if "@" not in n], [n for n in by if n.startswith(("fkl_topk@", "rkl_support@"))],
              [n for n in by if n.startswith("rkl_mc@")]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), sharey=True)
    for ax, names, title in zip(axes, groups, ["variants", "top-k cache size k", "MC samples N"]):
        for n in names:
            ax.errorbar(ks, [by[n][str(k)]["cos_mean"] for k in ks], [by[n][str(k)]["cos_std"] for k in ks],
                        marker="o", ms=3, capsize=2, label=n)
        ax.set_title(title)
        ax.set_xlabel("staleness (steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("cosine with exact reverse-KL gradient")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(s: StudySettings, runs: list[dict[str, Any]],
                 gradients: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """results.json (compact), table.md (sweep, accuracy, gradients) and the two plots."""
    from services.study import save_results

    out = Path(s.out)
    save_results(s, runs)
    if gradients:
        (out / "gradients.json").write_text(json.dumps(gradients, separators=(",", ":")))
        plot_gradients(gradients, out / "gradient_cosine.png")
    from services.study_claims import claims_markdown

    parts = [("Learning-rate sweep at staleness 0 (bold: chosen)", sweep_table(runs)),
             ("Final accuracy", final_table(s, runs) if runs else ""),
             ("Accuracy curves per seed", curve_table(s, runs) if s.curves else ""),
             ("Gradient cosine with the exact reverse-KL gradient", gradient_table(gradients)),
             ("The paper's claims", claims_markdown(s, runs, gradients) if runs else "")]
    table = "\n".join(f"## {title}\n\n{body}" for title, body in parts if body)
    (out / "table.md").write_text(table)
    if runs:
        plot(s, runs, "step", out / "accuracy_vs_steps.png")
        plot(s, runs, "async_s", out / "accuracy_vs_time.png")
    print(table)
    print(f"report written to {out}/")
    return runs
