"""Dreamer's world model: encoder, sequence model, decoder, reward and continue heads (and, with
the transformer, the AC-CPC heads), and its loss. Everything here is trained by the one
world-model optimizer (``cfg.wm_optim``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from flatworld.agents.dreamer.config import SEQUENCE_MODELS, DreamerConfig
from flatworld.agents.dreamer.networks import (
    ConvDecoder,
    ConvEncoder,
    MLPDecoder,
    MLPEncoder,
    OneHotFeat,
    compute_precision,
    feed,
    mlp,
    preprocess,
    recon_loss,
)
from flatworld.agents.dreamer.rssm import RSSM
from flatworld.agents.dreamer.sequence import SequenceModel, State, kl_terms
from flatworld.agents.dreamer.transformer import ACCPC, TSSM, random_boxes, resized_crop
from flatworld.nn import TwoHot, soft_cross_entropy


def make_sequence_model(cfg: DreamerConfig, embed_dim: int, action_dim: int) -> SequenceModel:
    d = cfg.dims()
    if cfg.sequence_model == "rssm":
        return RSSM(embed_dim, action_dim, d["deter"], d["units"], cfg.stoch, cfg.classes,
                    cfg.unimix)  # fmt: skip
    if cfg.sequence_model == "transformer":
        return TSSM(embed_dim, action_dim, cfg.tssm_width, cfg.tssm_blocks, cfg.tssm_heads,
                    cfg.tssm_ff_mult, cfg.tssm_dropout, cfg.tssm_context, cfg.stoch,
                    cfg.classes, cfg.unimix, cfg.tssm_positions)  # fmt: skip
    raise ValueError(f"sequence_model={cfg.sequence_model!r}; accepted: {SEQUENCE_MODELS}")


class WorldModel(nn.Module):
    def __init__(self, cfg: DreamerConfig, obs_shape: Sequence[int], action_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dims()
        self.obs_shape = tuple(obs_shape)
        self.pixels = len(self.obs_shape) == 3
        if not self.pixels and len(self.obs_shape) != 1:
            raise ValueError(f"obs_shape={self.obs_shape}; accepted: (C, 64, 64) or (dim,)")
        if self.pixels:
            self.encoder: nn.Module = ConvEncoder(self.obs_shape, d["cnn_depth"])
        else:
            self.encoder = MLPEncoder(self.obs_shape[0], *reversed(cfg.vector_dims()))
        self.seq = make_sequence_model(cfg, self.encoder.out_dim, action_dim)
        feat, dec = self.seq.feat_dim, self.seq.decoder_dim
        if self.pixels:
            self.decoder: nn.Module = ConvDecoder(dec, self.obs_shape, d["cnn_depth"])
        else:
            self.decoder = MLPDecoder(dec, self.obs_shape[0], *reversed(cfg.vector_dims()))
        self.reward = mlp(feat, d["units"], d["layers"], cfg.num_bins, out_scale=0.0)
        self.cont = mlp(feat, d["units"], d["layers"], 1)
        self.two_hot = TwoHot(cfg.num_bins, cfg.bin_min, cfg.bin_max)
        # AC-CPC comes with the transformer (TWISTER); its heads are world-model parameters.
        self.cpc: ACCPC | None = None
        if cfg.sequence_model == "transformer" and cfg.cpc_steps > 0 and cfg.cpc_scale > 0:
            self.cpc = ACCPC(feat, cfg.stoch * cfg.classes, action_dim, cfg.cpc_steps,
                             d["units"], cfg.cpc_decay)  # fmt: skip

    def augment(self, obs: Tensor) -> Tensor:
        """AC-CPC's targets: a random resized crop of every frame (..., C, H, W), one batched
        op, from the global RNG (so SAM's passes replay it); vectors pass unchanged."""
        if not self.pixels:
            return obs
        flat = obs.reshape(-1, *obs.shape[-3:])
        boxes = random_boxes(flat.shape[0], obs.device, self.cfg.cpc_crop_min)
        return resized_crop(flat, boxes).reshape(obs.shape)

    def preprocess(self, obs: Tensor) -> Tensor:
        return preprocess(obs, self.pixels)

    def embed(self, obs: Tensor) -> Tensor:
        """Raw observations (..., *obs_shape) -> embeddings (..., E)."""
        return self.encoder(self.preprocess(obs))

    def reward_mean(self, feat: Tensor | OneHotFeat) -> Tensor:
        return self.two_hot.decode(feed(self.reward, feat))

    def loss(self, data: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], State]:
        """World-model loss on prepared data (see ``DreamerAgent.prepare``): the loss, its
        parts (0-dim, detached) and the posterior states. Predictions only: every target in
        ``data`` was computed before. Runs in ``cfg.precision``."""
        with compute_precision(data["obs"].device, self.cfg.precision):
            return self._loss(data)

    def _loss(self, data: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], State]:
        cfg = self.cfg
        post, prior, feat = self.seq.observe(self.encoder(data["obs"]), data["action"],
                                             data["is_first"])  # fmt: skip
        dec = self.decoder(self.seq.decoder_feat(post))  # the sequence model says what it sees
        rec = recon_loss(dec, data["obs"], len(self.obs_shape))  # (T, B)
        heads = self.seq.onehot_feat(post)  # the same feat, read by row sums
        rew = soft_cross_entropy(feed(self.reward, heads), data["reward_probs"]).squeeze(-1)
        cont = F.binary_cross_entropy_with_logits(feed(self.cont, heads), data["cont"],
                                                  reduction="none").squeeze(-1)  # fmt: skip
        dyn, rep, kl = kl_terms(post["logits"], prior["logits"], cfg.free_bits)
        per_step = (cfg.decoder_scale * rec + cfg.reward_scale * rew + cfg.cont_scale * cont
                    + cfg.kl_dyn * dyn + cfg.kl_rep * rep)  # fmt: skip
        loss = per_step.mean()
        parts = {"recon_loss": rec.mean(), "reward_loss": rew.mean(),
                 "cont_loss": cont.mean(), "dyn_loss": dyn.mean(), "rep_loss": rep.mean(),
                 "kl": kl.mean()}  # fmt: skip
        if self.cpc is not None:
            target = self.seq.posterior_sample(self.encoder(self.augment(data["obs"])))
            cpc = self.cpc(self.seq.onehot_feat(prior), data["action"], target, data["is_first"])
            loss = loss + cfg.cpc_scale * cpc
            parts["cpc_loss"] = cpc
        parts = {"wm_loss": loss, **parts}
        return loss, {k: v.detach() for k, v in parts.items()}, post
