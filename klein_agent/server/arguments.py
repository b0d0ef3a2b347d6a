"""Checks on what a client sends, before the SDK validates it: unknown arguments, wrong JSON types and ranges on
tools, missing arguments and unknown names on prompts. Each answer reads like the tools' own messages.

Why here: the SDK coerces `"64"` to 64 and `"yes"` to True, silently drops an argument the tool does not have (an
agent passing `negative_prompt` believes it took effect), and reports schema errors as pydantic text with links.
Prompt errors came back with JSON-RPC code 0. This middleware runs before the SDK's own validation
(`ServerMiddleware`), checks tool arguments against each tool's published input schema with `jsonschema`, and
raises INVALID_PARAMS (-32602) for prompts.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from mcp.server import MCPServer
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolResult, TextContent

# What agents reach for that FLUX.2 [klein] does not have, and what to do instead.
HINTS = {
    "negative_prompt": "klein takes no negative prompt: describe what should be there instead",
    "cfg_scale": "the guidance scale is `guidance` (Base models only)",
    "num_inference_steps": "the step count is `steps`",
    "size": "give `width` and `height`",
    "image_url": "pass the URL (or an id, path or data: URI) as `image`",
}


class ArgumentChecks(ServerMiddleware[Any]):
    """Refuses bad tool arguments with a readable tool error and bad prompt requests with -32602."""

    def __init__(self) -> None:
        self._mcp: MCPServer[Any] | None = None
        self._tools: dict[str, dict[str, Any]] | None = None
        self._prompts: dict[str, tuple[set[str], set[str]]] | None = None

    def bind(self, mcp: MCPServer[Any]) -> None:
        """The server whose tools and prompts are checked (it is built with this middleware in it)."""
        self._mcp = mcp

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Check `tools/call` and `prompts/get` requests; pass everything else on."""
        if self._mcp is None:
            return await call_next(ctx)
        params = ctx.params if isinstance(ctx.params, dict) else {}
        if ctx.method == "tools/call":
            problem = await self._tool_problem(params)
            if problem is not None:
                name = params.get("name")
                return CallToolResult(
                    content=[TextContent(type="text", text=f"Error executing tool {name}: {problem}")],
                    is_error=True,
                )
        elif ctx.method == "prompts/get":
            await self._check_prompt(params)
        return await call_next(ctx)

    async def _tool_problem(self, params: dict[str, Any]) -> str | None:
        if self._tools is None:
            assert self._mcp is not None
            self._tools = {t.name: t.input_schema for t in await self._mcp.list_tools()}
        schema = self._tools.get(params.get("name"))  # type: ignore[arg-type]
        if schema is None:
            return None  # the SDK's own "unknown tool" answer
        arguments = params.get("arguments") or {}
        if not isinstance(arguments, dict):
            return "arguments must be a JSON object of named arguments"
        properties: dict[str, Any] = schema.get("properties", {})
        unknown = [key for key in arguments if key not in properties]
        if unknown:
            hints = [f"{k}: {HINTS[k]}" for k in unknown if k in HINTS]
            return (
                f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}; "
                f"this tool takes {', '.join(properties)}" + (f" ({'; '.join(hints)})" if hints else "")
            )
        values = {key: _pre_parse(properties[key], value) for key, value in arguments.items()}
        errors = sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(values), key=lambda e: list(e.absolute_path)
        )
        if not errors:
            return None
        return "; ".join(_message(error, properties) for error in errors[:3])

    async def _check_prompt(self, params: dict[str, Any]) -> None:
        if self._prompts is None:
            assert self._mcp is not None
            self._prompts = {
                p.name: (
                    {a.name for a in p.arguments or []},
                    {a.name for a in p.arguments or [] if a.required},
                )
                for p in await self._mcp.list_prompts()
            }
        name = params.get("name")
        if name not in self._prompts:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"unknown prompt {name!r}; the prompts are {', '.join(sorted(self._prompts))}",
            )
        known, required = self._prompts[name]
        given = params.get("arguments") or {}
        missing = sorted(required - {k for k, v in given.items() if isinstance(v, str) and v.strip()})
        if missing:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"prompt {name} needs the argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
            )
        unknown = sorted(set(given) - known)
        if unknown:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"prompt {name} has no argument {', '.join(unknown)}; it takes {', '.join(sorted(known))}",
            )


def _pre_parse(schema: dict[str, Any], value: Any) -> Any:
    """Some clients send a list argument as a JSON string (`'["a", "b"]'`); the SDK parses those, so do we."""
    if isinstance(value, str) and _allows(schema, "array") and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _allows(schema: dict[str, Any], kind: str) -> bool:
    options = schema.get("anyOf", [schema])
    return any(option.get("type") == kind for option in options)


def _kinds(schema: dict[str, Any]) -> list[str]:
    return [o["type"] for o in schema.get("anyOf", [schema]) if "type" in o]


_JSON_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "string": "a string",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


def _described(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a value"
    )
    shown = (
        json.dumps(value) if not isinstance(value, str) or len(value) < 60 else json.dumps(value[:57] + "...")
    )
    return f"{kind} ({shown})"


def _message(error: jsonschema.ValidationError, properties: dict[str, Any]) -> str:
    path = list(error.absolute_path)
    name = str(path[0]) if path else "arguments"
    where = name + "".join(f"[{p}]" for p in path[1:])
    value = error.instance
    rule, limit = error.validator, error.validator_value
    if rule == "anyOf" and error.context:
        # `int | None` and the like: report the failure of the non-null branch (a range, a type)
        tried = [e for e in error.context if not (e.validator == "type" and e.validator_value == "null")]
        if tried and not all(e.validator == "type" for e in tried):
            return _message(jsonschema.exceptions.best_match(tried), properties)
    if rule in ("anyOf", "type"):
        schema = properties.get(name, {}) if len(path) == 1 else error.schema
        kinds = [k for k in _kinds(schema) if k != "null"] or [str(limit)]
        return f"{where} must be {' or '.join(_JSON_NAMES.get(k, k) for k in kinds)}, not {_described(value)}"
    if rule == "maximum":
        return f"{where} must be at most {limit}, got {value}"
    if rule == "minimum":
        return f"{where} must be at least {limit}, got {value}"
    if rule == "multipleOf":
        return f"{where} must be a multiple of {limit}, got {value}"
    if rule == "minLength":
        return f"{where} must be at least {limit} character{'s' if limit != 1 else ''} long"
    if rule == "maxLength":
        return f"{where} must be at most {limit} characters long, got {len(value)}"
    if rule == "minItems":
        return f"{where} must hold at least {limit} item{'s' if limit != 1 else ''}"
    if rule == "maxItems":
        return f"{where} must hold at most {limit} items, got {len(value)}"
    if rule == "required":
        return f"the argument {error.message.split(' ')[0]} is required"
    if rule == "enum":
        return f"{where} must be one of {', '.join(map(str, limit))}, got {value!r}"
    return f"{where}: {error.message}"
