"""The public proto documents itself: every field and enum value carries a comment (units, range,
default, required or not), so a client in any language needs only steering.proto; the seed's
declared type is the range the service accepts (tests/sae_runtime/test_scope_applies.py)."""

from __future__ import annotations

import re
from pathlib import Path

from steering.v1 import steering_pb2 as pb

PROTO = Path(__file__).resolve().parents[2] / "protos" / "steering" / "v1" / "steering.proto"
FIELD = re.compile(r"^\s*(optional\s+|repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+;")
ENUM_VALUE = re.compile(r"^\s*([A-Z][A-Z0-9_]+)\s*=\s*\d+;")


def undocumented() -> list[str]:
    lines = PROTO.read_text().splitlines()
    missing, block = [], None
    for n, line in enumerate(lines):
        opened = re.match(r"^\s*(message|enum)\s+(\w+)", line)
        if opened:
            block = opened.group(2)
            continue
        match = FIELD.match(line) or ENUM_VALUE.match(line)
        if not match:
            continue
        name = match.group(3) if match.re is FIELD else match.group(1)
        trailing = "//" in line
        leading = n > 0 and lines[n - 1].strip().startswith("//")
        if not (trailing or leading):
            missing.append(f"{block}.{name} (line {n + 1})")
    return missing


def test_every_field_and_enum_value_is_documented():
    assert undocumented() == []


def test_the_comments_use_the_enum_names_clients_see():
    text = PROTO.read_text()
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        for value in enum.values:
            assert value.name in text
            assert value.name.startswith(re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_")


def test_seed_is_declared_uint64_in_every_request():
    for message in (pb.GenerateRequest, pb.GenerateMultimodalRequest, pb.GenerateImageRequest):
        field = message.DESCRIPTOR.fields_by_name["seed"]
        assert field.type == field.TYPE_UINT64 and field.has_presence
