"""The menu of compile shape buckets for `--compile`, and which bucket a request falls in. No torch.

What varies between requests, for the transformer. Every call runs batch 1 (pictures of a batch are denoised one by
one, CFG runs its two passes apart) over 512 text tokens, so the only dimension that changes is L, the image tokens
each step sees: the output's tokens plus every reference's tokens (one token is 16x16 px). A bucket is a range of L.

How a request maps to a bucket: neither padded nor snapped. The request runs at exactly its own size; the compiled
blocks take L as a dynamic dimension bounded by the bucket's range (`torch._dynamo.mark_dynamic(min=, max=)`), so one
graph per bucket serves every size inside it, and the pictures are those of the uncompiled pipeline. The two
alternatives were rejected:
- padding L up to the bucket's top needs an attention mask over the padded keys, which takes the flash and cuDNN
  kernels off the table for masks they do not accept, costs the padded tokens' work in every matrix product, and
  changes the summation order (no longer the reference's pixels);
- snapping the output size to a bucket's size changes the picture the user asked for (and the recipe that remakes it).
`rules.buckets` only says which range a size falls in; `speedups.compilation` marks the dimensions, and
`pipeline.warmup` compiles each bucket once at start-up at its `example` (also the size hint the compiler tunes for).

Past the menu (L over the last bucket's top: a 2048x2048 output with references, or a 1024x1024 one with four
1024x1024 references and more) a request still runs compiled: a static graph for exactly that L is compiled at
request time (logged, as a warning, with its cost), up to `PAST_MENU_SHAPES` such shapes; past those it runs
uncompiled, and the log says so each time. Nothing falls back to eager silently.

The autoencoder's decoder has no menu: its two latent sides are dynamic over every side the rules allow a caller
(`DECODER_SIDE_RANGE`: MIN_SIDE to MAX_SIDE px), one graph for all. klein 9B-KV's kept reference keys and values are
dynamic over one range too (`REFERENCE_TOKEN_RANGE`: up to MAX_REFERENCES references of REFERENCE_MAX_AREA px).
`speedups.compilation` reads all three from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from klein_agent.rules import limits

TOKEN_PIXELS = limits.SIZE_MULTIPLE  # one image token is 16x16 px for every klein checkpoint
MIN_TOKENS = (limits.MIN_SIDE // TOKEN_PIXELS) ** 2  # 16: the smallest output (64x64), no reference
# Distinct sizes past the menu that get a static graph of their own before the rest run uncompiled (logged).
PAST_MENU_SHAPES = 16
# klein 9B-KV's kept reference tokens: from 2 (Dynamo specialises sizes 0 and 1) to MAX_REFERENCES prepared
# references, each scaled to at most REFERENCE_MAX_AREA px (4 x 4096 tokens)
REFERENCE_TOKEN_RANGE = (2, limits.MAX_REFERENCES * limits.REFERENCE_MAX_AREA // TOKEN_PIXELS**2)
# FLUX 3's text window, in a joint block beside the image tokens: one window of FLUX3_TEXT_WINDOW tokens up to the
# longest prompt the encoder keeps (a multiple of the window), dynamic over the whole range so a long prompt compiles
# nothing new
FLUX3_TEXT_TOKEN_RANGE = (limits.FLUX3_TEXT_WINDOW, limits.FLUX3_MAX_TEXT_TOKENS)
# The decoder's raw latent sides, one per 8 px (a token's 16 px before the 2x2 patch): MIN_SIDE to MAX_SIDE px
LATENT_PIXELS = TOKEN_PIXELS // 2
DECODER_SIDE_RANGE = (limits.MIN_SIDE // LATENT_PIXELS, limits.MAX_SIDE // LATENT_PIXELS)


@dataclass(frozen=True)
class ShapeBucket:
    """A range of image tokens per step (output plus references, inclusive) compiled as one graph, and the request
    warm-up runs for it: an output of `example_size` (width, height) px with `example_references` references of
    `example_reference_size` px (whose token count is the size hint the compiler tunes the graph for)."""

    name: str
    min_tokens: int
    max_tokens: int
    example_size: tuple[int, int]
    example_references: int = 0
    example_reference_size: tuple[int, int] = (1024, 1024)

    @property
    def example_tokens(self) -> int:
        """Image tokens per step of the example request."""
        return image_tokens(self.example_size, [self.example_reference_size] * self.example_references)

    def __contains__(self, tokens: object) -> bool:
        return isinstance(tokens, int) and self.min_tokens <= tokens <= self.max_tokens


# Contiguous, increasing ranges from the smallest output to a 1024x1024 output with four 1024x1024 references.
MENU: tuple[ShapeBucket, ...] = (
    ShapeBucket("up to 512x512", MIN_TOKENS, 1024, (512, 512)),
    ShapeBucket("up to 1024x1024", 1025, 4096, (1024, 1024)),
    ShapeBucket("1024x1024 + 1 reference", 4097, 8192, (1024, 1024), 1),
    ShapeBucket("1024x1024 + 3 references", 8193, 16384, (1024, 1024), 3),
    ShapeBucket("1024x1024 + 4 references", 16385, 20480, (1024, 1024), 4),
)


def image_tokens(
    output_size: tuple[int, int],
    reference_sizes: Sequence[tuple[int, int]] = (),
    token_pixels: int = TOKEN_PIXELS,
) -> int:
    """L for one denoising step: the output's tokens plus each prepared reference's, sizes as (width, height) px
    (multiples of `token_pixels`, as `rules.resolution` makes them)."""
    sizes = [output_size, *reference_sizes]
    return sum((w // token_pixels) * (h // token_pixels) for w, h in sizes)


def bucket_for(tokens: int, menu: Sequence[ShapeBucket] = MENU) -> ShapeBucket | None:
    """The bucket whose range holds `tokens`, or None past the menu (see the module docstring for what then)."""
    for bucket in menu:
        if tokens in bucket:
            return bucket
    return None


def check_menu(menu: Sequence[ShapeBucket]) -> None:
    """Raises ValueError unless the ranges are increasing and disjoint, start at 2 or more (Dynamo specialises
    sizes 0 and 1, so a range must not hold them), and each holds its own example."""
    previous = 1
    for bucket in menu:
        if not previous < bucket.min_tokens <= bucket.max_tokens:
            raise ValueError(
                f"bucket {bucket.name!r}: range {bucket.min_tokens}-{bucket.max_tokens} must start above "
                f"{previous} and not end before it starts"
            )
        if bucket.example_tokens not in bucket:
            raise ValueError(
                f"bucket {bucket.name!r}: its example has {bucket.example_tokens} tokens, outside its range"
            )
        previous = bucket.max_tokens


def select(names: str | None, menu: Sequence[ShapeBucket] = MENU) -> tuple[ShapeBucket, ...]:
    """The buckets to warm at start-up from a comma-separated list of names or 1-based positions in the menu;
    None or "all" is the whole menu, "none" is none. Raises ValueError naming the menu for an unknown entry."""
    if names is None or names.strip().lower() == "all":
        return tuple(menu)
    if names.strip().lower() == "none":
        return ()
    chosen: list[ShapeBucket] = []
    for entry in (part.strip() for part in names.split(",")):
        match = [b for i, b in enumerate(menu, 1) if entry in (b.name, str(i))]
        if not match:
            listed = "; ".join(f"{i}: {b.name}" for i, b in enumerate(menu, 1))
            raise ValueError(f"unknown compile bucket {entry!r}; the menu is {listed} (or all, none)")
        if match[0] not in chosen:
            chosen.append(match[0])
    return tuple(chosen)
