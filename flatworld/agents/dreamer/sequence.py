"""The sequence-model seam of the Dreamer family, and the categorical latents it shares.

The agent talks to its sequence model (the RSSM, or the transformer TSSM) only through
:class:`SequenceModel`. A state is a dict of tensors with leading batch dims; every state holds
``stoch`` (flattened one-hot samples, straight-through) and ``logits`` (the log-probabilities of
the categorical latents, after the uniform mixture), and ``feat(state)`` = [``deter``,
``stoch``] is what the heads, the actor and the critic see; the decoder sees
``decoder_feat(state)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatworld.agents.dreamer.networks import OneHotFeat, onehot_index

State = dict[str, Tensor]


class SequenceModel(nn.Module):
    """What the Dreamer agent needs from a sequence model.

    - ``initial(batch_size)``: the state before an episode's first observation;
    - ``observe(embed (T,B,E), action (T,B,A), is_first (T,B,1), state=None)``:
      ``(post, prior, feat)``; ``action[t]`` is the action that led to observation ``t``;
      where ``is_first`` is 1 the state and the previous action are reset first;
    - ``obs_step(state, action, embed, sample)``: one step of ``observe`` (acting);
    - ``imagine_step(state, action, sample)``: the prior's next state, without an observation;
      the state's latent must be one-hot (a sample or a mode: see ``networks.onehot_matmul``).
      The state it returns also holds ``index``, the columns of the latent's 1s, so that the
      next step and the heads read the latent without an argmax;
    - ``imagine_start(post)``: every posterior state of a (T, B) batch as (T*B) start states.
    - ``decoder_feat(state)`` (``decoder_dim`` wide, a ``OneHotFeat``): what the decoder
      sees; by default the same as ``feat`` (DreamerV3). The transformer's decoder sees the
      latent only.

    A state may also hold non-tensor entries (the transformer's ring-buffer slot, an int);
    callers that copy states copy tensors and keep the rest.
    """

    feat_dim: int
    stoch: int  # categorical latents ...
    classes: int  # ... of this many classes each
    unimix: float

    # Both sequence models draw their latents the same way.
    def _noise(self, logp: Tensor) -> Tensor:
        """Uniform noise for one draw of every latent (the model's only randomness)."""
        return torch.rand(*logp.shape[:-1], 1, device=logp.device, dtype=logp.dtype)

    def _latent(self, logits: Tensor, sample: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(one-hot latents (..., stoch * classes), their log-probabilities (..., stoch,
        classes), the flat columns of their 1s (..., stoch)) from logits, sampled
        (straight-through) or the mode. The columns spare the next layer an argmax."""
        logits = logits.float()  # the latents' distributions in fp32, also under autocast
        logp = unimix_logits(logits.unflatten(-1, (self.stoch, self.classes)), self.unimix)
        if sample:
            cls = sample_classes(logp, self._noise(logp))
            z = straight_through_onehot(cls, logp)
        else:
            cls = logp.argmax(-1)
            z = F.one_hot(cls, self.classes).to(logp.dtype)
        offsets = torch.arange(0, self.stoch * self.classes, self.classes, device=cls.device)
        return z.flatten(-2), logp, cls + offsets

    @property
    def decoder_dim(self) -> int:
        return self.feat_dim

    def decoder_feat(self, state: State) -> OneHotFeat:
        return self.onehot_feat(state)

    def initial(self, batch_size: int) -> State:
        raise NotImplementedError

    def observe(self, embed: Tensor, action: Tensor, is_first: Tensor,
                state: State | None = None) -> tuple[State, State, Tensor]:  # fmt: skip
        raise NotImplementedError

    def obs_step(self, state: State, action: Tensor, embed: Tensor,
                 sample: bool = True) -> State:  # fmt: skip
        raise NotImplementedError

    def imagine_step(self, state: State, action: Tensor, sample: bool = True) -> State:
        raise NotImplementedError

    def feat(self, state: State) -> Tensor:
        return torch.cat([state["deter"], state["stoch"]], -1)

    def onehot_feat(self, state: State) -> OneHotFeat:
        """``feat(state)`` in its two parts (the latent is one-hot): cheaper first layers."""
        return OneHotFeat(state["deter"], state["stoch"], latent_index(state, self.stoch))

    def imagine_start(self, post: State) -> State:
        return {k: v.detach().flatten(0, 1) for k, v in post.items()}


# ---- categorical latents -----------------------------------------------------------------
def unimix_logits(logits: Tensor, unimix: float) -> Tensor:
    """Log-probabilities of (1 - unimix) softmax(logits) + unimix / classes, over the last dim."""
    if unimix == 0.0:
        return F.log_softmax(logits, dim=-1)
    probs = F.softmax(logits, dim=-1) * (1.0 - unimix) + unimix / logits.shape[-1]
    return probs.log()


def sample_classes(logp: Tensor, noise: Tensor) -> Tensor:
    """Samples (...) of categoricals ``logp`` (..., C) by inverse CDF from uniform ``noise``
    (..., 1)."""
    below = logp.exp().cumsum(-1) < noise
    return below.sum(-1).clamp_max(logp.shape[-1] - 1)


def straight_through_onehot(cls: Tensor, logp: Tensor) -> Tensor:
    """One-hot ``cls`` (..., C) with the probabilities' gradient (straight-through)."""
    hard = torch.zeros_like(logp).scatter_(-1, cls[..., None], 1.0)
    if logp.requires_grad:
        probs = logp.exp()
        hard = hard + (probs - probs.detach())
    return hard


def onehot_sample(logp: Tensor, noise: Tensor) -> Tensor:
    """One-hot samples of categoricals ``logp`` (..., C) by inverse CDF from uniform ``noise``
    (..., 1), with straight-through gradients (one-hot forward, the probabilities' backward)."""
    return straight_through_onehot(sample_classes(logp, noise), logp)


def onehot_mode(logp: Tensor) -> Tensor:
    return F.one_hot(logp.argmax(-1), logp.shape[-1]).to(logp.dtype)


def latent_index(state: State, groups: int) -> Tensor:
    """The flat columns (..., groups) of the 1s of ``state["stoch"]``: kept by the state that
    sampled them (imagination), found by argmax otherwise."""
    index = state.get("index")
    return onehot_index(state["stoch"], groups) if index is None else index


def kl_terms(post: Tensor, prior: Tensor, free_bits: float) -> tuple[Tensor, Tensor, Tensor]:
    """KL balancing with free bits on latents (..., S, C) of log-probabilities.

    Returns (dyn, rep, kl), each (...): dyn = max(free, KL(sg(post) || prior)) trains the prior,
    rep = max(free, KL(post || sg(prior))) trains the posterior, kl = KL(post || prior) (no
    gradient, no floor). KLs are summed over the S latents.
    """
    p = post.exp()
    p_sg, post_sg, prior_sg = p.detach(), post.detach(), prior.detach()
    dyn = (p_sg * (post_sg - prior)).sum((-2, -1))
    rep = (p * (post - prior_sg)).sum((-2, -1))
    kl = (p_sg * (post_sg - prior_sg)).sum((-2, -1))
    return dyn.clamp_min(free_bits), rep.clamp_min(free_bits), kl
