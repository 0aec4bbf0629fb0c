"""Memory and time of `tools/upcycle_checkpoint.py`'s conversion against a plain file copy.

Builds a synthetic HF LLaMA checkpoint (random bf16 weights, TinyLlama-1.1B shapes by default:
about 2.2 GB in 1 GB safetensors shards) plus a tiny HF CLIP vision tower, then runs ``--rounds``
rounds (default 3) of, side by side:

1. ``copy``: a child process imports torch and megatron-core (as the converter's does), then
   copies the LLaMA's files with ``shutil.copyfile`` (the same bytes, no conversion) and, timed
   apart, ``fsync``s the copies;
2. ``convert``: a child process runs the conversion (``import_checkpoint``, target layout
   TP2 x PP2, model precision bf16 so the output has the source's size) and reports its resident
   memory right after its imports (torch + megatron-core alone are ~0.7 GB), its peak from then
   on, and the conversion's wall time (`tests.fixtures.conversion_probe`).

Both outputs are deleted after each step. Both children start the same way because on a VM the
cost of writing depends on whether the guest's free pages are still backed by the host: a copy
repeated at once (into the pages the previous copy just freed) ran in 0.66 s, the same copy in a
fresh process 1.6-4 s. Medians over the rounds are compared.

Prints (a) the largest peak resident memory above the post-import level, divided by the
checkpoint's size, and (b) the median conversion time divided by the median copy time. The
conversion syncs its output to disk (as megatron's own writer does, so that the atomically
renamed directory survives a crash) and a plain copy does not: ``time_over_synced_copy`` also
divides by the copy plus its ``fsync``. ``time_over_warm_copy`` divides by the copy repeated at once
in the same process (the best case for the copy; the converter recycles its own pages, see
`cumo_megatron.checkpoint.stream_writer`). The last line is JSON:
``{"peak_rss_over_ckpt": X, "time_over_copy": Y, "time_over_synced_copy": Z, ...}``. Goals: X <= 0.25, Y <= 3.

Usage: ``python bench/convert.py [--rounds 3] [--layers 22] [--hidden 2048] [--ffn 5632] [--work DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def copy_probe(src: Path, dest: Path) -> None:
    """The copy's child process: the converter's imports first, then the timed copy and fsync,
    then a second copy at once (JSON line)."""
    import megatron.core  # noqa: F401
    import torch  # noqa: F401

    copy_s, fsync_s = copy_files(src, dest)
    shutil.rmtree(dest)
    warm_s, _ = copy_files(src, dest)  # into the pages the first copy just freed: the best case
    print(json.dumps({"copy_s": copy_s, "fsync_s": fsync_s, "warm_copy_s": warm_s}))


def _child(argv: list[str], env: dict) -> dict:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(argv[:3])} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the checkpoint, then copy and convert it in child processes round by round; print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--rounds", type=int, default=3, help="copy + conversion rounds (medians are compared)")
    parser.add_argument("--copy-probe", nargs=2, type=Path, metavar=("SRC", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.copy_probe:
        copy_probe(*args.copy_probe)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.work))
    try:
        from tests.fixtures.tiny_models import save_hf_clip_vision, save_synthetic_llama

        t0 = time.perf_counter()
        ckpt_bytes = save_synthetic_llama(work / "llama", args.layers, args.hidden, args.ffn, args.heads,
                                          args.kv_heads, args.vocab)
        save_hf_clip_vision(work / "clip")
        print(f"synthetic LLaMA: {ckpt_bytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
        os.sync()  # flush the source now, so neither the copy nor the conversion waits for it

        env = dict(os.environ, PYTHONPATH=str(ROOT))
        rounds = []
        for round_index in range(args.rounds):
            copied = _child([sys.executable, str(Path(__file__).resolve()), "--copy-probe", str(work / "llama"),
                             str(work / "copy")], env)
            shutil.rmtree(work / "copy")
            child = _child([sys.executable, "-m", "tests.fixtures.conversion_probe", str(work / "clip"),
                            str(work / "llama"), str(work / "ours"), "precision=bf16"], env)
            shutil.rmtree(work / "ours")
            rounds.append({"copy_s": copied["copy_s"], "copy_fsync_s": copied["fsync_s"],
                           "warm_copy_s": copied["warm_copy_s"], "convert_s": child["seconds"],
                           "peak_rss_above_imports_bytes": child["peak_rss"] - child["rss_after_imports"],
                           "rss_after_imports_bytes": child["rss_after_imports"], "out_bytes": child["out_bytes"]})
            print(f"round {round_index + 1}: copy {copied['copy_s']:.2f} s (+ {copied['fsync_s']:.2f} s fsync; "
                  f"repeated at once {copied['warm_copy_s']:.2f} s), "
                  f"convert {child['seconds']:.2f} s, peak RSS "
                  f"{rounds[-1]['peak_rss_above_imports_bytes'] / 2**20:.0f} MiB above the "
                  f"{child['rss_after_imports'] / 2**20:.0f} MiB after imports", flush=True)

        def median(key):
            return statistics.median(r[key] for r in rounds)

        above = max(r["peak_rss_above_imports_bytes"] for r in rounds)
        result = {
            "peak_rss_over_ckpt": round(above / ckpt_bytes, 4),
            "time_over_copy": round(median("convert_s") / median("copy_s"), 3),
            "time_over_synced_copy": round(median("convert_s") / (median("copy_s") + median("copy_fsync_s")), 3),
            "time_over_warm_copy": round(median("convert_s") / median("warm_copy_s"), 3),
            "ckpt_bytes": ckpt_bytes,
            "out_bytes": rounds[-1]["out_bytes"],
            "peak_rss_above_imports_bytes": above,
            "rss_after_imports_bytes": rounds[-1]["rss_after_imports_bytes"],
            "convert_s": round(median("convert_s"), 2),
            "copy_s": round(median("copy_s"), 2),
            "copy_fsync_s": round(median("copy_fsync_s"), 2),
            "warm_copy_s": round(median("warm_copy_s"), 2),
            "rounds": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rounds],
        }
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
