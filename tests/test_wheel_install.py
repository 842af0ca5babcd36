"""The package installs like any library.

A wheel built from this tree, installed (not editable) into a fresh virtualenv outside the source tree, trains
one step with every ZeRO config through the installed ``pixeldit-train``, imports every console script's
module, finds the ZeRO JSONs as package data and has no top-level ``tools`` package; an editable install reads
the JSONs from the tree's ds_configs/ itself. pyproject.toml lists every package of the tree.

Dependencies (torch, deepspeed, ...) are not installed again: the fresh virtualenv also sees the running
environment's site-packages, after its own and without running their .pth files (so an editable install of
this tree there stays inert); every console script's module is asserted to come from the fresh virtualenv.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cli_helpers import ROOT, console_scripts, debug_run_config
from train_helpers import free_port, write_tiny_dataset

pytestmark = pytest.mark.slow

BUILD_INPUTS = ("pyproject.toml", "README.md", "pixeldit", "data_pipeline", "launchers", "ds_configs")
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ZERO_CONFIGS = ("zero1", "zero2", "zero3", "zero3_offload")

# run inside the fresh virtualenv: where each console script's module and the package data come from
PROBE = """
import importlib, importlib.metadata as md, importlib.resources as res, json, sys
dist = md.distribution("pixeldit")
out = {"prefix": sys.prefix, "scripts": {}, "modules": {}}
for ep in dist.entry_points.select(group="console_scripts"):
    out["scripts"][ep.name] = ep.value
    out["modules"][ep.name] = (importlib.import_module(ep.module).__file__, callable(ep.load()))
try:
    import tools
    out["tools"] = str(getattr(tools, "__file__", tools.__path__))
except ModuleNotFoundError:
    out["tools"] = None
ds = res.files("pixeldit.ds_configs")
out["ds_configs"] = sorted(p.name for p in ds.iterdir() if p.name.endswith(".json"))
out["ds_configs_dir"] = str(ds)
print(json.dumps(out))
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (it would put the source tree on sys.path), with the running
    environment's scripts first on PATH: DeepSpeed's JIT ops are built with the same ninja as everywhere else
    (another ninja version hashes its commands differently and rebuilds them)."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", *DIST_ENV)  # a leaked RANK/WORLD_SIZE would wait for peers
    env = {k: v for k, v in os.environ.items() if k not in drop}
    path = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", "")])
    return {**env, "PATH": path, "NO_ALBUMENTATIONS_UPDATE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _dependency_paths() -> list[Path]:
    """The folders this interpreter imports third-party packages from (site-packages and the like), in
    sys.path order: not the standard library, not this tree. Real paths, so that DeepSpeed finds its JIT-built
    ops under the same source paths as everywhere else (another path would rebuild them)."""
    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    paths = [Path(p).resolve() for p in sys.path if p and Path(p).is_dir()]
    return [p for p in dict.fromkeys(paths) if p != ROOT and ROOT not in p.parents
            and not any(p == s or s in p.parents and "-packages" not in str(p) for s in stdlib)]


def _fresh_venv(path: Path) -> Path:
    """A virtualenv without pip that also sees ``_dependency_paths()`` (after its own site-packages, where the
    package is installed: the .pth files of those folders, e.g. an editable install's hook, are not run)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], env=_env())
    python = path / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env=_env()).stdout.strip()
    (Path(site) / "_pixeldit_test_deps.pth").write_text("".join(f"{p}\n" for p in _dependency_paths()))
    return python


def _pip_install(python: Path, *args: str) -> None:
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", *args],
         env=_env())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A copy of the build inputs (the tree stays clean) and a tiny dataset."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    return {"tmp": tmp, "src": src, "data": write_tiny_dataset(tmp / "data", {"1.00": 4}, per_shard=4)}


def test_pyproject_lists_every_package_of_the_tree():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)))
    tree = {str(p.parent.relative_to(ROOT)).replace("/", ".") for top in ("pixeldit", "data_pipeline", "launchers")
            for p in (ROOT / top).rglob("__init__.py")}
    data_only = {"pixeldit.ds_configs", "pixeldit.train.configs"}  # package data: ds_configs/, train/configs/
    assert listed == tree | data_only
    assert 'package-dir]\n"pixeldit.ds_configs" = "ds_configs"' in text


def test_wheel_installs_outside_the_tree_and_trains_with_every_zero_config(work):
    tmp, src = work["tmp"], work["src"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(tmp / "wheels"), str(src)], env=_env())
    (wheel,) = (tmp / "wheels").glob("pixeldit-*.whl")
    python = _fresh_venv(tmp / "venv")
    _pip_install(python, str(wheel))
    venv = (tmp / "venv").resolve()

    probe = json.loads(_run([str(python), "-c", PROBE], cwd=tmp, env=_env()).stdout)
    assert probe["scripts"] == console_scripts()  # the wheel's console scripts are pyproject.toml's
    for script, (file, is_callable) in probe["modules"].items():
        assert Path(file).resolve().is_relative_to(venv) and is_callable, (script, file)
    assert probe["tools"] is None  # tools/ is not installed
    assert probe["ds_configs"] == [f"{z}.json" for z in ZERO_CONFIGS]
    assert Path(probe["ds_configs_dir"]).resolve().is_relative_to(venv)

    procs = {}
    for zero in ZERO_CONFIGS:  # one step each, side by side (one rank each)
        cfg = debug_run_config(tmp / f"{zero}.yaml", tmp / "runs" / zero, work["data"], zero=zero)
        env = _env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_PORT=str(free_port()))
        procs[zero] = subprocess.Popen([str(venv / "bin" / "pixeldit-train"), "--config", str(cfg)], cwd=tmp,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for zero, proc in procs.items():
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"{zero}:\n{out[-4000:]}"
        assert "pixeldit-train: finished at step 1" in out, out[-2000:]
        assert (tmp / "runs" / zero / "checkpoints" / "step_00000001" / "meta.json").exists()

    bad = subprocess.run([str(venv / "bin" / "pixeldit-train"), "--config", str(tmp / "zero2.yaml"),
                          f"stages.0.data_path={tmp / 'nowhere'}", f"run_dir={tmp / 'runs' / 'bad'}"],
                         cwd=tmp, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("pixeldit-train: error: stages.0 (s).data_path=")
    assert not (tmp / "runs" / "bad").exists()


def test_editable_install_reads_the_trees_ds_configs(work):
    tmp, src = work["tmp"], work["src"]
    python = _fresh_venv(tmp / "editable")
    _pip_install(python, "--no-build-isolation", "-e", str(src))
    probe = json.loads(_run([str(python), "-c", PROBE], cwd=tmp, env=_env()).stdout)
    assert Path(probe["ds_configs_dir"]).resolve() == (src / "ds_configs").resolve()  # the source of truth
    assert probe["ds_configs"] == [f"{z}.json" for z in ZERO_CONFIGS] and probe["tools"] is None
    for script, (file, _) in probe["modules"].items():
        assert Path(file).resolve().is_relative_to(src.resolve()), (script, file)
