"""Peak device memory of a FLUX 3 [klein] picture, computed on the meta device (no GPU, no weights needed).

    python tools/flux3_memory.py                                   # flux3-klein, 1024², bfloat16, 1 picture
    python tools/flux3_memory.py --preset flux3-klein-base --size 2048x2048 --refs 1

How. The modules are built from the preset (`model/configs.py`, the one registry) on the meta device, so their
parameter bytes are exact for the dtype. Each phase is then run on meta tensors under a dispatch mode that adds the
bytes of every tensor an op creates (views excluded: they share their base's storage) and subtracts them when
Python frees it; the largest sum is that phase's activation peak. Attention on meta runs the math path (it
materialises the [heads, S, S] score matrix, which flash and memory-efficient kernels never do), so the figure is
an upper bound for the transformer phases. Allocator rounding, cuBLAS workspaces and the CUDA context (~0.5 GB) are
not in it.

Phases, with the text encoder offloaded (`--offload-text-encoder`: it lives in host memory and visits the device
for one prompt, all its weights at once, `pipeline/offload.py`): the transformer and the autoencoder stay resident.
- text: resident + the text encoder's weights + its activations over the padded window;
- references: resident + encoding each reference (the autoencoder's encoder at its prepared size);
- denoise: resident + the prompt's features + reference tokens + one transformer pass (a Base model's CFG runs its
  two passes one after the other, so its peak is one pass);
- decode: resident + the autoencoder's decoder at the output size.
The peak is the largest phase. Without offload the text encoder's weights are resident throughout.
"""

from __future__ import annotations

import argparse
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from klein_agent.loading.random_init import build_random_flux3
from klein_agent.model import flux3_sampling
from klein_agent.model.configs import Flux3TransformerConfig, preset
from klein_agent.rules import limits

META = torch.device("meta")
GB = 1e9
# An upsampled caption: BFL's t2i system prompt asks for 100-350 words; at about 1.3 Qwen tokens a word that is up to
# ~455 tokens, which the encoder pads to the next multiple of its 80-token window.
TEXT_WINDOW_TOKENS = math.ceil(350 * 1.3 / 80) * 80


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors ops create and Python still holds, and their peak, while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def _peak(fn: Any) -> int:
    with torch.inference_mode(), LiveBytes() as mode:
        fn()
    return mode.peak


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class MemoryFigure:
    """Bytes per part and phase of one picture; `peak` is the largest phase."""

    preset: str
    width: int
    height: int
    references: int
    dtype: str
    offload_text_encoder: bool
    transformer_params: int
    weights: dict[str, int]  # transformer, autoencoder, text encoder
    phases: dict[str, int]  # text, references, denoise, decode: device bytes at that phase's peak

    @property
    def peak(self) -> int:
        """The largest phase, in bytes."""
        return max(self.phases.values())

    def lines(self) -> list[str]:
        """The figure as printed: the weights, each phase and the peak, in GB (10^9 bytes)."""
        out = [
            f"{self.preset} {self.width}x{self.height}, {self.references} references, {self.dtype}, text encoder "
            f"{'offloaded' if self.offload_text_encoder else 'resident'} (meta device, upper bound)",
            "weights: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in self.weights.items()),
        ]
        out += [f"  {k:<10} {v / GB:6.2f} GB" for k, v in self.phases.items()]
        out.append(f"peak {self.peak / GB:.2f} GB")
        return out


def flux3_memory(
    preset_name: str = "flux3-klein",
    width: int = 1024,
    height: int = 1024,
    references: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    offload_text_encoder: bool = True,
    text_window: int = TEXT_WINDOW_TOKENS,
) -> MemoryFigure:
    """The device memory of one `width` x `height` picture of `preset_name` with `references` references of the
    output's size, in `dtype`. Raises ValueError for a FLUX.2 preset or a size that is not a multiple of 16."""
    if width % limits.SIZE_MULTIPLE or height % limits.SIZE_MULTIPLE:
        raise ValueError(f"width and height must be multiples of {limits.SIZE_MULTIPLE}")
    chosen = preset(preset_name)
    config = chosen.transformer
    if not isinstance(config, Flux3TransformerConfig):
        raise ValueError(f"{preset_name} is not a FLUX 3 preset")
    transformer, autoencoder, text = build_random_flux3(chosen, device=META, dtype=dtype)
    weights = {
        "transformer": _bytes(transformer),
        "autoencoder": _bytes(autoencoder),
        "text encoder": _bytes(text),
    }
    resident = (
        weights["transformer"]
        + weights["autoencoder"]
        + (0 if offload_text_encoder else weights["text encoder"])
    )
    h, w = height // limits.SIZE_MULTIPLE, width // limits.SIZE_MULTIPLE
    channels = config.in_channels

    def encode_text() -> None:
        # the tower layer by layer, as Qwen3Model.forward runs it, but without building a mask: transformers reads
        # the mask's and position ids' values (.item()), which meta tensors lack; SDPA's causal path costs what a
        # full window's mask would. The stacked output layers are `conditioning`, counted below.
        model = text.model
        positions = torch.arange(text_window, device=META)[None]
        hidden = model.embed_tokens(torch.zeros(1, text_window, dtype=torch.long, device=META))
        rope = model.rotary_emb(hidden, positions)
        for layer in model.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)

    context = torch.empty(1, text_window, config.context_in_dim, device=META, dtype=dtype)
    refs = torch.empty(1, references * h * w, config.cond_in_channels, device=META, dtype=dtype)

    def denoise() -> None:
        ref_ids = flux3_sampling.reference_ids([(h, w)] * references).to(META) if references else None
        transformer(
            torch.empty(1, h * w, channels, device=META, dtype=dtype),
            flux3_sampling.image_ids(h, w).to(META),
            context,
            flux3_sampling.text_ids(text_window).to(META),
            torch.empty(1, device=META),
            torch.empty(1, device=META) if config.flow_map else None,
            ref=refs if references else None,
            ref_ids=ref_ids,
        )

    def encode_reference() -> None:
        autoencoder.encode(torch.empty(1, 3, height, width, device=META, dtype=dtype))

    def decode() -> None:
        autoencoder.decode(torch.empty(1, channels, h, w, device=META, dtype=dtype))

    conditioning = context.numel() * context.element_size()
    visiting = weights["text encoder"] if offload_text_encoder else 0
    text_phase = resident + visiting + _peak(encode_text) + conditioning
    ref_bytes = refs.numel() * refs.element_size()
    phases = {
        "text": text_phase,
        "references": resident + conditioning + (_peak(encode_reference) + ref_bytes if references else 0),
        "denoise": resident + conditioning + ref_bytes + _peak(denoise),
        "decode": resident + _peak(decode),
    }
    params = sum(p.numel() for p in transformer.parameters())
    name = str(dtype).removeprefix("torch.")
    return MemoryFigure(
        preset_name, width, height, references, name, offload_text_encoder, params, weights, phases
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="flux3-klein")
    parser.add_argument("--size", default="1024x1024", help="WxH")
    parser.add_argument("--refs", type=int, default=0, help="references of the output's size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--resident-text-encoder", action="store_true", help="without --offload-text-encoder")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    figure = flux3_memory(
        args.preset,
        width,
        height,
        args.refs,
        getattr(torch, args.dtype),
        offload_text_encoder=not args.resident_text_encoder,
    )
    print("\n".join(figure.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
