"""The FLUX.2 flow transformer: double-stream blocks, then single-stream (parallel) blocks.

Module and parameter names follow BFL's `flux2/model.py`, so a BFL single-file checkpoint loads with no renaming;
`klein_agent.loading.keymaps` maps the diffusers layout onto these names. No biases anywhere; LayerNorms have no affine
parameters; the three modulation projections are computed once per forward and shared by every block.

Shapes: B batch, L image tokens (noisy output first, then references), T text tokens (512), D hidden size,
H heads, Dh head dim, R reference tokens.

klein 9B-KV runs references apart (BFL `forward_kv_extract` / `forward_kv_cached`, diffusers `Flux2KVCache`): the
reference tokens pass through the blocks on their own, modulated by timestep 0 and attending only to themselves
(`Flux2Transformer.reference_kv`); every block keeps their post-RoPE keys and values, and the [text, noisy] pass reads
them between its text and image keys (`forward(..., reference_kv=...)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klein_agent.model.configs import TransformerConfig
from klein_agent.model.step_cache import MagCachePass

KeyValue = tuple[Tensor, Tensor]  # post-RoPE keys and values of the reference tokens, each [1, H, R, Dh]


@dataclass(frozen=True)
class ReferenceKV:
    """The reference tokens' keys and values in every block, as klein 9B-KV keeps them after its first step.

    They depend only on the reference latents, their positions and the weights (not on the prompt, the noise or the
    timestep), so one set serves every step of a call and every call on the same references.
    """

    double: tuple[KeyValue, ...]  # one per double-stream block
    single: tuple[KeyValue, ...]  # one per single-stream block
    num_tokens: int  # R

    @property
    def nbytes(self) -> int:
        """Memory held, in bytes: 2 x (blocks) x R x D x the dtype's size."""
        return sum(t.numel() * t.element_size() for kv in self.double + self.single for t in kv)


