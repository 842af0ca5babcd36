"""The run-folder / checkpoint format (pixeldit.run_folder) and the checkpoint writing protocol, without DeepSpeed.

A stand-in engine writes one file per save, so the order of writes, the keep-k pruning, the ``latest``
pointer, the manifest (checksums), the defensive reading of ``latest`` with its fallback and the cleanup of an
interrupted save are checked in milliseconds; the same protocol under real DeepSpeed runs in
tests/test_train_distributed.py, tests/test_train_nonfinite.py and tests/test_train_integrity.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixeldit import run_folder, storage
from pixeldit.errors import CheckpointError
from pixeldit.train.checkpoint import CheckpointManager


class FakeEngine:
    """What CheckpointManager needs of a DeepSpeed engine: save_checkpoint into {root}/{tag}/ (a small state
    file and a bigger 'optimizer partition')."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert not save_latest and run_folder.is_save_leftover(tag)  # written under the staging name
        (Path(root) / tag).mkdir()
        torch.save(client_state, Path(root) / tag / "client.pt")
        torch.save(torch.arange(1000.0), Path(root) / tag / OPTIM)


OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def saved_run(run: Path, steps, keep: int = 10) -> Path:
    """A run folder with stand-in checkpoints at ``steps``; returns its checkpoints folder."""
    ckpt = CheckpointManager(run, keep=keep)
    for step in steps:
        ckpt.save(FakeEngine(), step, {"step": step}, {"stage_index": 0}, ema=None)
    return ckpt.root


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
    files = ["client.pt", "meta.json", "rng_rank00000.pt", OPTIM]
    assert sorted(p.name for p in final.iterdir()) == sorted([*files, "manifest.json"])
    manifest = run_folder.read_manifest(final)
    assert sorted(manifest) == sorted(files)
    assert all(manifest[f] == {"size": (final / f).stat().st_size, "sha256": run_folder.file_sha256(final / f)}
               for f in files)
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


def test_prune_never_deletes_the_new_checkpoint_in_a_folder_with_newer_ones(tmp_path):
    """Issue 12.1: `latest` removed (as the old hint said) in a run folder still holding step_126 and step_130;
    pruning by name deleted every new checkpoint right after writing it and left `latest` naming it."""
    root = saved_run(tmp_path / "run", [126, 130])
    (root / run_folder.LATEST).unlink()
    ckpt = CheckpointManager(tmp_path / "run", keep=2)
    latest, note = run_folder.find_latest(root)
    assert latest is None and "step_00000126 .. step_00000130" in note and "starting a new run" in note
    for step in range(5, 35, 5):
        final = ckpt.save(FakeEngine(), step, {"step": step}, {"stage_index": 0}, ema=None)
        assert final.is_dir() and ckpt.latest() == final and run_folder.resolve_checkpoint(tmp_path / "run") == final
        kept = [run_folder.step_of(d) for d in run_folder.step_dirs(root)]
        assert kept == [*([step - 5] if step > 5 else []), step, 126, 130]  # keep 2 up to the new one; newer untouched


def test_prune_spares_the_folder_latest_names(tmp_path):
    root = saved_run(tmp_path / "run", [1, 2, 3], keep=10)
    run_folder.write_latest(root, root / "step_00000001")  # e.g. written by hand to go back
    CheckpointManager(tmp_path / "run", keep=1)._prune(root / "step_00000003")
    assert [d.name for d in run_folder.step_dirs(root)] == ["step_00000001", "step_00000003"]


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00\x9c binary", b"", b"hello", b"step_00000099",
                                     b"../step_00000004", b"step_" + b"1" * 400])
