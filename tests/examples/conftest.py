"""Fixtures of the launcher tests: whether the launcher finds Transformer Engine."""

from __future__ import annotations

import os

import pytest

from cumo_megatron import launch


@pytest.fixture(scope="session")
def te_found(tmp_path_factory) -> str:
    """A PYTHONPATH under which ``transformer_engine`` is found (an empty package).

    Lets dry runs of the shipped configs (``model.spec: te``) pass the launcher's Transformer Engine
    check on machines without it; a dry run imports nothing, so the empty package is never used.
    """
    root = tmp_path_factory.mktemp("fake-te")
    (root / "transformer_engine").mkdir()
    (root / "transformer_engine" / "__init__.py").write_text("")
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture
def te_installed(monkeypatch):
    """In this process, the launcher finds Transformer Engine."""
    monkeypatch.setattr(launch, "transformer_engine_available", lambda: True)
