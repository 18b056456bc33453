"""A tiny JSON Schema validator: the subset ``spec/schemas/*.schema.json`` use.

Supports ``type`` (one or a list), ``enum``, ``required``, ``properties``,
``additionalProperties`` (bool or schema), ``propertyNames``, ``items``, ``minItems``,
``maxItems``, ``minimum``, ``pattern``, ``oneOf`` and local ``$ref`` (``#/$defs/...``),
with ``$ref`` siblings applied too (draft 2020-12). ``validate`` raises AssertionError
naming the JSON path of the first violation. When the ``jsonschema`` package is installed
the tests also run it, so this subset cannot drift from the standard unnoticed.
"""

from __future__ import annotations

import re

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(value, schema: dict, root: dict | None = None, where: str = "$") -> None:
    root = root if root is not None else schema
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), f"only local refs are supported: {ref}"
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        validate(value, target, root, where)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(_is_type(value, t) for t in types), f"{where}: {value!r} is not of type {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "oneOf" in schema:
        ok = 0
        for sub in schema["oneOf"]:
            try:
                validate(value, sub, root, where)
                ok += 1
            except AssertionError:
                pass
        assert ok == 1, f"{where}: {value!r} matches {ok} of the oneOf alternatives, not exactly one"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing required '{key}'"
        props = schema.get("properties", {})
        for key, sub in value.items():
            if "propertyNames" in schema:
                validate(key, schema["propertyNames"], root, f"{where}.<key {key}>")
            if key in props:
                validate(sub, props[key], root, f"{where}.{key}")
            elif "additionalProperties" in schema:
                extra = schema["additionalProperties"]
                assert extra is not False, f"{where}: unexpected property '{key}'"
                if isinstance(extra, dict):
                    validate(sub, extra, root, f"{where}.{key}")
    if isinstance(value, list):
        if "minItems" in schema:
            assert len(value) >= schema["minItems"], f"{where}: fewer than {schema['minItems']} items"
        if "maxItems" in schema:
            assert len(value) <= schema["maxItems"], f"{where}: more than {schema['maxItems']} items"
        if "items" in schema:
            for i, item in enumerate(value):
                validate(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, str) and "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{where}: {value!r} does not match {schema['pattern']}"
    if _is_type(value, "number") and "minimum" in schema:
        assert value >= schema["minimum"], f"{where}: {value} < {schema['minimum']}"


def validate_both(value, schema: dict) -> None:
    """Validate with this module, and with ``jsonschema`` too when it is installed."""
    validate(value, schema)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator(schema).validate(value)
