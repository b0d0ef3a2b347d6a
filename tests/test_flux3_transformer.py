"""Our FLUX 3 transformer against diffusers' `Flux3Transformer2DModel` on the same random weights, fp32 on CPU.

The tolerance comes from the arithmetic (tests/tolerances.py): diffusers' module also runs in float64, and ours must
be within a small multiple of diffusers' own float32 error on this CPU. Each case also checks that one weight scaled
by 1 + 1e-3, or one reference moved on the l axis, fails that bound. Inputs are diffusers' own position ids (its
`_prepare_image_ids`), so a wrong position rule on our side cannot be handed to the reference.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from diffusers import Flux3Transformer2DModel
from diffusers.modular_pipelines.flux3.before_denoise import _prepare_image_ids
from tolerances import rounding_bound, scaled_weight

from klein_agent.loading import flux3_keymaps
from klein_agent.model.configs import Flux3TransformerConfig, preset
from klein_agent.model.flux3_transformer import Flux3Transformer

TINY = preset("flux3-tiny").transformer
assert isinstance(TINY, Flux3TransformerConfig)
# Non-default shapes: unequal mode and joint block counts, more heads, other channel counts, a wider context
ODD = Flux3TransformerConfig(
    in_channels=8,
    cond_in_channels=12,
    context_in_dim=40,
    hidden_size=96,
    num_heads=4,
    depth=3,
    depth_single_blocks=1,
    axes_dim=(4, 8, 8, 4),
    flow_map=True,
)


def diffusers_flux3(config: Flux3TransformerConfig) -> Flux3Transformer2DModel:
    """diffusers' module of the same sizes, with random weights large enough that every part matters."""
    model = Flux3Transformer2DModel(
        in_channels=config.in_channels,
        cond_in_channels=config.cond_in_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        timestep_channels=config.timestep_channels,
        mlp_ratio=config.mlp_ratio,
        axes_dims_rope=config.axes_dim,
        rope_theta=config.theta,
        eps=config.eps,
        flow_map=config.flow_map,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 1.3 * p[0].numel() ** -0.5)
    return model.eval()


CASES = [
    ("distilled-t2i", TINY, ()),
    ("base-t2i", replace(TINY, flow_map=False), ()),
    ("distilled-edit", TINY, ((4, 3),)),
    ("base-compose", replace(TINY, flow_map=False), ((2, 4), (3, 3), (1, 5))),
    ("odd-shapes-compose", ODD, ((3, 2), (2, 2))),
]


