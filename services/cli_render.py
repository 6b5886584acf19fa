"""What the command line prints: generations (with variants, stop conditions and the latents a
description chose), latent tables and errors with their google.rpc details."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table
from steering.v1 import steering_pb2 as pb

from services.client import SteeringError


def latents_text(acts: Sequence[pb.LatentActivation]) -> str:
    return ", ".join(f"{a.label or '#' + str(a.index)} {a.value:.2f}" for a in acts) or "-"


def print_generation(console: Console, response: pb.GenerateResponse) -> None:
    table = Table(title="Generation", show_lines=True)
    table.add_column("", style="bold")
    table.add_column("text")
    table.add_column("finish")
    table.add_row("steered" if response.steered else "output", response.completion.text, _finish(response.completion))
    if response.HasField("default_completion"):
        table.add_row("unsteered", response.default_completion.text, _finish(response.default_completion))
    for n, v in enumerate(response.variants):
        table.add_row(f"variant {n + 1}", v.completion.text, _finish(v.completion))
    console.print(table)
    described = [e for e in response.plan.edits if e.describe]
    for e in described:
        console.print(f"[dim]{e.describe!r} chose {e.sae} latents {', '.join(str(i) for i in e.latents)}[/dim]")

    if response.pooled:
        latents = Table(title="Top latents (pooled over the steered sequence)")
        for col in ("SAE", "by mean", "by max"):
            latents.add_column(col)
        for p in response.pooled:
            latents.add_row(p.sae, latents_text(p.top_mean), latents_text(p.top_max))
        console.print(latents)

    if response.HasField("risk") or response.HasField("risk_prompt"):
        risk = Table(title="Hallucination risk")
        for col in ("when", "score", "top contributing concepts"):
            risk.add_column(col)
        for when, field in (("prompt", "risk_prompt"), ("final", "risk")):
            if response.HasField(field):
                r = getattr(response, field)
                concepts = ", ".join(f"{c.label or c.sae + '#' + str(c.latent)} {c.contribution:+.2f}" for c in r.top_concepts)
                risk.add_row(when, f"{r.score:.3f}", concepts or "-")
        console.print(risk)
    t = response.timings
    console.print(f"[dim]model {response.versions.model} {response.versions.model_version} | queue {t.queue_ms:.1f} ms, "
                  f"compute {t.compute_ms:.1f} ms, batch {t.batch_size}[/dim]")


def _finish(c: pb.Completion) -> str:
    if not c.HasField("stopped_by"):
        return c.finish_reason
    hit = c.stopped_by
    return f"{c.finish_reason} ({hit.sae}#{hit.latent} = {hit.value:.2f} at token {hit.position})"


def print_error(console: Console, err: SteeringError) -> None:
    """The status, then what its google.rpc details say: the fields at fault, the unknown
    resource, the limits exceeded."""
    console.print(f"[red]error[/red] {err.code.name}: {err.details}", highlight=False)
    for field, description in err.field_violations:
        console.print(f"  bad field [bold]{field}[/bold]: {description}", highlight=False)
    if err.resource is not None:
        kind, name = err.resource
        console.print(f"  not found: {kind} {name!r}" if name else f"  not found: {kind}", highlight=False)
    for subject, description in err.quota_violations:
        console.print(f"  over the limit [bold]{subject}[/bold]: {description}", highlight=False)
