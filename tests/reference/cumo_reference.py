"""A plain-PyTorch re-statement of CuMo, used as the independent oracle in numerical tests.

Everything here is written for readability, not speed: fp32, explicit loops where the original
CuMo code loops, no fused kernels, no parallelism.  It deliberately shares no code with the
``cumo_megatron`` package so that a bug there cannot hide behind the same bug here.

Semantics (see DESIGN.md section 1):

* Router: bias-free linear d -> E, softmax over experts in fp32, top-k of the probabilities, the k
  weights renormalised to sum to 1.  Dropless, no noise, no capacity.
* Balance loss per MoE module call: ``E^2 * mean_e(P_e * f_e)`` with ``P_e`` the mean router
  probability of expert e over a group of tokens and ``f_e`` the fraction of the group's tokens
  whose top-1 expert is e; averaged over groups.  The groups are the original's, module by module:
  per sample (image) for the CLIP MoE (``clip_smoe.py``) and the MLP-MoE connector
  (``multimodal_projector/builder.py``), which reduce ``'... n e -> ... e'`` over each image's
  tokens; the whole micro-batch for a Mixtral LLM (``smoe_mixtral_helper.py``, which flattens
  ``batch x sequence`` before routing), averaged over the LM layers (``llava_mixtral.py``; HF's
  ``load_balancing_loss_func`` is never used).
* Router z-loss: mean over all tokens of ``logsumexp(logits)^2`` (every module).
* Deliberate difference from the original CuMo code: the original's Mixtral block sees no attention
  mask and counts padding tokens in the LLM's losses; given an ``attention_mask``, this oracle
  leaves the padding (mask 0) out of them.
* Vision tower: CLIP ViT, features of the penultimate layer, CLS dropped, no post-LayerNorm.
  Deliberate difference from the original CuMo code: the original runs all N layers and averages
  the aux losses over all N, although the last layer's output is never used; this oracle runs only
  the layers whose output is used (N-1 for ``select_layer=-2``) and averages over those.
* S2: scale-1 features concatenated on channels with the area-downsampled features of a 3x
  bicubic upsample cut into 3x3 crops.  Aux losses are the mean over the scales.
* Total loss = LM loss + balance_coeff * sum(balance losses of the MoE modules)
  + z_coeff * sum(z losses), defaults 0.1 and 0.01.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "route_topk",
    "balance_loss",
    "z_loss",
    "quick_gelu",
    "ReferenceMoE",
    "ReferenceCLIPMLP",
    "ReferenceConnectorExpert",
    "ReferenceCLIPAttention",
    "ReferenceCLIPEmbeddings",
    "ReferenceCLIPEncoderLayer",
    "ReferenceCLIPMoEVisionTower",
    "split_chessboard",
    "merge_chessboard",
    "s2_features",
    "ReferenceConnector",
    "ReferenceCuMo",
]


# --------------------------------------------------------------------------------------------
# Routing and auxiliary losses
# --------------------------------------------------------------------------------------------


def route_topk(logits: torch.Tensor, k: int):
    """Top-k routing of router logits ``[..., E]`` (any leading shape, e.g. ``[B,T,E]`` or ``[T,E]``).

    Softmax over experts in fp32, take the top-k probabilities, renormalise them to sum to 1.

    Returns ``(weights [..., k], indices [..., k], probs [..., E])``; ``weights`` and ``probs`` are fp32.
    ``indices[..., 0]`` is the top-1 expert.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, indices = torch.topk(probs, k, dim=-1)
    weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return weights, indices, probs


