"""Benchmark case strings shared by the step benchmarks: ``SIZE@RES[:bs=N][:ckpt]``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Case:
    size: str
    res: int
    batch: int
    ckpt: bool

    @classmethod
    def parse(cls, text: str) -> "Case":
        head, *opts = text.split(":")
        if "@" not in head:
            raise ValueError(f"case {text!r}: expected SIZE@RES[:bs=N][:ckpt]")
        size, res = head.split("@")
        batch, ckpt = 1, False
        for o in opts:
            if o == "ckpt":
                ckpt = True
            elif o.startswith("bs="):
                batch = int(o[3:])
            else:
                raise ValueError(f"case {text!r}: unknown option {o!r}; valid: bs=N, ckpt")
        return cls(size, int(res), batch, ckpt)

    def __str__(self) -> str:
        return f"{self.size}@{self.res}:bs={self.batch}{':ckpt' if self.ckpt else ''}"
