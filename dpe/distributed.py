"""Gradient averaging across `torch.distributed` workers, overlapped with backward (DDP's scheme).

The training step calls model methods rather than one ``forward``, so it cannot use a
``DistributedDataParallel`` wrapper; `GradientReducer` does what DDP does for it. Parameters are
grouped into buckets of about ``bucket_mb`` in reverse registration order (roughly the order in
which backward produces their gradients). During the *last* backward before an optimiser step
(``armed()``), a hook on each parameter marks its gradient ready; a bucket whose gradients are all
ready is flattened and all-reduced asynchronously while backward goes on. Buckets are launched
strictly in index order, so every rank issues the same collectives in the same order whatever
its autograd timing. Earlier backward passes (micro-batch accumulation) run without hooks: no
communication until the gradient is complete. ``finish()`` launches what is left (parameters
whose gradient arrived in an earlier pass, or never: zeros), waits, and writes the averages back.

Without an initialised process group of more than one worker every method is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

BUCKET_MB = 25
"""DDP's default bucket size."""


def distributed_world() -> int:
    """Workers of the initialised process group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class GradientReducer:
    """Averages the gradients of `parameters` across workers, bucket by bucket, during backward."""

    def __init__(self, parameters: Sequence[nn.Parameter], bucket_mb: float = BUCKET_MB) -> None:
        self.world = distributed_world()
        self.parameters = list(parameters)
        self.buckets: list[list[int]] = []
        self._bucket_of: dict[int, int] = {}
        self._armed = False
        self._ready: list[int] = []
        self._launched: list[tuple[torch.Tensor, object]] = []
        if self.world == 1:
            return
        limit = bucket_mb * (1 << 20)
        current: list[int] = []
        size = 0
        for index in reversed(range(len(self.parameters))):
            current.append(index)
            size += self.parameters[index].numel() * self.parameters[index].element_size()
            if size >= limit:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        for number, bucket in enumerate(self.buckets):
            for index in bucket:
                self._bucket_of[index] = number
        for index, parameter in enumerate(self.parameters):
            parameter.register_post_accumulate_grad_hook(self._hook(index))

    @contextlib.contextmanager
    def armed(self, last: bool = True) -> Iterator[None]:
        """Reduce during the backward run inside this block when `last` (otherwise: no sync)."""
        if self.world == 1 or not last:
            yield
            return
        self._armed = True
        self._ready = [0] * len(self.buckets)
        try:
            yield
        finally:
            self._armed = False

    def _hook(self, index: int):
        def ready(parameter: nn.Parameter) -> None:
            if not self._armed:
                return
            self._ready[self._bucket_of[index]] += 1
            self._launch_ready()

        return ready

    def _launch_ready(self) -> None:
        while len(self._launched) < len(self.buckets):
            number = len(self._launched)
            if self._ready[number] < len(self.buckets[number]):
                return
            self._launch(number)

    def _launch(self, number: int) -> None:
        grads = []
        for index in self.buckets[number]:
            parameter = self.parameters[index]
            grads.append((parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)).reshape(-1))
        flat = torch.cat(grads)
        self._launched.append((flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """Launch the buckets not yet sent, wait for all, and store the averaged gradients."""
        if self.world == 1:
            return
        while len(self._launched) < len(self.buckets):
            self._launch(len(self._launched))
        for number, (flat, work) in enumerate(self._launched):
            work.wait()
            flat /= self.world
            offset = 0
            for index in self.buckets[number]:
                parameter = self.parameters[index]
                count = parameter.numel()
                parameter.grad = flat[offset:offset + count].view_as(parameter)
                offset += count
        self._launched = []


def broadcast_from_first(tensors: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values of `tensors` to every rank (after a restore: one source of truth)."""
    if distributed_world() == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)
