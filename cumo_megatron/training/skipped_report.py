"""The skipped-records report of a training run: ``<train.save>/skipped_records.json``.

`DataHealth` counts, on each data-parallel rank, the bad records that rank met; its state travels
in every checkpoint's per-rank file. This module merges those counts over the data-parallel ranks
and writes them next to ``metrics.jsonl`` at each checkpoint and at the end of the run, so the
list of skipped records (file, index, line, id, kind, reason) can be read without opening a
checkpoint. A resumed run restores the counts from its checkpoint, so the report covers the whole
run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["REPORT_NAME", "merge_health_states", "summary_line", "write_report"]

REPORT_NAME = "skipped_records.json"


def _entry(d: dict) -> dict:
    """One record of the report from a `Problem` as `DataHealth.state_dict` stores it."""
    return {"file": d["source"], "index": d["index"], "line": d.get("line"), "id": d.get("record_id"),
            "kind": d["kind"], "reason": d["message"]}


def merge_health_states(states: Sequence[Optional[dict]], step: Optional[int] = None) -> dict:
    """One report from the `DataHealth.state_dict` of every data-parallel rank (None: no counter).

    A record met by several ranks (or epochs) appears once; ``skip_events`` adds every rank's count
    of bad samples met. Records are ordered by file and index.
    """
    skipped: dict[tuple, dict] = {}
    truncated: dict[tuple, dict] = {}
    events = 0
    for state in states:
        if not state:
            continue
        for d in state.get("skipped", ()):
            skipped.setdefault((d["source"], d["index"]), d)
        for d in state.get("truncated", ()):
            truncated.setdefault((d["source"], d["index"]), d)
        events += int(state.get("events", 0))
    counts: dict[str, int] = {}
    for d in skipped.values():
        counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    return {
        "step": step,
        "skipped_records": len(skipped),
        "skip_events": events,
        "truncated_records": len(truncated),
        "counts": dict(sorted(counts.items())),
        "records": [_entry(skipped[k]) for k in sorted(skipped)],
        "truncated": [_entry(truncated[k]) for k in sorted(truncated)],
    }


def summary_line(report: dict, path: Optional[Path] = None) -> str:
    """The totals of ``report`` in one line (what the trainer prints at the end of a run)."""
    kinds = ", ".join(f"{k}={n}" for k, n in report["counts"].items()) or "none"
    where = f"; list in {path}" if path is not None and report["skipped_records"] else ""
    return (f"data: {report['skipped_records']} skipped record(s) ({kinds}), {report['skip_events']} skip event(s), "
            f"{report['truncated_records']} truncated{where}")


def write_report(out_dir, health, step: int, write: bool, group=None) -> tuple[dict, Path]:
    """Merge ``health`` (this rank's `DataHealth`, or None) over the data-parallel ``group`` and,
    where ``write`` (one rank), write ``<out_dir>/skipped_records.json`` atomically.

    Collective over ``group`` when torch.distributed is initialised: every rank calls it. Returns
    the merged report and the file's path.
    """
    import torch.distributed as dist

    from cumo_megatron.files import write_text_atomic

    state = health.state_dict() if health is not None else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        states: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, state, group=group)
    else:
        states = [state]
    report = merge_health_states(states, step)
    path = Path(out_dir) / REPORT_NAME
    if write:
        write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    return report, path
