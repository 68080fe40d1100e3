"""The evaluations' plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = {"auc": "AUC", "log_loss": "log loss", "per_entity_auc": "per-entity AUC", "rmse": "RMSE"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def replay_plots(windows: list[dict], entity_aucs: dict[str, np.ndarray], out: Path) -> list[Path]:
    """Per window and variant: AUC and log loss; the distribution of per-entity AUCs."""
    plt, written = _pyplot(), []
    steps = [w["window"] for w in windows]
    names = list(windows[0]["variants"]) if windows else []
    for key in ("auc", "log_loss"):
        if not windows or key not in windows[0]["variants"][names[0]]:
            continue
        figure, axes = plt.subplots(figsize=(9.5, 4.5))
        for name in names:
            axes.plot(steps, [w["variants"][name][key] for w in windows], marker="o", label=name)
        axes.set_xticks(steps)
        axes.set_xlabel("window (scored before learning from it)")
        axes.set_ylabel(LABELS[key])
        axes.set_title(f"Replay: {LABELS[key]} per window")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never over them
        figure.tight_layout()
        written.append(_save(figure, out / f"{key}.png"))
    if any(len(values) for values in entity_aucs.values()):
        figure, axes = plt.subplots(figsize=(8, 4.5))
        # The triangle is the mean, the per_entity_auc figure of the summary.
        axes.boxplot([entity_aucs[name] for name in names], tick_labels=names, showmeans=True)
        axes.set_ylabel("AUC of one entity over the scored windows")
        axes.set_title("Replay: per-entity AUC distribution")
        axes.tick_params(axis="x", rotation=20)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        written.append(_save(figure, out / "per_entity_auc.png"))
    return written


def interval_label(minutes: float) -> str:
    if minutes % 1440 == 0:
        return f"{minutes // 1440:g}d"
    if minutes % 60 == 0:
        return f"{minutes // 60:g}h"
    return f"{minutes:g}m"


def freshness_plot(report: dict, out: Path) -> Path:
    """One figure: each figure against the update interval, all events and cold start, with the references."""
    plt = _pyplot()
    points, references = report["intervals"], report["references"]
    keys = [key for key in LABELS if points and key in points[0]["all"]]
    figure, panels = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.6), squeeze=False)
    x = [p["minutes"] for p in points]
    subsets = (("all", "all events", "tab:blue"), ("cold_start", "cold start", "tab:orange"))
    for axes, key in zip(panels[0], keys, strict=True):
        for subset, label, color in subsets:
            axes.plot(x, [p[subset][key] for p in points], marker="o", color=color, label=f"updated every N: {label}")
            for name, style in (("stale", "--"), ("ideal", ":")):
                if name in references:
                    value = references[name][subset][key]
                    axes.axhline(value, color=color, linestyle=style, linewidth=1.2, label=f"{name}: {label}")
        axes.set_xscale("log")
        axes.set_xticks(
            x, [interval_label(m) + (" (nightly)" if p["nightly_only"] else "") for m, p in zip(x, points, strict=True)]
        )
        axes.minorticks_off()
        axes.set_xlabel("update interval N (event time)")
        axes.set_ylabel(LABELS[key])
        axes.set_title(LABELS[key])
        axes.grid(alpha=0.3)
    handles, labels = panels[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    ideal = references.get("ideal", {}).get("minutes")
    note = f"; ideal: nightly retrain every {interval_label(ideal)}" if ideal else ""
    figure.suptitle(f"Freshness: predict then learn, {report['events']} events after the nightly cutoff{note}")
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(figure, out / "freshness.png")


def bandit_plot(report: dict, out: Path) -> Path:
    """Cumulative regret (overall, new members, new items) and cumulative clicks, per round and policy."""
    plt = _pyplot()
    panels = (
        ("all", "regret", "cumulative regret (expected clicks lost to the oracle)"),
        ("all", "clicks", "cumulative clicks"),
        ("new_requester", "regret", "cumulative regret: requests of new members"),
        ("new_best_item", "regret", "cumulative regret: requests whose best item is new"),
    )
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for panel, (segment, key, title) in zip(axes.ravel(), panels, strict=True):
        for name, rounds in report["rounds"].items():
            steps = [r["round"] + 1 for r in rounds]
            panel.plot(steps, np.cumsum([r[segment][key] for r in rounds]), marker=".", label=name)
        panel.set_title(title)
        panel.set_xlabel("round")
        panel.xaxis.get_major_locator().set_params(integer=True)
        panel.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.suptitle(
        f"Bandit replay: {report['requests_per_round']} requests per round, top {report['top_k']} "
        f"of {report['candidates']} candidates, clicks by the generator's truth"
    )
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(figure, out / "bandit.png")


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
