"""services.errors.rich_status without Ray: each typed error gets its google.rpc detail, and the
client decodes what the service encodes (a second code path: the google.rpc classes themselves)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from sae_runtime.errors import FormatError, InvalidArgument, NotFound, TooLarge
from services.client import SteeringError
from services.errors import STATUS_DETAILS_KEY, rich_status, set_error


def only_detail(status, cls):
    (packed,) = status.details
    out = cls()
    assert packed.Unpack(out), packed.type_url
    return out


@pytest.mark.parametrize(("exc", "code", "cls", "check"), [
    (InvalidArgument("must be finite", field="plan.edits[2].value"), grpc.StatusCode.INVALID_ARGUMENT,
     error_details_pb2.BadRequest, lambda d: (d.field_violations[0].field, d.field_violations[0].description)
     == ("plan.edits[2].value", "must be finite")),
    (NotFound("unknown SAE 'res9' (available: res)", field="plan.edits[0].sae"), grpc.StatusCode.NOT_FOUND,
     error_details_pb2.ResourceInfo, lambda d: (d.resource_type, d.resource_name) == ("sae", "res9")),
    (TooLarge("40 new tokens exceed the limit of 24", field="params.max_new_tokens"), grpc.StatusCode.RESOURCE_EXHAUSTED,
     error_details_pb2.QuotaFailure, lambda d: d.violations[0].subject == "params.max_new_tokens"),
    (FormatError("tensor 'W_dec' missing", field="/m/sae.safetensors"), grpc.StatusCode.FAILED_PRECONDITION,
     error_details_pb2.PreconditionFailure, lambda d: (d.violations[0].type, d.violations[0].subject)
     == ("FILE", "/m/sae.safetensors")),
])
def test_each_typed_error_gets_its_detail(exc, code, cls, check):
    got, details, status = rich_status(exc)
    assert got == code and status.code == code.value[0] and status.message == details == str(exc)
    assert check(only_detail(status, cls))


def test_errors_without_a_field_carry_no_detail():
    _, _, status = rich_status(RuntimeError("boom"))
    assert status.code == grpc.StatusCode.INTERNAL.value[0] and not status.details


class _Context:
    def __init__(self):
        self.calls = {}

    def set_code(self, code):
        self.calls["code"] = code

    def set_details(self, details):
        self.calls["details"] = details

    def set_trailing_metadata(self, metadata):
        self.calls["trailing"] = metadata


class _RpcError(grpc.RpcError):
    def __init__(self, code, details, trailing):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_the_client_decodes_what_set_error_sends():
    context = _Context()
    set_error(context, TooLarge("3000 latent edits exceed the limit of 16", field="plan.edits"))
    (key, value), = context.calls["trailing"]
    assert key == STATUS_DETAILS_KEY and isinstance(value, bytes)
    err = SteeringError.from_rpc_error(_RpcError(context.calls["code"], context.calls["details"], context.calls["trailing"]))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.quota_violations == [("plan.edits", "3000 latent edits exceed the limit of 16")]
    assert err.field == "plan.edits"
