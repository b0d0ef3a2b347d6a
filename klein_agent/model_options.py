"""Command-line options that choose and place a model, shared by `klein-agent generate` and `klein-agent serve`.

Parsing stays light (no torch import) so `--help` and the MCP `initialize` answer are instant; the model itself is
built only when the returned factory is called.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from pathlib import Path

from klein_agent.option_types import non_negative_gib
from klein_agent.rules import buckets, families
from klein_agent.rules.requests import ImageGenerator
from klein_agent.rules.resolution import RequestError

log = logging.getLogger(__name__)


def add_model_arguments(
    parser: argparse.ArgumentParser, *, serve: bool = False, model_required: bool = True
) -> None:
    """Add the "model" option group (--model, --transformer-file, --device, --dtype, ...) to `parser`; with `serve`,
    also --warm-buckets (a server compiles before it reports ready; a one-off generate compiles what it needs).
    Without `model_required` (serve) --model may be left out; `check_serve_model_options` says when it must not."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=model_required,
        help="a diffusers-layout folder (FLUX.2 [klein], or FLUX 3 [klein] as diffusers' modular pipelines save "
        "it), a Hugging Face repo id (read from the local HF cache), 'tiny' or 'flux3-tiny' (deterministic tiny "
        "random models: noise pictures, run anywhere), or random:PRESET (random weights of a preset's shape such "
        "as random:klein-4b or random:flux3-klein, for benchmarks)"
        + (
            "; with --generator ray the deployed application's model is used and --model, if given, must name it"
            if not model_required
            else ""
        ),
    )
    group.add_argument(
        "--transformer-file",
        default=None,
        help="a BFL single-file transformer (e.g. flux-2-klein-4b.safetensors, or a FLUX 3 one with a FLUX 3 "
        "folder) to use instead of the folder's",
    )
    group.add_argument(
        "--device", default=None, help="cuda, cuda:N, mps or cpu (default: the best available)"
    )
    group.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="weights and activations (default: bfloat16 on CUDA, float32 elsewhere)",
    )
    group.add_argument(
        "--offload-text-encoder",
        action="store_true",
        help="keep the text encoder in host memory between prompts (saves ~8 GB of GPU memory for the 4B; "
        "costs a transfer for each prompt not already cached)",
    )
    group.add_argument(
        "--fp8",
        action="store_true",
        help="float8 weights and activations for the transformer blocks' linear layers (fast on Hopper/Ada GPUs)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="compile the transformer blocks and the decoder with torch.compile (GPU), for a menu of shape buckets "
        "(sizes inside a compiled bucket never recompile; serve compiles them before it reports ready, see "
        "--warm-buckets; kernels are cached on disk in ~/.cache/klein-agent/torch-compile)",
    )
    if serve:
        menu = ", ".join(f"{i}: {b.name}" for i, b in enumerate(buckets.MENU, 1))
        group.add_argument(
            "--warm-buckets",
            default="all",
            metavar="NAMES",
            help="with --compile: the shape buckets to compile before the server reports ready, by name or position "
            f"in the menu ({menu}), comma-separated, or all (default) or none (each compiles on its first request)",
        )
    group.add_argument(
        "--reference-kv-cache-gib",
        type=non_negative_gib,
        default=None,
        metavar="GIB",
        help="klein 9B-KV: memory for reference keys and values kept across calls, so a retry on the same "
        "references skips them at every step (a 1024x1024 reference takes 2 GiB for the 9B in bfloat16; "
        "0 keeps them for one call only; default: on CUDA half the memory free after loading, at most a quarter "
        "of the card, elsewhere 2)",
    )
    group.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA adapter (.safetensors: diffusers/PEFT, kohya or ai-toolkit layout) or LoKr adapter (BFL, "
        "LyCORIS or diffusers layout) and its scale (default 1, "
        "from -4 to 4); repeatable. generate runs them all; serve loads them for calls to choose by name "
        "(the file's stem)",
    )
    group.add_argument(
        "--prompt-upsampler",
        default=None,
        metavar="PATH|REPO",
        help="FLUX 3 [klein]: BFL's prompt upsampler (a folder or a cached repo id, e.g. "
        "black-forest-labs/flux-3-image-klein-pup) writes the caption the model encodes from each prompt (and an "
        "edit's pictures), greedily, as BFL trained the model; the recipe keeps prompt and caption. Without it a "
        "FLUX 3 model encodes the prompt as given (or a caption you pass)",
    )
    group.add_argument(
        "--allow-download",
        action="store_true",
        help="let a repo id missing from the local Hugging Face cache be downloaded (needs huggingface_hub)",
    )


