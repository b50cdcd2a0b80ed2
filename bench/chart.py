"""The PNG chart of a report, drawn with matplotlib when it is installed."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["draw"]

CONTENDERS = ("bare", "floor", "gateway")


def draw(report: Mapping[str, Any], path: Path) -> bool:
    """Throughput and latency side by side; False when matplotlib is not installed."""
    try:
        # Optional and not a project dependency: imported by name so type checks need it not.
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return False
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    stats = report["contenders"]
    half = report.get("half_load")
    panels = 3 if half else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.2), layout="constrained")
    colours = ["#8c8c8c", "#4c72b0", "#dd8452"]

    rps = [stats[name]["rps"] for name in CONTENDERS]
    axes[0].bar(CONTENDERS, rps, color=colours)
    axes[0].bar_label(axes[0].containers[0], fmt="%.0f")
    axes[0].set_title("throughput (requests/s)")

    width = 0.38
    xs = range(len(CONTENDERS))
    p50 = [stats[name]["p50_ms"] for name in CONTENDERS]
    p99 = [stats[name]["p99_ms"] for name in CONTENDERS]
    axes[1].bar([x - width / 2 for x in xs], p50, width, label="p50", color="#4c72b0")
    axes[1].bar([x + width / 2 for x in xs], p99, width, label="p99", color="#c44e52")
    axes[1].set_xticks(list(xs), CONTENDERS)
    axes[1].set_title("latency at max throughput (ms)")
    axes[1].legend()

    if half:
        names = ("bare", "gateway")
        values = [half[name]["p99_ms"] for name in names]
        axes[2].bar(names, values, color=[colours[0], colours[2]])
        axes[2].bar_label(axes[2].containers[0], fmt="%.1f")
        axes[2].set_title(f"p99 at {half['rate_rps']:.0f} req/s (ms)")

    # The ratios are medians of per-round ratios, not the bars' quotient: say so.
    rounds = len(report.get("rounds") or [])
    low, high = report.get("ratio_floor_range") or (report["ratio_floor"],) * 2
    spread = f" (median of {rounds} rounds, {low:.2f}–{high:.2f})" if rounds > 1 else ""
    fig.suptitle(
        f"gateway/floor {report['ratio_floor']:.2f}{spread}   gateway/bare"
        f" {report['ratio_bare']:.2f}   ({report['machine']['cpu_count']} CPUs, shared with load"
        " and upstream)"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
