"""vagrant/: the provisioning scripts pass shellcheck, the Vagrantfile parses (`ruby -c`), the make targets exist.

Missing tools are a failure, not a skip: `sudo make setup` installs both (shellcheck and ruby are in its
Debian package list).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"


def tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: run `sudo make setup` (it installs the Debian package)")
    return exe


def test_scripts_pass_shellcheck() -> None:
    scripts = sorted(VAGRANT.glob("*.sh"))
    assert len(scripts) >= 5
    result = subprocess.run(
        [tool("shellcheck"), "-x", *map(str, scripts)], capture_output=True, text=True, check=False, cwd=VAGRANT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_vagrantfile_parses() -> None:
    result = subprocess.run(
        [tool("ruby"), "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


def test_vagrantfile_shape() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    assert ":libvirt" in text and ":virtualbox" in text
    assert '"2"' in text and '"4096"' in text  # 2 vCPU / 4 GB defaults
    for script in re.findall(r'path: "([^"]+)"', text):
        assert (VAGRANT / script).is_file(), f"Vagrantfile provisions with missing {script}"


def test_make_targets() -> None:
    text = (VAGRANT / "vagrant.mk").read_text()
    for target in ("vagrant-up", "vagrant-e2e", "vagrant-destroy"):
        assert re.search(rf"^{target}:", text, re.M), target