def test_damaged_latest_falls_back_to_the_newest_intact_folder(tmp_path, garbage, caplog):
    """Issue 12.5: binary garbage raised a raw UnicodeDecodeError; no garbage fell back."""
    root = saved_run(tmp_path / "run", [2, 4])
    (root / run_folder.LATEST).write_bytes(garbage)
    latest, note = run_folder.find_latest(root)
    assert latest == root / "step_00000004"
    assert note.startswith(f"{root / run_folder.LATEST} ") and "damaged" in note and "\n" not in note
    assert note.endswith(f"using the newest intact step folder {latest} instead")
    with pytest.raises(CheckpointError, match=r"damaged.*set checkpoint.fallback=true or write 'step_00000004' into"
                                              r".*start over, use a new run_dir") as err:
        run_folder.find_latest(root, fallback=False)
    assert "\n" not in str(err.value) and "remove" not in str(err.value)
    assert run_folder.resolve_checkpoint(tmp_path / "run") == latest  # pixeldit-release: one warning line
    assert [r.getMessage() for r in caplog.records] == [note]


def test_truncated_partition_falls_back_below_latest(tmp_path):
    """Issue 12.5: a truncated optimizer partition of the folder `latest` names -> the newest intact folder at
    or below its step (not a newer folder, which a crash between rename and `latest` may leave)."""
    root = saved_run(tmp_path / "run", [2, 4, 6])
    run_folder.write_latest(root, root / "step_00000004")
    with open(root / "step_00000004" / OPTIM, "r+b") as f:
        f.truncate(100)
    latest, note = run_folder.find_latest(root)
    assert latest == root / "step_00000002"
    assert f"names step_00000004, which is damaged: {OPTIM} has 100 bytes" in note
    with pytest.raises(CheckpointError, match=f"{OPTIM} has 100 bytes.*write 'step_00000002' into"):
        run_folder.read_latest(root)
    for d in ("step_00000002", "step_00000006"):  # nothing left: one error, what to do, nothing deleted
        (root / d / "client.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact step folder at or below step 4 is left.*new run_dir"):
        run_folder.find_latest(root)


def test_checkpoint_problem_size_and_full(tmp_path):
    root = saved_run(tmp_path / "run", [2])
    step = root / "step_00000002"
    assert run_folder.checkpoint_problem(step) is None and run_folder.checkpoint_problem(step, "full") is None
    data = bytearray((step / OPTIM).read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte: only the hash sees it
    (step / OPTIM).write_bytes(bytes(data))
    assert run_folder.checkpoint_problem(step, "size") is None
    assert run_folder.checkpoint_problem(step, "full") == f"{OPTIM} does not match its SHA-256"
    (step / run_folder.MANIFEST).write_bytes(b"\x00{")
    assert "manifest.json is damaged" in run_folder.checkpoint_problem(step)
    (step / run_folder.MANIFEST).unlink()  # a folder saved before checksums: readable when named, no fallback
    assert run_folder.checkpoint_problem(step) is None
    assert run_folder.checkpoint_problem(step, require_manifest=True) == "no manifest.json (saved before checksums)"
    assert run_folder.read_latest(root) == step
    with pytest.raises(ValueError, match="valid values: size, full"):
        run_folder.checkpoint_problem(step, "quick")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_hash_shares_give_each_file_to_one_rank(world):
    from pixeldit.train.checkpoint import hash_shares

    files = ["meta.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema_rank00001.pt", "rng_rank00000.pt",
             "rng_rank00002.pt"]
    shares = hash_shares(files, world)
    assert sorted(f for share in shares for f in share) == sorted(files)
    if world == 3:
        assert shares == [["meta.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                           "rng_rank00000.pt"],
                          ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema_rank00001.pt"], ["rng_rank00002.pt"]]


def test_a_trainer_that_lost_its_lock_publishes_no_checkpoint(tmp_path):
    import json

    from pixeldit.train.run_lock import RunLock, RunLockLost, this_process

    run = tmp_path / "run"
    lock = RunLock(run)
    lock.acquire()
    ckpt = CheckpointManager(run, keep=2, lock=lock)
    first = ckpt.save(FakeEngine(), 1, {"step": 1}, {"stage_index": 0}, ema=None)
    run_folder.lock_path(run).write_text(json.dumps({**this_process(), "host": "node-z"}))  # taken over
    with pytest.raises(RunLockLost, match="now held by pid .* on node-z"):
        ckpt.save(FakeEngine(), 2, {"step": 2}, {"stage_index": 0}, ema=None)
    assert ckpt.latest() == first and run_folder.step_dirs(ckpt.root) == [first]
    lock.release()
