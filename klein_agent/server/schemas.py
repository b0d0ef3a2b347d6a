"""The tools' input schemas as they are published: optional scalars as `"type": [T, "null"]`, not `anyOf`.

Pydantic writes `int | None` as `{"anyOf": [{"type": "integer", ...}, {"type": "null"}]}`. Both are valid JSON
Schema, but clients that build a form from the schema read only a top-level `type`: MCP Inspector 0.15 (what
`npx @modelcontextprotocol/inspector` resolves on Node 20) shows such an argument as text and sends `width=256` as
the string "256", which is refused. `{"type": ["integer", "null"], "minimum": 64, ...}` takes exactly the same
values (`minimum`, `multipleOf`, `minLength`... apply only to values of their own type, so null still passes), and
those clients read it.

Why a rewrite of the finished schema: the SDK builds each tool's schema with pydantic's default generator and has
no hook for another one, and a per-field `json_schema_extra` would have to be repeated on every optional argument.
Rewriting what `list_tools` publishes covers every tool, argument and nested model ($defs) at once.
"""

from __future__ import annotations

from typing import Any

SCALARS = ("integer", "number", "string", "boolean")
NULL = {"type": "null"}


def nullable_as_type_lists(schema: Any) -> Any:
    """A copy of the JSON schema `schema` with every `anyOf: [{"type": T, ...}, {"type": "null"}]` for a scalar T
    merged into `{"type": [T, "null"], ...}`, at any depth (properties, items, $defs). A branch with `enum` or
    `const` (null would need listing there too) or keys that clash with the outer schema's is left as it is."""
    if isinstance(schema, list):
        return [nullable_as_type_lists(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: nullable_as_type_lists(value) for key, value in schema.items()}
    options = result.get("anyOf")
    if not (isinstance(options, list) and len(options) == 2 and NULL in options):
        return result
    given = options[1 - options.index(NULL)]
    outer = {key: value for key, value in result.items() if key != "anyOf"}
    if (
        not isinstance(given, dict)
        or given.get("type") not in SCALARS
        or {"enum", "const"} & set(given)
        or set(given) & set(outer)
    ):
        return result
    return {**outer, **given, "type": [given["type"], "null"]}
