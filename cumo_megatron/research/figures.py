"""Headless matplotlib for the research tools' PNG figures."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png_path, dpi: int) -> Path:
    """Write ``fig`` to ``png_path`` (creating its folder), close it, return the path."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)
    pyplot().close(fig)
    return png_path


__all__ = ["pyplot", "save_figure"]
