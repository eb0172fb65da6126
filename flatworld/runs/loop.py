"""The online loop: seed with random actions, then act, store, update once per step.

Determinism: every episode is reset with a seed derived from (run seed, episode index), and
checkpoints are taken only at episode ends, so the whole state of the loop is the agent, the
replay buffer, the RNG states and a few counters. A resumed run on CPU is then bit-identical
to one that never stopped.
"""

from __future__ import annotations

import errno
import random
import re
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flatworld.runs.checkpoint import (
    atomic_write,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unloadable,
)
from flatworld.runs.config import RunConfig
from flatworld.runs.episodes import (
    ACTIONS,
    DIAG,
    EVAL,
    REPLAY,
    TRAIN,
    derive_seed,
    env_action,
    run_episodes,
)
from flatworld.runs.folder import (
    ConfigMismatchError,
    agent_entry,
    checked_configs,
    config_differences,
    holds_run,
    locked_run,
    read_config,
    run_dir_of,
    with_agent_env_defaults,
    write_config,
)
from flatworld.runs.logger import MetricsLog
from flatworld.runs.memory import keep_freed_memory
from flatworld.runs.protocol import Agent, AgentEntry, Agents
from flatworld.runs.replay import ROW_FIELDS, ReplayBuffer

_ROWS = re.compile(r"^rows_(\d+)_(\d+)\.pt$")


def _check_keys(expected: Any, got: Any, where: str) -> None:
    """Every key of `expected` (nested dicts) is in `got`. An empty or None expected value
    (fresh optimizer state, no held-out batch yet) says nothing about what a saved one holds."""
    if not isinstance(expected, dict) or not expected:
        return
    if not isinstance(got, dict):
        raise ValueError(f"{where}: expected a dict, found {type(got).__name__}")
    for key, value in expected.items():
        if key not in got:
            raise ValueError(f"{where}: missing {key!r}")
        if key != "state":  # an optimizer's per-parameter state: absent until its first step
            _check_keys(value, got[key], f"{where}.{key}")


