"""The one Flower version of the project: the exact pin on `flwr` in pyproject.toml.

Flower peers (CLI, SuperLink, SuperNode, SuperExec) refuse each other across a major.minor
release (exit code 606, "runtime version mismatch"), so the venv, the compose file, the app
image and the compose test's stand-in images all take their version from that pin; nothing
else names it. Upgrading Flower: edit the pin, `make setup`, `flain compose --out
docker-compose.yml`; tests/test_versions.py fails until every place agrees.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from launch.superlink import SOURCE_ROOT

PYPROJECT = SOURCE_ROOT / "pyproject.toml"
_PIN = re.compile(r"^flwr(\[[^\]]*\])?\s*==\s*(?P<version>\d+\.\d+\.\d+)\s*$")


class VersionMismatch(RuntimeError):
    """The installed Flower is not the project's pinned one."""


def _requirements() -> list[str]:
    if PYPROJECT.is_file():
        return tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return [r.split(";")[0] for r in metadata.requires("flain") or []]  # installed from a wheel


def pin_from(requirements: list[str]) -> str:
    """X.Y.Z from the one `flwr[...]==X.Y.Z` requirement; ValueError if there is none or it is
    not an exact pin (peers must share major.minor, a range would let them drift apart)."""
    flwr = [r for r in requirements if re.match(r"^flwr(\[|\s|=|<|>|~|!|$)", r.strip())]
    if len(flwr) != 1:
        raise ValueError(f"expected one requirement on flwr, found {flwr}")
    found = _PIN.match(flwr[0].strip())
    if found is None:
        raise ValueError(f"the flwr requirement {flwr[0]!r} is not an exact pin (flwr[simulation]==X.Y.Z)")
    return found.group("version")


def flwr_pin() -> str:
    """The Flower version every peer of this project runs."""
    return pin_from(_requirements())


def same_release(a: str, b: str) -> bool:
    """Flower's own compatibility rule: the same major.minor."""
    return a.split(".")[:2] == b.split(".")[:2]


def check_installed() -> None:
    """Raise VersionMismatch (one line) if the installed flwr is not the pinned release."""
    installed, pinned = metadata.version("flwr"), flwr_pin()
    if installed != pinned:
        raise VersionMismatch(f"flwr {installed} is installed but the project pins flwr=={pinned} "
                              "(pyproject.toml): run `make setup` to install the pinned version")
