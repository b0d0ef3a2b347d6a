"""Checks on what a client sends, before the SDK validates it: unknown arguments, wrong JSON types and ranges on
tools, missing arguments and unknown names on prompts. Each answer reads like the tools' own messages.

Why here: the SDK coerces `"64"` to 64 and `"yes"` to True, silently drops an argument the tool does not have (an
agent passing `negative_prompt` believes it took effect), and reports schema errors as pydantic text with links.
Prompt errors came back with JSON-RPC code 0. This middleware runs before the SDK's own validation
(`ServerMiddleware`), checks tool arguments against each tool's published input schema with `jsonschema`, and
raises INVALID_PARAMS (-32602) for prompts.

The schema keeps its ranges (clients read them), but a value out of range is answered with the message of the rule
in `klein_agent.rules` that the CLI and the studio apply (`RULES`), so one bad value reads the same everywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import jsonschema
from mcp.server import MCPServer
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolResult, TextContent

from klein_agent.rules import families, masks, resolution
from klein_agent.rules.image_refs import looks_like_image_ref, split_refs
from klein_agent.rules.loras import check_scale
from klein_agent.rules.masks import MaskRequest, check_strength
from klein_agent.rules.step_caches import from_recipe
from klein_agent.rules.verdicts import check_verdict

# What agents reach for that FLUX.2 [klein] does not have, and what to do instead.
HINTS = {
    "negative_prompt": "klein takes no negative prompt: describe what should be there instead",
    "cfg_scale": "the guidance scale is `guidance` (Base models only)",
    "num_inference_steps": "the step count is `steps`",
    "size": "give `width` and `height`",
    "image_url": "pass the URL (or an id, path or data: URI) as `image`",
}


def _lora_scale(value: Any, arguments: dict[str, Any], path: list[Any]) -> None:
    if len(path) == 3 and path[2] == "scale":
        item = arguments["loras"][path[1]]
        check_scale(value, str(item.get("name", f"loras[{path[1]}]")))


# The rule each argument's schema range stands for: (value, all arguments, path of the error) -> raises
# RequestError with the message the CLI and the studio give. A rule that accepts the value leaves the schema's
# own message (the schema can be stricter than the rule, e.g. a side of 16 px the rules would take).
RULES: dict[str, Callable[[Any, dict[str, Any], list[Any]], object]] = {
    "prompt": lambda v, a, p: resolution.clean_prompt(v) if isinstance(v, str) else None,
    "width": lambda v, a, p: resolution.check_user_size(v, None),
    "height": lambda v, a, p: resolution.check_user_size(None, v),
    "seed": lambda v, a, p: resolution.batch_seeds(v, 1),
    "num_images": lambda v, a, p: resolution.batch_seeds(0, v),
    "steps": lambda v, a, p: resolution.check_steps(v),
    "guidance": lambda v, a, p: resolution.check_guidance(v),
    "images": lambda v, a, p: families.check_most_references(len(v)) if len(p) == 1 else None,
    "session": lambda v, a, p: resolution.check_session(v),
    "strength": lambda v, a, p: check_strength(v),
    "loras": lambda v, a, p: _lora_scale(v, a, p),
    "reason": lambda v, a, p: check_verdict("pick", v),  # record_verdict: the limit on the trimmed reason
    "cache": lambda v, a, p: from_recipe(a["cache"]) if len(p) == 2 else None,
}

# Rules that judge an argument's whole value, whatever its JSON type: asked for every error under that argument,
# wrong types included, so `boxes` reads the same as the CLI's --box ("box 1: x must be a finite number, got NaN").
WHOLE_VALUE_RULES: dict[str, Callable[[Any, dict[str, Any]], object]] = {
    "boxes": lambda v, a: MaskRequest(a.get("mask"), masks.boxes_from(v), None).check(),
    "region": lambda v, a: masks.box_from_values(v, name="region"),  # view_image
    "expected_box": lambda v, a: masks.box_from_values(v, name="expected_box"),  # compare_images
}


def _finite_number(checker: Any, instance: object) -> bool:
    # JSON from Python clients may hold NaN and Infinity (the SDK parses them); no range check can refuse them
    # (every comparison with NaN is false), so they are not numbers here: each float argument's "type" refuses them
    is_number = jsonschema.Draft202012Validator.TYPE_CHECKER.is_type(instance, "number")
    return is_number and not (isinstance(instance, float) and not math.isfinite(instance))


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("number", _finite_number),
)


class ArgumentChecks(ServerMiddleware[Any]):
    """Refuses bad tool arguments with a readable tool error and bad prompt requests with -32602."""

    def __init__(self, reference_limit: Callable[[], int] | None = None) -> None:
        """`reference_limit`: how many references the model takes, once known (`Studio.reference_limit`); a count
        over the schema's bound is then refused with the sentence the CLI and the studio say for that model.
        Without it, with the bound of every family (`families.check_most_references`)."""
        self._rules = dict(RULES)
        if reference_limit is not None:
            self._rules["images"] = lambda v, a, p: (
                resolution.check_reference_count(len(v), reference_limit()) if len(p) == 1 else None
            )
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
            # the SDK's own schemas, not the published ones (server/schemas.py publishes an optional scalar as its
            # type alone, for older clients): an explicit null for an optional argument is taken as before
            self._tools = {t.name: t.input_schema for t in await MCPServer.list_tools(self._mcp)}
        schema = self._tools.get(params.get("name"))  # type: ignore[arg-type]
        if schema is None:
            return None  # the SDK's own "unknown tool" answer
        arguments = params.get("arguments") or {}
        if not isinstance(arguments, dict):
            return "arguments must be a JSON object of named arguments"
        properties: dict[str, Any] = schema.get("properties", {})
        unknown = [key for key in arguments if key not in properties]
        if unknown and not properties:
            return f"{params.get('name')} takes no arguments"
        if unknown:
            hints = [f"{k}: {HINTS[k]}" for k in unknown if k in HINTS]
            return (
                f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}; "
                f"this tool takes {', '.join(properties)}" + (f" ({'; '.join(hints)})" if hints else "")
            )
        values = {key: _pre_parse(properties[key], value) for key, value in arguments.items()}
        order = {key: k for k, key in enumerate(properties)}  # report in the tool's argument order
        errors = sorted(
            Validator(schema).iter_errors(values),
            key=lambda e: (
                order.get(str(next(iter(e.absolute_path), "")), -1),
                [str(p) for p in e.absolute_path],
            ),
        )
        if not errors:
            return None
        messages: list[str] = []
        for error in errors:
            message = _message(error, properties, values, self._rules)
            if message not in messages:
                messages.append(message)
        return "; ".join(messages[:3])

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


def id_list(text: str) -> list[str] | None:
    """The pieces of one string (`"img_a, image://img_b"`) when every piece is meant as an image id
    (`rules.image_refs.looks_like_image_ref`), else None. For arguments that also take paths and data: URIs
    (compose): those may hold commas and spaces, so only a string of id references is split. A malformed piece
    (`img_short`) stays in the list, and the input dispatcher refuses it with the one id message."""
    pieces = split_refs(text)
    return pieces if pieces and all(looks_like_image_ref(piece) for piece in pieces) else None


def _pre_parse(schema: dict[str, Any], value: Any) -> Any:
    """Some clients send a list argument as a JSON string (`'["a", "b"]'`); the SDK parses those, so do we."""
    if isinstance(value, str) and _allows(schema, "array") and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _allows(schema: dict[str, Any], kind: str) -> bool:
    return kind in _kinds(schema)


def _kinds(schema: dict[str, Any]) -> list[str]:
    """The JSON types a schema takes: `type` as a name or a list (`["integer", "null"]`), or its anyOf branches'."""
    kinds: list[str] = []
    for option in schema.get("anyOf", [schema]):
        kind = option.get("type", [])
        kinds += [kind] if isinstance(kind, str) else list(kind)
    return kinds


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
    """What a client sent, in words and as JSON: `a string ("abc")`, `null`, `NaN`."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return resolution.number_text(value) if value is not None else "null"
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), "a value")
    shown = (
        json.dumps(value) if not isinstance(value, str) or len(value) < 60 else json.dumps(value[:57] + "...")
    )
    return f"{kind} ({shown})"


def _message(
    error: jsonschema.ValidationError,
    properties: dict[str, Any],
    arguments: dict[str, Any],
    rules: dict[str, Callable[[Any, dict[str, Any], list[Any]], object]] = RULES,
) -> str:
    path = list(error.absolute_path)
    name = str(path[0]) if path else "arguments"
    where = name + "".join(f"[{p}]" for p in path[1:])
    value = error.instance
    rule, limit = error.validator, error.validator_value
    if name in WHOLE_VALUE_RULES and path:
        try:
            WHOLE_VALUE_RULES[name](arguments[name], arguments)
        except resolution.RequestError as exc:
            return str(exc)
    if rule == "anyOf" and error.context:
        # `list[str] | str` and the like: report the failure inside the branch of the value's JSON type (a wrong
        # item in a list is named where it is, not as "must be a list, not a list"); when the value has none of
        # the branches' types, the type message below names them all
        own_type_failed = {
            e.relative_schema_path[0]
            for e in error.context
            if e.validator == "type" and len(e.relative_schema_path) == 2
        }
        right_type = [e for e in error.context if e.relative_schema_path[0] not in own_type_failed]
        if right_type:
            return _message(jsonschema.exceptions.best_match(right_type), properties, arguments, rules)
    finite_wanted = isinstance(value, float) and not math.isfinite(value) and "number" in _kinds(error.schema)
    if (
        (rule not in ("anyOf", "type", "required", "additionalProperties") or finite_wanted)
        and name in rules
        and path
    ):
        try:
            rules[name](value, arguments, path)
        except resolution.RequestError as exc:
            return str(exc)
    if finite_wanted:
        return f"{where} must be a finite number, got {resolution.number_text(value)}"
    if rule == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [key for key in value if key not in allowed]
        return (
            f"{where} has no key{'s' if len(extra) > 1 else ''} {', '.join(repr(k) for k in extra)}; "
            f"it takes {', '.join(allowed)}"
        )
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
