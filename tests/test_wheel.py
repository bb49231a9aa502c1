"""The package works installed, not only from the checkout: a wheel built from the sources and
installed into a temporary folder trains the default config from an empty directory and finds
its bundled configs. Offline: no build isolation, no dependencies fetched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The default config (shapes.yaml), made tiny: 2 iterations on 8 + 4 images of 128 px.
TINY = ["solver.max_iter=2", "solver.warmup_iters=0", "data.num_workers=0",
        "data.shapes.num_train=8", "data.shapes.num_val=4", "train.log_period=1"]


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the installed wheel (and nothing else)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp / "src"
    for name in ("retina", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp / "dist")], cwd=tmp)
    wheel, = (tmp / "dist").glob("retina-*.whl")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
         str(tmp / "site"), str(wheel)], cwd=tmp)
    return tmp / "site"


@pytest.fixture
def env(site) -> dict:
    # Only the installed copy on the path; the empty working directory holds no `retina`.
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


def test_every_package_is_listed_for_the_wheel():
    # pyproject names its packages one by one (retina.configs is mapped from configs/): a new
    # subpackage missing there would import from the checkout and be absent from the wheel
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "retina").rglob("__init__.py")}
    assert found - listed == set()
    assert listed - found == {"retina.configs", "retina.configs.ablations"}


def test_wheel_ships_the_configs(site):
    configs = sorted(str(p.relative_to(site / "retina" / "configs"))
                     for p in (site / "retina" / "configs").rglob("*.yaml"))
    assert "shapes.yaml" in configs and "retinanet_r50_fpn_1x_coco.yaml" in configs
    assert "ablations/shapes_focal.yaml" in configs


def test_installed_package_finds_bundled_configs(site, env, tmp_path):
    code = ("import retina; from retina.config import find_config, load_config; "
            "p = find_config('retinanet_r50_fpn_1x_coco'); cfg = load_config(p); "
            "print(retina.__file__); print(p); print(cfg.model.backbone.depth)")
    out = run([sys.executable, "-c", code], cwd=tmp_path, env=env).stdout.splitlines()
    assert Path(out[0]) == site / "retina" / "__init__.py"  # not the checkout's
    assert Path(out[1]) == site / "retina" / "configs" / "retinanet_r50_fpn_1x_coco.yaml"
    assert out[2] == "50"


def test_installed_package_trains_the_default_config_from_an_empty_directory(site, env, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    proc = run([sys.executable, "-c", "import retina; print(retina.__file__)"], cwd=work, env=env)
    assert Path(proc.stdout.strip()) == site / "retina" / "__init__.py"
    run([sys.executable, "-m", "retina", "train", "--device", "cpu", "--set", *TINY], cwd=work, env=env)
    run_dir = work / "runs" / "shapes"  # runs/<config name>
    assert (run_dir / "model_final.pth").is_file() and (run_dir / "metrics.json").is_file()
    assert (work / "data" / "shapes" / "meta.json").is_file()  # the dataset, generated on first use
