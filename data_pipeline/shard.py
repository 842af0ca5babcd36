"""Bucketing + sharding: img2dataset output -> aspect-ratio-bucketed webdataset shards + manifest.

    summary = build_shards("work/ingest", "s3://bucket/data", ShardConfig(min_side=256, workers=4))
    summary = build_shards(ingest, out, cfg, BuildOptions(tasks=16, launch=LaunchConfig(cluster="slurm", ...)))

The stream is a declared list of stages (``shard_stream.STAGES``, next to ``ShardConfig``); each stage is a
generator over the previous one, and every row it drops is counted under one `Skip` reason. Bucket assignment uses width/height
that are already known without decoding pixels: img2dataset's parquet when it recorded them
(resize="max-side"), otherwise the image header read by the verify stage (see normalize.py for what
is decoded when). Output layout and commit order: the dataset_format package.

A build (build.py) has three steps:
  1. plan (this process): the new ingest shards (finished, not consumed by a committed run) in order, cut
     into contiguous task slices; and the duplicate verdicts. Deduplication keeps the first row of a URL or a
     content hash in stream order, over the whole build and the committed root, which needs everything seen
     before; so the plan runs the cheap metadata stages (read, failed downloads, captions, --filter) over all
     new rows once and records which rows are duplicates (``_build/duplicates.parquet``). The tasks then drop
     exactly the rows a single process would drop, whatever the slices.
  2. tasks (here, local processes or a SLURM array): task t runs the stream over its slice into its own part,
     ``_build/parts/{t:05d}/`` (shards numbered from 0 per bucket, samples.parquet), then writes its done
     record; a rerun of the task deletes its part first.
  3. commit (this process, once every task is done): the parts' shards are renamed, in task order, to the next
     free shard numbers of the root (the names are recorded in ``_build/commit.json`` before the first move,
     so an interrupted commit resumes); then samples.parquet, stats.json and manifest.parquet (last) are
     rewritten with the committed rows followed by every part's rows.
The samples (keys, bytes, buckets, captions, metadata) are those of a one-task build; only the grouping into
shards differs (each task closes its partly filled shards). Shards or staging files left by a crashed run
(not in the committed manifest) are deleted when a new build is planned.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pixeldit.storage import (exists, fs_and_path, join, normalise_root, read_bytes, write_bytes_atomic,
                              write_json_atomic)

from .buckets import bucket_table
from .build import (PARTS_DIR, BuildFailed, BuildOptions, Plan, build_dir, execute, failed_message, fingerprint,
                    load_plan, open_plan, part_dir, read_records, remove_tree, task_slices)
from .dataset_format import (META_TYPES, SAMPLE_COLUMNS, ShardRow, committed_samples, concat_samples,
                             parse_shard_name, read_manifest, read_samples, read_state, read_stats, shard_name,
                             table_rows, write_samples)
from .filters import parse_filter
from .ingest import finished_shards, meta_schema, read_prepare_stats, read_shard_stats, started_shards
from .reasons import Skip
from .shard_sink import BucketSink, RunCounts, cleanup_orphans, commit_root
from .shard_stream import SCREEN, STAGES, ShardConfig, StreamState

@dataclass
class ShardSummary:
    root: str
    up_to_date: bool  # nothing new to shard
    ingest_shards_new: int
    ingest_shards_pending: int  # started by img2dataset but not finished (no *_stats.json)
    samples_written: int  # by this run
    shards_written: int  # by this run
    seconds: float
    rows_per_second: float  # input rows of the new ingest shards processed per second
    stats: dict[str, Any] = field(default_factory=dict)  # stats.json content (cumulative)
    tasks: int = 1
    waited: bool = True  # False: tasks were submitted and this returned before they ended (nothing committed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- 1. plan --------------------------------------------------------------------------------------------------

DUPLICATES = "duplicates.parquet"  # in the build folder: (source, key, reason) of every duplicate row
COMMIT = "commit.json"  # in the build folder: part shard -> final shard name, written before the first move
_PLAN_COLUMNS = ["key", "url", "caption", "status", "error_message", "sha256"]  # what the screen stages read
_TYPES = {str(t): t for t in META_TYPES}


def build_meta_schema(roots: list[str]) -> pa.Schema:
    """The metadata columns of the ingest folders together (int64 next to float64 becomes float64)."""
    merged: dict[str, pa.DataType] = {}
    for root in roots:
        for f in meta_schema(root):
            old = merged.get(f.name)
            if old is None or old == f.type:
                merged[f.name] = f.type
            elif {old, f.type} == {pa.int64(), pa.float64()}:
                merged[f.name] = pa.float64()
            else:
                raise ValueError(f"metadata column {f.name!r} is {old} in one ingest folder and {f.type} in another "
                                 f"({root}); ingest them with one type")
    return pa.schema([pa.field(n, t) for n, t in merged.items()])


def plan_duplicates(todo: list[tuple[str, str]], cfg: ShardConfig, meta: pa.Schema, source_ids: dict[str, int],
                    previous: pa.Table | None) -> Iterator[tuple[str, str, str]]:
    """(ingest root/shard, key, Skip value) of every row of ``todo`` that repeats the URL or the content hash
    of an earlier row (in stream order, after the SCREEN stages) or of a committed sample of ``previous``."""
    c = SAMPLE_COLUMNS
    seen_urls = set(previous.column(c.url).to_pylist()) if previous is not None else set()
    seen_hashes = set(previous.column(c.sha256).to_pylist()) - {None} if previous is not None else set()
    extra = parse_filter(cfg.filter).columns if cfg.filter else []
    run = StreamState(cfg, meta, source_ids, columns=_PLAN_COLUMNS + extra)
    stream: Iterable[Any] = todo
    for stage in SCREEN:
        stream = stage(stream, run)
    for row in stream:
        if cfg.dedupe_url and row.url in seen_urls:
            yield row.source, row.key, Skip.DUPLICATE_URL.value
            continue
        if cfg.dedupe_hash and row.sha256 and row.sha256 in seen_hashes:
            yield row.source, row.key, Skip.DUPLICATE_HASH.value
            continue
        seen_urls.add(row.url)
        if row.sha256:
            seen_hashes.add(row.sha256)


def _new_work(roots: list[str], out: str, manifest: pa.Table | None) -> tuple[list[tuple[str, str]], int, int]:
    """(new ingest shards in order, shards still being ingested, their input rows)."""
    consumed = {k: set(v) for k, v in read_state(manifest).get("consumed", {}).items()}
    todo: list[tuple[str, str]] = []
    pending = rows = 0
    for root in roots:
        if not exists(root):
            raise FileNotFoundError(f"ingest folder {root!r} does not exist: run `pixeldit-data ingest` into it first")
        done = set(finished_shards(root).values())
        pending += len(started_shards(root) - done)
        for name in sorted(done - consumed.get(root, set())):
            todo.append((root, name))
            rows += int(read_shard_stats(root, name).get("count", 0))
    return todo, pending, rows


def _manifest_digest(manifest: pa.Table | None) -> str:
    return fingerprint([r.shard for r in table_rows(manifest, ShardRow)] if manifest is not None else [])


def build_shards(ingested: str | list[str], out: str, config: ShardConfig | None = None,
                 build: BuildOptions | None = None) -> ShardSummary:
    """Bucket and shard every finished, not yet consumed img2dataset shard of `ingested` into `out`.

    `ingested` is one ingest folder or a list of them; `out` a local folder or s3://bucket/prefix. ``build``:
    how many tasks and where they run (default: one, in this process). When a task fails this raises
    ``BuildFailed`` once every task has ended, and commits nothing; running it again reruns only those tasks.
    """
    cfg = config or ShardConfig()
    options = build or BuildOptions()
    start = time.time()
    roots = [normalise_root(r) for r in ([ingested] if isinstance(ingested, str) else ingested)]
    out = normalise_root(out)
    manifest = read_manifest(out)
    fp = fingerprint({"roots": roots, "config": cfg.output_settings()})
    old = load_plan(out)
    unfinished = old is not None and old.state != "committed"
    if not unfinished:  # (an unfinished build's commit may have moved shards the manifest does not list yet)
        cleanup_orphans(out, manifest)
    todo, pending, expected_rows = _new_work(roots, out, manifest)
    if not todo and manifest is not None and not unfinished:
        return ShardSummary(out, True, 0, pending, 0, 0, time.time() - start, 0.0, stats=read_stats(out))

    def make_plan() -> tuple[list[tuple[int, int, str]], dict[str, Any]]:
        cleanup_orphans(out, manifest)
        state = read_state(manifest)
        sources = list(state.get("sources", []))
        sources += [r for r in roots if r not in sources]
        source_ids = {r: i for i, r in enumerate(sources)}
        meta = build_meta_schema(roots)
        if cfg.filter:
            parse_filter(cfg.filter).check(meta, "the metadata columns of the ingest folders (ingest --meta-cols)")
        previous = committed_samples(out, manifest) if manifest is not None else None
        dups = list(plan_duplicates(todo, cfg, meta, source_ids, previous))
        table = pa.table({"source": [d[0] for d in dups], "key": [d[1] for d in dups],
                          "reason": [d[2] for d in dups]}, schema=pa.schema(
                              [("source", pa.string()), ("key", pa.string()), ("reason", pa.string())]))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes_atomic(join(build_dir(out), DUPLICATES), sink.getvalue().to_pybytes())
        slices = [(a, b, _describe(todo[a:b])) for a, b in task_slices(len(todo), options.tasks)]
        return slices, {
            "roots": roots, "todo": todo, "sources": sources, "source_ids": source_ids, "config": asdict(cfg),
            "meta": [[f.name, str(f.type)] for f in meta], "duplicates": len(dups), "rows": expected_rows,
            "base": _manifest_digest(manifest),
            "prepare": {**state.get("prepare", {}), **{r: p for r in roots if (p := read_prepare_stats(r))}},
        }

    plan, _ = open_plan(out, "shard", fp, make_plan, options)
    states = execute(plan, options)
    waited = options.launch is None or options.wait
    if not all(s.state == "done" for s in states):
        if waited:
            raise BuildFailed(failed_message(plan, states))
        return ShardSummary(out, False, len(plan.data["todo"]), pending, 0, 0, time.time() - start, 0.0,
                            tasks=plan.tasks, waited=False)
    stats, samples, shards = commit_build(plan)
    seconds = time.time() - start
    rows = plan.data["rows"]
    return ShardSummary(out, False, len(plan.data["todo"]), pending, samples, shards, seconds,
                        rows / seconds if seconds > 0 else 0.0, stats=stats, tasks=plan.tasks)


def _describe(sources: list[tuple[str, str]]) -> str:
    if not sources:
        return "nothing to shard"
    (r0, n0), (r1, n1) = sources[0], sources[-1]
    first = f"{os.path.basename(r0)}/{n0}"
    last = n1 if r1 == r0 else f"{os.path.basename(r1)}/{n1}"
    return f"{len(sources)} ingest shard{'s' if len(sources) > 1 else ''} {first}" + (f"-{last}" if len(sources) > 1 else "")


# ---- 2. one task ----------------------------------------------------------------------------------------------


def _plan_meta(plan: Plan) -> pa.Schema:
    return pa.schema([pa.field(n, _TYPES[t]) for n, t in plan.data["meta"]])


def run_shard_task(plan: Plan, task: int) -> dict[str, Any]:
    """Run the stream over slice ``task`` of ``plan`` into its part (see the module docstring)."""
    cfg = ShardConfig(**plan.data["config"])
    out, part = plan.root, part_dir(plan.root, task)
    remove_tree(part)  # what a killed earlier attempt of this task wrote
    first, stop = plan.slices[task]["start"], plan.slices[task]["stop"]
    sources = [(r, n) for r, n in plan.data["todo"][first:stop]]
    mine = {f"{r}/{n}" for r, n in sources}
    dups = pq.read_table(pa.BufferReader(read_bytes(join(build_dir(out), DUPLICATES))))
    duplicates = {(s, k): why for s, k, why in zip(*(dups.column(c).to_pylist() for c in ("source", "key", "reason")))
                  if s in mine}
    meta = _plan_meta(plan)
    run = StreamState(cfg, meta, plan.data["source_ids"], duplicates)
    expected = sum(int(read_shard_stats(r, n).get("count", 0)) for r, n in sources)
    table = bucket_table(cfg.base_res, cfg.align)
    with tempfile.TemporaryDirectory(prefix="pixeldit-shards-") as scratch:
        sink = BucketSink(part, table, cfg.samples_per_shard, cfg.max_shard_bytes, None, scratch, meta)
        if cfg.workers > 1:
            run.pool = multiprocessing.get_context("spawn").Pool(cfg.workers)
        run.bar = tqdm(total=expected, desc=f"shard task {task}", unit="row", disable=not cfg.progress)
        try:
            stream: Iterable[Any] = sources
            for stage in STAGES:
                stream = stage(stream, run)
            for sample in stream:
                sink.add(sample)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            run.bar.close()
            if run.pool is not None:
                run.pool.terminate()
                run.pool.join()
    write_samples(part, sink.samples_table())
    return {"shards": [asdict(r) for r in sink.manifest_rows], "samples": sink.samples_written,
            "counts": {"skipped": dict(run.skipped), "normalised": dict(run.fixes),
                       "rows_by_root": dict(run.rows_by_root)}}


# ---- 3. commit ------------------------------------------------------------------------------------------------


def commit_build(plan: Plan) -> tuple[dict[str, Any], int, int]:
    """Move every part's shards to their final names, then commit the root (samples, stats, manifest last);
    (stats, samples added, shards added). Resumes an interrupted commit of the same plan."""
    out = plan.root
    manifest = read_manifest(out)
    if _manifest_digest(manifest) != plan.data["base"]:
        raise RuntimeError(f"{out}: the committed dataset changed while build {plan.id} ran (another build "
                           f"committed?); rerun with --restart-build to plan again")
    records = read_records(plan)
    parts = [(t, [ShardRow(**r) for r in records[t]["result"]["shards"]]) for t in range(plan.tasks)]
    commit_url = join(build_dir(out), COMMIT)
    if exists(commit_url):
        names: dict[str, str] = json.loads(read_bytes(commit_url))
    else:
        next_n: dict[str, int] = collections.defaultdict(int)
        for row in table_rows(manifest, ShardRow) if manifest is not None else []:
            parsed = parse_shard_name(row.shard)
            if parsed:
                next_n[parsed[0]] = max(next_n[parsed[0]], parsed[1] + 1)
        names = {}
        for t, rows in parts:
            for row in rows:
                names[f"{t:05d}/{row.shard}"] = shard_name(row.ratio_key, next_n[row.ratio_key])
                next_n[row.ratio_key] += 1
        write_json_atomic(commit_url, names)
    fs, _ = fs_and_path(out)
    for key, final in names.items():
        t, _, rel = key.partition("/")
        src, dst = fs_and_path(join(part_dir(out, int(t)), rel))[1], fs_and_path(join(out, final))[1]
        if fs.exists(src):
            fs.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.mv(src, dst)
        elif not fs.exists(dst):
            raise FileNotFoundError(f"{join(part_dir(out, int(t)), rel)} is gone and {join(out, final)} is not "
                                    f"there: build {plan.id} cannot be committed; rerun with --restart-build")
    new_shards, tables = [], []
    counts = RunCounts(collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter(),
                       {}, plan.data["prepare"], plan.data["sources"])
    for t, rows in parts:
        part = read_samples(part_dir(out, t))
        if part is not None and part.num_rows:
            rename = {f"{row.shard}": names[f"{t:05d}/{row.shard}"] for row in rows}
            shard_col = pa.array([rename[s] for s in part.column(SAMPLE_COLUMNS.shard).to_pylist()], pa.string())
            tables.append(part.set_column(part.schema.get_field_index(SAMPLE_COLUMNS.shard), SAMPLE_COLUMNS.shard,
                                          shard_col))
        new_shards += [ShardRow(**{**asdict(r), "shard": names[f"{t:05d}/{r.shard}"]}) for r in rows]
        c = records[t]["result"]["counts"]
        counts.skipped.update(c["skipped"])
        counts.fixes.update(c["normalised"])
        counts.rows_by_root.update(c["rows_by_root"])
    state = read_state(manifest)
    consumed = {k: list(v) for k, v in state.get("consumed", {}).items()}
    for root, name in plan.data["todo"]:
        consumed.setdefault(root, []).append(name)
        st = read_shard_stats(root, name)
        counts.ingest.update({k: int(st.get(k, 0)) for k in ("successes", "failed_to_download", "failed_to_resize")})
    counts.consumed = consumed
    previous = committed_samples(out, manifest) if manifest is not None else None
    samples = concat_samples(([previous] if previous is not None else []) + tables)
    cfg = ShardConfig(**plan.data["config"])
    stats = commit_root(out, manifest, samples, new_shards, state, counts, {"base_res": cfg.base_res, "align": cfg.align},
                        (cfg.holdout_fraction, cfg.holdout_min_per_bucket))
    plan.state = "committed"
    plan.save()
    for url in (join(build_dir(out), PARTS_DIR), commit_url):
        remove_tree(url)
    return stats, sum(r.num_samples for r in new_shards), len(new_shards)
