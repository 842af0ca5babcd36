"""The run-folder / checkpoint format (pixeldit.run_folder) and the checkpoint writing protocol, without DeepSpeed.

A stand-in engine writes one file per save, so the order of writes, the keep-k pruning, the ``latest``
pointer and the cleanup of an interrupted save are checked in milliseconds; the same protocol under real
DeepSpeed runs in tests/test_train_distributed.py and tests/test_train_nonfinite.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixeldit import run_folder, storage
from pixeldit.errors import CheckpointError
from pixeldit.train.checkpoint import CheckpointManager


class FakeEngine:
    """What CheckpointManager needs of a DeepSpeed engine: save_checkpoint into {root}/{tag}/."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert not save_latest and run_folder.is_save_leftover(tag)  # written under the staging name
        (Path(root) / tag).mkdir()
        torch.save(client_state, Path(root) / tag / "client.pt")


def test_save_keeps_k_and_points_latest_at_the_newest(tmp_path):
    run = tmp_path / "run"
    ckpt = CheckpointManager(run, keep=2)
    assert ckpt.latest() is None
    with pytest.raises(CheckpointError, match=r"run: no checkpoint here.*checkpoints/latest"):
        run_folder.resolve_checkpoint(run)
    root = run_folder.checkpoints_dir(run)
    root.mkdir(parents=True)
    crashed = root / run_folder.staging_dirname(9)  # an interrupted save (another step)
    crashed.mkdir()
    converting = Path(storage.tmp_path(root / run_folder.universal_dirname(run_folder.step_dirname(1))))
    converting.mkdir()  # a universal conversion in progress: not the trainer's to delete
    for step in (1, 2, 10):
        final = ckpt.save(FakeEngine(), step, {"step": step}, {"stage_index": 0}, ema=None)
    assert final == root / "step_00000010" and ckpt.latest() == final == run_folder.resolve_checkpoint(run)
    assert run_folder.step_dirs(root) == [root / "step_00000002", root / "step_00000010"]  # numeric order, keep 2
    assert run_folder.read_meta(final) == {"stage_index": 0, "step": 10}
    assert not crashed.exists() and converting.exists()
    assert sorted(p.name for p in final.iterdir()) == ["client.pt", "meta.json", "rng_rank00000.pt"]
    assert run_folder.resolve_checkpoint(root) == final and run_folder.resolve_checkpoint(final) == final


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ema_partitions_consolidate_back(tmp_path, world_size):
    """ZeRO-3 EMA files of any world size consolidate to the full state dict (padding dropped)."""
    full = {"a.weight": torch.randn(5, 7), "b.bias": torch.randn(3), "c": torch.randn(1)}
    for rank in range(world_size):
        parts = run_folder.partition_state(full, world_size, rank)
        assert all(p.numel() == -(-full[k].numel() // world_size) for k, p in parts.items())
        run_folder.save_ema_file(tmp_path, {"layout": "zero3", "decay": 0.9, "world_size": world_size, "rank": rank,
                                            "shapes": {k: list(v.shape) for k, v in full.items()}, "shadow": parts})
    back = run_folder.consolidate_ema(tmp_path)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    if world_size > 1:
        (tmp_path / run_folder.EMA_FILE.format(rank=world_size - 1)).unlink()
        with pytest.raises(CheckpointError, match=rf"ema_rank{world_size - 1:05d}.pt missing: .*by {world_size} ranks"):
            run_folder.consolidate_ema(tmp_path)


def test_ema_file_layout_is_checked(tmp_path):
    with pytest.raises(ValueError, match="valid layouts: full, zero3"):
        run_folder.save_ema_file(tmp_path, {"layout": "sharded", "rank": 0})
