"""The one error loading raises on purpose."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says what is wrong and where."""


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this model. The message names the file, the key when one is to blame,
    what is wrong and what to do about it: `LoRA <file>, key '<key>': <problem>; <fix>`."""

    def __init__(self, path: object, problem: str, fix: str, key: str | None = None) -> None:
        where = f"LoRA {path}" if key is None else f"LoRA {path}, key {key!r}"
        super().__init__(f"{where}: {problem}; {fix}")
        self.path, self.key = path, key
