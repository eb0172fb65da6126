"""One training step (forward, backward, gradient clipping) captured in a CUDA graph.

An update of a recurrent world model is thousands of small kernels; on a GPU its time is the
host's time to launch them. A CUDA graph records the launches once and replays them with one
call. What a replay needs:

- fixed shapes and fixed memory: inputs are copied into static tensors before each replay, and
  the outputs are static tensors that the next replay overwrites (clone what you keep);
- no host reads in the step (``tests/test_sync_free.py``);
- gradients: they are written into tensors allocated while capturing, so after each replay
  :class:`CapturedStep` points ``p.grad`` at them again; the optimizer step runs outside the
  graph, and whoever calls it may set the gradients to None afterwards, as usual;
- randomness: kernels in the graph draw from the device generator's state at replay time, so
  setting that state on the host before two replays gives both the same random stream (what
  SAM's two passes need).

On a CPU nothing is captured: the step runs eagerly on the same static tensors, with the same
aliasing (outputs and gradients overwritten by the next call), so tests here exercise every
rule above but the capture itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten


class CapturedStep:
    """``step(*inputs)`` -> ``fn(*inputs)``, captured on CUDA after ``warmup`` eager calls.

    ``fn`` takes tensors (any nesting of tuples, lists and dicts) and returns tensors; it may
    call backward, which writes the gradients of ``params``. Non-tensor inputs are fixed at the
    capture. Every later call must pass inputs of the captured shapes and dtypes.
    """

    def __init__(self, fn: Callable[..., Any], params: Iterable[Tensor], device: torch.device,
                 warmup: int = 3) -> None:  # fmt: skip
        if warmup < 1:
            raise ValueError(f"warmup={warmup}; accepted: an int >= 1 (CUDA needs eager calls "
                             "before a capture)")  # fmt: skip
        self.fn, self.params, self.device = fn, list(params), torch.device(device)
        self.capture = self.device.type == "cuda"
        self.warmup, self.calls = warmup, 0
        self.graph: Any = None
        self._in: list[Any] | None = None
        self._in_spec: Any = None
        self._out: Any = None
        self._grads: list[Tensor | None] = []

    def __call__(self, *inputs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(inputs)
        flat, spec = tree_flatten(inputs)
        if self._in is None:
            self._in = [x.detach().clone() if isinstance(x, Tensor) else x for x in flat]
            self._in_spec = spec
            if self.capture:
                self._record()
        self._copy_in(flat, spec)
        if self.capture:
            self.graph.replay()
        else:
            self._simulate()
        for p, g in zip(self.params, self._grads, strict=True):
            p.grad = g
        return self._out

    # ---- internals ---------------------------------------------------------------------
    def _eager(self, inputs: tuple[Any, ...]) -> Any:
        if not self.capture:
            return self.fn(*inputs)
        # CUDA's rule: warm up on a side stream before capturing (lazy initialisations, the
        # autograd engine's streams).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _static_inputs(self) -> Any:
        return tree_unflatten(self._in, self._in_spec)

    def _record(self) -> None:
        for p in self.params:  # the captured backward then writes fresh gradients, not sums
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph):
            self._out = self.fn(*self._static_inputs())
        self._grads = [p.grad for p in self.params]

    def _simulate(self) -> None:
        for p in self.params:
            p.grad = None
        out = self.fn(*self._static_inputs())
        grads = [p.grad for p in self.params]
        if self._out is None:
            self._out = clone_tree(out)
            self._grads = [None if g is None else g.detach().clone() for g in grads]
            return
        flat_out, _ = tree_flatten(self._out)
        for dst, src in zip(flat_out, tree_flatten(out)[0], strict=True):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        for dst, src in zip(self._grads, grads, strict=True):
            if (dst is None) != (src is None):
                raise RuntimeError("CapturedStep: a parameter's gradient came and went between "
                                   "calls; a captured step must differentiate the same "
                                   "parameters every time")  # fmt: skip
            if dst is not None:
                dst.copy_(src)

    def _copy_in(self, flat: list[Any], spec: Any) -> None:
        if spec != self._in_spec:
            raise ValueError(f"CapturedStep: inputs {spec} differ from the captured "
                             f"{self._in_spec}")  # fmt: skip
        for i, (dst, src) in enumerate(zip(self._in, flat, strict=True)):  # type: ignore[arg-type]
            if not isinstance(dst, Tensor):
                if src is not dst and src != dst:
                    raise ValueError(f"CapturedStep: non-tensor input {i} is {src!r}; the "
                                     f"capture fixed it at {dst!r}")  # fmt: skip
                continue
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"CapturedStep: input {i} is {tuple(src.shape)} {src.dtype}; "
                                 f"the captured step takes {tuple(dst.shape)} {dst.dtype} "
                                 "(a graph replays fixed shapes)")  # fmt: skip
            dst.copy_(src)


def clone_tree(tree: Any) -> Any:
    """``tree`` (nested tuples, lists, dicts) with every tensor detached and cloned."""
    flat, spec = tree_flatten(tree)
    return tree_unflatten([x.detach().clone() if isinstance(x, Tensor) else x for x in flat], spec)
