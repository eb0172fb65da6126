"""A TWISTER-style transformer state-space model (TSSM) and action-conditioned CPC (AC-CPC).

State (the same keys as the RSSM's, plus the attention cache):
  ``deter`` (N, W): the transformer's output h_t; ``stoch`` (N, S*C) and ``logits`` (N, S, C):
  the latent z_t; ``k``, ``v`` (L, N, H, ctx + 1, W/H): a preallocated ring buffer of every
  block's keys and values over the last ``ctx`` tokens and the current one; ``valid``
  (N, ctx + 1): which slots hold a token of the current episode; ``slot``: a Python int, the
  ring slot written last (every state of a batch advances together, so the slot is shared and
  indexing needs no host sync).

Tokens: the token at step t is Mix([z_{t-1}, a_{t-1}]) (``action[t]`` is the action that led
to observation t, as in the RSSM), where Mix is TWISTER's action mixer, Linear -> LN -> SiLU ->
Linear -> LN without biases. At an episode start z_{t-1} is the learned initial latent (the
prior's mode at a learned h, zeros at first; straight-through, so both learn) and a_{t-1} = 0.
h_t, the output at token t, gives the prior p(z_t | h_t), a single Linear of h_t. The posterior
q(z_t | e_t) is a single Linear of the encoder's embedding alone, and the decoder sees z_t alone
(``decoder_feat``); the heads, actor and critic see [h_t, z_t].

Blocks are post-LN (x = LN(x + Drop(Attn(x))), x = LN(x + Drop(FF(x))), FF = Linear -> ReLU ->
Linear with no dropout inside, PyTorch's default init), causal, and a token attends to the
``ctx`` tokens before it and to itself (``ctx + 1`` positions; TWISTER's ``att_context_left``),
within its own episode.

Positions (``positions="xl"``, the default): Transformer-XL's relative attention, as in
TWISTER's ``RelPosMultiHeadSelfAttention``. The score of query i for key j at distance
d = i - j is ((q_i + u) . k_j + (q_i + v) . W_r s(d)) / sqrt(head dim), where s(d) is the
sinusoidal encoding of d over the model width (sin on even, cos on odd features, wavelengths
10000^(2m/W)), W_r a learned projection with bias, and u, v learned per block (zeros at first).
``positions="learned"`` instead adds a learned bias per block, head and distance (a T5-style
table; flatworld's earlier choice, kept as an option). Either depends on the distance only, so a
ring buffer of keys serves any start position: the cached path takes the same d for each slot,
and the parallel and the cached paths compute the very same numbers.

Training (``observe``) runs all tokens of a (T, B) batch in parallel under a mask (causal,
window, same episode). Acting and imagination add one token per step to the ring buffer: under
no_grad (acting, and imagination with discrete actions) the buffer is written in place, so a
step costs one token and no copy; with gradient (continuous actions backpropagate through the
rollout) each step builds new buffers (one copy per step), as autograd needs the old ones. A state
therefore hands its buffer on: after a step, the previous state dict must not be stepped again.
Dropout acts in the parallel training pass only; acting and imagination run the network
deterministically (their start states are the training pass's own, dropout included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatworld.agents.dreamer.networks import LN_EPS, OneHotFeat, feed, init_, onehot_rows
from flatworld.agents.dreamer.rssm import _split_linear
from flatworld.agents.dreamer.sequence import (
    SequenceModel,
    State,
    latent_index,
    straight_through_onehot,
    unimix_logits,
)
from flatworld.nn.linear import Linear


def _dropout(x: Tensor, p: float, active: bool) -> Tensor:
    """The one dropout of the TSSM (a seam tests spy on: its masks come from the global RNG)."""
    return F.dropout(x, p, training=True) if active and p > 0.0 else x


def _dist_linear(in_dim: int, latent: int) -> Linear:
    """A latent's logits from one Linear (TWISTER's prior and posterior heads: Xavier-uniform
    weights, zero bias)."""
    layer = Linear(in_dim, latent)
    with torch.no_grad():
        nn.init.xavier_uniform_(layer.weight)
        layer.bias.zero_()
    return layer


POSITIONS = ("xl", "learned")


def sinusoid_table(distances: int, width: int) -> Tensor:
    """(distances, width): Transformer-XL's encoding of the distances 0..distances-1, sin on the
    even features and cos on the odd ones, feature pair m at wavelength 10000^(2m / width)."""
    d = torch.arange(distances, dtype=torch.float32)[:, None]
    angle = d / 10000 ** (2 * torch.arange(width // 2, dtype=torch.float32)[None] / width)
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(-2)


class Block(nn.Module):
    """One post-LN transformer block: multi-head self-attention with relative positions, then a
    2-layer ReLU MLP. Query, key, value and output projections carry biases (PyTorch's default
    init), as TWISTER's attention does."""

    def __init__(self, width: int, heads: int, ff_mult: int, context: int,
                 positions: str = "xl") -> None:  # fmt: skip
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}; accepted: one of {POSITIONS}")
        self.heads, self.head_dim, self.positions = heads, width // heads, positions
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.ff1 = Linear(width, ff_mult * width)
        self.ff2 = Linear(ff_mult * width, width)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        if positions == "xl":
            self.pos_proj = Linear(width, width)
            self.u = nn.Parameter(torch.zeros(width))  # content bias
            self.v = nn.Parameter(torch.zeros(width))  # position bias
            self.register_buffer("sinusoid", sinusoid_table(context + 1, width),
                                 persistent=False)  # fmt: skip
        else:
            self.rel_bias = nn.Parameter(torch.zeros(heads, context + 1))

    def ff(self, x: Tensor) -> Tensor:
        return self.ff2(F.relu(self.ff1(x)))

    def scores(self, q: Tensor, k: Tensor, dist: Tensor) -> Tensor:
        """Attention logits (..., H, Tq, Tk) of queries q (..., H, Tq, hd) for keys
        k (..., H, Tk, hd) at distances ``dist`` (Tq, Tk) in 0..ctx (clamped where masked)."""
        scale = self.head_dim**-0.5
        if self.positions == "learned":
            return (q * scale) @ k.transpose(-1, -2) + self.rel_bias[:, dist]
        heads = (self.heads, self.head_dim)
        u, v = self.u.view(*heads, 1).transpose(-1, -2), self.v.view(*heads, 1).transpose(-1, -2)
        r = self.pos_proj(self.sinusoid.to(q.dtype)).view(-1, *heads).transpose(0, 1)
        # (q + v) . r per head as one (H, rows, hd) x (H, hd, ctx + 1) product: a broadcast
        # matmul would expand r to every row first (10x slower in cached imagination).
        qv = (q + v).movedim(-3, 0)  # (H, ..., Tq, hd)
        by_distance = (qv.reshape(self.heads, -1, self.head_dim) @ r.transpose(-1, -2))
        by_distance = by_distance.view(*qv.shape[:-1], -1).movedim(0, -3)  # (..., H, Tq, ctx+1)
        pos = by_distance.gather(-1, dist.expand(*by_distance.shape[:-1], dist.shape[-1]))
        return ((q + u) @ k.transpose(-1, -2) + pos) * scale


