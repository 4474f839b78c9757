"""Outputs the runner cannot view into: non-contiguous local tensors (a strided slice, a transposed
or ``channels_last`` weight) get a contiguous stand-in.

The runner adds results onto windows of each output made with ``as_strided``, which needs contiguous
storage. A non-contiguous output is copied into its stand-in before the buckets run and back after:
two foreach copies per step for all of them, nothing for contiguous outputs. Stand-ins are kept
while the outputs' storage stays where it is, so a captured CUDA graph records both copies too.
"""

from __future__ import annotations

from typing import Sequence

import torch


class StandIns:
    """Contiguous stand-ins of the non-contiguous outputs, by output position."""

    def __init__(self):
        self.positions: list[int] = []
        self.buffers: list[torch.Tensor] = []

    def bind(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs the runner views into: stand-ins in place of non-contiguous ones."""
        self.positions = [i for i, t in enumerate(outputs) if not t.is_contiguous()]
        self.buffers = [torch.empty_like(outputs[i], memory_format=torch.contiguous_format) for i in self.positions]
        bound = list(outputs)
        for i, b in zip(self.positions, self.buffers):
            bound[i] = b
        return bound

    def enter(self, outputs: Sequence[torch.Tensor]) -> None:
        if self.positions:
            torch._foreach_copy_(self.buffers, [outputs[i] for i in self.positions])

    def leave(self, outputs: Sequence[torch.Tensor]) -> None:
        if self.positions:
            torch._foreach_copy_([outputs[i] for i in self.positions], self.buffers)