@pytest.mark.parametrize(("config", "refs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_matches_diffusers(config: Flux3TransformerConfig, refs: tuple[tuple[int, int], ...]) -> None:
    torch.manual_seed(0)
    ref_model = diffusers_flux3(config)
    ours = Flux3Transformer(config).eval()
    ours.load_state_dict(flux3_keymaps.transformer_from_diffusers(ref_model.state_dict()), strict=True)

    h, w, txt = 3, 5, 7  # non-square
    x = torch.randn(2, h * w, config.in_channels)
    ctx = torch.randn(2, txt, config.context_in_dim)
    img_ids = _prepare_image_ids(h, w, 0.5)
    txt_ids = torch.cartesian_prod(
        torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(txt)
    ).float()
    cond = torch.randn(2, sum(a * b for a, b in refs), config.cond_in_channels) if refs else None
    cond_ids = (
        torch.cat([_prepare_image_ids(a, b, 0.5, l_coord=-(1 + k)) for k, (a, b) in enumerate(refs)])
        if refs
        else None
    )
    t = torch.tensor([0.9, 0.25])
    target = torch.tensor([0.8, 0.0]) if config.flow_map else None

    def reference(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=ctx.to(dtype),
            timestep=t.to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            image_cond_hidden_states=None if cond is None else cond.to(dtype),
            image_cond_ids=cond_ids,
            target_timestep=None if target is None else target.to(dtype),
            return_dict=False,
        )[0]

    def run(ids_of_refs: torch.Tensor | None = cond_ids) -> torch.Tensor:
        return ours(x, img_ids, ctx, txt_ids, t, target, cond, ids_of_refs)

    with torch.no_grad():
        got = run()
        want = reference(ref_model, torch.float32)
        bound = rounding_bound(
            "flux3 transformer", reference(copy.deepcopy(ref_model).double(), torch.float64), want
        )
        with scaled_weight(ours, "single_blocks.0.mlp_out.weight"):
            broken = run()
        moved = None
        if cond_ids is not None:
            shifted = cond_ids.clone()
            shifted[:, 3] -= 1  # every reference one step further along l
            moved = run(shifted)
    assert got.shape == want.shape == (2, h * w, config.in_channels)
    bound.check(got)
    bound.check_catches(broken, "the first joint block's MLP output weight x (1 + 1e-3)")
    if moved is not None:
        bound.check_catches(moved, "references one step further along the l axis")


def test_keymap_round_trip_and_bfl_names() -> None:
    ref_model = diffusers_flux3(TINY)
    theirs = ref_model.state_dict()
    ours = flux3_keymaps.transformer_from_diffusers(theirs)
    assert set(ours) == set(Flux3Transformer(TINY).state_dict())
    back = flux3_keymaps.transformer_to_diffusers(ours)
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    # BFL's output modulation is [shift; scale], diffusers' [scale; shift]
    shift_scale = ours["final_layer.image.adaLN_modulation.1.weight"]
    assert torch.equal(shift_scale[: TINY.hidden_size], theirs["norm_out.linear.weight"][TINY.hidden_size :])


def test_flow_map_needs_target_timestep_and_only_it() -> None:
    distilled, base = Flux3Transformer(TINY), Flux3Transformer(replace(TINY, flow_map=False))
    x, ctx = torch.randn(1, 4, TINY.in_channels), torch.randn(1, 3, TINY.context_in_dim)
    ids, txt_ids = _prepare_image_ids(2, 2, 0.5), torch.zeros(3, 4)
    t = torch.tensor([0.5])
    with pytest.raises(ValueError, match="target_timesteps"):
        distilled(x, ids, ctx, txt_ids, t)
    with pytest.raises(ValueError, match="target_timesteps"):
        base(x, ids, ctx, txt_ids, t, t)
    assert "ref_time_in.in_layer.weight" in distilled.state_dict()
    assert "ref_time_in.in_layer.weight" not in base.state_dict()


def test_real_presets_have_diffusers_parameter_counts() -> None:
    """The presets' shapes, counted on the meta device, are diffusers' defaults: 5,548,681,984 parameters for the
    distilled transformer and 5,538,458,368 for Base (counted from `Flux3Transformer2DModel()`)."""
    for name, count in (("flux3-klein", 5_548_681_984), ("flux3-klein-base", 5_538_458_368)):
        config = preset(name).transformer
        assert isinstance(config, Flux3TransformerConfig)
        with torch.device("meta"):
            model = Flux3Transformer(config)
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_random_flux3_models_run_and_the_real_shape_sizes_on_meta() -> None:
    from klein_agent.loading.random_init import build_random_flux3, build_random_models
    from klein_agent.pipeline.flux3 import Flux3Pipeline

    tiny = preset("flux3-tiny")
    pictures = []
    for _ in range(2):
        transformer, autoencoder, text = build_random_flux3(tiny, seed=3)
        pipe = Flux3Pipeline(transformer, autoencoder, text, tiny.sampling)
        pictures.append(pipe.pictures("a red cube", [1], height=32, width=48, steps=2)[0])
    assert pictures[0].size == (48, 32)
    assert pictures[0].tobytes() == pictures[1].tobytes()  # the same seed, the same weights
    real, _, real_text = build_random_flux3(preset("flux3-klein"), device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in real.parameters()) == 5_548_681_984
    assert real_text.output_dim == 20480
    assert real.single_blocks[0].norm.query_norm.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="build_random_flux3"):
        build_random_models(tiny)
    with pytest.raises(ValueError, match="build_random_models"):
        build_random_flux3(preset("tiny"))
