"""Training and eval loss curves from `metrics.jsonl`, drawn into a PNG (matplotlib, the `cli` extra)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit import atomic
from lorakit.extras import require

__all__ = ["plot_losses"]


def plot_losses(metrics_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Draw the loss of every step and every eval loss of a run into `out_path` (written atomically).

    Args:
        metrics_path: a run's `metrics.jsonl` (lines with `step`, `loss` and sometimes `eval_loss`).
        out_path: the PNG to write.

    Returns:
        The PNG's path.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    matplotlib = require("matplotlib", "cli", "the loss plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, eval_steps, eval_losses = [], [], [], []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill (a resume drops it)
        if row.get("loss") is not None:
            steps.append(row["step"])
            losses.append(row["loss"])
        if row.get("eval_loss") is not None:
            eval_steps.append(row["step"])
            eval_losses.append(row["eval_loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, label="train loss", linewidth=1)
    if eval_losses:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    try:
        return atomic.write_file(out_path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
