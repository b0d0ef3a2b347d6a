"""The FLUX 3 [klein] transformer: per-mode blocks (image, references, text), then joint blocks over all three.

Module and parameter names follow BFL's single-file checkpoints (as diffusers' converter
`convert_flux3_transformer_checkpoint_to_diffusers` reads them), so a BFL file loads with no renaming;
`klein_agent.loading.flux3_keymaps` maps the diffusers layout onto these names. What FLUX 3 shares with FLUX.2 is
imported from `transformer.py`: the timestep embedding and its MLP, RoPE, the QK RMSNorm, the SwiGLU, the adaptive
output layer and the LayerNorm-then-modulate step.

What is new, against FLUX.2 (diffusers `Flux3Transformer2DModel`, verified against diffusers 0.42.1):
- Three token modes, each with its own input projection and its own `depth` mode blocks, which attend within
  the mode only; then `depth_single_blocks` joint blocks over [text, image, references].
- Modulation per mode: the image tokens are modulated by the flow timestep t, the text and reference tokens by
  timestep 0; a flow map (the distilled model) adds the embedding of the timestep the step jumps to, to every mode.
- Blocks are parallel (attention and MLP read the same modulated input) with separate q/k/v/out projections; QK
  norm and RoPE run in float32 with one cast back.
- Positions: images at (0, 0.5 row, 0.5 col, l), reference k on l = -(k + 1), text at (0, 0, 0, i).

Shapes: B batch, L image tokens, R reference tokens, T text tokens, D hidden size, H heads, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klein_agent.model.configs import Flux3TransformerConfig
from klein_agent.model.transformer import (
    EmbedND,
    LastLayer,
    MLPEmbedder,
    QKNorm,
    SwiGLU,
    apply_rope,
    modulate,
    timestep_embedding,
)

MODES = ("image", "image_cond")  # the two image modes: the noisy image and the references
TEXT_MODE = "txt"


class Flux3Transformer(nn.Module):
    """The FLUX 3 [klein] flow transformer, tested equal to diffusers `Flux3Transformer2DModel` (both variants:
    `config.flow_map` is the distilled model's target-timestep embedder)."""

    def __init__(self, config: Flux3TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.emb_in = nn.ModuleDict(
            {
                "image": nn.Linear(config.in_channels, d, bias=False),
                "image_cond": nn.Linear(config.cond_in_channels, d, bias=False),
            }
        )
        self.txt_in = nn.Linear(config.context_in_dim, d, bias=False)
        self.time_in = MLPEmbedder(config.timestep_channels, d)
        # flow map only: BFL names the target-timestep embedder `ref_time_in`
        self.ref_time_in = MLPEmbedder(config.timestep_channels, d) if config.flow_map else None
        self.early_stream_modulations = nn.ModuleDict({m: Flux3Modulation(d) for m in (*MODES, TEXT_MODE)})
        self.single_stream_modulations = nn.ModuleDict({m: Flux3Modulation(d) for m in (*MODES, TEXT_MODE)})
        self.pe_embedder = EmbedND(config.axes_dim, config.theta)
        self.content_mode_blocks = nn.ModuleDict(
            {m: nn.ModuleList(ModeBlock(config) for _ in range(config.depth)) for m in MODES}
        )
        self.txt_mode_blocks = nn.ModuleList(ModeBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(JointBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = nn.ModuleDict({"image": LastLayer(d, config.in_channels, config.eps)})

    def forward(
        self,
        img: Tensor,  # [B, L, C_in] noisy image tokens, in the weights' dtype
        img_ids: Tensor,  # [L, 4] float (t, h, w, l)
        txt: Tensor,  # [B, T, C_ctx]
        txt_ids: Tensor,  # [T, 4]
        timesteps: Tensor,  # [B] in [0, 1]
        target_timesteps: Tensor | None = None,  # [B] in [0, 1]: where this step jumps to (flow map only)
        ref: Tensor | None = None,  # [B, R, C_cond] reference tokens
        ref_ids: Tensor | None = None,  # [R, 4]
    ) -> Tensor:  # [B, L, C_in] predicted velocity of the image tokens
        """The velocity of the image tokens, as diffusers `Flux3Transformer2DModel.forward` computes it.

        Timesteps are scaled by 1000 in the activation dtype before the sinusoidal embedding, as the reference does.
        Raises ValueError when `target_timesteps` is given to a model without a flow map or missing for one with it,
        or when only one of `ref` and `ref_ids` is given.
        """
        if (target_timesteps is not None) != self.config.flow_map:
            raise ValueError(
                "target_timesteps is required by, and only by, a flow-map (distilled) FLUX 3 transformer"
            )
        if (ref is None) != (ref_ids is None):
            raise ValueError("reference tokens and their position ids go together")
        dtype, batch = img.dtype, img.shape[0]
        channels = self.config.timestep_channels
        vec_img = self.time_in(timestep_embedding(timesteps.to(dtype) * 1000, channels).to(dtype))  # [B, D]
        zeros = torch.zeros(batch, device=img.device, dtype=dtype)
        vec_zero = self.time_in(timestep_embedding(zeros, channels).to(dtype))  # text and references: t = 0
        if self.ref_time_in is not None and target_timesteps is not None:
            t_next = target_timesteps.to(dtype) * 1000
            vec_target = self.ref_time_in(timestep_embedding(t_next, channels).to(dtype))
            vec_img = vec_img + vec_target
            vec_zero = vec_zero + vec_target

        # (name, tokens, their vector, positions), in the joint sequence's order: text, image, references
        modes = [
            (TEXT_MODE, self.txt_in(txt), vec_zero, txt_ids),
            ("image", self.emb_in["image"](img), vec_img, img_ids),
        ]
        if ref is not None and ref_ids is not None:
            modes.append(("image_cond", self.emb_in["image_cond"](ref), vec_zero, ref_ids))

        tokens, joint_mods, rope = [], [], []
        for name, x, vec, ids in modes:
            cos, sin = self.pe_embedder(ids)  # [S, Dh/2] float32 each
            mod = self.early_stream_modulations[name](vec)
            blocks = cast(
                nn.ModuleList, self.txt_mode_blocks if name == TEXT_MODE else self.content_mode_blocks[name]
            )
            for block in blocks:
                x = block(x, mod, cos, sin)
            tokens.append(x)
            joint_mods.append(self.single_stream_modulations[name](vec))
            rope.append((cos, sin))
        cos = torch.cat([c for c, _ in rope], dim=0)
        sin = torch.cat([s for _, s in rope], dim=0)
        for block in self.single_blocks:
            tokens = block(tokens, joint_mods, cos, sin)
        return self.final_layer["image"](tokens[1], vec_img)


class Flux3Modulation(nn.Module):
    """shift, scale, gate for one mode from its timestep vector; one set for the mode blocks and one for the joint
    blocks, each shared by every block of its kind (BFL `{early,single}_stream_modulations`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, vec: Tensor) -> Tensor:
        """Timestep vector [B, D] -> [B, 1, 3D] (shift, scale, gate), broadcast over the mode's tokens.

        diffusers applies the projection to a per-token copy of the vector; every token of a mode has the same one,
        so projecting it once gives the same values (up to the GEMM's rounding) at 1/S of the cost.
        """
        return self.lin(F.silu(vec))[:, None, :]


class ParallelBlock(nn.Module):
    """What the mode and joint blocks share: attention and a SwiGLU MLP read the same input and are summed."""

    def __init__(self, config: Flux3TransformerConfig) -> None:
        super().__init__()
        d, m = config.hidden_size, config.mlp_hidden
        self.num_heads = config.num_heads
        self.eps = config.eps
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.norm = QKNorm(config.head_dim, config.eps)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.mlp_in = nn.Linear(d, 2 * m, bias=False)
        self.mlp_act = SwiGLU()
        self.mlp_out = nn.Linear(m, d, bias=False)

    def parallel(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Modulated tokens [B, S, D] -> attention(x) + MLP(x), [B, S, D] in `x`'s dtype.

        `cos`, `sin`: [S, Dh/2] float32. As diffusers `Flux3AttnProcessor`: QK RMSNorm and RoPE in float32, one
        cast back to the value dtype, full unmasked attention (text padding is attended, as in training).
        """
        b, s, _ = x.shape
        q, k, v = (
            proj(x).view(b, s, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )  # [B, H, S, Dh]
        q = apply_rope(self.norm.query_norm(q.float()), cos, sin).to(v.dtype)
        k = apply_rope(self.norm.key_norm(k.float()), cos, sin).to(v.dtype)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, S, D]
        return self.attn_out(attn) + self.mlp_out(self.mlp_act(self.mlp_in(x)))


class ModeBlock(ParallelBlock):
    """One mode's tokens attending among themselves (diffusers `Flux3ModeTransformerBlock`)."""

    def forward(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Tokens [B, S, D], the mode's modulation [B, 1, 3D] and its RoPE [S, Dh/2] -> updated tokens."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        return x + gate * self.parallel(modulate(x, shift, scale, self.eps), cos, sin)


class JointBlock(ParallelBlock):
    """All modes in one sequence, each modulated and gated by its own set (diffusers `Flux3SingleTransformerBlock`,
    whose one content set is the image's and the references' sets side by side)."""

    def forward(
        self, parts: Sequence[Tensor], mods: Sequence[Tensor], cos: Tensor, sin: Tensor
    ) -> list[Tensor]:
        """Per-mode tokens ([B, S_i, D], in sequence order) and their modulations ([B, 1, 3D]), RoPE of the joint
        sequence ([sum S_i, Dh/2]) -> the updated per-mode tokens."""
        chunks = [mod.chunk(3, dim=-1) for mod in mods]
        normed = [
            modulate(x, shift, scale, self.eps) for x, (shift, scale, _) in zip(parts, chunks, strict=True)
        ]
        out = self.parallel(torch.cat(normed, dim=1), cos, sin).split([x.shape[1] for x in parts], dim=1)
        return [x + gate * o for x, o, (_, _, gate) in zip(parts, out, chunks, strict=True)]
