"""Bridge: a trainer checkpoint (``<train.save>`` with ``latest``) -> a model checkpoint of ours.

``tools/upcycle_checkpoint.py --from-checkpoint`` and ``python -m cumo_megatron.generate --load``
read model checkpoints (``model_config.yaml`` + megatron ``dist_checkpointing`` files, see
`cumo_megatron.checkpoint.ours`). The trainer's ``iter_N`` directories hold the same sharded model
keys (plus optimizer state) but the model config sits in ``<train.save>/config.yaml``. This loads
the newest complete iteration's weights into a world-of-one model and writes them as a model
checkpoint: ``python -m cumo_megatron.quickstart.export TRAIN_SAVE_DIR OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence


def trained_model_dir(save_dir) -> Optional[Path]:
    """The newest iteration of ``save_dir`` when it already is a model checkpoint, else ``None``."""
    # Plain file reads (no megatron import): the orchestrator calls this in its own process.
    pointer = Path(save_dir) / "latest"
    if not pointer.is_file():
        return None
    latest = Path(save_dir) / pointer.read_text().strip()
    ok = (latest / "model_config.yaml").is_file() and (latest / "metadata.json").is_file()
    return latest if ok else None


def export(save_dir, out_dir) -> Path:
    """Write the weights of ``save_dir``'s latest iteration as a model checkpoint in ``out_dir``."""
    import cumo_megatron.platform as platform
    from cumo_megatron.checkpoint import ours
    from cumo_megatron.config.loader import load_config
    from cumo_megatron.config.schema import ExperimentConfig, ParallelConfig
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.training.checkpointing import load_weights

    save_dir, out_dir = Path(save_dir), Path(out_dir)
    config = save_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {save_dir} is not a training output directory")
    cfg = load_config(ExperimentConfig, config)
    platform.initialize(platform.ParallelSizes(), seed=cfg.seed)
    model = build_model(cfg.model, ParallelConfig())
    report = load_weights(model, save_dir, cfg.model, ParallelConfig(), seed=cfg.seed)
    if report["upcycled"]:
        raise RuntimeError(f"{save_dir}: weights do not match its own config (would upcycle {report['upcycled']})")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    ours.save_model_checkpoint(model, cfg.model, tmp, info={"kind": "trainer-export", "source": report["path"]})
    tmp.rename(out_dir)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cumo_megatron.quickstart.export TRAIN_SAVE_DIR OUT_DIR``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m cumo_megatron.quickstart.export TRAIN_SAVE_DIR OUT_DIR", file=sys.stderr)
        return 2
    print(f"wrote {export(*args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
