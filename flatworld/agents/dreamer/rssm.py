"""DreamerV3's recurrent state-space model (RSSM).

State: ``deter`` (B, D), the GRU state; ``stoch`` (B, S*C), one-hot samples of S categorical
latents with C classes each; ``logits`` (B, S, C), their log-probabilities (1% uniform mixture).

One step: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]); prior p(z_t | h_t); posterior q(z_t | h_t, e_t)
from the observation's embedding e_t. The GRU is DreamerV3's: one LayerNorm'd linear layer gives
the reset, candidate and update gates, and the update gate is biased towards keeping the state.

``observe`` runs the posterior through a sequence. Only what the next step needs stays inside
the time loop: the embedding's share of the posterior layer is one matmul over the whole sequence
before the loop, and the prior, which no later step reads, one batched call after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatworld.agents.dreamer.networks import LN_EPS, Dense, init_, onehot_index, onehot_rows
from flatworld.agents.dreamer.sequence import (
    SequenceModel,
    State,
)
from flatworld.nn.linear import Linear, add_linear_


class RSSM(SequenceModel):
    def __init__(self, embed_dim: int, action_dim: int, deter: int = 512, units: int = 512,
                 stoch: int = 32, classes: int = 32, unimix: float = 0.01) -> None:  # fmt: skip
        super().__init__()
        self.deter, self.stoch, self.classes, self.unimix = deter, stoch, classes, unimix
        self.action_dim = action_dim
        latent = stoch * classes
        self.feat_dim = deter + latent
        # Layers that read a concatenation [x, y] are kept as one matrix per input (no copy
        # into a concatenated tensor every step), initialised as the one layer they stand for.
        stoch_in, self.img_in_action = _split_linear((latent, action_dim), units)
        # The latent's share, as rows (latent, units): a one-hot latent sums them, untransposed.
        self.img_in_rows = nn.Parameter(stoch_in.weight.detach().t().contiguous())
        self.img_in_norm = nn.LayerNorm(units, eps=LN_EPS)
        self.gru_x, self.gru_h = _split_linear((units, deter), 3 * deter)
        self.gru_norm = nn.LayerNorm(3 * deter, eps=LN_EPS)
        self.img_out = Dense(deter, units)
        self.prior_logits = Linear(units, latent)
        init_(self.prior_logits)
        # The posterior's first layer sees [h_t, e_t]; the e_t part runs once per sequence.
        self.obs_deter, self.obs_embed = _split_linear((deter, embed_dim), units)
        self.obs_norm = nn.LayerNorm(units, eps=LN_EPS)
        self.post_logits = Linear(units, latent)
        init_(self.post_logits)
        self.init_deter = nn.Parameter(torch.zeros(deter))  # learned initial state, tanh'd

    # ---- pieces ----------------------------------------------------------------------------
    def _gru_step(self, deter: Tensor, stoch: Tensor, action: Tensor,
                  index: Tensor | None = None) -> Tensor:  # fmt: skip
        # addmm_ into fresh outputs: an out-of-place addmm would copy them first.
        index = onehot_index(stoch, self.stoch) if index is None else index
        x = onehot_rows(stoch, index, self.img_in_rows)
        x = F.silu(self.img_in_norm(x.addmm_(action, self.img_in_action.weight.t())))
        gates = self.gru_x(x)  # bf16 under autocast, which casts out-of-place ops only
        gates = self.gru_norm(add_linear_(gates, deter.to(gates.dtype),
                                          self.gru_h.weight.to(gates.dtype)))
        reset, cand, update = gates.chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        return deter + update * (cand - deter)

    def _prior(self, deter: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        return self._latent(self.prior_logits(self.img_out(deter)), sample)

    def _post(self, deter: Tensor, embed_part: Tensor, sample: bool = True
              ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        x = F.silu(self.obs_norm(self.obs_deter(deter) + embed_part))
        return self._latent(self.post_logits(x), sample)

    # ---- the interface ---------------------------------------------------------------------
    def initial(self, batch_size: int) -> State:
        deter = torch.tanh(self.init_deter).expand(batch_size, -1)
        stoch, logp, _ = self._prior(deter, sample=False)
        return {"deter": deter, "stoch": stoch, "logits": logp}

    def obs_step(self, state: State, action: Tensor, embed: Tensor,
                 sample: bool = True) -> State:  # fmt: skip
        deter = self._gru_step(state["deter"], state["stoch"], action)
        stoch, logp, _ = self._post(deter, self.obs_embed(embed), sample)
        return {"deter": deter, "stoch": stoch, "logits": logp}

    def imagine_step(self, state: State, action: Tensor, sample: bool = True) -> State:
        deter = self._gru_step(state["deter"], state["stoch"], action, state.get("index"))
        stoch, logp, index = self._prior(deter, sample)
        return {"deter": deter, "stoch": stoch, "logits": logp, "index": index}

    def observe(self, embed: Tensor, action: Tensor, is_first: Tensor,
                state: State | None = None) -> tuple[State, State, Tensor]:  # fmt: skip
        steps, batch = embed.shape[:2]
        init = self.initial(batch)
        deter, stoch = (init["deter"], init["stoch"]) if state is None else (
            state["deter"], state["stoch"])  # fmt: skip
        keep = 1.0 - is_first
        action = action * keep  # no action leads to an episode's first observation
        embed_part = self.obs_embed(embed)
        deters, stochs, logps, indices = [], [], [], []
        for t in range(steps):
            # Reset to the initial state where an episode starts (arithmetic, not a branch:
            # no host sync, and the initial state keeps its gradient).
            deter = deter * keep[t] + init["deter"] * is_first[t]
            stoch = stoch * keep[t] + init["stoch"] * is_first[t]
            deter = self._gru_step(deter, stoch, action[t])
            stoch, logp, index = self._post(deter, embed_part[t])
            deters.append(deter)
            stochs.append(stoch)
            logps.append(logp)
            indices.append(index)
        post = {"deter": torch.stack(deters), "stoch": torch.stack(stochs),
                "logits": torch.stack(logps), "index": torch.stack(indices)}  # fmt: skip
        prior_stoch, prior_logp, _ = self._prior(post["deter"], sample=False)  # only logits used
        prior = {"deter": post["deter"], "stoch": prior_stoch, "logits": prior_logp}
        return post, prior, self.feat(post)


def _split_linear(in_dims: tuple[int, int], out_dim: int) -> tuple[Linear, Linear]:
    """Two bias-free Linears whose sum is a Linear on the concatenated inputs (same init)."""
    fan = (sum(in_dims) + out_dim) / 2
    a, b = (Linear(d, out_dim, bias=False) for d in in_dims)
    init_(a, fan=fan)
    init_(b, fan=fan)
    return a, b
