"""Installs and docs that hold: a built wheel runs from any directory with its bundled deploy configs, and
the README's Python example runs as written (against the demo model)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A clean environment with a private demo-model cache and no network (shared by this module's runs)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path_factory.mktemp("home")),
            "BAGEL_SERVE_CACHE": str(tmp_path_factory.mktemp("cache")), "HF_HUB_OFFLINE": "1"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_install_runs_from_any_directory(tmp_path: Path, demo_env: dict[str, str]) -> None:
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        src.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bagel_serve", src / "bagel_serve", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src)],
         tmp_path, {**os.environ, "PIP_NO_INDEX": "1"})
    (wheel,) = (tmp_path / "dist").glob("bagel_serve-*.whl")
    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], tmp_path, dict(os.environ))
    assert sorted(p.name for p in (site / "bagel_serve" / "deploy").glob("*.yaml")) == [
        "bagel.yaml", "bagel_cfg3.yaml", "bagel_hsdp4.yaml", "bagel_single_stage.yaml", "bagel_think.yaml",
        "bagel_thinker_tp2.yaml", "bagel_tp2_vae_pp2.yaml"]
    assert sorted(p.name for p in (site / "bagel_serve" / "serving" / "static").iterdir()) == [
        "app.js", "index.html", "style.css"]  # the playground at /

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**demo_env, "PYTHONPATH": str(site)}  # torch and the rest come from this interpreter's environment
    where = _run([sys.executable, "-c", "import bagel_serve; print(bagel_serve.__file__)"], elsewhere, env).stdout
    assert where.strip() == str(site / "bagel_serve" / "__init__.py")
    cli = [sys.executable, "-m", "bagel_serve.entrypoints.cli", "generate", "--model", "bagel-serve-demo",
           "--prompts", "A cute cat", "--steps", "2", "--height", "32", "--width", "32", "--no-progress"]
    for out, extra, pipeline in (("default", [], "bagel"),
                                 ("single", ["--deploy-config", "bagel_single_stage.yaml"], "bagel_single_stage")):
        _run([*cli, "--output", out, *extra], elsewhere, env)
        manifest = json.loads((elsewhere / out / "manifest.json").read_text())
        assert manifest["pipeline"] == pipeline
        assert manifest["deploy_config"].startswith(str(site / "bagel_serve" / "deploy"))
        assert Image.open(elsewhere / out / "output_0_0.png").size == (32, 32)


def test_readme_python_example_runs_as_written(tmp_path: Path, demo_env: dict[str, str]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Omni("ByteDance-Seed/BAGEL-7B-MoT")' in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("ByteDance-Seed/BAGEL-7B-MoT", "bagel-serve-demo"))
    _run([sys.executable, str(script)], tmp_path, {**demo_env, "PYTHONPATH": str(ROOT)})
    assert Image.open(tmp_path / "fox.png").size == Image.open(tmp_path / "fox_night.png").size
