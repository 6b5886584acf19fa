"""Proto messages <-> protobuf's JSON mapping, and JSON Schemas of the messages for /openapi.json.

Request bodies parse with ``json_format.ParseDict`` (field names in lowerCamelCase or as in the
.proto, enums by name or number, bytes as base64, 64-bit integers as strings or numbers); a body
that does not fit is a 400 naming the field. Responses are the canonical JSON form
(``MessageToDict``: lowerCamelCase names, fields at their default omitted).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.http.errors import HttpError

M = TypeVar("M", bound=Message)

_AT_PATH = re.compile(r" at [A-Za-z0-9_]+\.([A-Za-z0-9_\[\]]+(?:\.[A-Za-z0-9_\[\]]+)*)")
_PARSING = re.compile(r"Failed to parse ([A-Za-z0-9_]+) field")
_NO_FIELD = re.compile(r'has no field named "([^"]+)"')


def parse(body: Any, message_type: type[M], where: str = "") -> M:
    """``body`` (decoded JSON) as a ``message_type``; HttpError 400 naming the field (under
    ``where``) when it does not fit."""
    if not isinstance(body, dict):
        raise HttpError.invalid(where or "body", f"must be a JSON object, got {type(body).__name__}")
    try:
        return json_format.ParseDict(body, message_type())
    except json_format.ParseError as err:
        field, reason = _error_field(str(err))
        path = ".".join(p for p in (where, field) if p)
        raise HttpError.invalid(path or "body", reason) from None


def _error_field(text: str) -> tuple[str, str]:
    """(field path, reason) from a json_format.ParseError message."""
    reason = _PARSING.sub("", text).lstrip(": ").split(" at ")[0].rstrip(".") or text
    at = _AT_PATH.search(text)
    if at:
        return at.group(1), reason
    path = _PARSING.findall(text)
    unknown = _NO_FIELD.search(text)
    if unknown:
        return ".".join([*path, unknown.group(1)]), "unknown field"
    return ".".join(path), reason


def dump(message: Message) -> dict[str, Any]:
    """The canonical proto3 JSON form of ``message``."""
    return json_format.MessageToDict(message)


# -- JSON Schema --------------------------------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_INT64 = {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": r"^-?\d+$"}]}  # proto JSON writes 64-bit ints as strings


def json_schemas(*descriptors: Descriptor) -> dict[str, dict[str, Any]]:
    """OpenAPI component schemas (name -> schema) for these messages and every message they use,
    referenced as ``#/components/schemas/<full name>``."""
    schemas: dict[str, dict[str, Any]] = {}

    def ref(d: Descriptor) -> dict[str, str]:
        if d.full_name not in schemas:
            schemas[d.full_name] = {}  # placeholder: recursive messages terminate
            schemas[d.full_name] = message_schema(d)
        return {"$ref": f"#/components/schemas/{d.full_name}"}

    def field_schema(f: FieldDescriptor) -> dict[str, Any]:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            return ref(f.message_type)
        if f.type == FieldDescriptor.TYPE_ENUM:
            return {"type": "string", "enum": [v.name for v in f.enum_type.values]}
        return dict(_SCALARS.get(f.type, _INT64))

    def message_schema(d: Descriptor) -> dict[str, Any]:
        properties = {}
        for f in d.fields:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                value = f.message_type.fields_by_name["value"]
                properties[f.json_name] = {"type": "object", "additionalProperties": field_schema(value)}
            elif f.is_repeated:
                properties[f.json_name] = {"type": "array", "items": field_schema(f)}
            else:
                properties[f.json_name] = field_schema(f)
        return {"type": "object", "title": d.name, "properties": properties}

    for d in descriptors:
        ref(d)
    return schemas
