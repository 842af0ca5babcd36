"""Which step folder to trust: the manifest of a step folder (size and SHA-256 of every file),
``checkpoint_problem``, the defensive read of ``latest`` with its fallback (``find_latest``), ``resolve_checkpoint``
for release tools, and ``pin_weights`` (an eval job's copy of a step's weights). The package docstring gives
the costs."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from pixeldit.errors import CheckpointError
from pixeldit.storage import is_tmp, write_json_atomic

from .layout import (CHECKPOINTS, EMA_FILE, HASH, LATEST, MANIFEST, MANIFEST_VERSION, META, STEP_PREFIX, VERIFY_MODES,
                     checkpoints_dir, latest_name, rank_files, step_dirs, step_of)

_log = logging.getLogger("pixeldit.run_folder")
_HASH_CHUNK = 8 << 20


def read_latest(checkpoints: str | os.PathLike) -> Path | None:
    """The step folder named by ``checkpoints/latest`` (checked with ``checkpoint_problem``), or None when there
    is no pointer yet; ``CheckpointError`` (with what to do) when the pointer or its folder is damaged."""
    return find_latest(checkpoints, fallback=False)[0]


def find_latest(checkpoints: str | os.PathLike, fallback: bool = True, verify: str = "size",
                check: Callable[[Path, bool], str | None] | None = None) -> tuple[Path | None, str | None]:
    """(step folder to resume from or release, note) of a checkpoints folder; (None, note) without ``latest``
    (note: None, or a line naming the step folders that are there all the same).

    The folder ``latest`` names when it is intact; else, with ``fallback``, the newest intact step folder (with a
    manifest) at or below the step ``latest`` names (any step when its name is unreadable), and ``note`` says
    so in one line; without ``fallback``, or when no step folder is intact, ``CheckpointError``.
    ``check(step_dir, require_manifest)`` -> problem or None replaces the local ``checkpoint_problem`` (the
    trainer spreads full hashing over its ranks).
    """
    root = Path(checkpoints)
    check = check or (lambda d, require: checkpoint_problem(d, verify, require))
    bound, name = None, None
    try:
        name = latest_name(root)
        if name is None:
            found = step_dirs(root)
            return None, (f"{root} holds step folders ({found[0].name} .. {found[-1].name}) but no {LATEST}: "
                          f"starting a new run, which does not read them (use a new run_dir to keep runs apart)"
                          if found else None)
        problem = check(root / name, False)
        if problem is None:
            return root / name, None
        problem, bound = f"{root / LATEST} names {name}, which is damaged: {problem}", step_of(name)
    except CheckpointError as err:
        problem = str(err)
    candidates = [d for d in reversed(step_dirs(root)) if d.name != name and (bound is None or step_of(d) <= bound)]
    if not fallback:
        usable = next((d for d in candidates if check(d, True) is None), None)
        hint = (f"to resume from the newest intact step folder, set checkpoint.fallback=true or write "
                f"{usable.name!r} into {root / LATEST}" if usable else "no intact step folder is left")
        raise CheckpointError(f"{problem}; {hint}; to start over, use a new run_dir (nothing is deleted)")
    for candidate in candidates:
        if check(candidate, True) is None:
            return candidate, f"{problem}; using the newest intact step folder {candidate} instead"
    below = f" at or below step {bound}" if bound is not None else ""
    raise CheckpointError(f"{problem}, and no intact step folder{below} is left to fall back to; start over with "
                          f"a new run_dir (nothing is deleted), or restore the checkpoints from a copy")


def resolve_checkpoint(path: str | os.PathLike, fallback: bool = True, verify: str = "size") -> Path:
    """A step folder (with meta.json), or a run folder / its checkpoints folder -> the step folder of ``latest``
    (``find_latest``: a damaged one falls back to the newest intact folder, logged as one warning line).
    A step folder passed directly is checked with ``checkpoint_problem`` (``verify``)."""
    p = Path(path)
    if (p / META).exists():
        problem = checkpoint_problem(p, verify)
        if problem is not None:
            raise CheckpointError(f"{p} is damaged: {problem}; use another step folder")
        return p
    latest, note = find_latest(p if p.name == CHECKPOINTS else checkpoints_dir(p), fallback, verify)
    if latest is None:
        raise CheckpointError(f"{path}: no checkpoint here: neither a step folder (with {META}) nor a run folder "
                              f"with {CHECKPOINTS}/{LATEST}; pass a run folder that has saved a checkpoint, or one "
                              f"of its {CHECKPOINTS}/{STEP_PREFIX}N folders")
    if note:
        _log.warning(note)  # without logging set up, Python prints just this line on stderr
    return latest


def checkpoint_files(step_dir: str | os.PathLike) -> list[str]:
    """Every file of a step folder but the manifest (and temp files of a write in progress), as sorted
    '/'-separated paths relative to it."""
    root = Path(step_dir)
    return sorted(f.relative_to(root).as_posix() for f in root.rglob("*")
                  if f.is_file() and f.name != MANIFEST and not is_tmp(f.name))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, streamed in 8 MiB chunks (constant memory at any size)."""
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def write_manifest(step_dir: str | os.PathLike, digests: dict[str, str]) -> None:
    """Write ``manifest.json`` for the files of ``digests`` ({relative path: sha256}) with their sizes now."""
    root = Path(step_dir)
    files = {name: {"size": (root / name).stat().st_size, HASH: digest} for name, digest in sorted(digests.items())}
    write_json_atomic(root / MANIFEST, {"version": MANIFEST_VERSION, "hash": HASH, "files": files})


