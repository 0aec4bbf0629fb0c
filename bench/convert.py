"""Memory and time of `tools/upcycle_checkpoint.py`'s conversion against a plain file copy.

Builds a synthetic HF LLaMA checkpoint (random bf16 weights, TinyLlama-1.1B shapes by default:
about 2.2 GB in 1 GB safetensors shards) plus a tiny HF CLIP vision tower, then, in one run:

1. ``copy``: copies the LLaMA's files with ``shutil.copyfile`` (the same bytes, no conversion);
2. ``convert``: runs the conversion (``import_checkpoint``, target layout TP2 x PP2, model
   precision bf16 so the output has the source's size) in a child process that reports its
   resident memory right after its imports (torch + megatron-core alone are ~0.7 GB) and its
   peak from then on, and the conversion's wall time (`tests.fixtures.conversion_probe`).

Prints (a) the child's peak resident memory above its post-import level, divided by the
checkpoint's size, and (b) the conversion's time divided by the copy's. The page cache is warm
for both (the files were just written). The conversion syncs its output to disk (as megatron's
own writer does, so that the atomically renamed directory survives a crash) and a plain copy does
not: ``time_over_synced_copy`` also divides by the copy plus an ``fsync`` of the copies. The last line is JSON:
``{"peak_rss_over_ckpt": X, "time_over_copy": Y, "time_over_synced_copy": Z, ...}``. Goals: X <= 0.25, Y <= 3.

Usage: ``python bench/convert.py [--layers 22] [--hidden 2048] [--ffn 5632] [--work DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def copy_files(src: Path, dest: Path) -> tuple[float, float]:
    """Seconds to copy ``src``'s weight files into ``dest`` with ``shutil.copyfile``, and the
    seconds to then ``fsync`` the copies (the converter, like megatron's writer, syncs its output)."""
    dest.mkdir(parents=True)
    start = time.perf_counter()
    copies = []
    for path in sorted(src.glob("*.safetensors")):
        shutil.copyfile(path, dest / path.name)
        copies.append(dest / path.name)
    copied = time.perf_counter() - start
    for path in copies:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return copied, time.perf_counter() - start - copied


def main() -> None:
    """Build the checkpoint, copy it, convert it in a child process, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.work))
    try:
        from tests.fixtures.tiny_models import save_hf_clip_vision, save_synthetic_llama

        t0 = time.perf_counter()
        ckpt_bytes = save_synthetic_llama(work / "llama", args.layers, args.hidden, args.ffn, args.heads,
                                          args.kv_heads, args.vocab)
        save_hf_clip_vision(work / "clip")
        print(f"synthetic LLaMA: {ckpt_bytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
        os.sync()  # flush the source now, so neither the copy nor the conversion waits for it

        copy_s, sync_s = copy_files(work / "llama", work / "copy")
        shutil.rmtree(work / "copy")
        print(f"copy: {copy_s:.1f} s (+ {sync_s:.1f} s to fsync the copies)", flush=True)

        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run(
            [sys.executable, "-m", "tests.fixtures.conversion_probe", str(work / "clip"), str(work / "llama"),
             str(work / "ours"), "precision=bf16"],
            env=env, capture_output=True, text=True, cwd=ROOT,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"conversion failed (exit {proc.returncode})")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        above = child["peak_rss"] - child["rss_after_imports"]
        result = {
            "peak_rss_over_ckpt": round(above / ckpt_bytes, 4),
            "time_over_copy": round(child["seconds"] / copy_s, 3),
            "time_over_synced_copy": round(child["seconds"] / (copy_s + sync_s), 3),
            "ckpt_bytes": ckpt_bytes,
            "out_bytes": child["out_bytes"],
            "peak_rss_above_imports_bytes": above,
            "rss_after_imports_bytes": child["rss_after_imports"],
            "convert_s": round(child["seconds"], 2),
            "copy_s": round(copy_s, 2),
            "copy_fsync_s": round(sync_s, 2),
        }
        print(f"convert: {child['seconds']:.1f} s; peak RSS {above / 2**20:.0f} MiB above the "
              f"{child['rss_after_imports'] / 2**20:.0f} MiB after imports")
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
