"""PNG figures for `dspark eval` and `dspark bench` (matplotlib, headless).

    plot_conditional_acceptance(report["results"], {"code": ["humaneval"]}, "runs/eval.acceptance.png")
    plot_tau_vs_gamma(report["gamma_sweep"], {"code": ["humaneval"]}, "runs/eval.tau_vs_gamma.png")
    plot_bench(rows, "runs/bench.png")
    plot_training_curves({"dspark": json.load(open("models/x/training_log.json"))}, "runs/curves.png")
    plot_reliability(json.load(open("runs/calib.json")), "runs/calib.reliability.png")       # Figure 6
    plot_threshold_sweep(report["threshold_sweep"], {"code": ["humaneval"]}, "runs/eval.thr.png")  # Figure 5
    plot_load_frontier(load["results"], "runs/load.frontier.png")                              # Figure 7
    plot_load_budget(load["results"], "runs/load.budget.png")                                  # Figure 8

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


def plot_reliability(calib: Mapping[str, Any], path: str | Path) -> Path:
    """Paper Figure 6: observed against predicted survival per draft position, before and after
    Sequential Temperature Scaling, with the held-out sample histogram shaded behind (from the
    `reliability` bins of a `dspark calibrate` result)."""
    plt = _pyplot()
    before, after = calib["reliability"]["before"], calib["reliability"]["after"]
    n = len(after)
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.3 * nrows), squeeze=False)
    fig.suptitle("Reliability of the survival Π c_i by draft position (held-out rounds)")
    for k in range(nrows * cols):
        ax = axes[k // cols][k % cols]
        if k >= n:
            ax.axis("off")
            continue
        counts = after[k]["count"]
        width = 1.0 / max(1, len(counts))
        if counts and max(counts):
            hist = ax.twinx()
            hist.bar([width * (i + 0.5) for i in range(len(counts))], counts, width=width, color="#dddddd", zorder=0)
            hist.set_yticks([])
            ax.set_zorder(hist.get_zorder() + 1)
            ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], ls="--", color="#444444", lw=1, label="perfect calibration")
        for bins, label, color in ((before[k], "before", "#d9534f"), (after[k], "after", "#3b6fb6")):
            pts = [(p, o) for p, o in zip(bins["predicted"], bins["observed"]) if p is not None]
            if pts:
                ax.plot([p for p, _ in pts], [o for _, o in pts], marker="o", ms=3, color=color,
                        label=f"{label} calibration")
        eb, ea = calib["ece_before"][k], calib["ece_after"][k]
        auc = calib["roc_auc"][k]
        ax.set_title(f"Position {k + 1}\nECE {'–' if eb is None else f'{100 * eb:.1f}%'} → "
                     f"{'–' if ea is None else f'{100 * ea:.1f}%'}, AUC {'–' if auc is None else f'{auc:.3f}'}",
                     fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted acceptance", fontsize=8)
        ax.set_ylabel("observed acceptance", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left")
    return _save(fig, plt, path)


def plot_threshold_sweep(sweep: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
                         sets_by_domain: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    """Paper Figure 5: accepted and rejected draft tokens per step (stacked bars) and the acceptance
    rate (line) against the confidence threshold P, one panel per domain (counts pooled over its
    sets), one group of bars per drafter. `sweep[label][set][P]` holds `rounds`, `accepted_drafts`
    and `verified_drafts`."""
    plt = _pyplot()
    fig, axes = _panels(plt, len(sets_by_domain), "Confidence threshold sweep (threshold:P)")
    labels = list(sweep)
    for ax, (domain, sets) in zip(axes, sets_by_domain.items()):
        rate_ax = ax.twinx()
        rate_ax.set_ylim(0, 1.05)
        for li, label in enumerate(labels):
            per_set = sweep[label]
            ps = sorted({float(p) for s in sets for p in per_set.get(s, {})})
            xs, acc, rej, rate = [], [], [], []
            for p in ps:
                cells = [per_set[s][f"{p:g}"] for s in sets if f"{p:g}" in per_set.get(s, {})]
                rounds = sum(c["rounds"] for c in cells)
                a = sum(c["accepted_drafts"] for c in cells)
                v = sum(c["verified_drafts"] for c in cells)
                if not rounds:
                    continue
                xs.append(p)
                acc.append(a / rounds)
                rej.append((v - a) / rounds)
                rate.append(a / v if v else float("nan"))
            w = 0.8 * (min(b - a for a, b in zip(xs, xs[1:])) if len(xs) > 1 else 0.2) / max(1, len(labels))
            off = [x + (li - (len(labels) - 1) / 2) * w for x in xs]
            ax.bar(off, acc, width=w, color=f"C{li}", label=f"{label}: accepted")
            ax.bar(off, rej, width=w, bottom=acc, color=f"C{li}", alpha=0.35, hatch="//", label=f"{label}: rejected")
            rate_ax.plot(xs, rate, marker="o", ms=3, color=f"C{li}", ls="-", label=f"{label}: acceptance rate")
        ax.set_title(domain)
        ax.set_xlabel("confidence threshold P")
        ax.grid(axis="y", alpha=0.3)
        rate_ax.set_ylabel("acceptance rate (accepted / verified)", fontsize=8)
    axes[0].set_ylabel("draft tokens per step")
    axes[0].legend(fontsize=7, loc="upper right")
    return _save(fig, plt, path)


def _by_policy(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["policy"], []).append(r)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in out.items()}


def plot_load_frontier(rows: Sequence[Mapping[str, Any]], path: str | Path,
                       title: str = "Throughput vs per-user speed") -> Path:
    """Paper Figure 7: aggregate tokens/s against per-user tokens/s, one line per policy, each point
    a concurrency level (labelled). Rows: `dspark loadtest` results."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for i, (policy, rs) in enumerate(_by_policy(rows).items()):
        x = [r["per_user_tokens_per_s"] for r in rs]
        y = [r["throughput_tokens_per_s"] for r in rs]
        ax.plot(x, y, marker="o", ms=4, color=f"C{i}", label=policy)
        for r, xi, yi in zip(rs, x, y):
            ax.annotate(str(r["concurrency"]), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("per-user tokens/s")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(title + "\n(point labels: concurrent clients)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_load_budget(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Paper Figure 8: aggregate tokens/s (top) and the verification budget, target positions per
    request per step (1 + ℓ, bottom), against the number of concurrent clients, one line per policy."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 6.0), sharex=True)
    for i, (policy, rs) in enumerate(_by_policy(rows).items()):
        c = [r["concurrency"] for r in rs]
        top.plot(c, [r["throughput_tokens_per_s"] for r in rs], marker="o", ms=4, color=f"C{i}", label=policy)
        bottom.plot(c, [r["mean_verified_tokens_per_request"] for r in rs], marker="o", ms=4, color=f"C{i}",
                    label=policy)
    top.set_ylabel("aggregate tokens/s")
    top.set_title("Load-adaptive throughput and verification budget", fontsize=10)
    bottom.set_ylabel("verified tokens per request per step")
    bottom.set_xlabel("concurrent clients")
    levels = sorted({r["concurrency"] for r in rows})
    for ax in (top, bottom):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    top.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    from dspark.train.checkpoint import _atomic

    path = Path(path)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never a half-written PNG
    plt.close(fig)
    return path
