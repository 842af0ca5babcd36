"""The run folder and checkpoint on-disk format: its names, ``meta.json``, the ``latest`` pointer, EMA files.

The one owner of this format: the trainer writes it (``pixeldit.train.checkpoint``, ``pixeldit.train.ema``),
release tools and launchers read it, tests build fixtures through it. Imports torch, the standard library and
``pixeldit.storage`` / ``pixeldit.errors`` only.

    {run_dir}/config.yaml                        the resolved run config
    {run_dir}/losses.jsonl                       one JSON record per optimizer step
    {run_dir}/trainer.lock                       the trainer holding the run folder (``pixeldit.train.run_lock``)
    {run_dir}/samples/step_{N:08d}.png           EMA preview grids
    {run_dir}/metrics.jsonl                      evaluation records keyed by step: the trainer's validation loss
                                                 (kind "val"), eval jobs' results (kind "eval"), the runtime
                                                 preflight (kind "preflight") and straggler windows (kind
                                                 "straggler"); ``read_metrics``
    {run_dir}/evals/step_{N:08d}/                an eval job of that checkpoint: its pinned weights (checkpoint/),
                                                 images and results.json (launchers.eval_jobs)
    {run_dir}/checkpoints/latest                 text: the name of the newest complete step folder
    {run_dir}/checkpoints/step_{N:08d}/          one checkpoint: DeepSpeed's model + optimizer states (ZeRO
                                                 partitions), meta.json, ema_rank{r:05d}.pt, rng_rank{r:05d}.pt,
                                                 manifest.json (size and SHA-256 of every other file)
    {run_dir}/checkpoints/universal_step_{N:08d}/  the same step as a DeepSpeed universal checkpoint (a ``zero/``
                                                 folder; resumable on any number of ranks)

A step folder is built by every rank under ``staging_dirname(N)`` (a ``pixeldit.storage.is_tmp`` name); rank 0
writes ``meta.json`` and then ``manifest.json`` (every rank's files, hashed by the ranks in parallel) and
renames it to ``step_{N:08d}``; ``latest`` is replaced after that, so it never names a half folder.

Integrity (``checkpoint_problem``): a step folder is intact when every file of its manifest is there with its
size ("size", the default: a stat per file, so a truncated or missing file is found at once: 0.4 ms for a 1 GiB
folder) and, with "full", its SHA-256. Hashing streams the bytes in 8 MiB chunks: measured 1.0-1.2 GB/s per
core (about 1 CPU-second per GB; sha256 with SHA-NI, 1 GiB file in the page cache, AMD EPYC), so a 20 GB T2I
checkpoint costs ~20 CPU-seconds, which the trainer spreads over its ranks (each hashes the files it wrote).
That is why every save hashes (once, in parallel) but a resume only checks sizes unless asked for "full".
Folders saved before checksums have no manifest: they are read when ``latest`` names them but are not
fallback candidates.

``find_latest`` reads ``latest`` defensively (binary garbage, a wrong name, a missing or damaged folder) and
falls back to the newest intact step folder at or below the step ``latest`` names (any, when its name is
unreadable), with a one-line note; ``fallback=False`` raises instead.

EMA files hold ``{"layout", "decay", "world_size", "rank", "shapes": {name: shape}, "shadow": {name: tensor}}``:
layout ``"full"``: one file (rank 0) of full tensors (ZeRO-1/2); layout ``"zero3"``: one file per rank holding
rank r's ZeRO-3 partition of every flattened parameter, elements [r * n, (r + 1) * n) with
n = ceil(numel / world_size), zero-padded. ``consolidate_ema`` rebuilds the full state dict from either.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from pixeldit.errors import CheckpointError
from pixeldit.storage import TMP_MARK, atomic_local_file, is_tmp, write_json_atomic, write_text_atomic

RUN_CONFIG = "config.yaml"
LOSSES = "losses.jsonl"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
STEP_PREFIX = "step_"
UNIVERSAL_PREFIX = "universal_"
EMA_FILE = "ema_rank{rank:05d}.pt"
RNG_FILE = "rng_rank{rank:05d}.pt"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
HASH = "sha256"
VERIFY_MODES = ("size", "full")  # checkpoint_problem: sizes only (a stat per file), or sizes and SHA-256
METRICS = "metrics.jsonl"
EVALS = "evals"
# metrics.jsonl "kind": the trainer's validation loss, an eval job's results, the runtime preflight of every start
# (pixeldit.train.node_check), a straggler window (pixeldit.train.stragglers)
METRIC_KINDS = ("val", "eval", "preflight", "straggler")
LOCK = "trainer.lock"  # {run_dir}/trainer.lock: the trainer holding the run folder (pixeldit.train.run_lock)
_LATEST_MAX_BYTES = 256
_log = logging.getLogger(__name__)
_HASH_CHUNK = 8 << 20
EMA_LAYOUTS = ("full", "zero3")
_STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d+)")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def staging_dirname(step: int) -> str:
    """The folder every rank writes step ``step`` into before rank 0 renames it: one name all ranks agree on,
    recognised as a leftover by ``pixeldit.storage.is_tmp``."""
    return f".{step_dirname(step)}{TMP_MARK}all-ranks"


def is_save_leftover(name: str) -> bool:
    """A staging or replaced step folder, or a temp ``latest``, left by an interrupted save (never read).
    Other temp names (e.g. a universal conversion in progress) are not a save's to delete."""
    return is_tmp(name) and name.startswith((f".{STEP_PREFIX}", f".{LATEST}"))


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK


