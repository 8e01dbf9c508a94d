"""The package pip builds from this checkout: it must hold every module of the sources (a
subpackage missing from the wheel installs a fusecache that cannot import its own parts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import CHECKOUT


def test_the_wheel_ships_every_module(tmp_path: Path) -> None:
    tree = tmp_path / "tree"  # built from a copy: the checkout may not be ours to write
    shutil.copytree(CHECKOUT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(tree)], check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("fusecache-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    sources = {path.relative_to(CHECKOUT / "src").as_posix() for path in (CHECKOUT / "src").rglob("*.py")}
    assert sources - shipped == set()
    assert "fusecache/session/kernel.py" in shipped and "fusecache/engine/facade.py" in shipped
