"""Heatmap of expert load: layers x experts, each cell an expert's share of its layer's tokens.

One panel per MoE module (vision, connector, language), as in the CuMo paper's expert-distribution
figure; each row is labelled with its layer's MaxVio, and each colour bar marks the balanced share
``1 / experts``. PNG through matplotlib's Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from cumo_megatron.research.expert_load import LayerLoad

PathLike = Union[str, Path]
_TITLES = {"vision": "vision encoder (CLIP-MoE)", "connector": "connector (MLP-MoE)", "language": "LLM"}
_ANNOTATE_MAX_CELLS = 400  # beyond this many cells the percentages are unreadable
_CELL_ASPECT = 0.6  # cell height / width, the same in every panel (a 1-layer connector stays one row high)


def plot_expert_heatmap(table: Sequence[LayerLoad], png_path: PathLike, title: Optional[str] = None) -> Path:
    """Draw ``table`` (rows of `expert_load.load_table`) into ``png_path``; return the path.

    Panels follow the table's module order; a panel's rows are its layers top to bottom.
    Raises ``ValueError`` for an empty table.
    """
    if not table:
        raise ValueError(f"nothing to plot into {png_path}: the expert-load table has no MoE layer")
    from cumo_megatron.research.figures import pyplot, save_figure

    plt = pyplot()
    import numpy as np
    from matplotlib.ticker import PercentFormatter

    modules: list[str] = []
    for row in table:
        if row.module not in modules:
            modules.append(row.module)
    panels = [[row for row in table if row.module == m] for m in modules]
    widths = [max(r.num_experts for r in rows) for rows in panels]
    tallest = max(len(rows) for rows in panels)
    fig, axes = plt.subplots(
        1, len(panels), squeeze=False,
        figsize=(sum(2.2 + 0.5 * w for w in widths), 1.6 + 0.3 * max(tallest, 3)),
        gridspec_kw={"width_ratios": [1.6 + 0.5 * w for w in widths]},
    )
    for ax, module, rows, width in zip(axes[0], modules, panels, widths):
        share = np.full((len(rows), width), np.nan)
        for i, row in enumerate(rows):
            share[i, : row.num_experts] = row.shares
        balanced = 1.0 / width
        image = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(share)), 2 * balanced),
                          aspect=_CELL_ASPECT, interpolation="nearest")
        if share.size <= _ANNOTATE_MAX_CELLS:
            for (i, e), value in np.ndenumerate(share):
                if np.isfinite(value):
                    ax.text(e, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 * image.norm.vmax else "black")
        ax.set_xticks(range(width))
        ax.set_xticklabels([str(e) for e in range(width)], fontsize=8)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{_short(r.layer)}  ({r.max_vio:.2f})" for r in rows], fontsize=7)
        mean_vio = sum(r.max_vio for r in rows) / len(rows)
        ax.set_title(f"{_TITLES.get(module, module)}\nmean MaxVio {mean_vio:.2f}", fontsize=9)
        bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03, format=PercentFormatter(xmax=1.0, decimals=0))
        bar.ax.axhline(balanced, color="red", lw=1.2)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("share of tokens (red: balanced)", fontsize=7)
    axes[0][0].set_ylabel("layer  (MaxVio)")
    fig.suptitle(title or "expert load", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=110)


def _short(layer: str) -> str:
    """``"vision.layer3"`` -> ``"layer 3"``; other keys unchanged."""
    module, _, rest = layer.partition(".")
    return rest.replace("layer", "layer ", 1) if rest.startswith("layer") else layer


__all__ = ["plot_expert_heatmap"]
