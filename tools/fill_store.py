"""Fill a scratch image store with agent-like sessions of small synthetic pictures, fast.

    python tools/fill_store.py STORE [--images 1000] [--sessions 25] [--seed 0]
    python tools/fill_store.py STORE --odd      # the 20 awkward cards of `odd_cases` instead

Each session starts from a text-to-image try, then edits earlier tries (mostly the last one, sometimes an older
one: the agent went back), now and then imports a reference and composes it with a try. Records carry the recipe
keys the server writes (tool, prompt, seed, size, steps, model, parents, session, timings), so the gallery shows
them as it would a real store. The pictures are drawn, not generated: this needs no model.

For speed it skips fsync (the store's durability is pointless for a scratch folder): ~1 ms per image instead of
~13. Never point it at a store you care about. Used by the gallery's tests and by tools/bench_gallery.py.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path
from unittest import mock

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klein_agent

from klein_agent.service.store import ImageStore, StoredImage

SUBJECTS = [
    "a red fox",
    "a lighthouse",
    "a bowl of ramen",
    "a paper boat",
    "a robot gardener",
    "a desert city",
]
EDITS = [
    "make it night",
    "add falling snow",
    "warmer light",
    "in watercolour",
    "closer crop",
    "add a rainbow",
]


def picture(rng: random.Random, width: int, height: int) -> bytes:
    """A PNG of a soft two-colour gradient with a few shapes: cheap to draw, easy to tell apart."""
    top = tuple(rng.randrange(40, 230) for _ in range(3))
    bottom = tuple(rng.randrange(20, 200) for _ in range(3))
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line(
            [(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        )
    for _ in range(rng.randrange(1, 4)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(min(width, height) // 8, min(width, height) // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.rectangle([x - r, y - r // 2, x + r, y + r // 2], fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def recipe(
    tool: str, prompt: str, seed: int, size: tuple[int, int], parents: list[str], session: str
) -> dict:
    """A recipe with the keys `Studio` stores for a tiny-model call."""
    model_ms = round(random.uniform(300, 1800), 1)
    return {
        "tool": tool,
        "prompt": prompt,
        "seed": seed,
        "width": size[0],
        "height": size[1],
        "steps": 4,
        "guidance": None,
        "model": "tiny",
        "variant": "tiny",
        "parents": parents,
        "session": session,
        "device": "cpu",
        "dtype": "float32",
        "timings_ms": {"total": model_ms - 5.0},
        "model_ms": model_ms,
        "queued_ms": 0.0,
    }


def fill(store: ImageStore, images: int, sessions: int, seed: int = 0) -> list[StoredImage]:
    """Put `images` pictures in `sessions` sessions (oldest first); returns them in the order stored."""
    rng = random.Random(seed)
    made: list[StoredImage] = []
    with mock.patch("klein_agent.service.files.os.fsync"):
        store.catalog._conn.execute("PRAGMA synchronous=OFF")  # type: ignore[attr-defined]  # a scratch store
        for k in range(sessions):
            session = f"session-{k + 1:02d}"
            subject = rng.choice(SUBJECTS)
            size = rng.choice([(96, 96), (128, 96), (96, 128)])
            tries: list[StoredImage] = []
            until = round((k + 1) * images / sessions)  # this session ends when the store holds this many
            while len(made) < until:
                seed_k = rng.randrange(2**32)
                if not tries:
                    tool, prompt, parents = "generate", subject, []
                elif len(tries) >= 2 and rng.random() < 0.12:
                    reference = store.put(
                        picture(rng, *size),
                        width=size[0],
                        height=size[1],
                        session=session,
                        recipe={
                            "tool": "import",
                            "source": f"/home/me/Pictures/ref-{k}.png",
                            "width": size[0],
                            "height": size[1],
                        },
                    )
                    made.append(reference)
                    tool, prompt, parents = (
                        "compose",
                        f"{subject} from image 1 in the style of image 2",
                        [tries[-1].image_id, reference.image_id],
                    )
                else:
                    base = tries[-1] if rng.random() < 0.75 else rng.choice(tries)
                    tool, prompt, parents = "edit", f"{subject}, {rng.choice(EDITS)}", [base.image_id]
                if len(made) >= until:
                    break
                image = store.put(
                    picture(rng, *size),
                    width=size[0],
                    height=size[1],
                    session=session,
                    parents=parents,
                    recipe=recipe(tool, prompt, seed_k, size, parents, session),
                )
                tries.append(image)
                made.append(image)
    return made


HOSTILE_PARENT = "img_\"] <b>x</b> \\ ' %zz #\n"  # a parent id as a hand-edited database might hold it
LONG_PROMPT = (
    "a lighthouse on a basalt cliff at dusk, waves breaking far below, a keeper's cottage with one lit window, "
    "gulls over the lantern room, long exposure, the beam sweeping through sea mist, 35 mm, muted teal and amber "
    "palette, soft film grain, the horizon slightly tilted as if taken from a moving boat, no text, no watermark"
)


def odd_cases(store: ImageStore, seed: int = 0) -> dict[str, str]:
    """Twenty cards that are awkward to show: two sessions whose images interleave in time (two agents at work at
    once), an inpaint, a compose, an import, a very long prompt, two images without a session, and one image
    (agent-b's newest) whose stored parent list holds `HOSTILE_PARENT` (quotes, markup, a backslash, a bad %-escape, a newline; written
    into the database by hand, as `put` refuses such an id). Returns the notable ids by role: "hostile",
    "inpaint", "long", "first_a", "first_b"."""
    rng = random.Random(seed)
    size = (96, 96)
    last: dict[str | None, StoredImage] = {}
    roles: dict[str, str] = {}

    def put(session: str | None, tool: str, prompt: str, parents: list[str], **extra: object) -> StoredImage:
        image = store.put(
            picture(rng, *size),
            width=size[0],
            height=size[1],
            session=session,
            parents=parents,
            recipe={**recipe(tool, prompt, rng.randrange(2**32), size, parents, session or ""), **extra},
        )
        last[session] = image
        return image

    with mock.patch("klein_agent.service.files.os.fsync"):
        roles["first_a"] = put("agent-a", "generate", "a red fox", []).image_id
        roles["first_b"] = put("agent-b", "generate", "a paper boat", []).image_id
        for k in range(6):  # the two agents take turns: their images interleave in time
            for session, subject in (("agent-a", "a red fox"), ("agent-b", "a paper boat")):
                if k == 2 and session == "agent-a":
                    roles["inpaint"] = put(
                        session,
                        "inpaint",
                        "replace the sky with a storm",
                        [last[session].image_id],
                        mask={"boxes": [[0, 0, 96, 40]]},
                        strength=0.9,
                    ).image_id
                elif k == 3 and session == "agent-b":
                    roles["long"] = put(session, "edit", LONG_PROMPT, [last[session].image_id]).image_id
                else:
                    put(session, "edit", f"{subject}, {EDITS[k]}", [last[session].image_id])
        reference = store.put(
            picture(rng, *size),
            width=size[0],
            height=size[1],
            session="agent-a",
            recipe={"tool": "import", "source": "/home/me/Pictures/a very long folder name/ref.png"},
        )
        put(
            "agent-a",
            "compose",
            "image 1 in the style of image 2",
            [last["agent-a"].image_id, reference.image_id],
        )
        put(None, "generate", "a bowl of ramen", [])
        put(None, "edit", "a bowl of ramen, warmer light", [last[None].image_id])
        hostile = put("agent-b", "edit", "a paper boat, closer crop", [last["agent-b"].image_id])
        put("agent-a", "edit", "a red fox, add a rainbow", [last["agent-a"].image_id])
    store.catalog._conn.execute(  # type: ignore[attr-defined]  # what only a hand edit of the database can do
        "UPDATE images SET parents = ? WHERE image_id = ?",
        (json.dumps([*hostile.parents, HOSTILE_PARENT]), hostile.image_id),
    )
    store.catalog._conn.commit()  # type: ignore[attr-defined]
    roles["hostile"] = hostile.image_id
    return roles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--odd", action="store_true", help="store the 20 awkward cards of odd_cases() instead"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with ImageStore(args.store, max_images=max(10_000, args.images)) as store:
        if args.odd:
            roles = odd_cases(store, args.seed)
            print(f"20 awkward images in {args.store}: {roles}", file=sys.stderr)
            return 0
        made = fill(store, args.images, args.sessions, args.seed)
    print(f"{len(made)} images in {args.store} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