def preview_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SAMPLES / f"{step_dirname(step)}.png"


def step_dirs(checkpoints: str | os.PathLike) -> list[Path]:
    """The complete step folders under ``checkpoints``, oldest first."""
    root = Path(checkpoints)
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_NAME.fullmatch(p.name).group(1)))


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(step_dir) / META
    if not path.exists():
        raise CheckpointError(f"{path} not found: {step_dir} is not a complete checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged: use an older "
                              f"step folder") from None


def write_meta(step_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json_atomic(Path(step_dir) / META, meta)


def latest_name(checkpoints: str | os.PathLike) -> str | None:
    """The step folder name held by ``checkpoints/latest``; None when there is no pointer.

    Raises ``CheckpointError`` when the pointer is not a step folder name (binary garbage, empty, oversized).
    """
    pointer = Path(checkpoints) / LATEST
    try:
        with open(pointer, "rb") as f:
            raw = f.read(_LATEST_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is damaged (not text)") from None
    if len(raw) > _LATEST_MAX_BYTES or not _STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} is damaged (holds {name[:40]!r}, not a {STEP_PREFIX}N folder name)")
    return name


def step_of(step_dir: str | os.PathLike) -> int:
    """The step number of a step folder name or path."""
    m = _STEP_NAME.fullmatch(Path(step_dir).name)
    if m is None:
        raise ValueError(f"{step_dir}: not a {STEP_PREFIX}N folder")
    return int(m.group(1))


def read_latest(checkpoints: str | os.PathLike) -> Path | None:
    """The step folder named by ``checkpoints/latest`` (checked with ``checkpoint_problem``), or None when there
    is no pointer yet; ``CheckpointError`` (with what to do) when the pointer or its folder is damaged."""
    return find_latest(checkpoints, fallback=False)[0]


def write_latest(checkpoints: str | os.PathLike, step_dir: str | os.PathLike) -> None:
    write_text_atomic(Path(checkpoints) / LATEST, Path(step_dir).name)


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


# --- manifest: size and SHA-256 of every file of a step folder -------------------------------------------

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


def universal_dirname(step_dir: str | os.PathLike) -> str:
    return UNIVERSAL_PREFIX + Path(step_dir).name


def is_universal_checkpoint(path: str | os.PathLike) -> bool:
    """True for a DeepSpeed universal checkpoint folder of ours (a ``zero/`` folder and meta.json)."""
    p = Path(path)
    return (p / "zero").is_dir() and (p / META).exists()


def rank_files(step_dir: str | os.PathLike) -> list[Path]:
    """Our per-rank files of a step folder (EMA and RNG), in the order of their names."""
    prefixes = (EMA_FILE.split("{")[0], RNG_FILE.split("{")[0])
    return sorted(f for f in Path(step_dir).iterdir() if f.is_file() and f.name.startswith(prefixes))


# --- EMA files ------------------------------------------------------------------------------------------

def partition_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(start, partition size, valid elements) of rank's ZeRO-3 partition of a flattened tensor."""
    size = -(-numel // world_size)
    start = size * rank
    return start, size, max(0, min(numel - start, size))


def partition_state(full: dict[str, torch.Tensor], world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """The ZeRO-3 local partitions (1-D fp32, padded with zeros) of a full state dict."""
    out = {}
    for name, t in full.items():
        flat = t.detach().reshape(-1).float()
        start, size, valid = partition_bounds(flat.numel(), world_size, rank)
        part = torch.zeros(size, dtype=torch.float32)
        part[:valid] = flat[start:start + valid]
        out[name] = part
    return out


def save_ema_file(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write one rank's EMA file (``state`` as in the module docstring) atomically; returns its path."""
    if state["layout"] not in EMA_LAYOUTS:
        raise ValueError(f"EMA layout {state['layout']!r}; valid layouts: {', '.join(EMA_LAYOUTS)}")
    path = Path(folder) / EMA_FILE.format(rank=state["rank"])
    with atomic_local_file(path) as tmp:
        torch.save(state, tmp)
    return path


def read_ema_file(folder: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """One rank's EMA file of a step folder (tensors only, no pickled code), or None when absent."""
    path = Path(folder) / EMA_FILE.format(rank=rank)
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def consolidate_ema(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 EMA state dict (model parameter names -> tensors) of a step folder, any layout and world size."""
    folder = Path(step_dir)
    sd0 = read_ema_file(folder, 0)
    if sd0 is None:
        raise CheckpointError(f"{folder / EMA_FILE.format(rank=0)} not found: {folder} is not a checkpoint folder "
                              f"with an EMA (use --weights raw for the raw weights)")
    if sd0["layout"] == "full":
        return {n: t.clone() for n, t in sd0["shadow"].items()}
    world = sd0["world_size"]
    parts = [sd0]
    for r in range(1, world):
        part = read_ema_file(folder, r)
        if part is None:
            raise CheckpointError(f"{folder / EMA_FILE.format(rank=r)} missing: the ZeRO-3 EMA of {folder} was saved "
                                  f"by {world} ranks; copy the whole step folder")
        parts.append(part)
    full = {}
    for name, shape in sd0["shapes"].items():
        numel = int(torch.Size(shape).numel())
        flat = torch.cat([p["shadow"][name] for p in parts])[:numel]
        full[name] = flat.reshape(shape).clone()
    return full


# --- metrics.jsonl: evaluation records keyed by step ---------------------------------------------------------

def eval_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the eval job of step ``step``: ``{run_dir}/evals/step_{N:08d}``."""
    return Path(run_dir) / EVALS / step_dirname(step)


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


def append_metrics(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record ({"step": int, "kind": METRIC_KINDS, metric: value, ...}) to ``{run_dir}/metrics.jsonl``
    as one strict-JSON line, under an exclusive lock: the trainer and eval jobs append to it concurrently."""
    import fcntl

    if record.get("kind") not in METRIC_KINDS or not isinstance(record.get("step"), int):
        raise ValueError(f"metrics record needs an integer step and kind in {METRIC_KINDS}, got {record}")
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    path = Path(run_dir) / METRICS
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``{run_dir}/metrics.jsonl`` in file order ([] without the file). A step re-run after a
    resume appends its record again: readers take the last record of a (step, kind)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):  # a line cut by a crash mid-write: the last one only
                break
            raise CheckpointError(f"{path}:{n} is not valid JSON ({err})") from None
    return records
