"""Figure of a scaling sweep's fits: loss against data size per encoder, fitted curves over the points."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cumo_megatron.research.scaling_law import ScalingReport


def _size_label(params: int) -> str:
    """86000000 -> '86M', 1012000000 -> '1.01B'."""
    return f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"


def plot_scaling(report: ScalingReport, png_path) -> Path:
    """Write the sweep's figure to ``png_path``; one panel per LLM, one colour per encoder.

    Points are the sweep's cells; solid lines are the per-curve fits ``E + B / D^beta``, dashed
    lines the LLM's joint fit at that encoder's size, and a triangle marks where doubling the
    data starts to gain less than the report's epsilon (when that falls inside the plotted range).
    """
    from cumo_megatron.research.figures import pyplot, save_figure

    plt = pyplot()

    llms = list(dict.fromkeys(c.llm for c in report.curves))  # the report's order: smallest LLM first
    encoders = sorted({(c.vision_params, c.vision) for c in report.curves})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, (_, name) in enumerate(encoders)}
    joints = {j.llm: j.fit for j in report.joints if j.fit is not None}

    fig, axes = plt.subplots(1, max(len(llms), 1), figsize=(6.0 * max(len(llms), 1), 4.6), squeeze=False)
    for ax, llm in zip(axes[0], llms):
        marked = False
        for curve in (c for c in report.curves if c.llm == llm):
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
        ax.set_title(f"LLM {llm}: loss vs data per vision encoder", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=100)


__all__ = ["plot_scaling"]
