"""Write generated images in the layout their scorer reads.

- prompt files and class ids: ``{out}/images/{i:05d}-{j:03d}.png`` (prompt i, image j).
- GenEval (its README and ``evaluation/evaluate_images.py``): ``{out}/geneval/{i:05d}/metadata.jsonl`` (the
  prompt's metadata line, one JSON object), ``samples/{j:04d}.png`` and ``grid.png`` (the prompt's images
  in one row). Score with ``python evaluation/evaluate_images.py {out}/geneval --outfile results.jsonl``.
- DPG-Bench (ELLA's ``dpg_bench/compute_dpg_bench.py``): ``{out}/dpg_bench/{item_id}.png``, the prompt's
  image, or with 4 images per prompt a 2 x 2 grid (top-left, top-right, bottom-left, bottom-right, the crop
  order of its scorer); nothing else in that folder (the scorer reads every file in it). Score with
  ``bash dpg_bench/dist_eval.sh {out}/dpg_bench RESOLUTION`` (PIC_NUM=4 for grids, 1 otherwise).

Every layout also lists its images in ``{out}/images.jsonl`` (file relative to ``out``, prompt id, prompt or
class id, image index, seed), written when the writer closes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixeldit.storage import write_bytes_atomic
from pixeldit.diffusion import image_grid, to_uint8

from .generation import ImageItem
from .protocol import EvalProtocol

INDEX_FILE = "images.jsonl"
LAYOUT_FOLDERS = {"prompts": "images", "classes": "images", "geneval": "geneval", "dpg_bench": "dpg_bench"}


def grid_uint8(images: np.ndarray, nrow: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows * H, nrow * W, 3) uint8 grid (``pixeldit.diffusion.image_grid``)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # exact round trip through to_uint8
    return to_uint8(image_grid(x, nrow)[None])[0]


class ImageWriter:
    """``add(items, images)`` as batches arrive (in item order); ``close()`` writes the index."""

    def __init__(self, out: str | Path, kind: str, protocol: EvalProtocol):
        self.out, self.kind, self.protocol = Path(out), kind, protocol
        self.folder = self.out / LAYOUT_FOLDERS[kind]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: list[dict] = []
        self._pending: list[tuple[ImageItem, np.ndarray]] = []  # images of the prompt being completed

    def _save(self, image: np.ndarray, path: Path, item: ImageItem) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        e = item.entry
        label = {"prompt": e.prompt} if e.prompt is not None else {"class_id": e.class_id}
        self.index.append({"file": str(path.relative_to(self.out)), "id": e.key, **label,
                           "image": item.image_index, "seed": item.seed})

    def add(self, items: list[ImageItem], images: np.ndarray) -> None:
        for item, image in zip(items, images):
            if self.kind in ("prompts", "classes"):
                self._save(image, self.folder / f"{item.prompt_index:05d}-{item.image_index:03d}.png", item)
                continue
            self._pending.append((item, image))
            if item.image_index == self.protocol.images_per_prompt - 1:
                self._flush()

    def _flush(self) -> None:
        items = [it for it, _ in self._pending]
        images = np.stack([im for _, im in self._pending])
        first = items[0]
        self._pending = []
        if self.kind == "geneval":
            prompt_dir = self.folder / f"{first.prompt_index:05d}"
            (prompt_dir / "samples").mkdir(parents=True, exist_ok=True)
            (prompt_dir / "metadata.jsonl").write_text(json.dumps(first.entry.metadata) + "\n")
            for item, image in zip(items, images):
                self._save(image, prompt_dir / "samples" / f"{item.image_index:04d}.png", item)
            Image.fromarray(grid_uint8(images, len(images))).save(prompt_dir / "grid.png")
        else:  # dpg_bench: one file per prompt
            image = images[0] if len(images) == 1 else grid_uint8(images, 2)
            path = self.folder / f"{first.entry.key}.png"
            Image.fromarray(image).save(path)
            for item in items:
                e = item.entry
                self.index.append({"file": str(path.relative_to(self.out)), "id": e.key, "prompt": e.prompt,
                                   "image": item.image_index, "seed": item.seed})

    def close(self) -> Path:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} images of an unfinished prompt were never written")
        path = self.out / INDEX_FILE
        write_bytes_atomic(str(path), "".join(json.dumps(r) + "\n" for r in self.index).encode())
        return path
