"""The matrix part of a step as a CUDA graph (``DistMuon(..., cuda_graph=True)``).

A graph replays fixed kernels on fixed addresses, so everything that changes between steps is
moved into device memory before the replay, by a short eager prologue:

* gradients are copied into static buffers (a parameter without a gradient gets its momentum
  buffer there instead, which leaves momentum and Nesterov unchanged);
* learning rates, weight-decay factors and the has-gradient mask go into one device vector
  (one host-to-device copy), which the graph reads: LR schedulers and schedule-coupled weight
  decay keep working, and a parameter without a gradient is masked inside the graph (its value
  and state stay as they are) instead of making capture impossible.

The body (momentum, Nesterov and weight decay as foreach ops, then every bucket: copies,
all-to-alls, Newton–Schulz, results added onto the parameters) runs eagerly on the first step,
is captured on the second and replayed from then on. On a CPU there is nothing to capture: the
same prologue and body run eagerly every step, which is how the tests check them anywhere.
AdamW groups run eagerly before it (torch's foreach AdamW is a few launches); Muown groups are
not supported here (their weight-norm math is per parameter).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import comm
from .pipeline import BucketRunner, Live
from .state_dtype import WORK_DTYPE, group_momentum_, rounds


class GraphedMatrixStep:
    """Static buffers, the live-value vector and the captured graph of one optimizer's plan."""

    def __init__(self, opt, runner: BucketRunner):
        self.opt, self.runner = opt, runner
        self.entries = opt._matrix_params()
        self.device = opt._device
        self.groups = sorted({gi for gi, _, _, _ in self.entries})
        self.members = {gi: [i for i, (g, _, _, _) in enumerate(self.entries) if g == gi] for gi in self.groups}
        locals_ = [comm.local_tensor(p) for _, _, p, _ in self.entries]
        # in the dtype the momentum math runs in: fp32 for low-precision (rounded) state
        self.grads = [torch.empty_like(t, dtype=WORK_DTYPE if rounds(buf, p) else buf.dtype)
                      for t, (_, _, p, _) in zip(locals_, self.entries)
                      for buf in (opt.state[p]["momentum_buffer"],)]
        # [lr per group | weight-decay factor per parameter | has-gradient mask per parameter]
        self.values = torch.zeros(len(self.groups) + 2 * len(self.entries), device=self.device)
        self.host = torch.zeros_like(self.values, device="cpu", pin_memory=self.device.type == "cuda")
        lr = {gi: self.values[i] for i, gi in enumerate(self.groups)}
        start = len(self.groups)
        self.decay = list(self.values[start:start + len(self.entries)])
        self.mask = self.values[start + len(self.entries):]
        self.live = Live(lr, self.mask)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warm = False

    # -- every step, eagerly

    def prologue(self, has_grad: dict[int, bool], lrs: list[float]) -> None:
        """``lrs``: every param group's current lr (tensor lrs read by the caller)."""
        opt = self.opt
        flags = [has_grad[id(p)] for _, _, p, _ in self.entries]
        values = [lrs[gi] for gi in self.groups]
        values += [1 - lrs[gi] * g["weight_decay"] if has else 1.0 for (gi, g, _, _), has in zip(self.entries, flags)]
        values += [float(has) for has in flags]
        self.host.copy_(torch.tensor(values))
        self.values.copy_(self.host, non_blocking=True)
        with_grad = [i for i, has in enumerate(flags) if has]
        without = [i for i, has in enumerate(flags) if not has]
        if with_grad:
            torch._foreach_copy_([self.grads[i] for i in with_grad],
                                 [comm.local_tensor(self.entries[i][2].grad) for i in with_grad])
        if without:
            torch._foreach_copy_([self.grads[i] for i in without],
                                 [comm.local_tensor(opt.state[self.entries[i][2]]["momentum_buffer"]) for i in without])

    def step(self, has_grad: dict[int, bool], lrs: list[float]):
        self.prologue(has_grad, lrs)
        if self.device.type != "cuda":
            return self.body()
        if self.graph is not None:
            self.graph.replay()
            return self.stats
        if not self.warm:  # first step eager: Triton autotuning and lazy inits happen outside capture
            self.warm = True
            return self.body()
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.stats = self.body()
        self.graph.replay()  # capture records without running
        return self.stats

    # -- the captured part

    def body(self):
        opt = self.opt
        inputs: list[torch.Tensor] = [None] * len(self.entries)
        for gi in self.groups:
            group = opt.param_groups[gi]
            members = self.members[gi]
            params = [comm.local_tensor(self.entries[i][2]) for i in members]
            bufs = [comm.local_tensor(opt.state[self.entries[i][2]]["momentum_buffer"]) for i in members]
            grads = [self.grads[i] for i in members]
            ns_inputs = group_momentum_(params, grads, bufs, group["momentum"], group["nesterov"],
                                        [self.decay[i] for i in members], opt._scratch)
            for i, t in zip(members, ns_inputs):
                inputs[i] = t
        outputs = [comm.local_tensor(p) for _, _, p, _ in self.entries]
        rows = opt._second_moments()
        normuon = {gi: (g["beta2"], g["eps"]) for gi, g in enumerate(opt.param_groups) if g["algorithm"] == "normuon"}
        return self.runner.run(inputs + rows, outputs + rows, {gi: -1.0 for gi in self.groups},
                               normuon=normuon, live=self.live)

    def release(self) -> None:
        """Drop the graph (before ``destroy_process_group``: captured collectives keep NCCL work alive)."""
        self.graph = None
        self.warm = False
