"""The curves of a preference run from `metrics.jsonl`: loss, rewards, margin and accuracy (matplotlib,
the `cli` extra)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit import atomic
from lorakit.extras import require

__all__ = ["PANELS", "plot_preference"]

PANELS = (
    ("loss", ("loss",), "loss"),
    ("rewards", ("rewards_chosen", "rewards_rejected"), "implicit reward"),
    ("margin", ("margin",), "chosen − rejected reward"),
    ("accuracy", ("accuracy",), "pairs ranked right"),
)
"""Each panel: its title, the metrics.jsonl keys it draws (training and `eval_`), the y label."""


def plot_preference(metrics_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Draw every step's loss, rewards of chosen and rejected answers, margin and accuracy, with the
    evaluations' as points, into a PNG of four panels (written atomically).

    Args:
        metrics_path: a preference run's `metrics.jsonl`.
        out_path: the PNG to write.

    Returns:
        The PNG's path.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    matplotlib = require("matplotlib", "cli", "the preference plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill (a resume drops it)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys, label) in zip(axes.flat, PANELS, strict=True):
        for key in keys:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                points = [(r["step"], r[prefix + key]) for r in rows if r.get(prefix + key) is not None]
                if points:
                    steps, values = zip(*points, strict=True)
                    name = key.replace("rewards_", "")
                    ax.plot(steps, values, style, label=f"{'eval ' if prefix else ''}{name}", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic.write_file(out_path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
