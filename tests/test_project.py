"""The project's own promises: the README's commands are what CI runs, the license, the version."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_the_readme_opens_with_the_install_and_the_test_commands():
    first, second = readme_commands()[:2]
    assert first == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/gateway demo"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert second == ci_command
    assert ".venv/bin/ruff check" in second and ".venv/bin/mypy" in second and second.endswith("pytest")
    # Lint and types come before the tests, and the tools are in the extra the command installs.
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(d.startswith("ruff") for d in test_extra) and any(d.startswith("mypy") for d in test_extra)


def test_the_license_is_the_mit_license_pyproject_names():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "The Ultravox telephony gateway authors" in license_text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "MIT"}


def test_gateway_version_is_the_installed_packages():
    shown = subprocess.run([str(Path(sys.executable).parent / "gateway"), "--version"], capture_output=True,
                           text=True, timeout=30, check=True)
    assert shown.stdout.strip() == f"gateway {version('ultravox-gateway')}"


def test_the_shipped_speech_is_package_data():
    from gateway.testing import SHIPPED_SPEECH, Speech, shipped_wav

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "testing/sounds/*.wav" in package_data["gateway"]
    for name in SHIPPED_SPEECH:
        path = shipped_wav(name)
        assert path.is_absolute() and path.stat().st_size < 200_000
        speech = Speech.from_wav(path)
        assert speech.rate in (8000, 16000) and 1.0 < speech.seconds < 10.0
