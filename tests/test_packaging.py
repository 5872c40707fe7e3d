"""The distribution installs nothing under a generic import name: the tools in data/, launch/ and
checkpoints_tools/ import as osp_data, osp_launch and osp_ckpt, and the console scripts point at them."""

import runpy
import subprocess
import sys
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]


def _setup_arguments(monkeypatch) -> dict:
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


def test_every_installed_package_has_a_name_of_its_own(monkeypatch):
    arguments = _setup_arguments(monkeypatch)
    top_level = {name.split(".")[0] for name in arguments["packages"]}
    assert top_level == {"osp_megatron", "osp_data", "osp_launch", "osp_ckpt"}
    assert arguments["package_dir"] == {"osp_data": "data", "osp_launch": "launch", "osp_ckpt": "checkpoints_tools"}
    for script in arguments["entry_points"]["console_scripts"]:
        assert script.split("=")[1].split(".")[0] in top_level, script


def test_outside_the_repository_generic_names_are_free():
    """In the installed environment (a folder other than the checkout), `data` and `launch` are not importable,
    and the tools are, under their own names."""
    code = (
        "import importlib.util as u\n"
        "assert u.find_spec('data') is None and u.find_spec('launch') is None\n"
        "assert u.find_spec('checkpoints_tools') is None\n"
        "import osp_data.cli, osp_launch.cli, osp_ckpt.cli\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
