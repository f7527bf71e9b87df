"""A cost model for policy tests that keeps the CostModel base class's defaults: batched steps cost
B separate steps (batching never pays) and CFG-parallel steps are priced by the base rule."""

from __future__ import annotations

from collections.abc import Callable

from gfdit.cost import CostModel


class BaseRulesCostModel(CostModel):
    """step_time = step(sp_degree) for every model and shape; every ENCODE/DECODE takes stage_s;
    reshards are free; observations are ignored."""

    def __init__(self, step: Callable[[int], float], stage_s: float):
        self._step, self._stage_s = step, stage_s

    def step_time(self, model, width, height, frames, sp_degree):
        return self._step(sp_degree)

    def stage_time(self, kind, model, width, height, frames, sp_degree):
        return self._stage_s

    def reshard_time(self, num_bytes):
        return 0.0

    def observe(self, *args, **kwargs):
        pass
