"""Prompt sets an evaluation generates for: a prompt file, class ids, GenEval, DPG-Bench.

Neither benchmark's prompt files ship here (no licence in their repositories); the loaders read the
user's copy of the official files:

- GenEval (github.com/djghosh13/geneval): ``prompts/evaluation_metadata.jsonl``, one JSON object per
  line with at least ``prompt`` and ``tag`` (553 prompts in the paper's set). Prompt ``i`` is keyed
  ``f"{i:05d}"``, the folder name its scorer expects.
- DPG-Bench (ELLA, github.com/TencentQQGYLab/ELLA): the folder ``dpg_bench/prompts/`` of ``{item_id}.txt``
  files (or the ``dpg_bench`` folder holding it); keyed by ``item_id``, the image name its scorer expects.
- A prompt file: ``.txt`` (one prompt per line, blank lines skipped) or ``.jsonl`` (objects with
  ``prompt`` and optionally ``id``); keyed by ``id`` or the line number ``f"{i:05d}"``.
- Class ids: ``"0-999"``, ``"1,5,7"`` or a mix (``"0-9,207"``); keyed by the id.

``PromptSet.digest`` hashes the entries in order: recorded with the protocol, it tells two runs on
different prompt files apart.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPT_KINDS = ("prompts", "classes", "geneval", "dpg_bench")


@dataclass(frozen=True)
class PromptEntry:
    key: str  # the prompt's id: file/folder name in the benchmark layouts
    prompt: str | None = None  # text-to-image
    class_id: int | None = None  # class-conditional
    metadata: dict[str, Any] | None = field(default=None, compare=False)  # GenEval: its metadata line


@dataclass(frozen=True)
class PromptSet:
    kind: str  # one of PROMPT_KINDS
    source: str  # the file, folder or class spec it was read from
    entries: tuple[PromptEntry, ...]

    @property
    def conditioning(self) -> str:
        return "class" if self.kind == "classes" else "text"

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for e in self.entries:
            h.update(json.dumps([e.key, e.prompt, e.class_id, e.metadata], sort_keys=True).encode() + b"\n")
        return h.hexdigest()[:16]


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    return path.read_text(encoding="utf-8")


def _jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{n}: expected an object with a non-empty \"prompt\"")
        rows.append(row)
    return rows


def _nonempty(entries: list[PromptEntry], source: str) -> tuple[PromptEntry, ...]:
    if not entries:
        raise ValueError(f"{source}: no prompts")
    keys = [e.key for e in entries]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{source}: duplicate prompt ids {dup[:5]}")
    return tuple(entries)


def load_prompt_file(path: str) -> PromptSet:
    p = Path(path)
    if p.suffix == ".jsonl":
        rows = _jsonl(p, "prompt file")
        entries = [PromptEntry(str(r.get("id", f"{i:05d}")), r["prompt"].strip()) for i, r in enumerate(rows)]
    else:
        lines = [ln.strip() for ln in _read_text(p, "prompt file").splitlines() if ln.strip()]
        entries = [PromptEntry(f"{i:05d}", ln) for i, ln in enumerate(lines)]
    return PromptSet("prompts", str(path), _nonempty(entries, str(path)))


def parse_class_ids(spec: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    ids: list[int] = []
    for part in spec.replace(" ", "").split(","):
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ValueError(f"class ids {spec!r}: use ids and ranges like 0-999 or 1,5,7 (bad part {part!r})") from None
    return ids


def class_prompts(spec: str) -> PromptSet:
    ids = parse_class_ids(spec)
    return PromptSet("classes", spec, _nonempty([PromptEntry(str(c), class_id=c) for c in ids], f"class ids {spec!r}"))


def load_geneval(path: str) -> PromptSet:
    """GenEval's ``evaluation_metadata.jsonl`` (the user's copy)."""
    rows = _jsonl(Path(path), "GenEval metadata file")
    for n, r in enumerate(rows, 1):
        if "tag" not in r:
            raise ValueError(f"{path}: prompt {n} has no \"tag\": not GenEval's evaluation_metadata.jsonl")
    entries = [PromptEntry(f"{i:05d}", r["prompt"], metadata=r) for i, r in enumerate(rows)]
    return PromptSet("geneval", str(path), _nonempty(entries, str(path)))


def load_dpg_bench(path: str) -> PromptSet:
    """DPG-Bench's ``prompts/`` folder of ``{item_id}.txt`` (or the folder holding ``prompts/``)."""
    p = Path(path)
    folder = p / "prompts" if (p / "prompts").is_dir() else p
    if not folder.is_dir():
        raise FileNotFoundError(f"DPG-Bench prompts folder {str(path)!r} not found (the dpg_bench/prompts folder "
                                "of {item_id}.txt files)")
    entries = []
    for f in sorted(folder.glob("*.txt")):
        text = " ".join(f.read_text(encoding="utf-8").split())
        if not text:
            raise ValueError(f"{f}: empty prompt")
        entries.append(PromptEntry(f.stem, text))
    return PromptSet("dpg_bench", str(path), _nonempty(entries, f"{folder} (no .txt prompt files)"))


def load_prompt_set(kind: str, source: str) -> PromptSet:
    if kind == "prompts":
        return load_prompt_file(source)
    if kind == "classes":
        return class_prompts(source)
    if kind == "geneval":
        return load_geneval(source)
    if kind == "dpg_bench":
        return load_dpg_bench(source)
    raise ValueError(f"prompt set kind {kind!r}; valid kinds: {', '.join(PROMPT_KINDS)}")
