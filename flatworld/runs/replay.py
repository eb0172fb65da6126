"""Episodic replay: preallocated CPU tensors, subsequences that never cross an episode.

Rows follow TD-MPC2's layout: an episode of T steps is T+1 rows; row 0 holds the first
observation, row t>0 holds obs_t with the action, reward and terminal flag that led to it.
A window of H+1 rows is then one training sequence: obs from all rows, the rest from rows 1..H
(TD-MPC2, `sample`). Sequence models (Dreamer) take every field of every row, windows may
cross episodes, and `is_first` marks the rows that start one (`sample_sequences`).

Rows have absolute numbers (`total` counts every row ever written), so a checkpoint can store
only the rows added since the previous one (`rows`, `put_rows`; see flatworld.runs.loop).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

_NP_TO_TORCH = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}
ROW_FIELDS = ("obs", "action", "reward", "terminated", "first", "episode")


def _need_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an int >= 1")


class ReplayBuffer:
    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        action_dim: int,
        obs_dtype: np.dtype | type = np.float32,
        seed: int = 0,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"capacity={capacity!r}: expected an int >= 2")
        dtype = np.dtype(obs_dtype)
        if dtype not in _NP_TO_TORCH:
            raise ValueError(f"obs_dtype={dtype}: expected float32 or uint8 (pixels)")
        self.capacity, self.obs_shape, self.action_dim = capacity, tuple(obs_shape), action_dim
        # uint8 pixels stay uint8 in memory (4x smaller) and become float32 when sampled.
        self.obs = torch.zeros((capacity, *self.obs_shape), dtype=_NP_TO_TORCH[dtype])
        self.action = torch.zeros((capacity, action_dim), dtype=torch.float32)
        self.reward = torch.zeros(capacity, dtype=torch.float32)
        self.terminated = torch.zeros(capacity, dtype=torch.bool)
        self.first = torch.zeros(capacity, dtype=torch.bool)  # the row starts an episode
        self.episode = torch.full((capacity,), -1, dtype=torch.int64)
        self.total = 0  # rows ever written; row number r lives at index r % capacity
        self.ptr = 0  # next row to write
        self.size = 0  # rows held
        self.num_episodes = 0  # episodes started; the id of the current one is this - 1
        self.episode_rows = 0  # rows of the current episode
        self.longest = 0  # most rows any episode has had
        self.generator = torch.Generator().manual_seed(seed)
        self._scratch: dict[tuple[str, int, str], Tensor] = {}  # see _gather

    def __len__(self) -> int:
        return self.size

    def _write(self, obs: np.ndarray, action: Any, reward: float, terminated: bool,
               first: bool = False) -> None:  # fmt: skip
        i = self.ptr
        self.obs[i] = torch.as_tensor(np.asarray(obs)).to(self.obs.dtype)
        self.action[i] = torch.as_tensor(np.asarray(action, np.float32))
        self.reward[i] = float(reward)
        self.terminated[i] = bool(terminated)
        self.first[i] = first
        self.episode[i] = self.num_episodes - 1
        self.total += 1
        self.episode_rows += 1
        self.longest = max(self.longest, self.episode_rows)
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def start_episode(self, obs: np.ndarray) -> None:
        self.num_episodes += 1
        self.episode_rows = 0
        self._write(obs, np.zeros(self.action_dim, np.float32), 0.0, False, first=True)

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, terminated: bool) -> None:
        """One step: `obs` is the observation reached by taking `action`."""
        if self.num_episodes == 0:
            raise RuntimeError("ReplayBuffer.add before start_episode")
        self._write(obs, action, reward, terminated)

    def can_sample(self, horizon: int) -> bool:
        """Whether some episode has a window of horizon + 1 rows."""
        return self.longest > horizon and self.size > horizon

    def _starts(self, n: int, horizon: int, generator: torch.Generator) -> Tensor:
        """n start rows, uniform over rows whose next `horizon` rows are in the same episode."""
        span = self.size - horizon  # windows may not run past the newest row
        if span <= 0:
            raise ValueError(
                f"horizon={horizon}: the buffer holds {self.size} rows, need more than {horizon}"
            )
        oldest = (self.ptr - self.size) % self.capacity
        starts = torch.empty(n, dtype=torch.int64)
        todo = torch.arange(n)
        # Rejection sampling is exactly uniform over valid starts; episode ids grow along the
        # write order, so equal ids at both ends mean the whole window is one episode.
        for _ in range(100):
            k = torch.randint(0, span, (len(todo),), generator=generator)
            pos = (oldest + k) % self.capacity
            ok = self.episode[pos] == self.episode[(pos + horizon) % self.capacity]
            starts[todo[ok]] = pos[ok]
            todo = todo[~ok]
            if len(todo) == 0:
                return starts
        # Nearly every window is invalid (episodes barely longer than H): enumerate them.
        pos = (oldest + torch.arange(span)) % self.capacity
        valid = pos[self.episode[pos] == self.episode[(pos + horizon) % self.capacity]]
        if len(valid) == 0:
            raise ValueError(
                f"horizon={horizon}: no episode in the buffer has more than {horizon} steps"
            )
        starts[todo] = valid[torch.randint(0, len(valid), (len(todo),), generator=generator)]
        return starts

    def sample(
        self,
        batch_size: int,
        horizon: int,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        out: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """A batch in TD-MPC2's layout: obs (H+1, B, *obs), action (H, B, A), reward and
        terminated (H, B, 1), all float32 on `device`. Uses the buffer's own generator unless
        another is given (the held-out diagnostics batch uses a separate one). ``out``, a batch
        an earlier call returned, is filled in place and returned (see :meth:`_gather`)."""
        _need_counts(batch_size=batch_size, horizon=horizon)
        starts = self._starts(batch_size, horizon, generator or self.generator)
        idx = (starts[None, :] + torch.arange(horizon + 1)[:, None]) % self.capacity
        nxt = idx[1:]
        return self._gather({"obs": idx, "action": nxt, "reward": nxt, "terminated": nxt},
                            device, out)  # fmt: skip

    def can_sample_sequences(self, length: int) -> bool:
        return self.size >= length

    def sample_sequences(
        self,
        batch_size: int,
        length: int,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        out: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Windows of `length` consecutive rows, uniform over the rows held, that may cross
        episodes: obs (L, B, *obs), action (L, B, A) (the action that led to each obs; zeros
        on an episode's first row), reward, terminated and is_first (L, B, 1), float32. ``out``
        as in :meth:`sample`."""
        _need_counts(batch_size=batch_size, length=length)
        if self.size < length:
            raise ValueError(f"length={length}: the buffer holds {self.size} rows")
        oldest = (self.ptr - self.size) % self.capacity
        k = torch.randint(0, self.size - length + 1, (batch_size,),
                          generator=generator or self.generator)  # fmt: skip
        idx = (oldest + k[None, :] + torch.arange(length)[:, None]) % self.capacity
        return self._gather({"obs": idx, "action": idx, "reward": idx, "terminated": idx,
                             "is_first": idx}, device, out)  # fmt: skip

    def _gather(self, rows: dict[str, Tensor], device: str | torch.device,
                out: dict[str, Tensor] | None) -> dict[str, Tensor]:  # fmt: skip
        """Each field at the rows ``rows[name]`` (L, B), as float32 (L, B, *field) on
        ``device``; reward, terminated and is_first get a trailing dim of 1.

        With ``out`` (a batch an earlier call returned, of the same shapes), the rows are
        gathered straight into its tensors, so a training loop allocates its batch once. On the
        CPU a float32 field goes in with no intermediate copy; a uint8 or bool field passes
        through a scratch tensor of its own dtype, also kept. For another device the rows
        travel in their own dtype (pixels as uint8, a quarter of float32's bytes) and are
        converted there."""
        shapes = {name: (*idx.shape, *self._item_shape(name)) for name, idx in rows.items()}
        if out is None:
            out = {name: torch.empty(shape, dtype=torch.float32, device=device)
                   for name, shape in shapes.items()}
        for name, idx in rows.items():
            field, target, shape = self._field(name), out.get(name), shapes[name]
            if target is None or tuple(target.shape) != shape:
                got = None if target is None else tuple(target.shape)
                raise ValueError(f"out[{name!r}] has shape {got}; expected {shape} (pass a "
                                 f"batch that an earlier call with the same sizes returned)")
            flat = idx.reshape(-1)
            if field.dtype == target.dtype and target.device.type == "cpu":
                torch.index_select(field, 0, flat, out=target.view(-1, *field.shape[1:]))
                continue
            scratch = self._scratch_for(name, field, flat.numel(), field.device,
                                        pin=target.device.type == "cuda")  # fmt: skip
            torch.index_select(field, 0, flat, out=scratch)
            if target.device != field.device and target.dtype != field.dtype:
                staged = self._scratch_for(name, field, flat.numel(), target.device)
                staged.copy_(scratch)
                scratch = staged
            target.copy_(scratch.view(shape))
        return out

    def _scratch_for(self, name: str, field: Tensor, rows: int, device: torch.device,
                     pin: bool = False) -> Tensor:  # fmt: skip
        """A kept tensor of ``rows`` rows of ``field``'s dtype on ``device`` (pinned host
        memory, when ``pin``, so that it copies to the GPU fast)."""
        key = (name, rows, str(device))
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = torch.empty(rows, *field.shape[1:], dtype=field.dtype, device=device,
                                  pin_memory=pin and device.type == "cpu")  # fmt: skip
            self._scratch[key] = scratch
        return scratch

    def _field(self, name: str) -> Tensor:
        return self.first if name == "is_first" else getattr(self, name)

    def _item_shape(self, name: str) -> tuple[int, ...]:
        """A batch's trailing dims for one row of a field."""
        return {"obs": self.obs_shape, "action": (self.action_dim,)}.get(name, (1,))

    # Incremental persistence: rows by absolute number, plus the small counters.
    def rows(self, start: int, stop: int) -> dict[str, Tensor]:
        """Copies of rows [start, stop), all of them still held."""
        if not (self.total - self.size <= start <= stop <= self.total):
            raise ValueError(f"rows [{start}, {stop}): the buffer holds rows "
                             f"[{self.total - self.size}, {self.total})")  # fmt: skip
        idx = torch.arange(start, stop) % self.capacity
        return {name: getattr(self, name)[idx].clone() for name in ROW_FIELDS}

    def put_rows(self, start: int, rows: dict[str, Tensor]) -> None:
        idx = torch.arange(start, start + len(rows["obs"])) % self.capacity
        for name in ROW_FIELDS:
            getattr(self, name)[idx] = rows[name]

    def meta_state(self) -> dict[str, Any]:
        """Everything but the rows."""
        return {
            "capacity": self.capacity, "obs_shape": list(self.obs_shape),
            "action_dim": self.action_dim, "ptr": self.ptr, "size": self.size,
            "total": self.total, "num_episodes": self.num_episodes,
            "episode_rows": self.episode_rows, "longest": self.longest,
            "generator": self.generator.get_state(),
        }  # fmt: skip

    def load_meta_state(self, d: dict[str, Any]) -> None:
        if (d["capacity"], tuple(d["obs_shape"]), d["action_dim"]) != (
            self.capacity, self.obs_shape, self.action_dim,
        ):  # fmt: skip
            raise ValueError(
                f"replay state has capacity={d['capacity']}, obs_shape={tuple(d['obs_shape'])}, "
                f"action_dim={d['action_dim']}; this buffer has {self.capacity}, "
                f"{self.obs_shape}, {self.action_dim}"
            )
        self.ptr, self.size, self.num_episodes = d["ptr"], d["size"], d["num_episodes"]
        self.total, self.episode_rows, self.longest = d["total"], d["episode_rows"], d["longest"]
        self.generator.set_state(d["generator"])

    def state_dict(self) -> dict[str, Any]:
        """The whole buffer in one dict (the training loop saves rows incrementally instead)."""
        return {**self.meta_state(), "start": self.total - self.size,
                **self.rows(self.total - self.size, self.total)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.load_meta_state(d)
        self.put_rows(d["start"], {name: d[name] for name in ROW_FIELDS})
