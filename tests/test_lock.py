"""requirements.lock pins every dependency pyproject.toml declares, inside its declared range, and the
environment the tests run in is exactly the lock (so `make test` tested what `make demo` installs)."""
from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_lock_pins_every_declared_dependency_inside_its_range():
    pins = lock()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in requirements.lock (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier} (make lock)")


def test_this_environment_is_the_lock():
    """Run from `make test`: what is installed equals the lock (a stale .venv would test something else)."""
    pins = lock()
    for name, version in pins.items():
        installed = Version(metadata.version(name))
        assert installed.public == version.public, f"{name} {installed} is installed, requirements.lock says {version}"
