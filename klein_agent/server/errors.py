"""The errors the layers below raise on purpose, as `ToolError`: their text reaches the calling model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mcp.server.mcpserver.exceptions import ToolError

from klein_agent.service.studio import EXPECTED_ERRORS


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Turn RequestError, ImageInputError, StoreError and EngineError into ToolError with the same message."""
    try:
        yield
    except ToolError:
        raise
    except EXPECTED_ERRORS as exc:
        raise ToolError(str(exc)) from exc
