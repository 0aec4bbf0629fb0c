"""Per-step training metrics: ``<out>/metrics.jsonl``, TensorBoard, and a one-line console summary.

Only the reporting rank writes (`MetricsWriter(enabled=...)`). On resume the JSONL file is cut
back to the resumed step, so the file always reads as one uninterrupted run.

Throughput counts real tokens only: ``tokens`` (and so ``tokens_per_s`` and the TFLOP/s) leaves
out padding (`real_and_padded_tokens`, from the batch's ``padding_mask``); ``tokens_padded`` is
every sequence position processed, padding included.

Validation rows (`training.validation`) share the file: they carry ``"split": "validation"`` and
the step they follow; their TensorBoard tags are prefixed ``validation/``. So do checkpoint rows
(``"split": "checkpoint"``, one per committed checkpoint, written when it is committed: the
checkpoint's step, ``async``, ``blocked_s``: how long the training loop waited for it, ``save_s``:
from its start to its commit; the same figure for a synchronous save). Readers that want the
training steps only keep the rows `is_training_row` accepts.

Model FLOPs are estimated from parameter counts (`model_flops_per_step`), per token through each
module: 6 x active parameters for what is trained (forward 2, input gradients 2, weight gradients
2); in stage 1 the frozen LLM 4x (forward and the input gradients that carry the loss back to the
connector, no weight gradients) and the frozen ViT 2x (forward only: nothing before it trains).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from cumo_megatron.files import write_text_atomic
from cumo_megatron.jsonl import read_json_lines

SUMMARY_KEYS = ("loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "tflops")


def _tensorboard_writer(directory: Path):
    """A `SummaryWriter` when ``tensorboard`` is installed, else None (JSONL stays the record)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional `tensorboard` package is missing
        return None
    return SummaryWriter(log_dir=str(directory))


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the rows with ``step <= last_step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    # A line cut by a kill is dropped.
    kept = [line.text for line in read_json_lines(path)
            if line.error is None and int(line.value.get("step", 0)) <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """Flatten numeric entries (nested dicts become ``a/b``; lists become ``a/i``)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(_scalars(value, name + "/"))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
    return out


def is_training_row(row: dict) -> bool:
    """Whether a ``metrics.jsonl`` row is a training step's (not a validation or checkpoint row)."""
    return row.get("split", "train") == "train"


def validation_line(row: dict) -> str:
    """``validation step 12 | loss 2.3456 | lm 2.3000 | vis bal 1.002 z 0.120 | 37 records, 1234 tokens | 1.2 s``."""
    parts = [f"{row['split']} step {row['step']}", f"loss {row['loss']:.4f}", f"lm {row['lm_loss']:.4f}"]
    for module in ("vision", "connector", "language"):
        if f"{module}_balance" in row:
            parts.append(f"{module[:3]} bal {row[f'{module}_balance']:.3f} z {row[f'{module}_z_loss']:.3f}")
    parts.append(f"{row['records']} records, {row['tokens']} tokens")
    if row.get("skipped"):
        parts.append(f"{row['skipped']} skipped")
    parts.append(f"{row['time_s']:.1f} s")
    return " | ".join(parts)


def checkpoint_line(row: dict) -> str:
    """``checkpoint step 12 | iter_0000012 | loop blocked 0.31 s of 4.20 s (async)``."""
    mode = "async" if row["async"] else "sync"
    return (f"checkpoint step {row['step']} | {row['checkpoint']} | loop blocked {row['blocked_s']:.2f} s "
            f"of {row['save_s']:.2f} s ({mode})")


def console_line(row: dict) -> str:
    """``step 12 | loss 2.3456 | lm 2.3000 | lr 1.0e-03 | gnorm 0.812 | 1234 tok/s | 0.01 TFLOP/s``."""
    def fmt(value, spec):
        return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    parts = [
        f"step {row['step']}",
        f"loss {fmt(row.get('loss'), '.4f')}",
        f"lm {fmt(row.get('lm_loss'), '.4f')}",
    ]
    for module in ("vision", "connector", "language"):
        if f"{module}_balance" in row:
            parts.append(f"{module[:3]} bal {row[f'{module}_balance']:.3f} z {row[f'{module}_z_loss']:.3f}")
    parts += [
        f"lr {fmt(row.get('lr'), '.2e')}",
        f"gnorm {fmt(row.get('grad_norm'), '.3f')}",
        f"{fmt(row.get('tokens_per_s'), '.0f')} tok/s",
        f"{fmt(row.get('tflops'), '.3g')} TFLOP/s",
    ]
    if row.get("overflow"):
        parts.append(f"SKIPPED (fp16 overflow at loss scale {row.get('loss_scale', float('nan')):g})")
    elif row.get("skipped"):
        parts.append(f"SKIPPED (non-finite, {row.get('bad_steps', 0)} in a row)")
    return " | ".join(parts)


_STDOUT = object()  # the console default: ``sys.stdout`` as it is when a line is printed


class MetricsWriter:
    """Writes one JSON line per step, the same scalars to TensorBoard, and a console line.

    ``console``: a text stream, None for no console lines, or by default whatever ``sys.stdout``
    is at each write (a caller may redirect it around a run and close its file afterwards).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0, console=_STDOUT):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.console = console
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a")
        self._tb = _tensorboard_writer(self.path.parent / "tensorboard")

    def write(self, row: dict, console: bool = True) -> None:
        """Record one step's metrics (a no-op on ranks that do not report).

        A row with a ``split`` (validation) gets TensorBoard tags ``<split>/<name>``, apart from the
        training curves of the same step.
        """
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        training = is_training_row(row)
        prefix = "" if training else f"{row['split']}/"
        if self._tb is not None:
            for name, value in _scalars(row).items():
                if name != "step" and math.isfinite(value):
                    self._tb.add_scalar(prefix + name, value, global_step=row["step"])
        if console and self.console is not None:
            stream = sys.stdout if self.console is _STDOUT else self.console
            line = console_line(row) if training else (
                checkpoint_line(row) if row["split"] == "checkpoint" else validation_line(row))
            print(line, file=stream, flush=True)

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def real_and_padded_tokens(microbatches) -> tuple[int, int]:
    """``(real, padded)`` LLM token counts of ``microbatches``: positions that are not padding
    (``padding_mask`` False; image placeholders count), and all positions."""
    real = padded = 0
    for mb in microbatches:
        padded += int(mb["input_ids"].numel())
        mask = mb.get("padding_mask")
        real += int(mb["input_ids"].numel() if mask is None else (~mask).sum())
    return real, padded


def model_flops_per_step(
    counts,
    model_cfg,
    stage: int,
    text_tokens: int,
    images: int,
) -> float:
    """Estimated model FLOPs of one optimizer step.

    ``counts`` is a `models.params.ParamCounts` (whole model, active parameters); ``text_tokens``
    the real LLM tokens processed (image placeholders included, padding not) and ``images`` the
    number of images encoded in the step (all ranks together). Stage 1 trains only the connector:
    the ViT runs forward (2 FLOPs per parameter and token), the LLM forward and input-gradient
    backward (4); everything trained costs 6.
    """
    vision = model_cfg.vision
    crops = sum(s * s for s in vision.s2_scales)
    vit_tokens = images * crops * (vision.patches_per_side**2 + 1)
    vit_factor, llm_factor = (2, 4) if stage == 1 else (6, 6)
    connector_tokens = images * vision.tokens_per_image
    return float(
        vit_factor * counts.vision.active * vit_tokens
        + 6 * counts.connector.active * connector_tokens
        + llm_factor * counts.language.active * text_tokens
    )
