"""Our autoencoder's encoder on the two input layouts: channels-last (what `imaging.to_tensor` gives, and what
diffusers' `VaeImageProcessor` gives) and contiguous NCHW.

    python tools/bench_layout.py --preset mid --size 512x512 --runs 9 --threads 1

Runs alternate between the layouts (interleaved, order flipping every run); medians of wall time and of the calling
thread's CPU time (the figure to trust on a shared machine with --threads 1). Also checks that both layouts encode to
the same latents within float tolerance (different kernels sum in different orders).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from klein_agent.loading.random_init import build_random_models
from klein_agent.model.configs import PRESETS
from klein_agent.pipeline.imaging import to_tensor
from klein_agent.speedups.devices import resolve_device, resolve_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, autoencoder, _ = build_random_models(PRESETS[args.preset], seed=0, device=device, dtype=dtype)
    width, height = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
    from PIL import Image

    picture = Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())
    ours = to_tensor(picture).to(device, dtype, memory_format=torch.channels_last)
    inputs = {"channels-last": ours, "NCHW": ours.contiguous()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in inputs}
    latents = {}
    with torch.inference_mode():
        for i in range(args.warmup + args.runs):
            names = list(inputs) if i % 2 == 0 else list(reversed(inputs))
            for name in names:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall, cpu = time.perf_counter(), time.thread_time()
                latents[name] = autoencoder.encode(inputs[name])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= args.warmup:
                    times[name].append(
                        ((time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000)
                    )
    print(
        f"encoder, preset {args.preset}, {args.size}, {device}, {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, {args.runs} interleaved runs, medians in ms"
    )
    for name, samples in times.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        print(f"{name:>14}: wall {wall:8.1f}  cpu {cpu:8.1f}")
    diff = (latents["channels-last"].float() - latents["NCHW"].float()).abs().max().item()
    print(f"max |latent difference| between layouts: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
