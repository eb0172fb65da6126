"""Seeds and episode playing, shared by the training loop and evaluation."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces as gym_spaces

from flatworld.runs.protocol import Agent

if TYPE_CHECKING:
    from flatworld.runs.replay import ReplayBuffer

# Seed streams: every random draw of a run comes from derive_seed(run seed, stream, ...).
TRAIN, EVAL, ACTIONS, REPLAY, DIAG, EVALUATE = range(6)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (and on nothing else)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def env_action(env: Any, action: np.ndarray) -> Any:
    """What `env.step` takes: the index of a one-hot action for a discrete env."""
    if isinstance(getattr(env, "action_space", None), gym_spaces.Discrete):
        return int(np.argmax(action))
    return action


def _discounted(rewards: list[float], discount: float) -> float:
    ret = 0.0
    for r in reversed(rewards):
        ret = r + discount * ret
    return ret


def run_episodes(
    env: Any, agent: Agent, seeds: list[int], value: bool = True, progress: bool = False,
    video: str | Path | None = None, record: ReplayBuffer | None = None,
) -> dict[str, float | list[float]]:
    """Evaluation episodes (eval_mode=True), one per seed. The value-prediction error compares
    agent.value(first obs) with the discounted return realised from it (agent.discount).

    `progress`: a bar over the episodes. `video`: an MP4 path for the first episode, one frame
    of `env.render()` after the reset and after every step (length + 1 frames). `record`: a
    replay buffer that receives every episode's transitions (the loop's held-out store).
    """
    from tqdm import tqdm

    returns, lengths, disc, preds = [], [], [], []
    bar = tqdm(seeds, desc="evaluating", unit="episode", disable=not progress, leave=False,
               dynamic_ncols=True)  # fmt: skip
    for i, seed in enumerate(bar):
        obs, _ = env.reset(seed=seed)
        if record is not None:
            record.start_episode(obs)
        obs = np.asarray(obs, np.float32)
        if value:
            preds.append(float(agent.value(obs)))
        recorder = _recorder(env, video) if video is not None and i == 0 else None
        rewards, done, t = [], False, 0
        with recorder or nullcontext():
            if recorder is not None:
                recorder.add(env.render())
            while not done:
                action = agent.act(obs, t0=t == 0, eval_mode=True)
                obs, r, term, trunc, _ = env.step(env_action(env, action))
                if record is not None:
                    record.add(obs, action, r, term)
                obs = np.asarray(obs, np.float32)
                rewards.append(float(r))
                done, t = term or trunc, t + 1
                if recorder is not None:
                    recorder.add(env.render())
        returns.append(sum(rewards))
        lengths.append(t)
        disc.append(_discounted(rewards, float(agent.discount)))
        bar.set_postfix(ret=f"{returns[-1]:.1f}", refresh=False)
    bar.close()
    out: dict[str, float | list[float]] = {
        "eval_return": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_length": float(np.mean(lengths)),
        "eval_discounted_return": float(np.mean(disc)),
        "returns": returns,
    }
    if value:
        out["value_pred"] = float(np.mean(preds))
        out["value_error"] = float(np.mean(np.abs(np.array(preds) - np.array(disc))))
    return out


def _recorder(env: Any, path: str | Path) -> Any:
    """A VideoRecorder at the env's frame rate (its `render_fps`, else 30)."""
    from flatworld.envs.video import VideoRecorder

    fps = getattr(env, "metadata", {}).get("render_fps")
    return VideoRecorder(path, fps=int(fps) if fps else 30)
