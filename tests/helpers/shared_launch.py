"""One 2-rank gloo launch shared by several test modules.

A launch costs 15-30 s on the 2-core CI machine (two interpreters importing torch and
megatron-core), while each module's 2-rank checks take seconds. A test module registers its part
when it is imported (`register`): a function that prepares the part's inputs in this process and
returns ``(target, args, context)``. The first module that asks for its results (`results`)
prepares every registered part and runs all targets, in the order they were registered, on the
ranks of one `run_distributed_many` launch; later modules get theirs from memory. pytest imports
every collected module before running any test, so all parts are known by then.

A part that fails fails the launch, and every module sharing it reports the same error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tests.helpers.distributed import run_distributed_many

Prepare = Callable[[Path], tuple[str, dict, Any]]

_PARTS: dict[str, Prepare] = {}
_RESULTS: dict[str, tuple[Any, list]] = {}
_FAILURE: list[BaseException] = []


def register(name: str, prepare: Prepare) -> None:
    """Add a part to the shared launch (call at import time; a second call replaces the first)."""
    _PARTS[name] = prepare


def results(name: str, tmp_path_factory) -> tuple[Any, list]:
    """``(context, per-rank results)`` of the registered part ``name``; launches on the first call."""
    if name not in _PARTS:
        raise KeyError(f"no shared-launch part {name!r}; register it when the test module is imported")
    if _FAILURE:
        raise RuntimeError(f"the shared 2-rank launch failed: {_FAILURE[0]}") from _FAILURE[0]
    if name not in _RESULTS:
        pending = [n for n in _PARTS if n not in _RESULTS]
        prepared = {n: _PARTS[n](tmp_path_factory.mktemp(n.replace(".", "-"))) for n in pending}
        try:
            launched = run_distributed_many([(target, args) for target, args, _ in prepared.values()])
        except BaseException as err:
            _FAILURE.append(err)
            raise
        for (n, (_, _, context)), ranks in zip(prepared.items(), launched):
            _RESULTS[n] = (context, ranks)
    return _RESULTS[name]