class Flux2Transformer(nn.Module):
    """The klein flow transformer: mirrors BFL `flux2/model.py` `Flux2` without `guidance_in` (klein has no
    guidance embedding), and is tested equal to diffusers `Flux2Transformer2DModel`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, d, bias=False)
        self.txt_in = nn.Linear(config.context_in_dim, d, bias=False)
        self.time_in = MLPEmbedder(config.timestep_channels, d)
        self.double_stream_modulation_img = Modulation(d, sets=2)
        self.double_stream_modulation_txt = Modulation(d, sets=2)
        self.single_stream_modulation = Modulation(d, sets=1)
        self.pe_embedder = EmbedND(config.axes_dim, config.theta)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(config) for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, config.in_channels, config.eps)

    def forward(
        self,
        img: Tensor,  # [B, L, C_in]
        img_ids: Tensor,  # [L, 4] int: (t, h, w, l)
        txt: Tensor,  # [B, T, C_ctx]
        txt_ids: Tensor,  # [T, 4]
        timesteps: Tensor,  # [B] in [0, 1]
        rope: tuple[Tensor, Tensor]
        | None = None,  # precomputed `self.rope(txt_ids, img_ids)`, reused across steps
        reference_kv: ReferenceKV | None = None,  # klein 9B-KV: the kept reference keys and values
        step_cache: MagCachePass | None = None,  # this guidance pass's step cache, if the call asked for one
    ) -> Tensor:  # [B, L, C_in] predicted velocity
        """The velocity for every image token (noisy and reference), as BFL `Flux2.forward` and diffusers
        `Flux2Transformer2DModel.forward` compute it.

        `timesteps` is scaled by 1000 in the activation dtype before the sinusoidal embedding (both references do
        so, which quantises t in bfloat16). All tensors on one device; `img` and `txt` in the weights' dtype.
        With `reference_kv` (from `reference_kv`), `img` holds the noisy tokens only and every block attends to
        [text, references, noisy] keys (diffusers `kv_cache_mode="cached"`). With `step_cache`
        (`model.step_cache`), a step the cache skips runs no block: the image tokens leave the stack as they entered
        it plus the residual of the last computed step (diffusers' MagCache hooks on the first and last block).
        Raises ValueError when `reference_kv` was made for another block count.
        """
        if reference_kv is not None and (
            len(reference_kv.double) != len(self.double_blocks)
            or len(reference_kv.single) != len(self.single_blocks)
        ):
            raise ValueError("reference_kv was made by a transformer with another number of blocks")
        t = timesteps.to(img.dtype) * 1000  # [B]
        vec = self.time_in(timestep_embedding(t, self.config.timestep_channels).to(img.dtype))  # [B, D]
        mod_img = self.double_stream_modulation_img(vec)  # [B, 1, 6D]
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)  # [B, 1, 3D]

        img = self.img_in(img)  # [B, L, D]
        if step_cache is not None and step_cache.skip():  # the text tokens would not reach the output
            return self.final_layer(step_cache.reuse(img), vec)
        txt = self.txt_in(txt)  # [B, T, D]
        start = img
        cos, sin = self.rope(txt_ids, img_ids) if rope is None else rope  # [T+L, Dh/2] each

        double_kv = single_kv = None
        if reference_kv is not None:
            double_kv, single_kv = reference_kv.double, reference_kv.single
        for i, block in enumerate(self.double_blocks):
            img, txt = block(
                img, txt, cos, sin, mod_img, mod_txt, None if double_kv is None else double_kv[i]
            )

        num_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)  # [B, T+L, D]
        for i, block in enumerate(self.single_blocks):
            x = block(x, cos, sin, mod_single, None if single_kv is None else single_kv[i], num_txt)
        if step_cache is not None:
            step_cache.keep(start, x[:, num_txt:])
        return self.final_layer(x[:, num_txt:], vec)

    def reference_kv(
        self,
        ref: Tensor,  # [1, R, C_in] reference tokens, in the weights' dtype
        ref_ids: Tensor,  # [R, 4] their positions (t = 10, 20, ... per reference)
        timestep: float = 0.0,  # BFL `ref_fixed_timestep`, diffusers `ref_fixed_timestep`
    ) -> ReferenceKV:
        """klein 9B-KV's reference pass: the references alone through every block, modulated by a fixed
        timestep and attending only to each other, keeping each block's post-RoPE keys and values.

        Equal to the reference rows of diffusers' `kv_cache_mode="extract"` pass (where they ride before the noisy
        tokens but attend only to themselves, so nothing else changes them). The last single block's output is
        never read, so its MLP is skipped.
        """
        t = torch.full((ref.shape[0],), timestep * 1000, dtype=ref.dtype, device=ref.device)
        vec = self.time_in(timestep_embedding(t, self.config.timestep_channels).to(ref.dtype))  # [1, D]
        mod_img = self.double_stream_modulation_img(vec)
        mod_single = self.single_stream_modulation(vec)
        cos, sin = self.pe_embedder(ref_ids)  # [R, Dh/2] each
        x = self.img_in(ref)  # [1, R, D]
        double: list[KeyValue] = []
        for double_block in self.double_blocks:
            x, kv = cast(DoubleStreamBlock, double_block).reference(x, cos, sin, mod_img)
            double.append(kv)
        single: list[KeyValue] = []
        for i, single_block in enumerate(self.single_blocks):
            last = i + 1 == len(self.single_blocks)
            x, kv = cast(SingleStreamBlock, single_block).reference(x, cos, sin, mod_single, not last)
            single.append(kv)
        return ReferenceKV(tuple(double), tuple(single), ref.shape[1])

    def rope(self, txt_ids: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin for the joint [text, image] sequence, in float32."""
        return self.pe_embedder(torch.cat((txt_ids, img_ids), dim=0))


