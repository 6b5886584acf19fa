"""Shared helpers of the reliability tests: raw gRPC calls that return a status instead of raising,
replica processes (actor ids and PIDs) of the running Serve instance, and a scan of the Serve
replica logs for exceptions that were not turned into a documented status."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import grpc
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc

from services.client import MAX_MESSAGE_BYTES

#: RPC name -> (request class, server-streaming?).
RPCS: dict[str, tuple[type, bool]] = {
    "Generate": (pb.GenerateRequest, False),
    "GenerateStream": (pb.GenerateRequest, True),
    "GenerateMultimodal": (pb.GenerateMultimodalRequest, False),
    "GenerateImage": (pb.GenerateImageRequest, False),
    "Encode": (pb.EncodeRequest, False),
    "ListModels": (pb.ListModelsRequest, False),
    "SearchFeatures": (pb.SearchFeaturesRequest, False),
}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class Outcome:
    """What one call ended with: the status code, its details, and the response (None on error;
    for a stream, the list of messages received)."""

    code: grpc.StatusCode
    details: str
    response: Any = None

    @property
    def field(self) -> str | None:
        match = re.match(r"^([A-Za-z_][\w.\[\]]*): ", self.details or "")
        return match.group(1) if match else None


def call(stub: steering_pb2_grpc.SteeringStub, rpc: str, request: Any, *, timeout: float = 60.0,
         metadata: Iterable[tuple[str, str]] = ()) -> Outcome:
    """One blocking call of ``rpc``; errors are returned, not raised."""
    method = getattr(stub, rpc)
    try:
        if RPCS[rpc][1]:
            response = list(method(request, timeout=timeout, metadata=tuple(metadata)))
        else:
            response = method(request, timeout=timeout, metadata=tuple(metadata))
        return Outcome(grpc.StatusCode.OK, "", response)
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "")


async def acall(stub, rpc: str, request: Any, *, timeout: float = 60.0, metadata: Iterable[tuple[str, str]] = ()) -> Outcome:
    """One call on a grpc.aio stub; errors are returned, not raised."""
    method = getattr(stub, rpc)
    try:
        if RPCS[rpc][1]:
            response = [m async for m in method(request, timeout=timeout, metadata=tuple(metadata))]
        else:
            response = await method(request, timeout=timeout, metadata=tuple(metadata))
        return Outcome(grpc.StatusCode.OK, "", response)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err.details() or "")


# -- replicas ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replica:
    app: str
    deployment: str
    actor_name: str
    pid: int


def replicas(app: str | None = None) -> list[Replica]:
    """Live Serve replicas (optionally of one application) with their worker process ids."""
    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if not name.startswith("SERVE_REPLICA::"):
            continue
        app_name, deployment, _ = name[len("SERVE_REPLICA::"):].split("#")
        if app is not None and app_name != app:
            continue
        try:
            actor = ray.get_actor(name, namespace=entry["namespace"])
            pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
        except Exception:  # noqa: BLE001 - a replica that is going away is not live
            continue
        found.append(Replica(app_name, deployment, name, int(pid)))
    return sorted(found, key=lambda r: (r.app, r.deployment, r.actor_name))


def deployment_pids(app: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for r in replicas(app):
        out.setdefault(r.deployment, set()).add(r.pid)
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- logs --------------------------------------------------------------------------------------------
#: Exceptions that reach the Serve logs as "Request failed" tracebacks but ARE handled: the ingress
#: turns them into their documented status (typed sae_runtime/services errors; Ray's wrapper of a
#: status the ingress set; the stream-ending marker), or the client went away (cancellation of a
#: request past its deadline; GeneratorExit when the proxy's stream generator is closed under a
#: cancelled stream, which Ray's proxy logs as "unexpected").
HANDLED = re.compile(
    r"^(sae_runtime\.errors\.(NotFound|InvalidArgument|TooLarge|DeadlineExceeded|FormatError)"
    r"|services\.errors\.(Unauthenticated|Unavailable)"
    r"|services\.ingress\._StreamFailed"
    r"|ray\.serve\.exceptions\.(gRPCStatusError|RequestCancelledError)"
    r"|asyncio\.exceptions\.CancelledError|concurrent\.futures\._base\.CancelledError|GeneratorExit)(:|$)"
)
_TIMESTAMP = re.compile(r"^(INFO|ERROR|WARNING|DEBUG|CRITICAL) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def serve_log_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"


_CHAINED = ("The above exception", "During handling")


def _traceback_end(lines: list[str], start: int) -> tuple[str, bool]:
    """The exception a traceback starting at ``lines[start]`` ends with (the last unindented line
    before the next log record, traceback or chain marker; a RayTaskError line embeds the remote
    traceback, whose own exception comes later), and whether another traceback is chained to it."""
    last = "(truncated traceback)"
    for line in lines[start + 1:]:
        if _TIMESTAMP.match(line) or line.startswith("Traceback (most recent call last)"):
            return last, False
        if line.startswith(_CHAINED):
            return last, True
        if line.strip() and not line.startswith((" ", "\t")):
            last = line.strip()
    return last, False


def unexpected_tracebacks(since: float, log_dir: Path | None = None) -> list[str]:
    """Final exception lines of tracebacks logged by Serve replicas and proxies at or after the
    wall-clock time ``since`` whose exception is not in :data:`HANDLED`. A chained traceback ("The
    above exception was the direct cause...") is judged by the last exception of the chain."""
    from datetime import datetime

    found = []
    for path in sorted((log_dir or serve_log_dir()).glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        stamp = 0.0
        for n, line in enumerate(lines):
            match = _TIMESTAMP.match(line)
            if match:
                stamp = datetime.strptime(match.group(2), "%Y-%m-%d %H:%M:%S").timestamp() + int(match.group(3)) / 1e3
            if not line.startswith("Traceback (most recent call last)") or stamp < since - 1.0:
                continue
            last, chained = _traceback_end(lines, n)
            if not chained and not HANDLED.match(last):
                found.append(f"{path.name}: {last}")
    return found


def wait_until(predicate, timeout: float, interval: float = 0.2):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