class _Interrupt:
    """Ctrl-C while a run trains: the first press asks it to stop at the end of the episode,
    with a checkpoint (checkpoints fall on episode ends, so a resumed run stays bit-identical
    to one never stopped); a second press stops it at once. Outside the main thread (where
    Python delivers signals) Ctrl-C keeps its usual meaning."""

    def __init__(self, bar: Any):
        self.pressed, self.bar, self.previous = False, bar, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_press)

    def _on_press(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        self.bar.write("Ctrl-C: stopping at the end of this episode, with a checkpoint "
                       "(Ctrl-C again stops at once, without one)")  # fmt: skip

    def release(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class Loop:
    """One run's envs, agent, replay and counters, and the online loop that drives them."""

    def __init__(self, run_dir: Path, cfg: RunConfig, entry: AgentEntry, agent_name: str,
                 agent_cfg: Any, replay: bool = True):  # fmt: skip
        from flatworld.envs import make

        self.run_dir, self.cfg = run_dir, cfg
        keep_freed_memory()  # every step reuses its memory instead of page-faulting it in
        torch.manual_seed(cfg.seed)
        np.random.seed(derive_seed(cfg.seed) % 2**32)
        random.seed(cfg.seed)
        self.env = self.eval_env = None
        try:
            self.env = make(cfg.env, seed=cfg.seed, **cfg.env_options)
            self.eval_env = make(cfg.env, seed=derive_seed(cfg.seed, EVAL), **cfg.env_options)
            if cfg.video_every:
                from flatworld.envs.video import check_renders

                check_renders(self.eval_env, cfg.env)  # every evaluation episode is seeded
            self._build(cfg, entry, agent_name, agent_cfg, replay)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close both environments (renderers, simulators); safe to call twice."""
        for env in (self.env, self.eval_env):
            if env is not None:
                env.close()
        self.env = self.eval_env = None

    def _build(self, cfg: RunConfig, entry: AgentEntry, agent_name: str, agent_cfg: Any,
               replay: bool) -> None:  # fmt: skip
        from flatworld.envs import action_kind, episode_length

        kind = action_kind(self.env)
        if kind not in entry.action_kinds:
            raise ValueError(
                f"env={cfg.env!r} has {kind} actions ({self.env.action_space}); agent "
                f"{agent_name!r} supports {' and '.join(entry.action_kinds)} actions only"
            )
        self.episode_length = episode_length(self.env)
        obs_space, act_space = self.env.observation_space, self.env.action_space
        # Discrete actions are one-hot vectors for the agent and the replay, an index for the env.
        self.discrete = kind == "discrete"
        self.action_dim = int(act_space.n) if self.discrete else int(np.prod(act_space.shape))
        self.seed_steps = (
            cfg.seed_steps if cfg.seed_steps is not None
            else entry.seed_steps(agent_cfg, self.episode_length)
        )  # fmt: skip
        burst = entry.seed_burst if cfg.seed_burst is None else cfg.seed_burst
        self.burst = self.seed_steps if burst else 0  # updates run once, when seeding ends
        self.episodic = bool(getattr(agent_cfg, "episodic", True))
        self.agent: Agent = entry.make(
            agent_cfg, obs_shape=tuple(obs_space.shape), action_dim=self.action_dim,
            episode_length=self.episode_length, device=cfg.device,
            total_steps=self._total_updates(),
            **({"discrete": True} if self.discrete else {}),
        )  # fmt: skip
        # Sequence agents (Dreamer) ask for `seq_len` rows that may cross episodes, and a train
        # ratio: replayed steps per agent step. Others get H+1-row windows, one update a step.
        self.seq_len: int | None = getattr(self.agent, "seq_len", None)
        ratio = getattr(self.agent, "train_ratio", None)
        rows = self.agent.batch_size * (self.seq_len or 1)
        self.updates_per_step = float(ratio) / rows if ratio else 1.0
        self.update_credit = 0.0
        # One row per step plus one per episode start; a run of many short episodes overflows
        # and forgets its oldest rows, which is the ring buffer's ordinary behaviour.
        n = (cfg.buffer_size or cfg.steps) if replay else 1  # evaluate() needs no replay
        capacity = n + n // self.episode_length + 2
        self.buffer = ReplayBuffer(
            capacity,
            tuple(obs_space.shape),
            self.action_dim,
            obs_space.dtype,
            seed=derive_seed(cfg.seed, REPLAY),
        )
        self.action_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, ACTIONS))
        self.diag_batch: dict[str, torch.Tensor] | None = None
        self._batch: dict[str, torch.Tensor] | None = None  # refilled by every update
        self.step = 0  # agent steps taken
        self.episode = 0  # episodes finished
        self.updates = 0
        self.last_return = float("nan")
        self.last_length = 0
        self.wall_s = 0.0
        self.sums: dict[str, float] = {}  # agent update metrics since the last row
        self.count = 0
        self.next_checkpoint = cfg.checkpoint_every
        self.saved_rows = 0  # replay rows already in checkpoint files
        self.last_checkpoint: int | None = None  # the step of the newest checkpoint written
        self.damaged_rows: list[Path] = []  # replay rows files found not to load
        self.replay_needs: dict[int, int] = {}  # checkpoint step -> first replay row it needs

    def _total_updates(self) -> int:
        """Updates in the whole run (late-phase SAM places its start from it): one per step
        after seeding, plus the burst when seeding ends."""
        after = max(self.cfg.steps - self.seed_steps, 0)
        return max(after + (self.burst or 1), 1)

    # -- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "step": self.step,
            "episode": self.episode,
            "updates": self.updates,
            "last_return": self.last_return,
            "last_length": self.last_length,
            "wall_s": self.wall_s,
            "sums": {k: float(v) for k, v in self.sums.items()},
            "count": self.count,
            "next_checkpoint": self.next_checkpoint,
            "update_credit": self.update_credit,
            "done": self.step >= self.cfg.steps,
            "agent": self.agent.state_dict(),
            # The rows themselves are in checkpoints/replay/, written incrementally.
            "replay": self.buffer.meta_state(),
            "diag_batch": self._compact(self.diag_batch),
            "action_gen": self.action_gen.get_state(),
            "rng": rng_state(),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.agent.load_state_dict(s["agent"])
        self.buffer.load_meta_state(s["replay"])
        self._load_replay_rows(s["replay"])
        self.diag_batch = self._expand(s["diag_batch"])
        self.update_credit = s["update_credit"]
        self.action_gen.set_state(s["action_gen"])
        for k in (
            "step",
            "episode",
            "updates",
            "last_return",
            "last_length",
            "wall_s",
            "count",
            "next_checkpoint",
        ):
            setattr(self, k, s[k])
        self.sums = dict(s["sums"])
        set_rng_state(s["rng"])

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError if a loaded checkpoint lacks part of this loop's state, or if
        replay rows it needs are not on disk or do not load (a damaged rows file is noted in
        `damaged_rows`, to be set aside once a checkpoint that does not need it loads)."""
        _check_keys(self.state_dict(), state, "checkpoint")
        meta = state["replay"]
        for a, b, path in self._replay_chunks(meta["total"] - meta["size"], meta["total"]):
            if path in self.damaged_rows:
                raise ValueError(f"its replay rows {path} do not load")
            try:
                self._read_rows(path, b - a)
            except Exception as err:  # noqa: BLE001  (any failure means: the file is unusable)
                self.damaged_rows.append(path)
                why = unloadable(err)
                raise ValueError(f"its replay rows {path} do not load ({why})") from None

    def _read_rows(self, path: Path, n: int) -> dict[str, torch.Tensor]:
        rows = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(rows, dict) or sorted(rows) != sorted(ROW_FIELDS):
            raise ValueError(f"expected the fields {', '.join(ROW_FIELDS)}")
        if any(len(v) != n for v in rows.values()):
            raise ValueError(f"expected {n} rows in every field")
        return rows

    def check_agent_state(self, state: dict[str, Any]) -> None:
        _check_keys({"step": 0, "agent": self.agent.state_dict()}, state, "checkpoint")

    def checkpoint(self) -> None:
        folder = self.run_dir / "checkpoints"
        try:
            self._save_replay_rows(folder / "replay")
            save_checkpoint(folder, self.step, self.state_dict(), keep=2)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            # Files are written atomically, so what was there before is whole.
            previous = list_checkpoints(folder)
            intact = (f"the previous checkpoint (step {previous[-1][0]}) is intact"
                      if previous else "there is no earlier checkpoint")  # fmt: skip
            raise OSError(errno.ENOSPC, f"no space left on device while writing "
                          f"{err.filename or folder}; {intact}") from None  # fmt: skip
        self.last_checkpoint = self.step
        self.replay_needs[self.step] = self.buffer.total - self.buffer.size
        self._prune_replay(folder)

    # -- replay rows on disk: each checkpoint adds the rows since the previous one -------------
    def _save_replay_rows(self, folder: Path) -> None:
        start = max(self.saved_rows, self.buffer.total - self.buffer.size)
        stop = self.buffer.total
        if stop > start:
            folder.mkdir(parents=True, exist_ok=True)
            rows = self.buffer.rows(start, stop)
            atomic_write(folder / f"rows_{start:012d}_{stop:012d}.pt",
                         lambda f: torch.save(rows, f))  # fmt: skip
        self.saved_rows = stop

    def _chunks(self) -> list[tuple[int, int, Path]]:
        folder = self.run_dir / "checkpoints" / "replay"
        if not folder.is_dir():
            return []
        found = [(int(m[1]), int(m[2]), p) for p in folder.iterdir()
                 if (m := _ROWS.match(p.name))]  # fmt: skip
        return sorted(found)

    def _replay_chunks(self, start: int, stop: int) -> list[tuple[int, int, Path]]:
        """The row files that cover [start, stop), or ValueError naming the gap."""
        need, out = start, []
        for a, b, path in self._chunks():
            if need >= stop:
                break
            if a <= need < b:
                out.append((a, b, path))
                need = b
        if need < stop:
            raise ValueError(f"replay rows [{need}, {stop}) are missing from checkpoints/replay")
        return out

    def _load_replay_rows(self, meta: dict[str, Any]) -> None:
        total, start = meta["total"], meta["total"] - meta["size"]
        for a, _, path in self._chunks():
            if a >= total:  # written after this checkpoint (by a refused one, or a crash)
                path.unlink()
        for a, b, path in self._replay_chunks(start, total):
            rows = self._read_rows(path, b - a)
            lo, hi = max(a, start), min(b, total)
            self.buffer.put_rows(lo, {k: v[lo - a: hi - a] for k, v in rows.items()})
        self.saved_rows = total
        self.replay_needs[self.step] = start

    def _prune_replay(self, folder: Path) -> None:
        """Drop row files that no kept checkpoint needs (a kept checkpoint this process did not
        write or load counts as needing every row)."""
        kept = [step for step, _ in list_checkpoints(folder)]
        self.replay_needs = {k: v for k, v in self.replay_needs.items() if k in kept}
        need = min((self.replay_needs.get(step, 0) for step in kept), default=0)
        for _, b, path in self._chunks():
            if b <= need:
                path.unlink()

    def _compact(self, batch: dict[str, torch.Tensor] | None) -> Any:
        """The held-out batch as stored: observations in the replay's dtype (pixels as uint8)."""
        if batch is None:
            return None
        return {k: v.to(self.buffer.obs.dtype) if k == "obs" else v for k, v in batch.items()}

    @staticmethod
    def _expand(batch: dict[str, torch.Tensor] | None) -> Any:
        return None if batch is None else {k: v.float() for k, v in batch.items()}

    # -- pieces of a step ---------------------------------------------------------------------
    def _reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=derive_seed(self.cfg.seed, TRAIN, self.episode))
        self.buffer.start_episode(obs)
        return np.asarray(obs, np.float32)

    def _random_action(self) -> np.ndarray:
        if self.discrete:
            i = int(torch.randint(self.action_dim, (1,), generator=self.action_gen))
            return np.eye(self.action_dim, dtype=np.float32)[i]
        a = torch.rand(self.action_dim, generator=self.action_gen) * 2 - 1
        return a.numpy().astype(np.float32)

    def _sample(self, buffer: ReplayBuffer | None = None, **kw: Any) -> dict[str, torch.Tensor]:
        buffer = buffer or self.buffer
        if self.seq_len is not None:
            return buffer.sample_sequences(self.agent.batch_size, self.seq_len, **kw)
        return buffer.sample(self.agent.batch_size, self.agent.horizon, **kw)

    def _can_update(self, buffer: ReplayBuffer | None = None) -> bool:
        buffer = buffer or self.buffer
        if self.seq_len is not None:
            return buffer.can_sample_sequences(self.seq_len)
        return buffer.can_sample(self.agent.horizon)

    def _updates_due(self) -> int:
        """Updates this step: the train ratio's credit, spent in whole updates."""
        self.update_credit += self.updates_per_step
        n = int(self.update_credit)
        self.update_credit -= n
        return n

    def _update(self) -> None:
        agent = self.agent
        # Sampled into the previous update's batch: the loop allocates its batch once.
        batch = self._batch = self._sample(device=self.cfg.device, out=self._batch)
        # Metrics may be tensors: summed where they live and read back only when a row is
        # written, so an update never waits for the device.
        for k, v in agent.update(batch).items():
            v = v.detach() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.updates += 1

    def _burst(self, progress: bool) -> None:
        """The published TD-MPC2 schedule: pretrain on the seed data with one update per seed
        step, once, when seeding ends. Counted in `updates`, not in environment steps."""
        from tqdm import tqdm

        for _ in tqdm(range(self.burst), desc="updates on the seed data", unit="update",
                      disable=not progress, leave=False, dynamic_ncols=True):  # fmt: skip
            self._update()

    def _evaluate(self, progress: bool) -> dict[str, Any]:
        """Periodic evaluation episodes; at the last step, the run's score: as many episodes
        as the suite's protocol asks (final_eval_episodes when set)."""
        from flatworld.envs import eval_episodes

        cfg = self.cfg
        n = cfg.eval_episodes
        if self.step == cfg.steps:
            n = cfg.final_eval_episodes or eval_episodes(cfg.env)
        video = None
        if cfg.video_every and self.step % cfg.video_every == 0:
            video = self.run_dir / "videos" / f"step-{self.step}.mp4"
        seeds = [derive_seed(cfg.seed, EVAL, self.step, i) for i in range(n)]
        held_out = self._held_out_store()
        out = run_episodes(self.eval_env, self.agent, seeds, progress=progress, video=video,
                           record=held_out)  # fmt: skip
        out.pop("returns")
        if self._can_update(held_out):
            # The diagnostics batch: windows of these evaluation episodes, which never enter
            # the replay, so the world model is measured on data it was not trained on. Drawn
            # from its own stream, so it shifts no other draw.
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, DIAG, self.step))
            self.diag_batch = self._sample(held_out, generator=gen)
        return out

    def _held_out_store(self) -> ReplayBuffer:
        """Where evaluation episodes are recorded for the diagnostics batch: the last rows of
        them, enough for two batches (at least 2,000)."""
        rows = self.agent.batch_size * (self.seq_len or self.agent.horizon + 1)
        space = self.env.observation_space
        return ReplayBuffer(max(2_000, 2 * rows), tuple(space.shape), self.action_dim,
                            space.dtype)  # fmt: skip

    def _diagnostics(self) -> dict[str, float]:
        assert self.diag_batch is not None
        tick = time.perf_counter()
        batch = {k: v.to(self.cfg.device) for k, v in self.diag_batch.items()}
        out = self.agent.diagnostics(batch, lambda_max=self.cfg.lambda_max,
                                     rho=self.cfg.diag_rho)  # fmt: skip
        out = {k: float(v) for k, v in out.items()}
        if {"bound_perturbed_loss", "bound_k", "bound_w_norm_sq"} <= out.keys():
            from flatworld.sharpness import sam_bound

            bound = sam_bound(out["bound_perturbed_loss"], int(out["bound_k"]),
                              out["bound_w_norm_sq"], self.cfg.diag_rho, max(len(self.buffer), 2))
            out.update(bound_n=float(bound.n), bound_delta=bound.delta,
                       bound_complexity=bound.complexity, bound_value=bound.value)  # fmt: skip
        out["diag_s"] = time.perf_counter() - tick
        return out

    def _row(self, extra: dict[str, Any], sps: float) -> dict[str, Any]:
        repeat = getattr(self.env, "action_repeat", 1)
        row: dict[str, Any] = {
            "step": self.step, "env_steps": self.step * repeat, "episode": self.episode,
            "updates": self.updates, "episode_return": self.last_return,
            "episode_length": self.last_length, "sps": round(sps, 2),
            "wall_s": round(self.wall_s, 2),
        }  # fmt: skip
        row.update(extra)
        row.update({f"train/{k}": float(v) / self.count for k, v in sorted(self.sums.items())})
        self.sums, self.count = {}, 0
        return row

    # -- the loop -----------------------------------------------------------------------------
    def run(self, progress: bool, stop_after: int | None, resumed: bool) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        log = MetricsLog(self.run_dir, cfg.tensorboard, self.step if resumed else None,
                         wandb_project=cfg.wandb_project, echo=not progress)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
            desc=cfg.env,
        )
        obs, t, ep_return = self._reset(), 0, 0.0
        tick, tick_step = time.perf_counter(), self.step
        deadline = None if cfg.time_limit_s is None else tick + cfg.time_limit_s
        go_on = f"go on with `flatworld train --resume {self.run_dir}`"
        interrupt = _Interrupt(bar)
        try:
            while self.step < cfg.steps:
                if stop_after is not None and self.step >= stop_after:
                    return  # a simulated crash: no checkpoint, nothing flushed beyond the rows
                if self.step < self.seed_steps:
                    action = self._random_action()
                else:
                    action = np.asarray(self.agent.act(obs, t0=t == 0, eval_mode=False))
                next_obs, reward, term, trunc, _ = self.env.step(env_action(self.env, action))
                if term and not self.episodic:
                    raise RuntimeError(
                        f"{cfg.env} returned terminated=True at step {self.step}, but the agent "
                        "is not episodic: its value targets would bootstrap through the "
                        "terminal state. Set the agent's episodic=True."
                    )
                self.buffer.add(next_obs, action, reward, term)
                obs, t, ep_return = np.asarray(next_obs, np.float32), t + 1, ep_return + reward
                self.step += 1
                bar.update(1)
                if self.step >= self.seed_steps and self._can_update():
                    if self.step == self.seed_steps and self.burst:
                        self._burst(progress)
                    else:
                        for _ in range(self._updates_due()):
                            self._update()
                done = term or trunc
                if done:
                    self.episode += 1
                    self.last_return, self.last_length = float(ep_return), t
                extra: dict[str, Any] = {}
                if cfg.eval_episodes and (self.step % cfg.eval_every == 0
                                          or self.step == cfg.steps):
                    extra.update(self._evaluate(progress))
                if self.step % cfg.diag_every == 0 and self.diag_batch is not None:
                    extra.update(self._diagnostics())
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    self.wall_s += now - tick
                    sps = (self.step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, self.step
                    log.write(self._row(extra, sps))
                    bar.set_postfix(ret=f"{self.last_return:.1f}", updates=self.updates,
                                    refresh=False)  # fmt: skip
                if self.step == cfg.steps:
                    self.checkpoint()  # the final one may fall mid-episode; it is not resumed
                elif done:
                    due = self.step >= self.next_checkpoint
                    out_of_time = deadline is not None and time.perf_counter() >= deadline
                    stopping = out_of_time or interrupt.pressed
                    if due:
                        self.next_checkpoint = (self.step // cfg.checkpoint_every + 1) * (
                            cfg.checkpoint_every
                        )
                    if due or stopping:
                        self.wall_s += time.perf_counter() - tick
                        tick, tick_step = time.perf_counter(), self.step
                        self.checkpoint()
                    if stopping:
                        why = (f" after time_limit_s={cfg.time_limit_s:g}" if out_of_time
                               else "")  # fmt: skip
                        bar.write(f"{self.run_dir}: stopped at step {self.step}{why}; {go_on}")
                        return
                    obs, t, ep_return = self._reset(), 0, 0.0
        except KeyboardInterrupt:  # a second Ctrl-C: at once, back to the last checkpoint
            last = ("the start" if self.last_checkpoint is None
                    else f"step {self.last_checkpoint}")  # fmt: skip
            bar.write(f"{self.run_dir}: stopped at step {self.step} without a checkpoint; "
                      f"{go_on} (from {last})")
        finally:
            interrupt.release()
            bar.close()
            log.close()


def train(
    run_cfg: RunConfig,
    agent_name: str,
    agent_cfg: Any,
    *,
    agents: Agents,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train agent `agent_name` (its entry in `agents`) online; returns the run folder.

    Everything is checked before the folder is made: the configs, the device, the env id and
    its action space against the agent. `stop_after` stops the loop after that many steps
    without a final checkpoint, as a crash would (for testing resume).
    """
    agent_cfg = checked_configs(run_cfg, agent_name, agent_cfg, agents)
    run_cfg = with_agent_env_defaults(run_cfg, agent_cfg)
    run_dir = run_dir_of(run_cfg, agent_name, agent_cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is a file; a run needs a folder")
    if holds_run(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds a run: resume it with `flatworld train --resume "
            f"{run_dir}`, or choose another --run-dir"
        )
    # Building the loop builds the envs: bad ids fail here, before the folder exists.
    loop = Loop(run_dir, run_cfg, agent_entry(agents, agent_name), agent_name, agent_cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with locked_run(run_dir):
            if holds_run(run_dir):  # another process started it meanwhile
                raise FileExistsError(f"{run_dir} already holds a run: resume it with "
                                      f"`flatworld train --resume {run_dir}`")  # fmt: skip
            write_config(run_dir, run_cfg, agent_name, agent_cfg)
            loop.run(progress, stop_after, resumed=False)
    finally:
        loop.close()
    return run_dir


def resume(run_dir: str | Path, *, agents: Agents, progress: bool = True,
           stop_after: int | None = None) -> Path:  # fmt: skip
    """Go on from the last checkpoint that loads; metrics rows after it are redone.

    A run killed before its first checkpoint (checkpoints are taken at episode ends) starts
    again from the beginning. Checkpoints that do not load, lack part of the state, or need
    replay rows that do not load are set aside (renamed `*.refused`, as are the damaged rows
    files) once a good one is found, so they never count among the checkpoints kept. A
    finished run says so and returns. A folder that another process is training is refused.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder: --resume takes a run folder")
    if not (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir} is not a flatworld run folder (no config.yaml)")
    run_cfg, agent_name, agent_cfg = read_config(run_dir, agents)
    agent_cfg = checked_configs(run_cfg, agent_name, agent_cfg, agents)
    loop = Loop(run_dir, run_cfg, agent_entry(agents, agent_name), agent_name, agent_cfg)
    try:
        with locked_run(run_dir):
            _resume(loop, run_dir, progress, stop_after)
    finally:
        loop.close()
    return run_dir


def _resume(loop: Loop, run_dir: Path, progress: bool, stop_after: int | None) -> None:
    folder = run_dir / "checkpoints"
    if not list_checkpoints(folder):
        warnings.warn(f"{run_dir} has no checkpoint (the run stopped before its first "
                      "episode ended): starting it again", RuntimeWarning, stacklevel=3)
        loop.run(progress, stop_after, resumed=False)
        return
    state, path = load_checkpoint(folder, validate=loop.check_state, set_aside=True)
    for damaged in loop.damaged_rows:  # a checkpoint that does not need them loaded
        damaged.rename(damaged.with_name(damaged.name + ".refused"))
    if state["done"]:
        print(f"{run_dir} is finished ({state['step']} steps): its metrics are in "
              f"{run_dir / 'metrics.csv'}, its last checkpoint is {path}; evaluate it with "
              f"`flatworld eval {run_dir}`")
        return
    loop.load_state_dict(state)
    loop.run(progress, stop_after, resumed=True)


def train_or_resume(run_cfg: RunConfig, agent_name: str, agent_cfg: Any, *, agents: Agents,
                    progress: bool = True, stop_after: int | None = None) -> Path:  # fmt: skip
    """Train a new run, or go on with the one in `run_cfg.run_dir` when its stored config is
    the requested one (a finished run returns at once). A different config is refused with
    the fields that differ: a run never silently continues under another env or budget."""
    agent_cfg = checked_configs(run_cfg, agent_name, agent_cfg, agents)
    run_cfg = with_agent_env_defaults(run_cfg, agent_cfg)
    run_dir = run_dir_of(run_cfg, agent_name, agent_cfg)
    if not (run_dir / "config.yaml").exists():
        return train(run_cfg, agent_name, agent_cfg, agents=agents, progress=progress,
                     stop_after=stop_after)
    diff = config_differences(run_dir, run_cfg, agent_name, agent_cfg, agents)
    if diff:
        raise ConfigMismatchError(
            f"{run_dir} holds a run with another config; remove it or choose another folder. "
            "Differences: " + "; ".join(diff)
        )
    return resume(run_dir, agents=agents, progress=progress, stop_after=stop_after)


