"""The bench chart: throughput over time and latency, the connectors side by side.

matplotlib is imported here only, with the Agg backend (no display needed),
so neither `import cascade_fast` nor a bench without ``--plot`` pays for it.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .deps import require
from .measure import TIMELINE_BUCKET_S, ConnectorResult

COLORS = {"python": "#4C72B0", "fast": "#DD8452"}
LATENCY_KEYS = ("p50", "p90", "p99", "max")


def plot(results: dict[str, ConnectorResult], path: str | os.PathLike, *, subtitle: str = "") -> None:
    """Write a PNG: delivered msgs/s over time, then latency bars (log) of the main and the paced run."""
    matplotlib = require("matplotlib", purpose="for --plot")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [n for n in ("python", "fast") if n in results]
    first = results[names[0]]
    paced = first.paced is not None
    ratios = [3, 2, 2] if paced else [3, 2]
    fig, axes = plt.subplots(1, len(ratios), figsize=(15 if paced else 12, 5), gridspec_kw={"width_ratios": ratios})
    try:
        ax_t = axes[0]
        for name in names:
            r = results[name]
            xs = [(i + 0.5) * TIMELINE_BUCKET_S for i in range(len(r.timeline))]
            ax_t.plot(xs, r.timeline, color=COLORS[name], lw=1.6, label=f"{name}: {_num(r.throughput)} msgs/s")
            if not math.isnan(r.throughput):
                ax_t.axhline(r.throughput, color=COLORS[name], lw=0.8, ls="--")
        main = "flat out" if not first.rate else f"at {first.rate:,.0f} msgs/s"
        ax_t.set_xlabel("seconds since start")
        ax_t.set_ylabel("messages/s delivered to the observer")
        ax_t.set_title(f"Throughput ({main}; dashed: average)")
        ax_t.set_ylim(bottom=0)
        ax_t.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        ax_t.grid(alpha=0.3)
        ax_t.legend(loc="upper right")

        _latency(axes[1], {n: results[n] for n in names}, f"Latency, {main}", matplotlib)
        if paced:
            runs = {n: results[n].paced for n in names if results[n].paced is not None}
            _latency(axes[2], runs, f"Latency, paced at {first.paced.rate:,.0f} msgs/s", matplotlib)  # type: ignore[union-attr]

        fig.suptitle("cascade-fast bench: python vs fast connector" + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _latency(ax: Any, runs: dict[str, ConnectorResult], title: str, matplotlib: Any) -> None:
    width = 0.8 / max(len(runs), 1)
    for j, (name, r) in enumerate(runs.items()):
        values = [r.latency_ms[k] for k in LATENCY_KEYS]
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(LATENCY_KEYS))]
        bars = ax.bar(xs, values, width=width, color=COLORS[name], label=name)
        for bar, value in zip(bars, values):
            if not math.isnan(value):
                ax.annotate(_short(value), (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(LATENCY_KEYS)), LATENCY_KEYS)
    ax.set_yscale("log")
    tallest = max((v for r in runs.values() for v in r.latency_ms.values() if not math.isnan(v)), default=1.0)
    ax.set_ylim(top=tallest * 5)  # room above the bars for their labels and the legend
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("end-to-end latency (ms, log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left")


def _short(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"
