"""The bench chart: throughput over time and latency, the connectors side by side.

matplotlib is imported here only, with the Agg backend (no display needed),
so neither `import cascade_fast` nor a bench without ``--plot`` pays for it.
"""

from __future__ import annotations

import math
import os

from .deps import require
from .measure import TIMELINE_BUCKET_S, ConnectorResult

COLORS = {"python": "#4C72B0", "fast": "#DD8452"}


def plot(results: dict[str, ConnectorResult], path: str | os.PathLike, *, subtitle: str = "") -> None:
    """Write a PNG: left, delivered msgs/s over time; right, latency p50/p90/p99/max (log scale)."""
    matplotlib = require("matplotlib", purpose="for --plot")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [n for n in ("python", "fast") if n in results]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    try:
        for name in names:
            r = results[name]
            xs = [(i + 0.5) * TIMELINE_BUCKET_S for i in range(len(r.timeline))]
            ax_t.plot(xs, r.timeline, color=COLORS[name], lw=1.6, label=f"{name}: {_num(r.throughput)} msgs/s")
            if not math.isnan(r.throughput):
                ax_t.axhline(r.throughput, color=COLORS[name], lw=0.8, ls="--")
        ax_t.set_xlabel("seconds since start")
        ax_t.set_ylabel("messages/s delivered to the observer")
        ax_t.set_title("Throughput")
        ax_t.set_ylim(bottom=0)
        ax_t.grid(alpha=0.3)
        ax_t.legend(loc="lower right")

        keys = ["p50", "p90", "p99", "max"]
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            r = results[name]
            values = [r.latency_ms[k] for k in keys]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(keys))]
            bars = ax_l.bar(xs, values, width=width, color=COLORS[name], label=name)
            for bar, value in zip(bars, values):
                if not math.isnan(value):
                    ax_l.annotate(
                        f"{value:.3g}",
                        (bar.get_x() + bar.get_width() / 2, value),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        ax_l.set_xticks(range(len(keys)), keys)
        ax_l.set_yscale("log")
        ticker = matplotlib.ticker
        ax_l.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax_l.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax_l.set_ylabel("end-to-end latency (ms, log)")
        ax_l.set_title("Latency")
        ax_l.grid(alpha=0.3, axis="y")
        ax_l.legend()

        fig.suptitle("cascade-fast bench: python vs fast connector" + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"
