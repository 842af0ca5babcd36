"""The progressive curriculum: where a global step falls among the stages (each stage's objective:
``RunConfig.stage_objective``).

Stages run back to back; stage i covers global optimizer steps [start_i, end_i). The trainer asks
``stage_of(step)`` (step = number of optimizer steps completed) to know which stage to build, including
after a resume from any checkpoint, so moving to the next stage needs no extra state.

Example: stages of 1000 / 500 / 300 steps -> stage 0 runs steps 0..999, stage 1 1000..1499, stage 2
1500..1799; a checkpoint at step 1000 resumes into stage 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import StageConfig


@dataclass(frozen=True)
class StageSpan:
    index: int
    name: str
    start: int  # first global step of the stage
    end: int  # one past its last step


class Curriculum:
    def __init__(self, stages: list[StageConfig]):
        if not stages:
            raise ValueError("the curriculum needs at least one stage")
        self.stages = list(stages)
        self.spans: list[StageSpan] = []
        start = 0
        for i, s in enumerate(self.stages):
            self.spans.append(StageSpan(i, s.name, start, start + s.steps))
            start += s.steps
        self.total_steps = start

    def __len__(self) -> int:
        return len(self.stages)

    def stage_of(self, step: int) -> int:
        """Index of the stage that runs the next step after ``step`` completed ones (last stage when done)."""
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        for span in self.spans:
            if step < span.end:
                return span.index
        return len(self.spans) - 1

    def span(self, index: int) -> StageSpan:
        return self.spans[index]