class TSSM(SequenceModel):
    def __init__(self, embed_dim: int, action_dim: int, width: int = 512, blocks: int = 4,
                 heads: int = 8, ff_mult: int = 2, dropout: float = 0.1, context: int = 8,
                 stoch: int = 32, classes: int = 32, unimix: float = 0.01,
                 positions: str = "xl") -> None:  # fmt: skip
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not a multiple of heads={heads}")
        self.width, self.heads, self.context, self.dropout = width, heads, context, dropout
        self.slots = context + 1  # the ring holds the context and the token being added
        self.stoch, self.classes, self.unimix, self.action_dim = stoch, classes, unimix, action_dim
        latent = stoch * classes
        self.feat_dim = width + latent
        stoch_in, self.tok_action = _split_linear((latent, action_dim), width)
        # The latent's share, as rows (latent, width): a one-hot latent sums them, untransposed.
        self.tok_rows = nn.Parameter(stoch_in.weight.detach().t().contiguous())
        self.tok_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.tok_out = Linear(width, width, bias=False)
        init_(self.tok_out)
        self.tok_out_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.blocks = nn.ModuleList(Block(width, heads, ff_mult, context, positions)
                                    for _ in range(blocks))  # fmt: skip
        self.prior_net = _dist_linear(width, latent)
        self.post_net = _dist_linear(embed_dim, latent)
        self.initial_deter = nn.Parameter(torch.zeros(width))
        # dist[c, j]: the distance from the token in ring slot c (written last) to slot j.
        ar = torch.arange(self.slots)
        self.register_buffer("ring_dist", (ar[:, None] - ar[None]) % self.slots,
                             persistent=False)  # fmt: skip

    # ---- pieces ----------------------------------------------------------------------------
    def token(self, prev_stoch: Tensor, action: Tensor, index: Tensor | None = None) -> Tensor:
        """The token Mix([z_{t-1}, a_{t-1}]), (..., W). Given ``index``, the columns of the 1s
        of z (a one-hot in every group), the first layer reads z by row sums."""
        lead = prev_stoch.shape[:-1]
        z = prev_stoch.reshape(-1, prev_stoch.shape[-1])
        if index is not None:
            x = onehot_rows(z, index.reshape(-1, index.shape[-1]), self.tok_rows)
        else:
            x = (z @ self.tok_rows).float()  # autocast's bf16 product: the addmm_ is fp32
        x = x.addmm_(action.reshape(-1, action.shape[-1]), self.tok_action.weight.t())
        # fp32 into the last norm: under autocast the residual stream stays fp32 (a CPU's
        # autocast keeps LayerNorm in its input's dtype).
        x = self.tok_out_norm(self.tok_out(F.silu(self.tok_norm(x))).float())
        return x.reshape(*lead, self.width)

    def initial_latent(self) -> Tensor:
        """(S*C,) the learned initial z: the prior's mode at ``initial_deter``, straight-through
        (the prior and ``initial_deter`` learn from the episode-start tokens that read it)."""
        logp = unimix_logits(self.prior_net(self.initial_deter).float()
                             .unflatten(-1, (self.stoch, self.classes)), self.unimix)  # fmt: skip
        return straight_through_onehot(logp.argmax(-1), logp).flatten(-2)

    def forward_tokens(self, tokens: Tensor, start: Tensor, dropout: bool = False
                       ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """The uncached, parallel pass: tokens (T, B, W), ``start`` (T, B) bool marks episode
        starts (t = 0 always counts as one). Returns h (T, B, W) and every block's keys and
        values (T, B, L, H, W/H)."""
        steps, batch = tokens.shape[:2]
        heads, hd, p = self.heads, self.width // self.heads, self.dropout
        episode = (start | (torch.arange(steps, device=start.device) == 0)[:, None]).cumsum(0)
        ep = episode.t()  # (B, T)
        pos = torch.arange(steps, device=tokens.device)
        dist = pos[:, None] - pos[None]  # (T, T): query i minus key j
        allowed = ((dist >= 0) & (dist <= self.context))[None] & (ep[:, :, None] == ep[:, None])
        neg = torch.zeros(allowed.shape, dtype=tokens.dtype, device=tokens.device)
        neg = neg.masked_fill(~allowed, float("-inf"))[:, None]  # (B, 1, T, T)
        idx = dist.clamp(0, self.context)
        x = tokens.transpose(0, 1)  # (B, T, W)
        ks, vs = [], []
        for block in self.blocks:
            q, k, v = block.qkv(x).view(batch, steps, 3, heads, hd).permute(2, 0, 3, 1, 4)
            scores = block.scores(q, k, idx) + neg
            attn = _dropout(torch.softmax(scores, -1), p, dropout)
            o = (attn @ v).transpose(1, 2).reshape(batch, steps, self.width)
            x = block.norm1(x + _dropout(block.proj(o), p, dropout))
            x = block.norm2(x + _dropout(block.ff(x), p, dropout))
            ks.append(k)
            vs.append(v)
        # (L, B, H, T, hd) -> (T, B, L, H, hd) views
        k_all = torch.stack(ks).permute(3, 1, 0, 2, 4)
        v_all = torch.stack(vs).permute(3, 1, 0, 2, 4)
        return x.transpose(0, 1), k_all, v_all

    def _step(self, state: State, token: Tensor) -> tuple[Tensor, State]:
        """One token per state through the cache: h (N, W) and the advanced cache."""
        keys, vals, valid = state["k"], state["v"], state["valid"]
        in_place = not torch.is_grad_enabled()  # autograd needs the old buffers: no writes
        slot = (int(state["slot"]) + 1) % self.slots  # a Python int: no host sync
        if not in_place:
            valid = valid.clone()
        valid[:, slot] = True
        n, heads, hd = token.shape[0], self.heads, self.width // self.heads
        neg = torch.zeros(valid.shape, dtype=token.dtype, device=token.device)
        neg = neg.masked_fill(~valid, float("-inf"))[:, None]  # (N, 1, ctx)
        dist = self.ring_dist[slot]
        here = (dist == 0)[:, None]  # (ctx + 1, 1): the slot being written
        new_k, new_v = [], []
        x = token
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv(x).view(n, 3, heads, hd).unbind(1)  # (N, H, hd)
            if in_place:
                keys[i, :, :, slot] = k
                vals[i, :, :, slot] = v
                kb, vb = keys[i], vals[i]
            else:  # a new buffer per block (one copy per step, with gradient only)
                kb = torch.where(here, k[:, :, None], keys[i])
                vb = torch.where(here, v[:, :, None], vals[i])
                new_k.append(kb)
                new_v.append(vb)
            scores = block.scores(q[:, :, None], kb, dist[None]).squeeze(-2)  # (N, H, ctx + 1)
            attn = torch.softmax(scores + neg, -1)
            o = (attn[:, :, None] @ vb).reshape(n, self.width)
            x = block.norm1(x + block.proj(o))
            x = block.norm2(x + block.ff(x))
        if not in_place:
            keys, vals = torch.stack(new_k), torch.stack(new_v)
        return x, {"k": keys, "v": vals, "valid": valid, "slot": slot}

    # ---- the interface ---------------------------------------------------------------------
    def initial(self, batch_size: int) -> State:
        ref = self.initial_deter
        hd, latent = self.width // self.heads, self.stoch * self.classes
        shape = (len(self.blocks), batch_size, self.heads, self.slots, hd)
        z = self.initial_latent()
        logp = torch.full((batch_size, self.stoch, self.classes), -math.log(self.classes),
                          device=ref.device, dtype=ref.dtype)  # fmt: skip
        return {"deter": ref.new_zeros(batch_size, self.width),
                "stoch": z.detach().expand(batch_size, latent).clone(), "logits": logp,
                "k": ref.new_zeros(shape), "v": ref.new_zeros(shape),
                "valid": torch.zeros(batch_size, self.slots, dtype=torch.bool,
                                     device=ref.device),
                "slot": self.slots - 1}  # fmt: skip

    @property
    def decoder_dim(self) -> int:
        return self.stoch * self.classes

    def decoder_feat(self, state: State) -> OneHotFeat:  # the decoder sees z only, as published
        z = state["stoch"]
        return OneHotFeat(z[..., :0], z, latent_index(state, self.stoch))

    def obs_step(self, state: State, action: Tensor, embed: Tensor,
                 sample: bool = True) -> State:  # fmt: skip
        h, cache = self._step(state, self.token(state["stoch"], action))
        stoch, logp, _ = self._latent(self.post_net(embed), sample)
        return {"deter": h, "stoch": stoch, "logits": logp, **cache}

    def imagine_step(self, state: State, action: Tensor, sample: bool = True) -> State:
        # Imagination starts from posterior samples: every latent it reads is one-hot.
        index = latent_index(state, self.stoch)
        h, cache = self._step(state, self.token(state["stoch"], action, index))
        stoch, logp, index = self._latent(self.prior_net(h), sample)
        return {"deter": h, "stoch": stoch, "logits": logp, "index": index, **cache}

    def observe(self, embed: Tensor, action: Tensor, is_first: Tensor,
                state: State | None = None) -> tuple[State, State, Tensor]:  # fmt: skip
        """All T steps at once. ``state`` gives only the latent before the first token (its
        cache is not attended to: replayed sequences start an episode at t = 0)."""
        stoch, logp, index = self._latent(self.post_net(embed), True)
        z0 = self.initial_latent()
        prev0 = (z0.expand_as(stoch[0]) if state is None else state["stoch"])[None]
        start = is_first[..., 0] > 0
        prev = torch.where(start[..., None], z0, torch.cat([prev0, stoch[:-1]]))
        tokens = self.token(prev, action * (~start)[..., None].to(action.dtype))
        h, k, v = self.forward_tokens(tokens, start, dropout=self.training)
        # A prior sample (straight-through), as published: AC-CPC predicts from [h_t, z_t ~ prior].
        prior_stoch, prior_logp, prior_index = self._latent(self.prior_net(h), True)
        post = {"deter": h, "stoch": stoch, "logits": logp, "index": index, "k": k, "v": v,
                "start": start}  # fmt: skip
        prior = {"deter": h, "stoch": prior_stoch, "logits": prior_logp, "index": prior_index}
        return post, prior, self.feat(post)

    def posterior_sample(self, embed: Tensor) -> OneHotFeat:
        """A sample (straight-through) of q(z | e) for embeddings (..., E), with the columns
        of its 1s: AC-CPC's targets."""
        z, _, index = self._latent(self.post_net(embed), True)
        return OneHotFeat(z[..., :0], z, index)

    def imagine_start(self, post: State) -> State:
        """Every posterior state of a (T, B) batch as (T*B) start states, each with its own
        token and the ``context`` tokens of its episode before it gathered into the cache."""
        steps, batch = post["stoch"].shape[:2]
        slots = self.slots
        start = post["start"].clone()
        start[0] = True
        episode = start.long().cumsum(0)  # (T, B)

        def windows(x: Tensor, fill: float) -> Tensor:  # (T, B, ...) -> (T, B, ..., slots)
            pad = torch.full((slots - 1, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
            return torch.cat([pad, x]).unfold(0, slots, 1)

        def cache(x: Tensor) -> Tensor:  # (T, B, L, H, hd) -> (L, T*B, H, slots, hd)
            # Overlapping windows are views of one another: copy them into a fresh buffer (a
            # reshape could return a view, and a step's in-place write would reach neighbours).
            w = windows(x.detach(), 0.0).permute(2, 0, 1, 3, 5, 4)  # (L, T, B, H, slots, hd)
            out = x.new_empty(w.shape)
            out.copy_(w)
            return out.flatten(1, 2)

        valid = windows(episode, -1) == episode[..., None]  # (T, B, slots), the last is t
        out = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch", "logits", "index")}
        return {**out, "k": cache(post["k"]), "v": cache(post["v"]),
                "valid": valid.flatten(0, 1), "slot": slots - 1}  # fmt: skip


# ---- AC-CPC --------------------------------------------------------------------------------
def info_nce(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """InfoNCE with dot products and in-batch negatives: row i of ``pred`` (M, P) should pick
    row i of ``target`` (M, P) among all M. The mean over rows weighted by ``weight`` (M,)."""
    logits = (pred @ target.t()).float()  # the logsumexp in fp32, also under autocast
    loss = torch.logsumexp(logits, -1) - logits.diagonal()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def random_boxes(n: int, device: torch.device | str, min_scale: float = 0.25,
                 max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3)
                 ) -> Tensor:  # fmt: skip
    """(n, 4) crop boxes (x0, y0, w, h) as fractions of the image: area ~ U(min, max), aspect
    log-uniform in ``ratio`` (RandomResizedCrop's ranges, with sides clipped to the image
    instead of redrawn), position uniform. Drawn from the global RNG (replayed by SAM)."""
    u = torch.rand(n, 4, device=device)
    area = min_scale + (max_scale - min_scale) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * log_r.exp()).sqrt().clamp_max(1.0)
    h = (area / log_r.exp()).sqrt().clamp_max(1.0)
    return torch.stack([u[:, 2] * (1 - w), u[:, 3] * (1 - h), w, h], -1)


def resized_crop(x: Tensor, boxes: Tensor) -> Tensor:
    """Crop every image of x (N, C, H, W) to its box and resize it back to (H, W), bilinear,
    all in one affine_grid + grid_sample."""
    x0, y0, w, h = boxes.unbind(-1)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, 2 * x0 + w - 1], -1),
                         torch.stack([zero, h, 2 * y0 + h - 1], -1)], 1)  # fmt: skip
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _projection(in_dim: int, units: int) -> nn.Sequential:
    """One side of an AC-CPC head, as in TWISTER's code: Linear, ELU, Linear, ELU (its MLP
    applies the activation after every layer, the last one included; PyTorch's default init)."""
    return nn.Sequential(Linear(in_dim, units), nn.ELU(), Linear(units, units), nn.ELU())


