"""What a Dreamer or TWISTER run's latents know about its vector observations.

Loads a run's last checkpoint, plays ``--episodes`` episodes with its training policy (sampled
actions, as the replay was filled), runs the sequence model over each episode from its start,
and prints JSON:

- ``posterior_entropy``: the mean entropy (nats) of one categorical latent of the posterior,
  beside ``uniform_entropy`` = log(classes);
- ``probe_r2``: for each representation, the held-out R^2 of a ridge regression (a linear
  probe) onto each observation dimension (symlog space, as the decoder predicts it):
  ``embedding`` (the encoder's output), ``posterior_probs``, ``posterior_sample`` (what the
  decoder, the heads and the next token see), ``h`` (the sequence model's deterministic output)
  and ``h_and_sample``;
- ``recon_mse`` and ``obs_var`` per dimension: the decoder's squared error from posterior
  samples, beside the observations' variance (a decoder that knew nothing would score about
  the variance);
- ``episode_ends`` (``gym/CartPole-v1`` runs only): how many episodes ended with the cart out of
  bounds, with the pole past 12 degrees, or with neither (the time limit), read from each
  episode's last observation.

    python benchmarks/latent_probe.py runs/twister-dec10-s1 --episodes 20
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatworld.agents import AGENTS
from flatworld.agents.dreamer.networks import symlog
from flatworld.runs import trained_agent
from flatworld.runs.episodes import env_action


def play(agent: Any, env: Any, episodes: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """(observations (T, D), actions (T, A)) per episode; ``actions[t]`` led to observation t
    (zero at the start), as the world model reads them."""
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        seen, acts, done, t = [obs], [np.zeros(agent.action_dim, np.float32)], False, 0
        while not done:
            a = agent.act(obs, t0=t == 0, eval_mode=False)
            obs, _, terminated, truncated, _ = env.step(env_action(env, a))
            done, t = terminated or truncated, t + 1
            seen.append(obs)
            acts.append(a)
        out.append((torch.as_tensor(np.array(seen, np.float32)),
                    torch.as_tensor(np.array(acts, np.float32))))  # fmt: skip
    return out


@torch.no_grad()
def representations(agent: Any, obs: Tensor, actions: Tensor) -> dict[str, Tensor]:
    """Every representation of one episode (T rows each), the target, and the decoder's output."""
    wm = agent.world_model
    seq = wm.seq
    is_first = torch.zeros(obs.shape[0], 1, 1)
    is_first[0] = 1.0
    embed = wm.encoder(wm.preprocess(obs[:, None]))
    post, _, _ = seq.observe(embed, actions[:, None], is_first)
    probs = post["logits"].exp().flatten(-2)
    return {"embedding": embed[:, 0], "posterior_probs": probs[:, 0],
            "posterior_sample": post["stoch"][:, 0], "h": post["deter"][:, 0],
            "h_and_sample": torch.cat([post["deter"], post["stoch"]], -1)[:, 0],
            "target": symlog(obs), "recon": wm.decoder(seq.decoder_feat(post))[:, 0],
            "logp": post["logits"][:, 0]}  # fmt: skip


# Gymnasium CartPole-v1 terminates when |x| > 2.4 or |angle| > 12 degrees.
CARTPOLE_X_LIMIT, CARTPOLE_ANGLE_LIMIT = 2.4, 12 * 2 * math.pi / 360


def episode_ends(last_obs: Tensor) -> dict[str, int]:
    """How CartPole episodes ended, from their last observations (episodes, 4): x, x-dot,
    angle, angle-dot."""
    cart_out = last_obs[:, 0].abs() > CARTPOLE_X_LIMIT
    pole_fell = ~cart_out & (last_obs[:, 2].abs() > CARTPOLE_ANGLE_LIMIT)
    return {"cart_out": int(cart_out.sum()), "pole_fell": int(pole_fell.sum()),
            "time_limit": int((~cart_out & ~pole_fell).sum())}  # fmt: skip


def ridge_r2(x: Tensor, y: Tensor, train: Tensor, test: Tensor, lam: float = 10.0) -> list[float]:
    """Held-out R^2 per column of ``y`` of a ridge regression (with intercept) from ``x``."""
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1).double()
    y = y.double()
    gram = x[train].T @ x[train] + lam * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, x[train].T @ y[train])
    resid = y[test] - x[test] @ w
    return (1.0 - resid.var(0) / y[test].var(0)).tolist()


def probe(run_dir: str | Path, episodes: int = 20, seed: int = 10_000) -> dict[str, Any]:
    torch.manual_seed(0)
    with trained_agent(run_dir, agents=AGENTS) as (agent, env, ckpt):
        if len(agent.world_model.obs_shape) != 1:
            raise ValueError(f"{run_dir}: observations {agent.world_model.obs_shape}; the probe "
                             "reads vector observations only")  # fmt: skip
        agent.world_model.eval()
        played = play(agent, env, episodes, seed)
        reps = [representations(agent, o, a) for o, a in played]
        cartpole = ckpt["config"].env.startswith("gym/CartPole")
    rows = {k: torch.cat([r[k] for r in reps]) for k in reps[0]}
    n = rows["target"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train, test = order[: 2 * n // 3], order[2 * n // 3 :]
    names = ("embedding", "posterior_probs", "posterior_sample", "h", "h_and_sample")
    logp = rows["logp"]
    mse = (rows["recon"] - rows["target"]).pow(2).mean(0)
    return {
        "run": str(run_dir), "checkpoint_step": ckpt["step"], "episodes": episodes,
        "rows": n, "mean_episode_length": n / episodes,
        "posterior_entropy": float(-(logp.exp() * logp).sum(-1).mean()),
        "uniform_entropy": math.log(logp.shape[-1]),
        "probe_r2": {k: [round(v, 3) for v in ridge_r2(rows[k], rows["target"], train, test)]
                     for k in names},
        "recon_mse": [round(v, 4) for v in mse.tolist()],
        "obs_var": [round(v, 4) for v in rows["target"].var(0).tolist()],
        **({"episode_ends": episode_ends(torch.stack([o[-1] for o, _ in played]))}
           if cartpole else {}),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a Dreamer or TWISTER run folder with vector observations")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.episodes < 1:
        ap.error(f"--episodes {args.episodes}; accepted: an int >= 1")
    torch.set_num_threads(args.threads)
    out = probe(args.run_dir, args.episodes)
    # one key a line: the lists stay readable
    print("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()) + "\n}")


if __name__ == "__main__":
    main()
