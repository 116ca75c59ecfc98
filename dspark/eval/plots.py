"""PNG figures for `dspark eval` and `dspark bench` (matplotlib, headless).

    plot_conditional_acceptance(report["results"], {"code": ["humaneval"]}, "runs/eval.acceptance.png")
    plot_tau_vs_gamma(report["gamma_sweep"], {"code": ["humaneval"]}, "runs/eval.tau_vs_gamma.png")
    plot_bench(rows, "runs/bench.png")
    plot_training_curves({"dspark": json.load(open("models/x/training_log.json"))}, "runs/curves.png")

Inputs are the plain dicts the JSON files hold, so figures can be redrawn from a results file alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers; must precede the pyplot import
    import matplotlib.pyplot as plt
    return plt


def _panels(plt, n: int, title: str):
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    fig.suptitle(title)
    return fig, axes[0]


def plot_conditional_acceptance(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                                sets_by_domain: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    """Paper Figure 2: P(k accepted | 1..k−1 accepted) against k, one panel per domain, one line per
    drafter. Counts are pooled over the domain's sets (a ratio of sums, like τ)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = _panels(plt, len(sets_by_domain), "Conditional acceptance by draft position")
    for ax, (domain, sets) in zip(axes, sets_by_domain.items()):
        for label, per_set in results.items():
            rows = [per_set[s] for s in sets if s in per_set]
            if not rows:
                continue
            n = max(len(r["tried_by_position"]) for r in rows)
            acc, tried = [0] * n, [0] * n
            for r in rows:
                for k, (a, t) in enumerate(zip(r["accepted_by_position"], r["tried_by_position"])):
                    acc[k] += a
                    tried[k] += t
            ks = [k + 1 for k in range(n) if tried[k]]
            ax.plot(ks, [acc[k - 1] / tried[k - 1] for k in ks], marker="o", ms=3, label=label)
        ax.set_title(domain)
        ax.set_xlabel("draft position k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("conditional acceptance")
    axes[0].legend(fontsize=8)
    return _save(fig, plt, path)


def plot_tau_vs_gamma(sweep: Mapping[str, Mapping[str, Mapping[str, float]]],
                      sets_by_domain: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    """Paper Figure 4: τ against γ, one panel per domain (macro average over its sets), one line per
    drafter. A γ enters a panel only when every set of the domain has it."""
    plt = _pyplot()
    fig, axes = _panels(plt, len(sets_by_domain), "Accepted length τ vs block size γ")
    for ax, (domain, sets) in zip(axes, sets_by_domain.items()):
        for label, per_set in sweep.items():
            gammas = sorted({int(g) for s in sets for g in per_set.get(s, {})})
            pts = [(g, sum(per_set[s][str(g)] for s in sets) / len(sets)) for g in gammas
                   if all(str(g) in per_set.get(s, {}) for s in sets)]
            if pts:
                ax.plot([g for g, _ in pts], [t for _, t in pts], marker="o", label=label)
        ax.set_title(domain)
        ax.set_xlabel("γ")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("τ (bonus included)")
    axes[0].legend(fontsize=8)
    return _save(fig, plt, path)


def plot_bench(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Decoding speed") -> Path:
    """Bar chart of tokens/s per method (rows: dicts with `method` and `tokens_per_s`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1), 3.6))
    names = [r["method"] for r in rows]
    vals = [r["tokens_per_s"] or 0.0 for r in rows]
    bars = ax.bar(range(len(rows)), vals, color=["#888888" if r.get("ours") is False else "#3b6fb6" for r in rows])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def plot_training_curves(logs: Mapping[str, Mapping[str, Any]], path: str | Path,
                         title: str = "Held-out τ̂ during drafter training") -> Path:
    """Held-out τ̂ (and validation loss) against optimiser step, one line per drafter, from each
    drafter's `training_log.json` (its `evals` list of {step, val_tau, val_loss})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    fig.suptitle(title)
    for label, log in logs.items():
        evals = log.get("evals") or []
        steps = [e["step"] for e in evals]
        axes[0].plot(steps, [e["val_tau"] for e in evals], marker="o", ms=3, label=label)
        axes[1].plot(steps, [e["val_loss"] for e in evals], marker="o", ms=3, label=label)
    axes[0].set_ylabel("held-out τ̂ (bonus included)")
    axes[1].set_ylabel("validation loss (0.1·CE + 0.9·TV [+ BCE])")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