class MLPEmbedder(nn.Module):
    """Linear, SiLU, linear, no biases: the timestep embedder (BFL `MLPEmbedder`, diffusers
    `TimestepEmbedding`)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, hidden], in the weights' dtype."""
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """shift, scale, gate (per set) from the timestep vector; shared by every block of one kind."""

    def __init__(self, dim: int, sets: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec: Tensor) -> Tensor:  # [B, D] -> [B, 1, 3*sets*D]
        """Timestep vector [B, D] -> [B, 1, 3*sets*D]: (shift, scale, gate) per set, which the blocks chunk.

        BFL `Modulation.forward` returns the chunks; diffusers `Flux2Modulation` returns the tensor, as here.
        """
        return self.lin(F.silu(vec))[:, None, :]


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, joint attention over [text, image]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d, m = config.hidden_size, config.mlp_hidden
        self.num_heads = config.num_heads
        self.eps = config.eps
        self.img_attn = SelfAttention(d, config.head_dim, config.eps)
        self.txt_attn = SelfAttention(d, config.head_dim, config.eps)
        self.img_mlp = nn.Sequential(nn.Linear(d, 2 * m, bias=False), SwiGLU(), nn.Linear(m, d, bias=False))
        self.txt_mlp = nn.Sequential(nn.Linear(d, 2 * m, bias=False), SwiGLU(), nn.Linear(m, d, bias=False))

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        cos: Tensor,
        sin: Tensor,
        mod_img: Tensor,
        mod_txt: Tensor,
        reference_kv: KeyValue | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Image tokens [B, L, D] and text tokens [B, T, D] -> both updated, same shapes and dtype.

        `cos`, `sin`: [T+L, Dh/2] float32 for the joint sequence; `mod_img`, `mod_txt`: [B, 1, 6D];
        `reference_kv`: kept reference keys and values, attended between the text and image keys. Mirrors
        BFL `DoubleStreamBlock.forward` and diffusers `Flux2TransformerBlock.forward`.
        """
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = mod_img.chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = mod_txt.chunk(6, dim=-1)

        img_q, img_k, img_v = self.img_attn.qkv_heads(
            modulate(img, img_shift1, img_scale1, self.eps), self.num_heads
        )
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            modulate(txt, txt_shift1, txt_scale1, self.eps), self.num_heads
        )
        q = torch.cat((txt_q, img_q), dim=2)  # [B, H, T+L, Dh]
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, cos, sin, reference_kv, txt.shape[1])  # [B, T+L, D]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2, self.eps))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2, self.eps))
        return img, clip_float16(txt)

    def reference(self, ref: Tensor, cos: Tensor, sin: Tensor, mod_ref: Tensor) -> tuple[Tensor, KeyValue]:
        """Reference tokens [1, R, D] alone through the image stream -> (updated tokens, their post-RoPE k, v).

        `cos`, `sin`: [R, Dh/2]; `mod_ref`: [1, 1, 6D] from the fixed reference timestep.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = mod_ref.chunk(6, dim=-1)
        q, k, v = self.img_attn.qkv_heads(modulate(ref, shift1, scale1, self.eps), self.num_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [1, R, D]
        ref = ref + gate1 * self.img_attn.proj(attn)
        ref = ref + gate2 * self.img_mlp(modulate(ref, shift2, scale2, self.eps))
        return ref, (k, v)


class SingleStreamBlock(nn.Module):
    """Parallel block: one projection feeds both attention (qkv) and the MLP, one projection merges them."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d, m = config.hidden_size, config.mlp_hidden
        self.num_heads = config.num_heads
        self.hidden_size = d
        self.mlp_hidden = m
        self.eps = config.eps
        self.linear1 = nn.Linear(d, 3 * d + 2 * m, bias=False)
        self.linear2 = nn.Linear(d + m, d, bias=False)
        self.norm = QKNorm(config.head_dim, config.eps)
        self.mlp_act = SwiGLU()

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mod: Tensor,
        reference_kv: KeyValue | None = None,
        num_txt: int = 0,
    ) -> Tensor:
        """Joint [text, image] tokens [B, T+L, D] -> same shape and dtype.

        `cos`, `sin`: [T+L, Dh/2] float32; `mod`: [B, 1, 3D]; `reference_kv`: kept reference keys and values,
        attended between the first `num_txt` keys and the rest. Mirrors BFL `SingleStreamBlock.forward` and
        diffusers `Flux2SingleTransformerBlock.forward`.
        """
        q, k, v, mlp, gate = self._project(x, mod)
        attn = attention(q, k, v, cos, sin, reference_kv, num_txt)  # [B, S, D]
        return clip_float16(x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=-1)))

    def reference(
        self, ref: Tensor, cos: Tensor, sin: Tensor, mod_ref: Tensor, need_output: bool = True
    ) -> tuple[Tensor, KeyValue]:
        """Reference tokens [1, R, D] alone -> (updated tokens, their post-RoPE k, v); with `need_output` False
        the tokens come back unchanged (only k, v are wanted)."""
        q, k, v, mlp, gate = self._project(ref, mod_ref)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if not need_output:
            return ref, (k, v)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [1, R, D]
        return clip_float16(ref + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=-1))), (k, v)

    def _project(self, x: Tensor, mod: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k, v [B, H, S, Dh] (q, k normalised, before RoPE), the MLP input [B, S, 2m] and the gate."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        qkv, mlp = self.linear1(modulate(x, shift, scale, self.eps)).split(
            (3 * self.hidden_size, 2 * self.mlp_hidden), dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v, mlp, gate


class LastLayer(nn.Module):
    """Adaptive LayerNorm from the timestep vector, then the projection to latent channels (BFL `LastLayer`,
    diffusers `norm_out` and `proj_out`)."""

    def __init__(self, hidden: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))
        self.linear = nn.Linear(hidden, out_channels, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """Image tokens [B, L, D] and timestep vector [B, D] -> velocity [B, L, C_in]."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear(modulate(x, shift, scale, self.eps))


class SelfAttention(nn.Module):
    """One stream's qkv and output projections and its QK norm (BFL `SelfAttention`); the attention itself
    runs over both streams in `DoubleStreamBlock`."""

    def __init__(self, dim: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(head_dim, eps)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens [B, S, D] -> q, k, v, each [B, H, S, Dh] in `x`'s dtype, q and k RMS-normalised."""
        q, k, v = split_heads(self.qkv(x), num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class QKNorm(nn.Module):
    """RMSNorm of queries and keys over the head dim (BFL `QKNorm`, diffusers `norm_q` / `norm_k`)."""

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps)
        self.key_norm = RMSNorm(head_dim, eps)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """q, k [B, H, S, Dh] -> normalised q, k in `v`'s dtype."""
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned scale, computed in float32 (BFL `RMSNorm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> same shape and dtype."""
        # float32 statistics whatever the activation dtype, as the reference does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.scale.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """silu(first half) * second half."""

    def forward(self, x: Tensor) -> Tensor:
        """[..., 2m] -> [..., m] (BFL `SiLUActivation`, diffusers `Flux2SwiGLU`)."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class EmbedND(nn.Module):
    """Rotary angles for 4-axis (t, h, w, l) integer positions; each axis owns a contiguous slice of the head dim."""

    def __init__(self, axes_dim: tuple[int, ...], theta: int) -> None:
        super().__init__()
        self.axes_dim = axes_dim
        self.theta = theta

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:  # [S, 4] -> ([S, Dh/2], [S, Dh/2])
        """Positions [S, 4] (t, h, w, l) -> (cos, sin), each [S, Dh/2] float32."""
        # angles in float64 (positions up to thousands times frequencies lose digits in float32), except on MPS,
        # which has no float64 (diffusers `Flux2PosEmbed` makes the same exception)
        precision = torch.float32 if ids.device.type == "mps" else torch.float64
        pos = ids.to(precision)
        angles = []
        for axis, dim in enumerate(self.axes_dim):
            omega = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=precision, device=ids.device) / dim))
            angles.append(pos[:, axis, None] * omega[None, :])  # [S, dim/2]
        angle = torch.cat(angles, dim=-1)
        return angle.cos().float(), angle.sin().float()


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, S, 3*H*Dh] with rows [q | k | v], heads contiguous -> three [B, H, S, Dh]."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of frequency i, in float32."""
    x32 = x.float().unflatten(-1, (-1, 2))  # [B, H, S, Dh/2, 2]
    x0, x1 = x32.unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    inserted: KeyValue | None = None,
    at: int = 0,
) -> Tensor:
    """RoPE on q and k, then full (unmasked) scaled dot-product attention (BFL `attention`).

    q, k, v [B, H, S, Dh] and cos, sin [S, Dh/2] float32 -> [B, S, H*Dh] in `q`'s dtype. `inserted` keys and
    values ([1, H, R, Dh], RoPE already applied) join the keys after the first `at` of them, as klein 9B-KV reads
    its kept references between text and image (diffusers `_flux2_kv_causal_attention`, cached mode).
    """
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if inserted is not None:
        k_ref, v_ref = (t.expand(q.shape[0], -1, -1, -1) for t in inserted)
        k = torch.cat((k[:, :, :at], k_ref, k[:, :, at:]), dim=2)  # [B, H, S+R, Dh]
        v = torch.cat((v[:, :, :at], v_ref, v[:, :, at:]), dim=2)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, S, Dh]
    return out.transpose(1, 2).flatten(2)  # [B, S, H*Dh]


def clip_float16(x: Tensor) -> Tensor:
    """In float16, clamp to the finite range where diffusers does (text stream of a double block, single blocks),
    so an overflow saturates as in the reference instead of becoming inf."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine parameters, then `(1 + scale) * x + shift`.

    x [B, S, D]; shift and scale [B, 1, D]; the result is [B, S, D] in `x`'s dtype.
    """
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] timesteps in [0, 1000] -> [B, dim] float32 sinusoids, cos half first (BFL `timestep_embedding`,
    diffusers `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
