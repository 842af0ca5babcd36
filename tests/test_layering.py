"""The shape of the codebase: dependencies flow one way, no import cycles, one owner per on-disk name.

Import direction as README "Architecture" draws it (``LAYERS``, lowest first): a module imports its own layer
and the layers below it, never one above; nothing installed imports tools/. Inside the bottom layer:
pixeldit.errors <- pixeldit.s3 <- pixeldit.storage <- pixeldit.node_cache. pixeldit/models imports torch and the standard
library only (no deepspeed, no torch.distributed); data_pipeline never imports the model;
pixeldit/run_folder/ (the run-folder format) imports torch, the standard library, pixeldit.storage and
pixeldit.errors only; pixeldit.release never imports pixeldit.train, pixeldit.train reads release folders in one
module (warm_start.py, the fine-tuning start) through the release format modules only, and inside
pixeldit.release only zero.py uses deepspeed.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pixeldit", "data_pipeline", "launchers", "tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(path: Path) -> set[str]:
    """Absolute names imported anywhere in one file (module level, functions, TYPE_CHECKING), relative resolved:
    ``from a.b import c`` gives both ``a.b`` and ``a.b.c`` (c may be a module or a name)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    pkg_parts = parts[:-1]  # the package a relative import starts from (for __init__.py: its own package)
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
    return names


# README "Architecture": a module imports its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("pixeldit.storage", "pixeldit.s3", "pixeldit.errors", "pixeldit.node_cache", "pixeldit.cluster"),  # cluster: launches
    ("data_pipeline",),
    ("pixeldit.models",),
    ("pixeldit.diffusion",),
    ("pixeldit.conditioning",),
    ("pixeldit.run_folder",),
    ("pixeldit.release", "pixeldit.train"),  # side by side: neither imports the other
    ("pixeldit.evaluation",),
    ("launchers",),
    ("tools",),
]
SIBLINGS_APART = ("pixeldit.release", "pixeldit.train")
# the one crossing between the siblings: the warm start (checkpoint.init_from) reads a release folder through the
# release format modules (test_train_reads_release_folders_in_one_module_through_the_format_modules)
WARM_START = "pixeldit/train/warm_start.py"
RELEASE_FORMAT_MODULES = ("pixeldit.release.config", "pixeldit.release.key_map", "pixeldit.release.safe_load")


def reads_release_format(file: str, name: str) -> bool:
    return file == WARM_START and any(name == m or name.startswith(m + ".") for m in RELEASE_FORMAT_MODULES)


def imports_of(package_dir: Path) -> dict[str, set[str]]:
    """Absolute module names imported by each .py file below package_dir, or by that one file (relative
    imports resolved)."""
    paths = [package_dir] if package_dir.is_file() else sorted(package_dir.rglob("*.py"))
    return {str(p.relative_to(ROOT)): imports_in(p) for p in paths}


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for file, names in imports_of(ROOT / package).items():
        for name in sorted(names):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{file}: imports {name}")
    return bad


def outside(package: str, allowed_roots: set[str]) -> list[str]:
    """Imports of ``package`` whose top-level module is not in ``allowed_roots`` (plus the standard library)."""
    allowed = allowed_roots | {"__future__"} | set(sys.stdlib_module_names)
    return [f"{file}: imports {name}" for file, names in imports_of(ROOT / package).items()
            for name in sorted(names) if name.split(".")[0] not in allowed]


def test_models_import_torch_and_stdlib_only():
    assert outside("pixeldit/models", {"torch", "pixeldit"}) == []
    assert offenders("pixeldit/models", ("deepspeed", "torch.distributed", "pixeldit.diffusion", "pixeldit.train")) == []


def test_models_do_not_read_environment():
    for path in (ROOT / "pixeldit" / "models").rglob("*.py"):
        assert "os.environ" not in path.read_text(), path


