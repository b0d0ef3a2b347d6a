"""The tools' input schemas as they are published: an optional scalar as its own type with its default
(`{"type": "integer", "default": null, "minimum": 64, ...}`), not `anyOf: [integer, null]`.

Clients that build a form or convert typed text from the schema read only a top-level `type`, and compare it as a
string: MCP Inspector 0.15 (what `npx @modelcontextprotocol/inspector` resolves on Node 20) converts
`--tool-arg width=256` to a number only when `schema.type === "integer"`, so under `anyOf` it sent the string
"256", which is refused. `"type": ["integer", "null"]` is no better there (an array is not "integer"; checked
against 0.15's CLI), so the type is published alone; `"default": null` says that omitting it is the way to ask for
the default. The argument checks still validate against the SDK's own schema, so an explicit null is taken as
before (`klein_agent.server.arguments`).

Why a rewrite of the finished schema: the SDK builds each tool's schema with pydantic's default generator and has
no hook for another one, and a per-field `json_schema_extra` would have to be repeated on every optional argument.
Rewriting what `list_tools` publishes covers every tool, argument and nested model ($defs) at once.
"""

from __future__ import annotations

from typing import Any

SCALARS = ("integer", "number", "string", "boolean")
NULL = {"type": "null"}


def optional_scalars_as_their_type(schema: Any) -> Any:
    """A copy of the JSON schema `schema` with every `anyOf: [{"type": T, ...}, {"type": "null"}]` for a scalar T
    merged into `{"type": T, ...}` (the outer keys, `default` and `description`, kept), at any depth (properties,
    items, $defs). A branch with `enum` or `const` or keys that clash with the outer schema's is left as it is."""
    if isinstance(schema, list):
        return [optional_scalars_as_their_type(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: optional_scalars_as_their_type(value) for key, value in schema.items()}
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
    return {**outer, **given}
