"""Evaluation results of a release: ``eval_results.json`` beside the weights, and a table in its model card.

``eval_results.json`` is the list of result summaries, one per protocol (a rerun of the same protocol
replaces its row); the model card's "Evaluation" section is regenerated from it between two HTML comment
markers, so the rest of the card is never touched. Both files are replaced atomically, under an exclusive
lock on ``.eval_results.lock`` so that evaluations finishing together do not lose each other's rows.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path
from typing import Any, Iterator

from pixeldit.storage import write_bytes_atomic

RESULTS_FILE = "eval_results.json"
CARD_FILE = "README.md"
BEGIN = "<!-- pixeldit-eval: begin (generated from eval_results.json by pixeldit-eval; edits are overwritten) -->"
END = "<!-- pixeldit-eval: end -->"
METRIC_COLUMNS = (("fid", "FID"), ("fd_dinov2", "FD-DINOv2"), ("clip_score", "CLIP score"))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".eval_results.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """What the card keeps of one ``results.json``."""
    p = result["protocol"]
    return {"key": result["protocol_key"], "step": result["model"].get("step"), "prompts": p["prompts"],
            "source": Path(p["source"]).name or p["source"], "prompt_digest": result["prompt_set"]["digest"],
            "images": result["num_images"], "sampling": result["sampling"], "metrics": result["metrics"],
            "reference": p.get("reference", ""), "date": result["date"]}


def render_table(rows: list[dict[str, Any]]) -> str:
    lines = [BEGIN, "## Evaluation", "",
             "Made by `pixeldit-eval` (pinned protocol and extractor fingerprints: each run's `results.json`).", "",
             "| prompts | images | sampling | " + " | ".join(n for _, n in METRIC_COLUMNS) + " | reference | date |",
             "|---" * (len(METRIC_COLUMNS) + 5) + "|"]
    for r in rows:
        vals = [f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "-" for k, _ in METRIC_COLUMNS]
        lines.append(f"| {r['prompts']}: {r['source']} ({r['prompt_digest']}) | {r['images']} | {r['sampling']} | "
                     + " | ".join(vals) + f" | {Path(r['reference']).name or '-'} | {r['date']} |")
    return "\n".join(lines + [END]) + "\n"


def update_model_card(release: str | Path, result: dict[str, Any]) -> Path:
    """Add (or replace, same protocol) the run's row; returns the card's path."""
    folder = Path(release)
    card = folder / CARD_FILE
    with _locked(folder):
        path = folder / RESULTS_FILE
        rows = json.loads(path.read_text()) if path.exists() else []
        row = summary_row(result)
        rows = [r for r in rows if r["key"] != row["key"]] + [row]
        write_bytes_atomic(str(path), (json.dumps(rows, indent=1) + "\n").encode())
        text = card.read_text() if card.exists() else ""
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + text[text.index(END) + len(END):].lstrip("\n")
        write_bytes_atomic(str(card), (text.rstrip("\n") + "\n\n" + render_table(rows)).encode())
    return card
