"""constraints.txt pins what the workers install to the versions these tests run with.

Setup installs `-r requirements.txt kaggle -c constraints.txt`, and .ci/run installs the test venv
with the same constraints; the PyTorch build (torch, torchvision, triton, nvidia-*, cuda-*) is the
one thing left to setup's driver check, so it is not pinned there.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYTORCH_BUILD = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")


def requirements() -> list[Requirement]:
    """The top-level requirements of requirements.txt."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


def pins() -> dict[str, str]:
    """constraints.txt as name -> version; every line must be `name==version`."""
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
            assert match, f"not an exact pin: {line!r}"
            found[canonicalize_name(match[1])] = match[2]
    return found


def installed_closure(requirements: list[Requirement]) -> dict[str, str]:
    """name -> installed version of everything these requirements pull in here (markers evaluated)."""
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(requirement, "") for requirement in requirements]
    while todo:
        requirement, parent_extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": parent_extra}):
            continue
        name = canonicalize_name(requirement.name)
        distribution = metadata.distribution(name)
        found[name] = distribution.version
        for extra in ["", *sorted(requirement.extras)]:
            if (name, extra) not in seen:
                seen.add((name, extra))
                todo += [(Requirement(line), extra) for line in distribution.requires or []]
    return found


def test_constraints_leave_pytorch_build_to_setup():
    assert [name for name in pins() if PYTORCH_BUILD.fullmatch(name)] == []


@pytest.mark.parametrize(
    "requirement", [r for r in requirements() if r.name not in ("torch", "torchvision")], ids=str
)
def test_constraints_pin_every_requirement(requirement):
    version = pins().get(canonicalize_name(requirement.name))
    assert version is not None, f"{requirement.name} is not in constraints.txt"
    assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes {version}"


def test_constraints_pin_kaggle():
    assert "kaggle" in pins()


def test_test_venv_has_pinned_versions():
    """Everything pinned that is installed here has that version: the tests ran with the pins."""
    different = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # kaggle and its dependencies: workers only
        if installed != version:
            different[name] = f"pinned {version}, installed {installed}"
    assert different == {}, "run .ci/run, which installs the test venv with -c constraints.txt"


def test_constraints_pin_all_that_requirements_install():
    """Every package requirements.txt pulls into the test venv, apart from the PyTorch build."""
    closure = installed_closure(requirements())
    missing = sorted(set(closure) - set(pins()) - {name for name in closure if PYTORCH_BUILD.fullmatch(name)})
    assert missing == [], "not in constraints.txt (see its header to refresh it)"
