"""Dependencies flow one way: pixeldit.models <- pixeldit.diffusion <- pixeldit.train <- launchers, tools.

pixeldit/models imports torch and the standard library only (no deepspeed, no torch.distributed);
data_pipeline never imports the model.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(package_dir: Path) -> dict[str, set[str]]:
    """Absolute module names imported by each .py file below package_dir (relative imports resolved)."""
    out: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module_parts = list(rel.parts)
        if module_parts[-1] == "__init__":
            module_parts = module_parts[:-1]
            pkg_parts = module_parts
        else:
            pkg_parts = module_parts[:-1]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names.add(mod)
                names.update(f"{mod}.{a.name}" for a in node.names)
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for file, names in imports_of(ROOT / package).items():
        for name in sorted(names):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{file}: imports {name}")
    return bad


def test_models_import_torch_and_stdlib_only():
    allowed_roots = {"torch", "pixeldit", "__future__"} | set(sys.stdlib_module_names)
    bad = []
    for file, names in imports_of(ROOT / "pixeldit" / "models").items():
        for name in names:
            if name.split(".")[0] not in allowed_roots:
                bad.append(f"{file}: imports {name}")
    assert bad == []
    assert offenders("pixeldit/models", ("deepspeed", "torch.distributed", "pixeldit.diffusion", "pixeldit.train")) == []


def test_models_do_not_read_environment():
    for path in (ROOT / "pixeldit" / "models").rglob("*.py"):
        assert "os.environ" not in path.read_text(), path


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("data_pipeline", ("pixeldit.models", "pixeldit.diffusion", "pixeldit.train", "launchers", "tools")),
        ("pixeldit/diffusion", ("pixeldit.train", "launchers", "tools", "deepspeed")),
        ("pixeldit/train", ("launchers", "tools")),
        ("pixeldit/models", ("data_pipeline",)),
        ("pixeldit/release", ("pixeldit.train", "deepspeed", "launchers", "tools", "data_pipeline")),
        # clean-fid: only its torch-only modules (fid, features, utils import torchvision)
        ("pixeldit/evaluation", ("launchers", "tools", "torchvision", "open_clip", "torch_fidelity", "cleanfid.fid",
                                 "cleanfid.features", "cleanfid.utils", "cleanfid.inception_pytorch")),
    ],
)
def test_dependencies_flow_one_way(package, forbidden):
    assert offenders(package, forbidden) == []
