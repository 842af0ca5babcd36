"""Shared helpers of the trainer tests: a tiny bucketed dataset in the dataset format, and configs.

``write_tiny_dataset`` writes webdataset shards with data_pipeline's own shard writer and commits the root
through ``data_pipeline.dataset_format`` (samples, stats, manifest last), exactly as the pipeline does, so
the loader is tested against the format module itself.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.dataset_format import SampleRow, ShardRow, rows_to_table, shard_name, write_index
from data_pipeline.tarshard import ShardWriter
from pixeldit.cluster import free_port  # noqa: F401 (re-exported for tests)

ROOT = Path(__file__).resolve().parents[1]

# ratio key -> (height, width) of the stored (original) images; ratio = h / w
SOURCE_SIZES = {"1.00": (40, 40), "0.50": (30, 60), "2.00": (72, 36)}


def _image(h: int, w: int, seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, size=3)
    arr = (base + 90 * np.sin(xx[..., None] / (3 + seed % 5) + yy[..., None] / 7 + rng.random(3))) % 256
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()


def write_tiny_dataset(root: str | os.PathLike, counts: dict[str, int], per_shard: int = 4,
                       num_classes: int = 10, seed: int = 0) -> Path:
    """Write ``counts[ratio_key]`` samples per bucket into shards of ``per_shard`` samples."""
    root = Path(root)
    rows: list[SampleRow] = []
    manifest: list[ShardRow] = []
    n = 0
    with tempfile.TemporaryDirectory() as scratch:
        for key, count in counts.items():
            h, w = SOURCE_SIZES[key]
            for s in range(-(-count // per_shard)):
                rel = shard_name(key, s)
                writer = ShardWriter(str(root / rel), scratch)
                for i in range(min(per_shard, count - s * per_shard)):
                    sk = f"{n:08d}"
                    ext = "png" if n % 4 == 3 else "jpg"
                    label = n % num_classes
                    caption = f"sample {n} in bucket {key}"
                    url = f"http://x/{sk}"
                    meta = {"key": sk, "url": url, "caption": caption, "width": w, "height": h, "ratio_key": key,
                            "sha256": "", "label": label}
                    span = writer.add(sk, _image(h, w, seed * 100003 + n, ext), ext, caption, meta, label)
                    rows.append(SampleRow(key=sk, shard=rel, ratio_key=key, sample_index=i, image_offset=span.offset,
                                          image_size=span.size, image_ext=ext, caption=caption, width=w, height=h,
                                          label=label, url=url, sha256=""))
                    n += 1
                num_samples = writer.num_samples
                size = writer.commit()
                manifest.append(ShardRow(shard=rel, ratio_key=key, bucket_height=h, bucket_width=w,
                                         num_samples=num_samples, bytes=size, min_width=w, max_width=w, min_height=h,
                                         max_height=h))
    write_index(str(root), rows_to_table(rows, SampleRow), {"total": n, "ok": n}, rows_to_table(manifest, ShardRow), {})
    return root


def set_single_rank(monkeypatch) -> None:
    """Make this process rank 0 of a 1-rank DeepSpeed job on the CPU (undone with the ``pytest.MonkeyPatch``)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)


def torchrun(config: Path, nproc: int = 2) -> tuple[list[str], dict[str, str]]:
    """Command and environment of ``pixeldit-train`` under torchrun on CPU ranks (gloo) for ``config``."""
    return torchrun_command(["-m", "pixeldit.train.cli", "--config", str(config)], nproc)


def torchrun_command(target: list[str], nproc: int = 2) -> tuple[list[str], dict[str, str]]:
    """Command and environment of ``target`` (a script and its arguments, or ``-m module ...``) under torchrun
    on CPU ranks (gloo)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *target]
    return cmd, env


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in their own sessions)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}").exists() else []:
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except FileNotFoundError:
                pass
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, children first (a hard crash of the whole job)."""
    for pid in reversed(process_tree(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
