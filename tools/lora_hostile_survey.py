"""How the hostile LoRA files of tests/lora_hostile.py fare, counted the way `klein-agent generate` would end.

    PYTHONPATH=$PWD python tools/lora_hostile_survey.py            # this tree
    PYTHONPATH=/path/to/other/tree python tools/lora_hostile_survey.py   # e.g. an export of main, for "before"

Each file is loaded with the tiny model (`load_pipeline("tiny", loras=[file])`) and, if that works, one 64x64
picture is made, in this process. Outcomes: `refused` (a ValueError/OSError/RuntimeError naming the file, at
load: exit 2 with that message), `unnamed` (one of those, not naming the file), `traceback` (any other
exception: the CLI prints a traceback), `accepted` (a picture came out), `late` (loaded, then generation failed).
The sparse 10 GiB file is left out unless --sparse: before the fix it allocates the 10 GiB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

CASES_FILE = Path(__file__).resolve().parents[1] / "tests" / "lora_hostile.py"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparse", action="store_true", help="include the sparse 10 GiB-declared file")
    parser.add_argument("--json", action="store_true", help="one JSON object per file as well")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    spec = importlib.util.spec_from_file_location("lora_hostile", CASES_FILE)
    assert spec is not None and spec.loader is not None
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)

    from klein_agent.pipeline import load_pipeline
    from klein_agent.rules.requests import GenerationRequest

    outcomes: Counter[str] = Counter()
    folder = Path(tempfile.mkdtemp(prefix="lora-survey-"))
    for k, (name, (build, _)) in enumerate(cases.CASES.items()):
        if name.startswith("sparse") and not args.sparse:
            continue
        path = folder / f"case{k}.safetensors"
        build(path)
        outcome, detail = "accepted", ""
        try:
            pipe = load_pipeline("tiny", loras=[(str(path), 1.0)])
        except (ValueError, OSError, RuntimeError) as exc:
            outcome, detail = ("refused" if str(path) in str(exc) else "unnamed"), str(exc)
        except BaseException as exc:  # what the CLI would print as a traceback
            outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"
        else:
            try:
                pipe.generate(GenerationRequest("x", 64, 64, seed=1, steps=1, loras=pipe.info.loras))
            except BaseException as exc:  # a late failure, whatever its kind
                outcome, detail = "late", f"{type(exc).__name__}: {exc}"
        outcomes[outcome] += 1
        if args.json:
            print(json.dumps({"case": name, "outcome": outcome, "detail": detail[:200]}))
        path.unlink()
    total = sum(outcomes.values())
    print(
        f"{total} files: "
        + ", ".join(
            f"{key} {outcomes[key]}" for key in ("refused", "traceback", "unnamed", "accepted", "late")
        )
    )


if __name__ == "__main__":
    main()
