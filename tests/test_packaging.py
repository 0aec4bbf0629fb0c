"""The package installs where GPU users are; CI installs one exact, reproducible environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
# An NGC-style CUDA image as seen on a GPU node: Python 3.12.3 with its own torch 2.11 build.
GPU_IMAGE = {"python": "3.12.3", "torch": "2.11.0"}


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup."""
    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        setuptools.setup = original
    return captured


def test_package_admits_gpu_images(setup_kwargs):
    assert SpecifierSet(setup_kwargs["python_requires"]).contains(GPU_IMAGE["python"])
    requirements = {Requirement(r).name: Requirement(r) for r in setup_kwargs["install_requires"]}
    assert requirements["torch"].specifier.contains(GPU_IMAGE["torch"])
    assert requirements["megatron-core"].specifier.contains("0.16.1")
    for requirement in requirements.values():
        assert not any(spec.operator == "==" for spec in requirement.specifier), (
            f"{requirement} pins an exact version in the package; pin in constraints.txt instead"
        )
    # torchvision would drag a torch of its own choosing into a GPU image: tests only.
    assert "torchvision" not in requirements and "open_clip_torch" not in requirements
    assert {"pytest", "open_clip_torch"} <= {Requirement(r).name for r in setup_kwargs["extras_require"]["test"]}


def test_ci_installs_the_pinned_constraints():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower()] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1" and pins["megatron-core"] == "0.16.1"
    readme = (ROOT / "README.md").read_text()
    test_command = re.search(r"<!-- ci:test-command -->\s*```bash\n(.*)\n```", readme).group(1)
    assert "-c constraints.txt" in test_command