ABOVE_CONDITIONING = ("pixeldit.train", "pixeldit.release", "launchers", "tools")


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("data_pipeline", ("pixeldit.models", "pixeldit.diffusion", "pixeldit.conditioning", "pixeldit.train",
                           "pixeldit.release", "launchers", "tools")),
        ("pixeldit/diffusion", ("pixeldit.conditioning", "pixeldit.train", "launchers", "tools", "deepspeed")),
        ("pixeldit/conditioning", ABOVE_CONDITIONING + ("deepspeed",)),
        ("pixeldit/train", ("launchers", "tools")),
        ("pixeldit/models", ("data_pipeline", "pixeldit.conditioning")),
        ("pixeldit/release", ("pixeldit.train", "launchers", "tools", "data_pipeline")),
        # clean-fid: only its torch-only modules (fid, features, utils import torchvision)
        ("pixeldit/evaluation", ("launchers", "tools", "torchvision", "open_clip", "torch_fidelity", "cleanfid.fid",
                                 "cleanfid.features", "cleanfid.utils", "cleanfid.inception_pytorch")),
    ],
)
def test_dependencies_flow_one_way(package, forbidden):
    assert offenders(package, forbidden) == []


def test_train_reads_release_folders_in_one_module_through_the_format_modules():
    """The warm start (checkpoint.init_from) reads a release folder's config.json and weights; nothing else of
    training imports pixeldit.release, and nothing imports its writers, CLIs or the deepspeed-using zero.py."""
    bad = []
    for file, names in imports_of(ROOT / "pixeldit" / "train").items():
        for name in sorted(n for n in names if n == "pixeldit.release" or n.startswith("pixeldit.release.")):
            if not reads_release_format(file, name):
                bad.append(f"{file}: imports {name}")
    assert bad == []


@pytest.mark.parametrize("module,allowed", [("pixeldit/errors.py", ()), ("pixeldit/s3.py", ("pixeldit.errors",)),
                                            ("pixeldit/storage.py", ("pixeldit.errors", "pixeldit.s3")),
                                            ("pixeldit/node_cache.py", ("pixeldit.errors", "pixeldit.storage")),
                                            ("pixeldit/cluster.py", ("pixeldit.errors", "pixeldit.storage"))])
def test_foundations_import_only_lower_foundations(module, allowed):
    """errors <- s3 (its errors are UserErrors) <- storage <- node_cache, cluster; nothing else of the project."""
    names = imports_in(ROOT / module)
    project = {n for n in names if n.split(".")[0] in PACKAGES}
    assert sorted(n for n in project if not any(n == a or n.startswith(a + ".") for a in allowed)) == []


def test_cluster_module_needs_only_submitit():
    """pixeldit.cluster (launch config, launch flags, executors, job states) is shared by the training launcher
    and the data pipeline: besides the foundations (above) it imports submitit and the standard library only."""
    assert outside("pixeldit/cluster.py", {"pixeldit", "submitit"}) == []


def test_data_pipeline_uses_only_the_foundations_from_pixeldit():
    allowed = LAYERS[0]
    bad = [f"{file}: imports {name}" for file, names in imports_of(ROOT / "data_pipeline").items()
           for name in sorted(names)
           if name.split(".")[0] == "pixeldit" and not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert bad == []


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (an imported name that is not a module counts as its module)."""
    files = {module_name(p): p for p in project_files()}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for name in imports_in(path):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != mod:
                targets.add(name)
        graph[mod] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return []


def test_find_cycle_reports_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    assert {"data_pipeline.dataset_format", "pixeldit.conditioning.text_cache", "pixeldit.storage"} <= set(graph)
    assert "data_pipeline.dataset_format" in graph["pixeldit.conditioning.text_cache"]  # the walk sees edges
    assert find_cycle(graph) == []


# file and folder names of on-disk formats: each is spelled in exactly one module, every other reader and
# writer imports it from there
FORMAT_NAMES = {
    "samples.parquet": "data_pipeline/dataset_format/layout.py",
    "manifest.parquet": "data_pipeline/dataset_format/layout.py",
    "stats.json": "data_pipeline/dataset_format/layout.py",
    "text_emb": "data_pipeline/dataset_format/layout.py",
    "pixeldit.state": "data_pipeline/dataset_format/layout.py",
    "pixeldit.format_version": "data_pipeline/dataset_format/layout.py",
    "scores.parquet": "data_pipeline/dataset_format/layout.py",
    "captions.parquet": "data_pipeline/dataset_format/layout.py",
    "dedupe.parquet": "data_pipeline/dataset_format/layout.py",
    "score_parts": "data_pipeline/dataset_format/layout.py",
    "pixeldit.scores": "data_pipeline/dataset_format/layout.py",
    "null.safetensors": "pixeldit/conditioning/text_cache.py",
    "prepare_stats.json": "data_pipeline/ingest.py",
    "_build": "data_pipeline/dataset_format/layout.py",
    "plan.json": "data_pipeline/build.py",
    "duplicates.parquet": "data_pipeline/shard.py",
    "commit.json": "data_pipeline/shard.py",
}


def string_literals(path: Path) -> list[str]:
    """String constants of a file, f-string pieces included, docstrings left out (prose may name a file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value.decode("latin-1") if isinstance(n.value, bytes) else n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, (str, bytes)) and id(n) not in docstrings]


