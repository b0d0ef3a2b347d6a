"""A scripted agent loop over the klein-agent MCP server: generate -> measure -> edit -> compose -> export.

It plays the part an LLM agent plays in Claude Desktop or Claude Code, with a critique a script can compute: the
mean colour of the full-resolution PNG against a target colour. Each round keeps an edit only if it moves the
picture closer to the target, and the loop stops when the picture is close enough or the rounds run out.

Runs as it is, on any machine, with the tiny random model (its pictures are noise, so the numbers move at random;
with a real FLUX.2 [klein] model they follow the prompts):

    python examples/agent_loop.py                      # spawns `klein-agent serve --model tiny` over stdio
    python examples/agent_loop.py --model black-forest-labs/FLUX.2-klein-4B --size 1024
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from PIL import Image, ImageStat

TARGET = (235, 140, 60)  # a warm sunset orange, as mean RGB
GOOD_ENOUGH = 25.0  # distance to the target (0-441) at which the loop stops
SESSION = "agent-loop"


def server_command(model: str, store: Path, out: Path) -> StdioServerParameters:
    exe = shutil.which("klein-agent")
    prefix = [exe] if exe else [sys.executable, "-m", "klein_agent"]
    args = [*prefix[1:], "serve", "--model", model, "--store", str(store), "--allow-dir", str(out)]
    return StdioServerParameters(
        command=prefix[0], args=[*args, "--no-default-dirs", "--log-level", "WARNING"]
    )


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content[0].text}")
    return dict(result.structured_content or {})


async def critique(client: Client, image_id: str) -> tuple[float, str]:
    """Distance of the picture's mean colour to TARGET, and an edit prompt that would reduce it."""
    blob = (await client.read_resource(f"image://{image_id}")).contents[0]
    picture = Image.open(io.BytesIO(base64.b64decode(blob.blob))).convert("RGB")  # type: ignore[union-attr]
    mean = ImageStat.Stat(picture).mean
    distance = math.dist(mean, TARGET)
    wishes = []
    if mean[0] < TARGET[0] - 20:
        wishes.append("a warmer, redder sky")
    if mean[2] > TARGET[2] + 20:
        wishes.append("deep orange light on the water")
    if sum(mean) / 3 < sum(TARGET) / 3 - 20:
        wishes.append("a brighter scene lit by a low golden sun")
    if not wishes:
        wishes.append("the same sunset with richer orange light")
    return distance, "The sunset over the sea with " + " and ".join(wishes) + "."


async def run(model: str, size: int, rounds: int, store: Path, out: Path) -> int:
    async with Client(server_command(model, store, out)) as client:
        status = await call(client, "server_status")
        print(f"server: model {model}, state {status['model']['state']}, store {status['store']['root']}")

        # 1. Two candidates from one prompt; keep the one closer to the target.
        made = await call(
            client, "generate", prompt="A sunset over a calm sea, warm orange sky", width=size, height=size,
            seed=1, num_images=2, session=SESSION,
        )  # fmt: skip
        scored = []
        for image in made["images"]:
            distance, _ = await critique(client, image["image_id"])
            scored.append((distance, image["image_id"], image["seed"]))
            print(f"generate  {image['image_id']}  seed {image['seed']}  distance {distance:6.1f}")
        scored.sort()
        best_distance, best, seed = scored[0]
        runner_up = scored[1][1]

        # 2. Targeted edits: measure, describe the fix positively, keep the edit only if it helped.
        for round_ in range(1, rounds + 1):
            if best_distance <= GOOD_ENOUGH:
                break
            _, wish = await critique(client, best)
            edited = await call(client, "edit", image=best, prompt=wish, seed=seed + round_, session=SESSION)
            candidate = edited["images"][0]["image_id"]
            distance, _ = await critique(client, candidate)
            kept = distance < best_distance
            print(
                f"edit {round_}    {candidate}  distance {distance:6.1f}  {'kept' if kept else 'dropped'}: {wish}"
            )
            if kept:
                best, best_distance = candidate, distance

        # 3. Compose the best picture with the runner-up, and keep whichever is closer.
        composed = await call(
            client, "compose", images=[best, runner_up],
            prompt="The sky of image 1 above the sea of image 2, warm orange light", seed=seed, session=SESSION,
        )  # fmt: skip
        candidate = composed["images"][0]["image_id"]
        distance, _ = await critique(client, candidate)
        print(f"compose   {candidate}  distance {distance:6.1f}  parents {composed['images'][0]['parents']}")
        if distance < best_distance:
            best, best_distance = candidate, distance

        # 4. Look at the winner, show its lineage, and write it out at full resolution.
        await call(client, "view_image", image_ids=[best], max_edge=256)
        history = await call(client, "list_images", session=SESSION, limit=50)
        exported = await call(
            client, "export_image", image_id=best, path=str(out / "best.png"), overwrite=True
        )
        print(
            f"\nbest {best}: distance {best_distance:.1f} to target {TARGET} after {len(history['images'])} images"
        )
        print(f"exported to {exported['path']}")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="tiny", help="what `klein-agent serve --model` loads (default: tiny)"
    )
    parser.add_argument(
        "--size", type=int, default=128, help="width and height, a multiple of 16 (default: 128)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="edit rounds at most (default: 3)")
    parser.add_argument(
        "--store", type=Path, default=None, help="image store folder (default: a temporary one)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("klein-agent-loop"),
        help="folder for best.png, kept after the run (default: ./klein-agent-loop)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="klein-agent-loop-") as scratch:
        store = args.store or Path(scratch) / "store"  # the store is scratch unless given; best.png is kept
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        return anyio.run(run, args.model, args.size, args.rounds, store, out)


if __name__ == "__main__":
    sys.exit(main())
