"""Training curves as one PNG: loss (train and validation), CC and SIM, KLD, per epoch."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from pipeline.core.fsio import Folder


def plot_history(history: Sequence[Mapping[str, float]], path: str | Path,
                 caveat: str = "") -> None:
    """Write the curves of ``history`` (one row per epoch with keys ``epoch``, ``train_loss``,
    ``valid_loss``, ``CC``, ``SIM``, ``KLD``) to the PNG ``path``, atomically; ``caveat``
    (synthetic data, random CLIP weights) as a red title over them."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_sim, ax_kld) = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    ax_loss.plot(epochs, [row["valid_loss"] for row in history], "o-", label="validation")
    ax_loss.set(title="BCE loss", xlabel="epoch")
    ax_loss.legend()
    for name in ("CC", "SIM"):
        ax_sim.plot(epochs, [row[name] for row in history], "o-", label=name)
    ax_sim.set(title="validation CC, SIM (higher is better)", xlabel="epoch")
    ax_sim.legend()
    ax_kld.plot(epochs, [row["KLD"] for row in history], "o-", color="tab:red")
    ax_kld.set(title="validation KLD (lower is better)", xlabel="epoch")
    for ax in (ax_loss, ax_sim, ax_kld):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if caveat:
        fig.suptitle(caveat, color="white", backgroundcolor="#c81e1e", fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    folder, _, name = str(path).rpartition("/")
    Folder(folder or ".").write_bytes(name, buf.getvalue())