@pytest.mark.parametrize("name", sorted(FORMAT_NAMES))
def test_each_format_name_is_spelled_in_one_module(name):
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}(?!\w)")
    spelled_in = sorted(str(p.relative_to(ROOT)) for p in project_files()
                        if any(pattern.search(s) for s in string_literals(p)))
    assert spelled_in == [FORMAT_NAMES[name]]


def test_run_folder_imports_torch_stdlib_storage_errors_only():
    assert outside("pixeldit/run_folder", {"torch", "pixeldit"}) == []
    allowed = ("pixeldit.storage", "pixeldit.errors", "pixeldit.run_folder")
    imported = imports_of(ROOT / "pixeldit" / "run_folder")
    assert len(imported) >= 4  # the rule still looks at the package's modules
    assert sorted(n for names in imported.values() for n in names
                  if n.startswith("pixeldit.") and not n.startswith(allowed)) == []


def test_job_supervisor_and_submit_cli_start_without_torch():
    """A job's per-task supervisor (one per GPU, alive for the whole job) and ``pixeldit-submit`` never import
    torch: hundreds of MB of memory per task and seconds of start-up for nothing."""
    import subprocess

    code = ("import sys, launchers.job, launchers.supervisor, launchers.train_child, launchers.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_only_release_zero_uses_deepspeed():
    bad = [b for b in offenders("pixeldit/release", ("deepspeed",)) if not b.startswith("pixeldit/release/zero.py:")]
    assert bad == []
    assert offenders("pixeldit/release/zero.py", ("deepspeed",))  # the rule still looks at the right file


def _layer(module: str) -> tuple[int, str] | None:
    """(layer index, package) of a project module name, by its longest listed prefix; None for others."""
    best = None
    for i, packages in enumerate(LAYERS):
        for pkg in packages:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best[1])):
                best = (i, pkg)
    return best


def layer_offenders() -> list[str]:
    bad = []
    for top in ("pixeldit", "data_pipeline", "launchers", "tools"):
        for file, names in imports_of(ROOT / top).items():
            own = _layer(file.removesuffix(".py").replace("/", ".").removesuffix(".__init__"))
            if own is None:
                continue
            for name in sorted(names):
                other = _layer(name)
                if other is None or other[1] == own[1]:
                    continue
                if other[0] > own[0] or ({own[1], other[1]} == set(SIBLINGS_APART)
                                         and not reads_release_format(file, name)):
                    bad.append(f"{file} ({own[1]}) imports {name} ({other[1]})")
    return bad


def test_every_module_imports_its_own_layer_or_below():
    assert layer_offenders() == []


def test_layer_check_sees_upward_and_sibling_imports():
    assert _layer("pixeldit.train.config") == (6, "pixeldit.train")
    assert _layer("pixeldit.storage") == (0, "pixeldit.storage") and _layer("yaml") is None
    assert _layer("tools.bench_mfu")[0] > _layer("launchers.cli")[0] > _layer("pixeldit.evaluation")[0]
