"""Sharpness-Aware Minimization as a wrapper around any torch optimizer.

SAM (Foret et al. 2021) minimises max_{|e| <= rho} L(w + e) with one ascent step:
e = rho g / |g|, then the base optimizer steps from w with the gradient taken at w + e.
This wrapper adds the variants the related work studies (adaptive SAM, n-step ascent,
m-sharpness, amortised and late-phase schedules) without a second optimizer: the base
optimizer takes every step and owns every piece of state, SAM only changes which
gradient it sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from flatworld.optim.finite import global_norm, step_unless
from flatworld.optim.when import Always, EveryK, RhoSchedule, Schedule

_TINY = 1e-12


def is_weight_matrix(p: Tensor) -> bool:
    """Default ASAM filter: scale weight matrices and kernels, not biases or norm gains."""
    return p.ndim > 1


def _split(batch: Any, m: int) -> list[Any]:
    if isinstance(batch, Tensor):
        return list(batch.split(m))
    if isinstance(batch, tuple | list):
        parts = [t.split(m) for t in batch]
        return [tuple(chunk) for chunk in zip(*parts, strict=True)]
    raise TypeError(f"m-sharpness needs batch as a Tensor or tuple of Tensors, got {type(batch)}")


def _batch_len(chunk: Any) -> int:
    return len(chunk) if isinstance(chunk, Tensor) else len(chunk[0])


class SAM(torch.optim.Optimizer):
    """Wrap ``base`` so that its steps use the sharpness-aware gradient.

    Args:
        base: any torch optimizer instance; SAM shares its ``param_groups`` and ``state``,
            so LR schedulers and checkpoints act on the base optimizer as usual.
        rho: radius of the perturbation ball (the constant of ``rho_schedule`` if given).
        adaptive: ASAM (Kwon et al. 2021): the ball lives in coordinates scaled by
            T_w = |w| + eta, which makes sharpness invariant to weight rescaling.
        adaptive_filter: which parameters get T_w; the rest get T = 1. Default: tensors
            with ndim > 1 (weight matrices, conv kernels), not biases or norm gains.
        ascent_steps: n projected ascent steps of size rho/n inside the ball; n = 1 is SAM.
        m: m-sharpness; ``step(closure, batch=...)`` splits the batch into chunks of m,
            perturbs each chunk independently and averages their SAM gradients.
        clip_grad_norm: clip the gradient the base optimizer sees (the SAM gradient).
        schedule: ``Always()``, ``LatePhase(start)`` or ``EveryK(k, reuse_grad)``.
        rho_schedule: a ``RhoSchedule``; overrides ``rho``.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale the closure applies; SAM then
            unscales each pass once and updates the scale itself (do not call
            ``scaler.step``/``scaler.update``).
        no_sync: ``ddp_model.no_sync``; every pass but the last runs under it, so DDP
            all-reduces only the SAM gradient.
        bn_module: a module whose BatchNorm running statistics only the first pass may update.
    """

    skips_nonfinite = True  # flatworld.optim.closure_step: a step checks its own passes

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.01,
        adaptive_filter: Callable[[Tensor], bool] = is_weight_matrix,
        ascent_steps: int = 1,
        m: int | None = None,
        clip_grad_norm: float | None = None,
        schedule: Schedule | None = None,
        rho_schedule: RhoSchedule | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        bn_module: nn.Module | None = None,
    ) -> None:
        if not isinstance(base, torch.optim.Optimizer) or isinstance(base, SAM):
            raise TypeError(f"base must be a torch optimizer instance (not SAM), got {type(base)}")
        if rho < 0:
            raise ValueError(f"rho={rho}; accepted: rho >= 0")
        if eta <= 0:
            raise ValueError(f"eta={eta}; accepted: eta > 0")
        if ascent_steps < 1:
            raise ValueError(f"ascent_steps={ascent_steps}; accepted: an integer >= 1")
        if m is not None and m < 1:
            raise ValueError(f"m={m}; accepted: None or an integer >= 1")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm={clip_grad_norm}; accepted: None or > 0")
        if m is not None and no_sync is not None:
            raise ValueError("m-sharpness with DDP no_sync is not supported: pass one of them")
        params = [p for g in base.param_groups for p in g["params"]]
        if not params:
            raise ValueError("SAM got a base optimizer with no parameters")
        super().__init__(base.param_groups, base.defaults)
        self.base = base
        self.param_groups = base.param_groups
        self.state = base.state
        self.rho_schedule = rho_schedule or RhoSchedule("constant", rho)
        self.adaptive, self.eta, self.adaptive_filter = adaptive, eta, adaptive_filter
        self.ascent_steps, self.m, self.clip_grad_norm = ascent_steps, m, clip_grad_norm
        self.schedule: Schedule = schedule or Always()
        self.grad_scaler, self.no_sync, self.bn_module = grad_scaler, no_sync, bn_module
        self._attempts = 0  # steps begun; minus the skipped ones: steps_taken
        self._skipped: Tensor | int = 0  # a device tensor when skips are decided on the device
        self._scale_growth = 0
        # Per-step scratch, allocated on first use and reused.
        self._perturbed: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._scales: list[Tensor] | None = None  # T_w per perturbed param (ASAM)
        self._z: list[Tensor] = []  # perturbation in T-scaled coordinates (n-step)
        self._first_grads: list[Tensor] | None = None
        # g_sam - g for EveryK reuse, keyed by the parameter's position in param_groups: a
        # plain step may hold gradients for more parameters than the SAM step perturbed.
        self._correction: dict[int, Tensor] | None = None
        self._nonfinite: list[Tensor] = []  # flags gathered over a step, read once

    # ---- the torch.optim contract -------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base"):  # called by Optimizer.__init__; groups belong to base
            return
        self.base.add_param_group(param_group)
        self.param_groups = self.base.param_groups

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "sam": {
                "steps_taken": self.steps_taken,
                "skipped_steps": self.skipped_steps,
                "scale_growth": self._scale_growth,
                "correction": self._correction,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"base", "sam"}:
            raise ValueError(f"not a SAM state_dict: keys {sorted(state_dict)}; expected base, sam")
        self.base.load_state_dict(state_dict["base"])
        # torch's load_state_dict rebinds the base's lists; share them again.
        self.param_groups, self.state = self.base.param_groups, self.base.state
        sam = state_dict["sam"]
        self._skipped = int(sam["skipped_steps"])
        self._attempts = int(sam["steps_taken"]) + self._skipped
        self._scale_growth = int(sam["scale_growth"])
        corr = sam.get("correction")
        self._correction = None if corr is None else {int(i): c.clone() for i, c in corr.items()}

    def __repr__(self) -> str:
        return (
            f"SAM(rho={self.rho_schedule.rho}, adaptive={self.adaptive}, "
            f"ascent_steps={self.ascent_steps}, m={self.m}, schedule={self.schedule}, "
            f"base={type(self.base).__name__})"
        )

    # ---- counters and schedule --------------------------------------------------
    # With a fused Adam/AdamW base, a non-finite step is skipped by the optimizer kernel itself
    # (its found_inf input), so nothing is read back to the host during a step; the counters
    # are read when asked for.
    @property
    def skipped_steps(self) -> int:
        return int(self._skipped)

    @property
    def steps_taken(self) -> int:
        return self._attempts - int(self._skipped)

    @property
    def sam_active(self) -> bool:
        """Whether the next step is a SAM step under the schedule."""
        if isinstance(self.schedule, Always):  # no need to count steps (a host read)
            return True
        return self.schedule.sam_on(self.steps_taken)

    @property
    def rho(self) -> float:
        if self.rho_schedule.kind == "constant":
            return self.rho_schedule.rho
        return self.rho_schedule.at(self.steps_taken, float(self.param_groups[0]["lr"]))

    def _params(self) -> list[Tensor]:
        return [p for p in self._all_params() if p.grad is not None]

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # ---- explicit control ---------------------------------------------------------
    @torch.no_grad()
    def ascent_step(self) -> None:
        """Move the weights towards the worst case within rho, using the gradients they hold.

        Call after backward at w; call again (after another backward) for n-step ascent.
        Zeroes the gradients so the next backward measures the perturbed point.
        """
        first = not self._perturbed
        if first:
            self._begin()
        params = self._perturbed
        grads = [p.grad for p in params]  # type: ignore[misc]
        self._unscale(grads)
        if self._first_grads is not None and first:
            torch._foreach_copy_(self._first_grads, grads)
        u = torch._foreach_mul(grads, self._scales) if self._scales is not None else grads
        norm = global_norm(u)
        self._nonfinite.append(~torch.isfinite(norm))
        rho = self.rho
        step = rho / self.ascent_steps
        coef = step / (norm + _TINY)
        if self.ascent_steps == 1 and self._scales is None:
            # Plain SAM: w += rho g/|g|, scaling the gradients in place (they are dropped
            # next): no temporary, and the coefficient stays a tensor (no host read).
            torch._foreach_mul_(grads, coef)
            torch._foreach_add_(params, grads)
            self.base.zero_grad(set_to_none=True)
            return
        if self.ascent_steps == 1:
            # One step from w: z = rho u / |u|, no projection needed.
            z = torch._foreach_mul(u, coef)
        else:
            if first:
                self._z = [torch.zeros_like(p) for p in params]
            torch._foreach_add_(self._z, torch._foreach_mul(u, coef))
            z_norm = global_norm(self._z)
            torch._foreach_mul_(self._z, torch.clamp(rho / (z_norm + _TINY), max=1.0))
            z = self._z
        e = torch._foreach_mul(z, self._scales) if self._scales is not None else z
        if not first:
            torch._foreach_copy_(params, self._saved)
        torch._foreach_add_(params, e)
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def descent_step(self, loss: Tensor | None = None) -> bool:
        """Restore w exactly and let the base optimizer step with the gradient at w + e.

        Returns False (and counts a skipped step) when the loss or either gradient is
        not finite; the weights are then the ones before the step, bit for bit.
        """
        if not self._perturbed:
            raise RuntimeError("descent_step() without ascent_step(): nothing to descend from")
        grads = [p.grad for p in self._perturbed if p.grad is not None]
        self._unscale(grads)
        if loss is not None:
            self._nonfinite.append(~torch.isfinite(loss.detach()).all())
        torch._foreach_copy_(self._perturbed, self._saved)
        if self._first_grads is not None and len(grads) == len(self._perturbed):
            position = {id(p): i for i, p in enumerate(self._all_params())}
            diffs = torch._foreach_sub(grads, self._first_grads)
            self._correction = {position[id(p)]: d
                                for p, d in zip(self._perturbed, diffs, strict=True)}
        self._perturbed = []
        return self._finish()

    # ---- the usual entry point ----------------------------------------------------
    def step(self, closure: Callable[..., Tensor] | None = None, batch: Any = None) -> Tensor:
        """One optimizer step. The closure computes the loss, calls backward and returns it.

        With ``m`` set, pass ``batch``: the closure is then called with one chunk at a time.
        Returns the loss at w (the first pass).
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that computes the loss and calls backward(); "
                "or call ascent_step()/descent_step() yourself"
            )
        if self.m is not None and batch is None:
            raise ValueError(f"SAM with m={self.m} needs step(closure, batch=...) to split")
        if not self.sam_active:
            return self._plain_step(closure, batch)
        if self.m is not None:
            return self._m_sharpness_step(closure, batch)
        return self._sam_pass(lambda: closure(), last=True, loss_check=True)

    # ---- internals ----------------------------------------------------------------
    def _sam_pass(self, closure: Callable[[], Tensor], last: bool, loss_check: bool) -> Tensor:
        """Ascent passes then the SAM-gradient pass; leaves the SAM gradient in .grad."""
        with torch.enable_grad(), self._maybe_no_sync():
            loss = closure()
        for i in range(self.ascent_steps):
            self.ascent_step()
            final = i == self.ascent_steps - 1
            sync = contextlib.nullcontext() if (final and last) else self._maybe_no_sync()
            with torch.enable_grad(), sync, self._frozen_running_stats():
                closure()
        if loss_check:
            self.descent_step(loss)
        return loss.detach()

    def _m_sharpness_step(self, closure: Callable[[Any], Tensor], batch: Any) -> Tensor:
        chunks = _split(batch, self.m)  # type: ignore[arg-type]
        total = sum(_batch_len(c) for c in chunks)
        params = self._all_params()
        acc = [torch.zeros_like(p) for p in params]
        has_grad = [False] * len(params)
        loss_sum = torch.zeros(())
        for chunk in chunks:
            self.base.zero_grad(set_to_none=True)
            w = _batch_len(chunk) / total
            chunk_loss = self._sam_pass(lambda c=chunk: closure(c), last=True, loss_check=False)
            self._nonfinite.append(~torch.isfinite(chunk_loss).all())
            loss_sum = loss_sum + chunk_loss.cpu() * w
            with torch.no_grad():
                torch._foreach_copy_(self._perturbed, self._saved)
                self._perturbed = []
                live = [i for i, p in enumerate(params) if p.grad is not None]
                torch._foreach_add_([acc[i] for i in live], [params[i].grad for i in live],
                                    alpha=w)
                for i in live:
                    has_grad[i] = True
        with torch.no_grad():
            for p, a, h in zip(params, acc, has_grad, strict=True):
                p.grad = a if h else None
            self._finish()
        return loss_sum

    def _plain_step(self, closure: Callable[..., Tensor], batch: Any) -> Tensor:
        with torch.enable_grad():
            loss = closure(batch) if self.m is not None else closure()
        with torch.no_grad():
            grads = [p.grad for p in self._params()]
            self._unscale(grads)
            self._nonfinite.append(~torch.isfinite(loss.detach()).all())
            reuse = isinstance(self.schedule, EveryK) and self.schedule.reuse_grad
            if reuse and self._correction is not None:
                params = self._all_params()
                live = [i for i in self._correction if params[i].grad is not None]
                if live:
                    torch._foreach_add_([params[i].grad for i in live],
                                        [self._correction[i] for i in live])
            self._finish()
        return loss.detach()

    def _begin(self) -> None:
        params = self._params()
        if not params:
            raise RuntimeError("ascent_step(): no parameter has a gradient; call backward first")
        if len(self._saved) != len(params) or any(
            s.shape != p.shape for s, p in zip(self._saved, params, strict=True)
        ):
            self._saved = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._saved, params)
        self._perturbed = params
        self._scales = None
        if self.adaptive:
            with torch.no_grad():
                scales = torch._foreach_abs(params)
                torch._foreach_add_(scales, self.eta)
                unscaled = [t for t, p in zip(scales, params, strict=True)
                            if not self.adaptive_filter(p)]
                if unscaled:  # biases and norm gains: T = 1
                    torch._foreach_zero_(unscaled)
                    torch._foreach_add_(unscaled, 1.0)
            self._scales = scales
        reuse = isinstance(self.schedule, EveryK) and self.schedule.reuse_grad
        self._first_grads = [torch.empty_like(p) for p in params] if reuse else None

    def _finish(self) -> bool | Tensor:
        """Clip, check finiteness, step or skip. A fused Adam/AdamW base skips on the device
        (returns a bool tensor: stepped); otherwise one host read decides (returns a bool)."""
        params = self._params()
        grads = [p.grad for p in params]
        if self.clip_grad_norm is not None and grads:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
        else:
            norm = global_norm(grads)  # type: ignore[arg-type]
        flags = [f.to(norm.device) for f in self._nonfinite] + [~torch.isfinite(norm)]
        self._nonfinite = []
        scaling = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        if self.base.defaults.get("fused") and not scaling:
            bad_t = torch.stack(flags).any()
            stepped = step_unless(self.base, bad_t)  # the fused kernel skips: no host read
            self._skipped = self._skipped + bad_t.long()
            self._attempts += 1
            return stepped
        bad = bool(torch.stack(flags).any())
        self._update_scale(bad)
        self._attempts += 1
        if bad:
            self._skipped = self._skipped + 1
            self.base.zero_grad(set_to_none=True)
            return False
        self.base.step()
        return True

    def _unscale(self, grads: list[Tensor]) -> None:
        if self.grad_scaler is not None and self.grad_scaler.is_enabled() and grads:
            torch._foreach_mul_(grads, 1.0 / self.grad_scaler.get_scale())

    def _update_scale(self, found_inf: bool) -> None:
        """GradScaler's dynamic rule, applied once per SAM step (both passes together)."""
        s = self.grad_scaler
        if s is None or not s.is_enabled():
            return
        scale = s.get_scale()
        if found_inf:
            scale *= s.get_backoff_factor()
            self._scale_growth = 0
        else:
            self._scale_growth += 1
            if self._scale_growth >= s.get_growth_interval():
                scale *= s.get_growth_factor()
                self._scale_growth = 0
        s.update(new_scale=scale)

    def _maybe_no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return self.no_sync() if self.no_sync is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _frozen_running_stats(self) -> Iterator[None]:
        if self.bn_module is None:
            yield
            return
        bn_type = nn.modules.batchnorm._BatchNorm
        norms = [m for m in self.bn_module.modules() if isinstance(m, bn_type)]
        saved = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, mom in zip(norms, saved, strict=True):
                m.momentum = mom
