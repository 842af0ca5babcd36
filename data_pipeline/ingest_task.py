"""One ingest task: download the unfinished img2dataset shards of its slice of the plan (``ingest.py`` plans,
commits and describes the folder layout; ``data_pipeline.build`` runs the tasks here, in processes or a SLURM
array)."""
from __future__ import annotations

import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pixeldit.storage import fs_and_path, join, write_bytes_atomic, write_json_atomic

from .build import Plan, remove_tree
from .ingest import SHARD_STATS_SUFFIX, WORK_DIR, IngestConfig, finished_shards, parse_meta_cols, prepared_list_url


def run_ingest_task(plan: Plan, task: int) -> dict[str, Any]:
    """Download the unfinished ingest shards of slice ``task`` of ``plan`` (see ingest.py's module docstring)."""
    root, cfg = plan.root, IngestConfig.from_dict(plan.data["config"])
    first, stop = plan.slices[task]["start"], plan.slices[task]["stop"]
    salvaged = _salvage(root, first, stop)
    done = set(finished_shards(root))
    todo = [i for i in range(first, stop) if i not in done]
    for a, b in _contiguous_runs(todo):
        _download_run(root, cfg, a, b, plan.data["shards"])
    missing = sorted(set(range(first, stop)) - set(finished_shards(root)))
    if missing:
        raise RuntimeError(f"img2dataset did not finish ingest shards {', '.join(f'{i:05d}' for i in missing)} of "
                           f"{root} (see its log above); rerun to retry them")
    return {"shards": stop - first, "downloaded": len(todo), "salvaged": salvaged}


def _contiguous_runs(ids: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _move_shard(fs: Any, src_dir: str, dst_dir: str, name: str) -> None:
    """Move one finished img2dataset shard; its _stats.json (the "finished" marker) last."""
    for suffix in (".tar", ".parquet", SHARD_STATS_SUFFIX):
        fs.mv(f"{src_dir}/{name}{suffix}", f"{dst_dir}/{name}{suffix}")


def _salvage(root: str, first: int, stop: int) -> int:
    """Move the shards a killed run of this slice finished in its scratch folders; delete those folders."""
    fs, base = fs_and_path(join(root, WORK_DIR))
    fs.invalidate_cache()
    if not fs.exists(base):
        return 0
    _, root_path = fs_and_path(root)
    moved = 0
    for entry in sorted(fs.ls(base, detail=False)):
        name = os.path.basename(entry.rstrip("/"))
        stem = name.removesuffix(".parquet")
        if not stem.isdigit() or not first <= int(stem) < stop:
            continue
        if name == stem and fs.isdir(entry):
            have = {os.path.basename(p) for p in fs.ls(entry, detail=False)}
            for i in range(int(stem), stop):  # the run's placeholder (id first - 1) is never moved
                shard = f"{i:05d}"
                if {shard + ".tar", shard + ".parquet", shard + SHARD_STATS_SUFFIX} <= have:
                    _move_shard(fs, entry.rstrip("/"), root_path, shard)
                    moved += 1
        remove_tree(join(root, WORK_DIR, name))
    return moved


def _prepared_rows(root: str, first: int, stop: int, shards: int, per_shard: int) -> pa.Table:
    """Rows of ingest shards [first, stop) of the prepared list (its row groups when they are the shards)."""
    fs, path = fs_and_path(prepared_list_url(root))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if pf.metadata.num_row_groups == shards:
            return pf.read_row_groups(list(range(first, stop)))
        return pf.read().slice(first * per_shard, (stop - first) * per_shard)


def _download_run(root: str, cfg: IngestConfig, first: int, stop: int, shards: int) -> None:
    """One img2dataset call for ingest shards [first, stop) into _work/{first}, then move them into ``root``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would check PyPI on import
    from img2dataset import download  # heavy import (OpenCV, albumentations): only when ingesting

    name = f"{first:05d}"
    work, listed = join(root, WORK_DIR, name), join(root, WORK_DIR, f"{name}.parquet")
    fs, work_path = fs_and_path(work)
    remove_tree(work)
    sink = pa.BufferOutputStream()
    pq.write_table(_prepared_rows(root, first, stop, shards, cfg.samples_per_shard), sink)
    write_bytes_atomic(listed, sink.getvalue().to_pybytes())
    fs.makedirs(work_path, exist_ok=True)
    if first > 0:  # "extend" numbers the new shards from the largest shard id it finds + 1: this placeholder's
        # (img2dataset's progress logger reads it as the stats of a finished shard: one row, no success, so its
        # ratios stay defined; the logger's printed total is one row high, nothing else reads it)
        now = time.time()
        write_json_atomic(join(work, f"{first - 1:05d}{SHARD_STATS_SUFFIX}"), {
            "count": 1, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "duration": 1.0,
            "start_time": now - 1.0, "end_time": now, "status_dict": {}})
    resize = (
        dict(resize_mode="no", disable_all_reencoding=True, image_size=cfg.max_side)
        if cfg.resize == "off"
        else dict(resize_mode="keep_ratio_largest", image_size=cfg.max_side, resize_only_if_bigger=True,
                  skip_reencode=True)
    )
    meta = [n for _, n in parse_meta_cols(cfg.meta_cols)]
    extra = ["row", "caption_fix"] + (["label"] if cfg.label_col else []) + meta
    download(
        url_list=listed,
        output_folder=work,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=extra,
        output_format="webdataset",
        encode_format=cfg.encode_format,
        processes_count=cfg.processes,
        thread_count=cfg.threads,
        number_sample_per_shard=cfg.samples_per_shard,
        timeout=cfg.timeout,
        retries=cfg.retries,
        compute_hash="sha256",
        extract_exif=True,
        incremental_mode="extend",
        distributor=cfg.distributor,
        enable_wandb=False,
        **resize,
    )
    _, root_path = fs_and_path(root)
    fs.invalidate_cache()
    have = {os.path.basename(p) for p in fs.ls(work_path, detail=False)}
    for i in range(first, stop):
        shard = f"{i:05d}"
        if {shard + ".tar", shard + ".parquet", shard + SHARD_STATS_SUFFIX} <= have:
            _move_shard(fs, work_path, root_path, shard)
    remove_tree(work)
    remove_tree(listed)