def read_manifest(step_dir: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """{relative path: {"size", "sha256"}} of a step folder; None when it has no manifest (saved before
    checksums); ``CheckpointError`` when the manifest itself is damaged."""
    path = Path(step_dir) / MANIFEST
    try:
        data = json.loads(path.read_bytes())
        files = data["files"]
        if data.get("version") != MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError(f"version {data.get('version')!r}")
        return files
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise CheckpointError(f"{path} is damaged ({type(err).__name__})") from None


def check_files(step_dir: str | os.PathLike, files: dict[str, dict[str, Any]], full: bool) -> str | None:
    """The first problem of the listed files of a step folder (missing, other size, other SHA-256), or None."""
    root = Path(step_dir)
    for name, entry in files.items():
        try:
            size = (root / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were written"
        if full and file_sha256(root / name) != entry[HASH]:
            return f"{name} does not match its SHA-256"
    return None


def checkpoint_problem(step_dir: str | os.PathLike, verify: str = "size", require_manifest: bool = False) -> str | None:
    """What is wrong with a step folder (one phrase), or None when it is intact.

    ``verify``: "size" (every file of the manifest there with its size: a stat per file) or "full" (and its
    SHA-256; see the module docstring for the cost). Without a manifest (saved before checksums) only meta.json
    is checked, unless ``require_manifest``.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}; valid values: {', '.join(VERIFY_MODES)}")
    root = Path(step_dir)
    if not root.is_dir():
        return "the folder does not exist"
    try:
        files = read_manifest(root)
    except CheckpointError as err:
        return str(err)
    if files is None:
        if require_manifest:
            return f"no {MANIFEST} (saved before checksums)"
        return None if (root / META).is_file() else f"no {META}"
    if META not in files:
        return f"{MANIFEST} does not list {META}"
    return check_files(root, files, verify == "full")


def pin_weights(step_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A step folder holding only ``step_dir``'s weights (meta.json and the EMA files) and a manifest of them, at
    ``dest``: hard links where the file system allows (no copy, and pruning ``step_dir`` leaves them), else
    copies. ``pixeldit-eval`` and ``pixeldit-release`` read it like the step folder itself."""
    import shutil

    src, out = Path(step_dir), Path(dest)
    problem = checkpoint_problem(src)
    if problem is not None:
        raise CheckpointError(f"{src} is damaged: {problem}")
    names = [META] + [f.name for f in rank_files(src) if f.name.startswith(EMA_FILE.split("{")[0])]
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = out / name
        target.unlink(missing_ok=True)
        try:
            os.link(src / name, target)
        except OSError:  # another file system, or no hard links there
            shutil.copy2(src / name, target)
    files = read_manifest(src)
    if files is not None:
        write_manifest(out, {n: files[n][HASH] for n in names})
    return out