def balance_loss(probs_bte: torch.Tensor, top1_idx_bt: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Load-balancing loss, computed per sample and averaged over samples.

    For sample b: ``P_e`` = mean over the sample's tokens of the router probability of expert e,
    ``f_e`` = fraction of the sample's tokens whose top-1 expert is e,
    ``loss_b = E^2 * mean_e(P_e * f_e)``.  Returns ``mean_b(loss_b)`` (a 0-dim fp32 tensor).

    Equals the original's ``(density_1_proxy * density_1).mean() * E**2``.
    A 2-D ``probs [T,E]`` / ``top1 [T]`` is treated as a single sample.
    """
    if probs_bte.dim() == 2:
        probs_bte, top1_idx_bt = probs_bte.unsqueeze(0), top1_idx_bt.unsqueeze(0)
    mean_prob = probs_bte.float().mean(dim=1)  # [B, E]  P_e
    top1_fraction = F.one_hot(top1_idx_bt, num_experts).float().mean(dim=1)  # [B, E]  f_e
    per_sample = (mean_prob * top1_fraction).mean(dim=-1) * float(num_experts**2)  # [B]
    return per_sample.mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over all tokens of ``logsumexp(logits)^2`` (fp32)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# --------------------------------------------------------------------------------------------
# MoE block and expert modules
# --------------------------------------------------------------------------------------------


class ReferenceMoE(nn.Module):
    """A generic dropless top-k sparse MoE block.

    Holds ``gate`` (bias-free ``Linear(d_in, E)``) and ``experts`` (a ``ModuleList`` of arbitrary
    modules mapping ``[n, d_in] -> [n, d_out]``).  ``forward`` is a faithful per-sample, per-expert
    loop like the original CuMo code (it doubles as the "reference-style loop" baseline in a
    benchmark, so keep it that way).
    """

    def __init__(self, d_in: int, experts: Iterable[nn.Module], top_k: int = 2, d_out: Optional[int] = None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, {self.num_experts}]")
        self.top_k = top_k
        self.d_in = d_in
        self.d_out = d_in if d_out is None else d_out
        self.gate = nn.Linear(d_in, self.num_experts, bias=False)

    def forward(self, x_btd: torch.Tensor):
        """``x [B,T,d_in]`` -> ``(out [B,T,d_out], balance_loss, z_loss)``."""
        logits = self.gate(x_btd)  # [B, T, E]
        weights, indices, probs = route_topk(logits, self.top_k)
        aux_balance = balance_loss(probs, indices[..., 0], self.num_experts)
        aux_z = z_loss(logits)
        weights = weights.to(x_btd.dtype)

        outputs = []
        for b in range(x_btd.shape[0]):
            out_b = x_btd.new_zeros(x_btd.shape[1], self.d_out)
            for e, expert in enumerate(self.experts):
                # Tokens of sample b that chose expert e, and in which of their k slots.
                token_idx, slot = torch.where(indices[b] == e)
                expert_out = expert(x_btd[b, token_idx])  # [n_e, d_out]
                contribution = weights[b, token_idx, slot].unsqueeze(-1) * expert_out
                out_b = out_b.index_add(0, token_idx, contribution)
            outputs.append(out_b)
        return torch.stack(outputs, dim=0), aux_balance, aux_z


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: F.gelu(x),  # exact (erf), OpenCLIP LAION models
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class ReferenceCLIPMLP(nn.Module):
    """CLIP MLP: ``fc1 -> act -> fc2`` with biases (act defaults to quick_gelu)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "quick_gelu"):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known: {sorted(_ACTIVATIONS)}")
        self.act_name = act
        self.act = _ACTIVATIONS[act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReferenceConnectorExpert(nn.Sequential):
    """The LLaVA 2-layer connector ``Linear(in, hidden) -> GELU(erf) -> Linear(hidden, hidden)``.

    An ``nn.Sequential`` so that its parameter names are ``0.*`` and ``2.*``, as in LLaVA's
    ``mm_projector`` and CuMo's ``mm_projector.experts.{j}``.
    """

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__(nn.Linear(in_features, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


# --------------------------------------------------------------------------------------------
# CLIP vision tower (dense or MoE MLPs)
# --------------------------------------------------------------------------------------------


class ReferenceCLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention with q/k/v/out biases (CLIP)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def heads(t):  # [B,S,D] -> [B,H,S,hd]
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-1, -2)) * (self.head_dim**-0.5)
        attn = torch.softmax(scores, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, s, d)
        return self.out_proj(out)


class ReferenceCLIPEncoderLayer(nn.Module):
    """Pre-LN CLIP encoder layer; ``mlp`` is a ``ReferenceCLIPMLP`` or a ``ReferenceMoE`` of them.

    ``forward(x) -> (x, balance_loss or None, z_loss or None)``.
    """

    def __init__(self, config, moe: bool, num_experts: int, top_k: int):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = ReferenceCLIPAttention(d, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.is_moe = moe

        def make_mlp():
            return ReferenceCLIPMLP(d, config.intermediate_size, config.hidden_act)

        if moe:
            self.mlp = ReferenceMoE(d, [make_mlp() for _ in range(num_experts)], top_k=top_k)
        else:
            self.mlp = make_mlp()

    def forward(self, x: torch.Tensor):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.layer_norm2(x)
        if self.is_moe:
            h, aux_balance, aux_z = self.mlp(h)
        else:
            h, aux_balance, aux_z = self.mlp(h), None, None
        return x + h, aux_balance, aux_z


class _Encoder(nn.Module):
    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ReferenceCLIPEmbeddings(nn.Module):
    """Class token + bias-free conv patch embedding + learned absolute positions."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.patch_size = config.patch_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(self.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # [B, D, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [B, g*g, D], row-major over the grid
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class ReferenceCLIPMoEVisionTower(nn.Module):
    """CLIP ViT whose MLPs may be sparse MoE blocks (CuMo's CLIP-MoE).

    Built from a ``transformers.CLIPVisionConfig``.  ``moe_layers``: indices of MoE layers
    (default: all when ``num_experts`` is set; pass ``num_experts=None`` or ``moe_layers=()`` for
    a dense tower).  ``select_layer=-2`` selects the penultimate layer's output (CuMo and LLaVA);
    only the layers needed for that output are run, but all ``num_hidden_layers`` are built so that
    full checkpoints load.

    Parameter names follow HF / the original (``embeddings.*``, ``pre_layrnorm.*``,
    ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2}``), with the MLP at
    ``encoder.layers.N.mlp.{fc1,fc2}`` when dense and ``encoder.layers.N.mlp.{gate, experts.j.fc1,
    experts.j.fc2}`` when MoE (the original release puts ``gate``/``experts`` directly on the layer).

    ``forward(pixel_values [B,3,H,W]) -> (features [B, num_patches, D], balance, z)`` where the aux
    losses are averaged over the MoE layers that were run (None if none ran).
    """

    def __init__(
        self,
        config,
        num_experts: Optional[int] = 4,
        top_k: int = 2,
        moe_layers: Optional[Iterable[int]] = None,
        select_layer: int = -2,
    ):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers
        if num_experts is None:
            moe_set = set()
        elif moe_layers is None:
            moe_set = set(range(n))
        else:
            moe_set = {i % n for i in moe_layers}
        self.moe_layers = sorted(moe_set)
        self.num_experts = num_experts
        self.top_k = top_k
        # hidden_states[select_layer] in HF terms: hidden_states has n+1 entries (embeddings first).
        self.num_layers_run = n + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= self.num_layers_run <= n:
            raise ValueError(f"select_layer={select_layer} out of range for {n} layers")
        self.embeddings = ReferenceCLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = _Encoder(
            [ReferenceCLIPEncoderLayer(config, i in moe_set, num_experts or 0, top_k) for i in range(n)]
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return self.embeddings.num_patches

    def forward(self, pixel_values: torch.Tensor):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        balances, zs = [], []
        for layer in self.encoder.layers[: self.num_layers_run]:
            x, aux_balance, aux_z = layer(x)
            if aux_balance is not None:
                balances.append(aux_balance)
                zs.append(aux_z)
        features = x[:, 1:]  # drop CLS; no post-LayerNorm
        if not balances:
            return features, None, None
        return features, torch.stack(balances).mean(), torch.stack(zs).mean()

    @torch.no_grad()
    def load_hf_clip_vision_state_dict(self, sd: dict, strict: bool = True):
        """Load a plain HF ``CLIPVisionModel`` / ``CLIPModel`` state dict.

        The ``vision_model.`` prefix is optional; text tower, projections, ``logit_scale``,
        ``post_layernorm`` and ``position_ids`` are ignored.  For MoE layers the dense MLP weights
        are copied into every expert (co-upcycling); the routers keep their current init.
        With ``strict`` every parameter other than the routers must be found.
        """
        stripped = {}
        for key, value in sd.items():
            if key.startswith("vision_model."):
                key = key[len("vision_model.") :]
            elif any(key.startswith(p) for p in ("text_model.", "visual_projection", "text_projection", "logit_scale")):
                continue
            if key.startswith("post_layernorm.") or key.endswith("position_ids"):
                continue
            stripped[key] = value

        own = dict(self.named_parameters())
        loaded = set()
        for key, value in stripped.items():
            parts = key.split(".")
            if key.startswith("encoder.layers.") and parts[3] == "mlp" and self.encoder.layers[int(parts[2])].is_moe:
                rest = ".".join(parts[4:])  # fc1.weight etc.
                for j in range(self.num_experts):
                    target = f"encoder.layers.{parts[2]}.mlp.experts.{j}.{rest}"
                    own[target].copy_(value)
                    loaded.add(target)
                continue
            if key not in own:
                if strict:
                    raise KeyError(f"unexpected key in CLIP vision state dict: {key}")
                continue
            own[key].copy_(value)
            loaded.add(key)
        missing = [k for k in own if k not in loaded and not k.endswith("mlp.gate.weight")]
        if strict and missing:
            raise KeyError(f"missing keys: {missing}")
        return missing


# --------------------------------------------------------------------------------------------
# S2 multi-scale features
# --------------------------------------------------------------------------------------------


def split_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[n*n*B, C, H/n, W/n]``: crops in row-major (i, j) order, each crop a block of B."""
    _, _, h, w = x.shape
    if h % n or w % n:
        raise ValueError(f"image {h}x{w} not divisible into {n}x{n} crops")
    ch, cw = h // n, w // n
    crops = [x[:, :, i * ch : (i + 1) * ch, j * cw : (j + 1) * cw] for i in range(n) for j in range(n)]
    return torch.cat(crops, dim=0)


def merge_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``split_chessboard``: ``[n*n*B, C, h, w]`` -> ``[B, C, n*h, n*w]``."""
    nb, c, h, w = x.shape
    b = nb // (n * n)
    grid = x.reshape(n, n, b, c, h, w)  # [i, j, B, C, h, w]
    grid = grid.permute(2, 3, 0, 4, 1, 5)  # [B, C, i, h, j, w]
    return grid.reshape(b, c, n * h, n * w)


def s2_features(tower_fn, images_bchw: torch.Tensor, scales: Sequence[float] = (1, 3)):
    """S2 multi-scale features as CuMo uses them.

    ``tower_fn(images) -> (features [b, g*g, C], balance or None, z or None)`` (a square grid).
    Scale 1 encodes the images as they are.  Each further scale s: bicubic upsample to
    ``int(H*s)``, cut into ``ceil(s)`` x ``ceil(s)`` crops (``split_chessboard``), encode all crops
    in one call, stitch the crop feature maps back into one map, area-downsample it to the
    scale-1 grid.  Returns ``(features [B, g*g, C*len(scales)], balance, z)`` with the aux losses
    the mean over scales (None if the tower returns None).
    """
    size = images_bchw.shape[-1]
    feats, balances, zs = [], [], []
    base_grid = None
    for i, scale in enumerate(scales):
        target = int(size * scale)
        n = math.ceil(target / size)
        if i == 0:
            x = images_bchw
        else:
            x = F.interpolate(images_bchw.float(), size=target, mode="bicubic").to(images_bchw.dtype)
            x = split_chessboard(x, n)
        out, aux_balance, aux_z = tower_fn(x)
        if i == 0:
            base_grid = int(round(out.shape[1] ** 0.5))
        else:
            g = int(round(out.shape[1] ** 0.5))
            fmap = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], g, g)  # [n*n*B, C, g, g]
            fmap = merge_chessboard(fmap, n)  # [B, C, n*g, n*g]
            fmap = F.interpolate(fmap.float(), size=base_grid, mode="area").to(out.dtype)
            out = fmap.flatten(2).transpose(1, 2)  # [B, g0*g0, C]
        feats.append(out)
        balances.append(aux_balance)
        zs.append(aux_z)
    features = torch.cat(feats, dim=-1)
    if any(v is None for v in balances):
        return features, None, None
    return features, torch.stack(balances).mean(), torch.stack(zs).mean()


# --------------------------------------------------------------------------------------------
# Connector
# --------------------------------------------------------------------------------------------


class ReferenceConnector(nn.Module):
    """The vision->LLM connector: dense (one ``ReferenceConnectorExpert``) or an MLP-MoE.

    ``net`` is the ``ReferenceConnectorExpert`` (dense; keys ``net.0.*``, ``net.2.*``) or a
    ``ReferenceMoE`` of them (keys ``net.gate.weight``, ``net.experts.j.{0,2}.*``).
    ``forward(x [B,T,in]) -> (y [B,T,hidden], balance or None, z or None)``.
    """

    def __init__(self, in_features: int, hidden_size: int, num_experts: Optional[int] = None, top_k: int = 2):
        super().__init__()
        self.is_moe = num_experts is not None
        if self.is_moe:
            experts = [ReferenceConnectorExpert(in_features, hidden_size) for _ in range(num_experts)]
            self.net = ReferenceMoE(in_features, experts, top_k=top_k, d_out=hidden_size)
        else:
            self.net = ReferenceConnectorExpert(in_features, hidden_size)

    def forward(self, x: torch.Tensor):
        if self.is_moe:
            return self.net(x)
        return self.net(x), None, None

    @torch.no_grad()
    def upcycle_from_dense(self, dense_sd: dict):
        """Copy a dense connector's ``{0,2}.{weight,bias}`` into every expert (router untouched)."""
        if not self.is_moe:
            self.net.load_state_dict(dense_sd)
            return
        for expert in self.net.experts:
            expert.load_state_dict(dense_sd)


# --------------------------------------------------------------------------------------------
# The composed model
# --------------------------------------------------------------------------------------------


class ReferenceCuMo(nn.Module):
    """Vision tower (+ optional S2) -> connector -> HF causal LM (Llama / Mistral / Mixtral).

    Data convention: every image is ALREADY expanded in ``input_ids`` to ``num_image_tokens``
    consecutive copies of ``image_token_id``; the connector outputs replace those positions, image
    by image in batch order (sample 0's images first).  ``image_token_id`` may lie outside the
    vocabulary (e.g. LLaVA's -200): those positions never reach the embedding table.

    Aux losses: the vision tower's and the connector's (when MoE) and, when ``llm_aux`` (default:
    the LM is a ``MixtralForCausalLM``), the LLM's router losses, computed over the micro-batch's
    flattened (non-padding) tokens from the router logits HF returns and averaged over the LM
    layers.
    ``total_loss = lm_loss + balance_coeff * sum(balances) + z_coeff * sum(zs)``.
    """

    def __init__(
        self,
        tower: ReferenceCLIPMoEVisionTower,
        connector: ReferenceConnector,
        lm: nn.Module,
        image_token_id: int = -200,
        scales: Optional[Sequence[float]] = None,
        balance_coeff: float = 0.1,
        z_coeff: float = 0.01,
        llm_aux: Optional[bool] = None,
    ):
        super().__init__()
        self.tower = tower
        self.connector = connector
        self.lm = lm
        self.image_token_id = image_token_id
        self.scales = tuple(scales) if scales else (1,)
        self.balance_coeff = balance_coeff
        self.z_coeff = z_coeff
        if llm_aux is None:
            llm_aux = type(lm).__name__.startswith("Mixtral")
        self.llm_aux = llm_aux

    @property
    def num_image_tokens(self) -> int:
        return self.tower.num_patches

    # -- pieces -------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor):
        """``images [N,3,H,W]`` -> ``(embeddings [N, num_image_tokens, hidden], aux dict)``."""
        aux = {}
        if len(self.scales) > 1:
            feats, vb, vz = s2_features(self.tower, images, self.scales)
        else:
            feats, vb, vz = self.tower(images)
        if vb is not None:
            aux["vision"] = (vb, vz)
        emb, cb, cz = self.connector(feats)
        if cb is not None:
            aux["connector"] = (cb, cz)
        return emb, aux

    def build_inputs_embeds(self, input_ids: torch.Tensor, images: Optional[torch.Tensor]):
        """Token embeddings with image positions replaced by the connector output."""
        is_image = input_ids == self.image_token_id
        safe_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.lm.get_input_embeddings()(safe_ids)
        aux = {}
        n_image_positions = int(is_image.sum())
        if images is None or images.shape[0] == 0:
            if n_image_positions:
                raise ValueError("input_ids contain image tokens but no images were given")
            return embeds, aux
        image_embeds, aux = self.encode_images(images)
        if n_image_positions != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"{n_image_positions} image positions for {image_embeds.shape[0]} images of "
                f"{image_embeds.shape[1]} tokens"
            )
        # Boolean-mask assignment fills positions in row-major (sample, position) order.
        embeds = embeds.clone()
        embeds[is_image] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        return embeds, aux

    def _llm_aux(self, router_logits, attention_mask: Optional[torch.Tensor]):
        """Router losses of the LM's MoE layers, averaged over layers.

        As ``smoe_mixtral_helper.py``: each layer's logits ``[B*T, E]`` are those of the flattened
        micro-batch, and its balance and z losses are taken over all those tokens at once (one
        group, not per sample).  Padding (``attention_mask == 0``) is left out: the deliberate
        difference from the original described in the module docstring.
        """
        balances, zs = [], []
        real_t = None if attention_mask is None else attention_mask.reshape(-1).bool()
        for logits in router_logits:
            logits_te = logits.reshape(-1, logits.shape[-1])  # HF gives [B*T, E], row-major (b, t)
            if real_t is not None:
                logits_te = logits_te[real_t]
            _, indices, probs = route_topk(logits_te, self.lm.config.num_experts_per_tok)
            # 2-D probs: the flattened tokens are a single group.
            balances.append(balance_loss(probs, indices[:, 0], logits_te.shape[-1]))
            zs.append(z_loss(logits_te))
        return torch.stack(balances).mean(), torch.stack(zs).mean()

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> dict:
        """Run the model and compute the losses.

        ``labels`` default: ``input_ids`` shifted left (the label of position t is the token at
        t+1); the last position then has no label and is always masked out.  ``loss_mask [B,T]``
        is aligned with positions (and labels); default: every position whose label is a real
        token (not an image placeholder, not -100, not the last position).  An explicit mask that
        puts an invalid label in the loss raises.

        Returns a dict with ``logits [B,T,V]``, ``per_token_loss [B,T]`` (0 where masked),
        ``loss_mask``, ``lm_loss`` (mean over loss tokens in the batch), ``balance_losses`` and
        ``z_losses`` (dicts keyed ``vision`` / ``connector`` / ``llm``), ``total_loss``.
        """
        b, t = input_ids.shape
        embeds, aux = self.build_inputs_embeds(input_ids, images)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            use_cache=False,
            **({"output_router_logits": True} if self.llm_aux else {}),
        )
        logits = out.logits.float()
        if self.llm_aux:
            aux["llm"] = self._llm_aux(out.router_logits, attention_mask)

        shifted = labels is None
        if shifted:
            labels = torch.full_like(input_ids, -100)
            labels[:, :-1] = input_ids[:, 1:]
        # Labels that cannot be looked up (image placeholders, -100, the last position).
        bad = (labels < 0) | (labels >= logits.shape[-1])
        if loss_mask is None:
            loss_mask = (~bad).float()
        else:
            loss_mask = loss_mask.float().clone()
            if shifted:
                loss_mask[:, -1] = 0.0
            if bool((bad & (loss_mask > 0)).any()):
                raise ValueError("a position in the loss has an invalid label")
        safe_labels = labels.masked_fill(bad, 0)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe_labels.reshape(-1), reduction="none")
        per_token = per_token.view(b, t) * loss_mask
        lm_loss = per_token.sum() / loss_mask.sum().clamp(min=1.0)

        balance_losses = {k: v[0] for k, v in aux.items()}
        z_losses = {k: v[1] for k, v in aux.items()}
        total = lm_loss
        if balance_losses:
            total = total + self.balance_coeff * sum(balance_losses.values())
            total = total + self.z_coeff * sum(z_losses.values())
        return {
            "logits": logits,
            "per_token_loss": per_token,
            "loss_mask": loss_mask,
            "lm_loss": lm_loss,
            "balance_losses": balance_losses,
            "z_losses": z_losses,
            "total_loss": total,
        }

    @torch.no_grad()
    def generate(
        self,
        images: Optional[torch.Tensor],
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: Optional[int] = None,
    ) -> torch.Tensor:
        """Greedy decoding without a KV cache (the whole sequence is recomputed each step).

        ``input_ids [B,T]`` (no padding; images already expanded as in ``forward``).  Image
        embeddings are computed once.  Returns the new tokens ``[B, n <= max_new_tokens]``; a
        sequence that produced ``eos_token_id`` keeps emitting it, and decoding stops early when
        all have.
        """
        prompt_embeds, _ = self.build_inputs_embeds(input_ids, images)
        embed_table = self.lm.get_input_embeddings()
        embeds = prompt_embeds
        new_tokens = []
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.lm(inputs_embeds=embeds, use_cache=False).logits[:, -1].float()
            nxt = logits.argmax(dim=-1)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            new_tokens.append(nxt)
            embeds = torch.cat([embeds, embed_table(nxt).unsqueeze(1)], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        if not new_tokens:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.stack(new_tokens, dim=1)
