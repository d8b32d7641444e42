"""One Flower version everywhere: pyproject's exact pin is what the venv, the compose file, the
app image and the compose test's stand-in images run (peers refuse each other across a
major.minor release: exit code 606)."""

import importlib.util
import re
from importlib import metadata

import pytest
import yaml

from launch.compose import compose_services
from launch.superlink import SOURCE_ROOT
from launch.versions import flwr_pin, pin_from, same_release


@pytest.mark.parametrize("requirements, expected", [
    (["numpy>=1", "flwr[simulation]==1.42.0", "torch"], "1.42.0"),
    (["flwr==2.0.13"], "2.0.13"),
    (["flwr[simulation] == 1.43.1"], "1.43.1"),
])
def test_pin_is_read_from_the_requirements(requirements, expected):
    assert pin_from(requirements) == expected


@pytest.mark.parametrize("requirements", [
    ["flwr[simulation]>=1.41"],  # a range lets the venv and the images drift apart
    ["flwr~=1.42.0"],
    ["flwr"],
    ["numpy"],  # no flwr at all
    ["flwr==1.42.0", "flwr[simulation]==1.41.0"],  # two
    ["flwr==1.42"],  # images are tagged X.Y.Z
])
def test_anything_but_one_exact_pin_is_refused(requirements):
    with pytest.raises(ValueError):
        pin_from(requirements)


def test_flwr_datasets_is_not_taken_for_flwr():
    assert pin_from(["flwr-datasets>=0.6", "flwr[simulation]==1.42.0"]) == "1.42.0"


def test_same_release_is_major_minor():
    assert same_release("1.42.0", "1.42.3")
    assert not same_release("1.42.0", "1.41.0")
    assert not same_release("2.42.0", "1.42.0")


def test_installed_flwr_is_the_pin():
    assert metadata.version("flwr") == flwr_pin(), "run `make setup` after changing the pin in pyproject.toml"


def test_compose_file_runs_the_pinned_release():
    committed = yaml.safe_load((SOURCE_ROOT / "docker-compose.yml").read_text())
    pin = flwr_pin()
    assert committed == compose_services(3, pin), "regenerate: flain compose --out docker-compose.yml"
    images = [s["image"] for s in committed["services"].values()]
    tags = {re.search(r":-[^:]+:([^}]+)\}$", image).group(1) for image in images}
    assert tags == {pin}
    build_versions = {s["build"]["args"]["FLWR_VERSION"] for s in committed["services"].values() if "build" in s}
    assert build_versions == {pin}


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/flwr-local.Dockerfile"])
def test_dockerfiles_name_no_version_of_their_own(dockerfile):
    """The Dockerfiles take FLWR_VERSION from the build (no default to fall behind)."""
    text = (SOURCE_ROOT / dockerfile).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"^ARG FLWR_VERSION\s*$", code, re.M), "ARG FLWR_VERSION must have no default"
    assert not re.search(r"\b1\.\d+\.\d+\b", code), "a Flower version literal in " + dockerfile


def test_compose_test_builds_the_pinned_release():
    spec = importlib.util.spec_from_file_location("compose_test", SOURCE_ROOT / "docker" / "compose_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VERSION == flwr_pin()
    assert module.previous_release("1.42.0") == "1.41.0"
    assert not same_release(module.previous_release(flwr_pin()), flwr_pin())
