"""Figure of a scaling sweep's fits: loss against data size per encoder, fitted curves over the points."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cumo_megatron.research.scaling_law import ScalingReport


def _size_label(params) -> str:
    """86000000 -> '86M', 1012000000 -> '1.01B', None (a table without sizes) -> '?'."""
    if params is None:
        return "?"
    return f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"


def plot_scaling(report: ScalingReport, png_path) -> Path:
    """Write the sweep's figure to ``png_path``; one panel per LLM (and group), one colour per encoder.

    Points are the sweep's cells; solid lines are the per-curve fits ``E + B / D^beta``, dashed
    lines the LLM's joint fit at that encoder's size, and a triangle marks where doubling the
    data starts to gain less than the report's epsilon (when that falls inside the plotted range).
    """
    from cumo_megatron.research.figures import pyplot, save_figure

    plt = pyplot()

    # The report's order: smallest LLM first, then its groups (data sets) as the table lists them.
    llms = list(dict.fromkeys((c.llm, c.group) for c in report.curves))
    encoders = list(dict.fromkeys(c.vision for c in report.curves))  # the report's order: by size
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(encoders)}
    joints = {(j.llm, j.group): j.fit for j in report.joints if j.fit is not None}

    # At most three panels a row, so that an LLM trained on several data sets stays readable.
    cols = min(max(len(llms), 1), 3)
    rows = -(-max(len(llms), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(llms):]:
        ax.set_visible(False)
    for ax, llm in zip(axes.ravel(), llms):
        marked = False
        for curve in (c for c in report.curves if (c.llm, c.group) == llm):
            colour = colours[curve.vision]
            d = np.array([r.data_size for r in curve.rows], dtype=float)
            loss = np.array([r.final_eval_loss for r in curve.rows], dtype=float)
            label = f"{curve.vision} ({_size_label(curve.vision_params)})"
            ax.scatter(d, loss, color=colour, s=22, zorder=3)
            grid = np.geomspace(d.min() / 1.5, d.max() * 1.5, 200)
            if curve.fit is not None:
                p = curve.fit.params
                ax.plot(grid, curve.fit.predict(grid), color=colour, lw=1.6,
                        label=f"{label}: E={p['E']:.3g}, beta={p['beta']:.2f}")
                sat = curve.saturation
                if sat and grid[0] <= sat <= grid[-1]:
                    ax.plot([sat], curve.fit.predict([sat]), marker="v", color=colour, ms=8, ls="none",
                            label=None if marked else f"doubling D gains < {report.epsilon:g}")
                    marked = True
            else:
                ax.plot([], [], color=colour, label=f"{label}: not fitted")
            if llm in joints:
                n = np.full_like(grid, curve.vision_params)
                ax.plot(grid, joints[llm].predict(grid, n), color=colour, lw=1.0, ls="--", alpha=0.7)
        if llm in joints:
            ax.plot([], [], color="grey", ls="--", label="joint fit E + A/N^alpha + B/D^beta")
        ax.set_xscale("log")
        ax.set_xlabel("training samples D")
        ax.set_ylabel("final eval loss")
        group = ", ".join(f"{k}={v}" for k, v in llm[1])
        ax.set_title(f"LLM {llm[0]}{f' ({group})' if group else ''}: loss vs data per vision encoder", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=100)


__all__ = ["plot_scaling"]
