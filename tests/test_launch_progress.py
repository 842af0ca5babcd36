"""The progress line a launcher shows while a run trains: read from losses.jsonl, step / loss / time left."""
from __future__ import annotations

import io
import json

from launchers.progress import ProgressLine, ProgressReader, follow_progress, format_duration
from pixeldit.run_folder import LOSSES


def append(run_dir, *steps, loss=0.5, partial=""):
    with open(run_dir / LOSSES, "a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "stage": 0 if s <= 50 else 1, "loss": loss / s}) + "\n")
        f.write(partial)


def test_reader_skips_old_records_and_waits_for_whole_lines(tmp_path):
    append(tmp_path, 1, 2)  # an earlier job of the run
    reader = ProgressReader.from_end(tmp_path)
    assert reader.new_records() == []
    append(tmp_path, 3, partial='{"step": 4, "st')
    assert [r["step"] for r in reader.new_records()] == [3]
    with open(tmp_path / LOSSES, "a") as f:
        f.write('age": 0, "loss": 0.1}\n')
    assert reader.new_records() == [{"step": 4, "stage": 0, "loss": 0.1}]
    assert ProgressReader.from_end(tmp_path / "missing").new_records() == []


def test_rate_and_time_left_over_the_window():
    line = ProgressLine(total_steps=1000, window_s=60)
    assert line.text().startswith("waiting for the first step")
    line.update([{"step": 10, "stage": 0, "loss": 0.9}], now=0.0)
    assert "measuring speed" in line.text()
    line.update([{"step": s, "stage": 0, "loss": 0.5} for s in range(11, 211)], now=20.0)
    assert line.rate() == 10.0
    assert line.text() == "step 210/1000 (stage 0)  loss 0.5000  10.0 steps/s, 1m19s left"
    line.update([{"step": 300, "stage": 1, "loss": float("nan")}], now=100.0)  # old samples leave the window
    assert line.rate() == (300 - 210) / 80 and line.loss == 0.5 and line.stage == 1


def test_follow_prints_lines_until_done(tmp_path):
    polls = iter(range(100))

    def done():  # the job writes 30 steps per poll and ends after the fourth poll
        n = next(polls)
        append(tmp_path, *range(30 * n + 1, 30 * n + 31))
        return n == 3

    out = io.StringIO()
    final = follow_progress(tmp_path, 120, done, prefix="[train] ", interval_s=0.01, line_every_s=0.0, stream=out)
    lines = out.getvalue().splitlines()
    assert final.step == 120 and len(lines) == 4
    assert lines[-1].startswith("[train] step 120/120 (stage 1)  loss 0.0042") and "0s left" in lines[-1]


def test_durations_read_naturally():
    assert [format_duration(s) for s in (0, 59.4, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m"]
