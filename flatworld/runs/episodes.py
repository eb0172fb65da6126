"""Seeds and episode playing, shared by the training loop and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces as gym_spaces

from flatworld.runs.protocol import Agent

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
    env: Any, agent: Agent, seeds: list[int], value: bool = True
) -> dict[str, float | list[float]]:
    """Evaluation episodes (eval_mode=True), one per seed. The value-prediction error compares
    agent.value(first obs) with the discounted return realised from it (agent.discount)."""
    returns, lengths, disc, preds = [], [], [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        obs = np.asarray(obs, np.float32)
        if value:
            preds.append(float(agent.value(obs)))
        rewards, done, t = [], False, 0
        while not done:
            action = agent.act(obs, t0=t == 0, eval_mode=True)
            obs, r, term, trunc, _ = env.step(env_action(env, action))
            obs = np.asarray(obs, np.float32)
            rewards.append(float(r))
            done, t = term or trunc, t + 1
        returns.append(sum(rewards))
        lengths.append(t)
        disc.append(_discounted(rewards, float(agent.discount)))
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