def lora_arguments(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The --lora options as (file, scale); raises RequestError for a bad scale and ValueError for a file that
    does not exist (checked before the model loads)."""
    from klein_agent.rules.loras import parse_lora_argument

    loras = []
    for text in getattr(args, "lora", []):
        path, scale = parse_lora_argument(text)
        if not path.is_file():
            raise ValueError(f"--lora {text}: {path} is not a file")
        loras.append((str(path), scale))
    return loras


DEVICE_NAME = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")


def check_model_options(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Check --device, --model, --transformer-file and --lora as far as the filesystem tells, importing neither
    torch nor transformers (whether CUDA or MPS is usable is known only once torch loads). Returns the --lora
    options as (file, scale). Raises ValueError (CheckpointError, RequestError) naming the option."""
    from klein_agent.loading.hub import check_model_source

    device = args.device
    if device is not None and not DEVICE_NAME.match(device):
        raise ValueError(f"--device {device!r}: choose cpu, cuda, cuda:N (N = 0, 1, ...) or mps")
    if args.transformer_file is not None and not Path(args.transformer_file).expanduser().is_file():
        raise ValueError(f"--transformer-file {args.transformer_file} is not a file")
    loras = lora_arguments(args)
    buckets.select(getattr(args, "warm_buckets", None))  # a bad --warm-buckets name, before the model loads
    if not _built_in(args.model):
        folder = check_model_source(args.model, allow_download=args.allow_download)
        if folder is not None:
            log_licence(folder)
    if getattr(args, "prompt_upsampler", None) is not None:
        from klein_agent.loading.upsampler_source import check_upsampler_files

        try:  # by --model's name or folder: refused before the model loads, not after
            families.check_flux3_only("--prompt-upsampler", model_family(args))
        except RequestError as exc:
            raise RequestError(f"--model {args.model}: {exc}") from None

        check_upsampler_files(args.prompt_upsampler)
    return loras


# The options that choose how a model loads and runs: with `serve --generator ray` they belong to the replicas
# (`klein-agent deploy` takes them), so a front-end given one would silently not use it.
LOADING_OPTIONS = {
    "transformer_file": "--transformer-file",
    "device": "--device",
    "dtype": "--dtype",
    "offload_text_encoder": "--offload-text-encoder",
    "fp8": "--fp8",
    "compile": "--compile",
    "reference_kv_cache_gib": "--reference-kv-cache-gib",
    "lora": "--lora",
    "allow_download": "--allow-download",
}


def check_serve_model_options(args: argparse.Namespace, remote: bool) -> None:
    """`serve`'s model options. With a local model (`remote` False) --model is required and checked as
    `check_model_options` does. With a deployed one (`--generator ray`) the front-end loads nothing and needs no
    weights: --model is optional (compared with the application's model once connected) and the loading options
    are refused, naming them, since the replicas were given theirs by `deploy`. Raises ValueError."""
    if not remote:
        if args.model is None:
            raise ValueError(
                "serve needs --model MODEL (a folder, a Hugging Face repo id or tiny), or --generator ray[:APP] to "
                "use the model a `klein-agent deploy` application runs"
            )
        check_model_options(args)
        return
    given = [flag for name, flag in LOADING_OPTIONS.items() if _given(getattr(args, name, None))]
    if given:
        raise ValueError(
            f"{', '.join(given)}: with --generator ray the model loads on the replicas, with the options given to "
            "`klein-agent deploy`; drop them here (or redeploy with them)"
        )


def _given(value: object) -> bool:
    """Whether an option differs from its unset default (None, False, []); `0` counts as given
    (--reference-kv-cache-gib 0), which `value not in (None, False, [])` would miss since 0 == False."""
    return value is not None and value is not False and value != []


def log_licence(folder: Path) -> None:
    """One stderr line with the licence the model folder ships (its LICENSE file's first line): the weights'
    licence is the user's to respect, and the file is the authority (`klein-agent models` lists BFL's table)."""
    from klein_agent.loading.hub import licence_line

    found = licence_line(folder)
    if found is None:
        log.info("model %s: no LICENSE file in the folder; check the licence on the model card", folder)
    else:
        log.info("model licence (%s): %s", found[0], found[1])


def _built_in(model: str) -> bool:
    return model in families.BUILT_IN_MODELS or model.startswith(families.RANDOM_PREFIX)


def model_family(args: argparse.Namespace) -> str:
    """The family ("flux2", "flux3": `rules.families`) of the model --model names, from its name or its folder's
    index, without loading it (a repo id still to be downloaded counts as FLUX.2 until it has loaded). Raises
    CheckpointError as `check_model_source` does."""
    from klein_agent.loading.hub import check_model_source, is_flux3

    if _built_in(args.model):
        return families.preset_family(args.model.removeprefix(families.RANDOM_PREFIX)).name
    folder = check_model_source(args.model, allow_download=args.allow_download)
    return families.FLUX3.name if folder is not None and is_flux3(folder) else families.FLUX2.name


def generator_factory(
    args: argparse.Namespace, *, skip_bad_loras: bool = False
) -> Callable[[], ImageGenerator]:
    """A zero-argument callable that loads the model the options name; runs wherever it is called. The options
    are checked first (`check_model_options`), before anything heavy is imported. `skip_bad_loras` (serve): a
    --lora file that cannot be loaded is logged and left out instead of failing the load (`load_pipeline`)."""
    loras = check_model_options(args)

    def load() -> ImageGenerator:
        from klein_agent.pipeline import load_pipeline  # torch is imported here, not at parse time
        from klein_agent.pipeline.captioning import with_captions

        generator = load_pipeline(
            args.model,
            device=args.device,
            dtype=args.dtype,
            transformer_file=args.transformer_file,
            allow_download=args.allow_download,
            offload_text_encoder=getattr(args, "offload_text_encoder", False),
            fp8=getattr(args, "fp8", False),
            compile=getattr(args, "compile", False),
            reference_kv_cache_bytes=_gib_to_bytes(getattr(args, "reference_kv_cache_gib", None)),
            loras=loras,
            warm_buckets=getattr(args, "warm_buckets", None),
            skip_bad_loras=skip_bad_loras,
        )
        return with_captions(generator, getattr(args, "prompt_upsampler", None))

    return load


def _gib_to_bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * 1024**3)