class ACCPC(nn.Module):
    """Action-conditioned CPC, as in TWISTER: head k (k = 0..K-1) projects the prior feature
    [h_t, z_t ~ p(z_t | h_t)] with the actions that lead to observations t+1..t+k, and,
    separately, the posterior sample z of the augmented observation t+k; InfoNCE over the
    batch, weighted by decay^k (normalised). Step 0 predicts observation t itself from what
    came before it (h_t has seen tokens up to t, that is z_{t-1} and the action into t)."""

    def __init__(self, feat_dim: int, latent_dim: int, action_dim: int, steps: int = 10,
                 units: int = 512, decay: float = 0.75) -> None:  # fmt: skip
        super().__init__()
        self.steps, self.decay, self.action_dim = steps, decay, action_dim
        self.heads = nn.ModuleList(_projection(feat_dim + k * action_dim, units)
                                   for k in range(steps))  # fmt: skip
        self.targets = nn.ModuleList(_projection(latent_dim, units) for _ in range(steps))

    def weights(self, steps: int) -> list[float]:
        w = [self.decay**k for k in range(steps)]
        return [x / sum(w) for x in w]

    def forward(self, prior_feat: Tensor | OneHotFeat, action: Tensor,
                target_z: Tensor | OneHotFeat, is_first: Tensor) -> Tensor:  # fmt: skip
        """prior_feat (T, B, F); action (T, B, A), ``action[t]`` leads to observation t;
        target_z (T, B, S*C): posterior samples of the augmented observations; is_first
        (T, B, 1). A pair whose steps t+1..t+k hold an episode start is left out (it still
        serves as a negative). Given as ``OneHotFeat`` (the world model's one-hot samples),
        the heads' first layers read the latents by row sums instead of dense products."""
        steps = min(self.steps, len(is_first))
        first = is_first[..., 0]
        loss = is_first.new_zeros(())
        for k, w in zip(range(steps), self.weights(steps), strict=True):
            n = len(is_first) - k
            acts = None
            if k:
                acts = action[1:].unfold(0, k, 1).transpose(-1, -2).flatten(-2)  # (n, B, k*A)
                keep = (first[1:].unfold(0, k, 1).sum(-1) == 0).to(loss.dtype)
            else:
                keep = torch.ones_like(first)
            pred = feed(self.heads[k], prior_feat[:n], acts)
            target = feed(self.targets[k], target_z[k:])
            loss = loss + w * info_nce(pred.flatten(0, 1), target.flatten(0, 1), keep.flatten())
        return loss
