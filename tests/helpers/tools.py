"""``tools/<name>.py`` as an importable module (the tools are scripts in a folder, not a package)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.helpers.distributed import ROOT


def load_tool(name: str) -> ModuleType:
    """A fresh import of ``tools/<name>.py`` as ``cumo_tool_<name>``; its ``main(argv)`` is what
    the command line runs."""
    spec = importlib.util.spec_from_file_location(f"cumo_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
