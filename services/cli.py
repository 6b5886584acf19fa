"""Command line for the steering service.

    python -m services.cli list-models
    python -m services.cli generate --model demo-lm --set color:red=60 "the"
    python -m services.cli generate --model demo-lm --ablate 12 --add animal:cat=4 --stream "the"
    python -m services.cli search-features --model demo-lm red
    python -m services.cli encode --model demo-lm "the red cat"
    python -m services.cli generate --model demo-llava --image cat.png "what colour is it"
    python -m services.cli image --model demo-sdxl-turbo --sae mid --set 3=20 --out cat.png "a cat"
    python -m services.cli generate --model demo-lm --preset red --stop-when animal:cat>4 "the"
    python -m services.cli generate --model demo-lm --project-cap color:red=0.5 --variant '{"edits": []}' "the"
    python -m services.cli steering-vector --model demo-lm --sae concepts --positive "the red" --negative "the blue"
    python -m services.cli health

Edits name latents by concept label or index: ``--set color:red=8``, ``--ablate 12``. Without
``--sae``, a label is looked up among the model's SAEs (it must be unambiguous); an index needs
``--sae`` unless the model has one SAE. ``--preset NAME`` adds a config preset, ``--vector NAME=V``
adds a declared steering vector (``--vector-file F=V``: an inline one from a ``steering-vector
--out`` file), ``--describe TEXT=V`` clamps the latent whose label best matches TEXT,
``--stop-when LATENT>V`` (or ``<``) ends generation where it holds, and each ``--variant JSON`` (an
InterventionPlan in proto JSON) runs one more plan beside the request's. Errors print the status, then the fields, unknown resource
or limit that the service's google.rpc details name; the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from rich.console import Console
from rich.table import Table
from steering.v1 import steering_pb2 as pb

from services.cli_render import latents_text, print_error, print_generation
from services.client import Generation, SteeringClient, SteeringError, edit, plan, vector, when

EDIT_FLAGS = ("set", "add", "scale", "cap", "ablate", "project_set", "project_cap")


class UsageError(Exception):
    pass


def parse_target(text: str, with_value: bool) -> tuple[int | str, float]:
    """``color:red=8`` -> ("color:red", 8.0); ``12=3`` -> (12, 3.0); ``12`` (ablate) -> (12, 0.0)."""
    if with_value:
        name, sep, value = text.rpartition("=")
        if not sep or not name:
            raise UsageError(f"expected LABEL=VALUE or INDEX=VALUE, got {text!r}")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"not a number: {value!r} in {text!r}") from None
    else:
        name, number = text, 0.0
    return (int(name) if name.isdigit() else name), number


def resolve_sae(client: SteeringClient, model: str, target: int | str, sae: str | None, cache: dict) -> str:
    if sae:
        return sae
    if "saes" not in cache:
        models = {m.name: m for m in client.list_models()}
        if model not in models:
            raise UsageError(f"unknown model {model!r} (available: {', '.join(models)})")
        cache["saes"] = [s.name for s in models[model].saes]
    if len(cache["saes"]) == 1:
        return cache["saes"][0]
    if isinstance(target, int):
        raise UsageError(f"latent index {target}: name the SAE with --sae (one of {', '.join(cache['saes'])})")
    owners = sorted({f.sae for f in client.search_features(model, target, limit=1000) if f.label == target})
    if len(owners) != 1:
        where = "no SAE" if not owners else f"several SAEs ({', '.join(owners)})"
        raise UsageError(f"label {target!r} is in {where} of {model}; name one with --sae")
    return owners[0]


def build_edits(client: SteeringClient, args: argparse.Namespace, cache: dict | None = None) -> list[pb.LatentEdit]:
    edits, cache = [], {} if cache is None else cache
    for op in EDIT_FLAGS:
        for text in getattr(args, op) or ():
            target, value = parse_target(text, with_value=op != "ablate")
            sae = resolve_sae(client, args.model, target, args.sae, cache)
            edits.append(edit(sae, op, target, value=value, normalize=args.normalize and op == "add"))
    for text in getattr(args, "describe", None) or ():
        description, value = parse_target(text, with_value=True)
        try:
            sae = resolve_sae(client, args.model, 0, args.sae, cache)  # like an index: --sae, or the model's only SAE
        except UsageError:
            raise UsageError(f"--describe {text!r}: name the SAE with --sae (one of {', '.join(cache['saes'])})") from None
        edits.append(edit(sae, "set", describe=str(description), value=value))
    return edits


def parse_condition(client: SteeringClient, args: argparse.Namespace, text: str, cache: dict) -> pb.Condition:
    """``animal:cat>4`` / ``12<0.5`` -> a condition leaf (the SAE found as for edits)."""
    for sign in (">", "<"):
        name, sep, value = text.rpartition(sign)
        if sep and name:
            try:
                threshold = float(value)
            except ValueError:
                raise UsageError(f"not a number: {value!r} in {text!r}") from None
            target: int | str = int(name) if name.isdigit() else name
            sae = resolve_sae(client, args.model, target, args.sae, cache)
            return when(sae, target, above=threshold) if sign == ">" else when(sae, target, below=threshold)
    raise UsageError(f"expected LATENT>VALUE or LATENT<VALUE, got {text!r}")


def build_plan(client: SteeringClient, args: argparse.Namespace, **scope) -> pb.InterventionPlan:
    """The request's plan from the edit, preset, vector and stop flags."""
    cache: dict = {}
    vectors = []
    for text in args.vector or ():
        name, value = parse_target(text, with_value=True)
        vectors.append(vector(str(name), value=value))
    for text in getattr(args, "vector_file", None) or ():
        path, value = parse_target(text, with_value=True)
        try:
            saved = json.loads(Path(str(path)).read_text())
            vectors.append(vector(values=saved["values"], site=saved["site"], value=value))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{path}: not a steering-vector file ({err})") from None
    stop = parse_condition(client, args, args.stop_when, cache) if getattr(args, "stop_when", None) else None
    return plan(build_edits(client, args, cache), vectors=vectors, presets=args.preset or (), stop_when=stop, **scope)


def parse_variants(texts: Sequence[str]) -> list[pb.InterventionPlan]:
    plans = []
    for n, text in enumerate(texts or ()):
        try:
            plans.append(ParseDict(json.loads(text), pb.InterventionPlan()))
        except (ValueError, ParseError) as err:
            raise UsageError(f"--variant {n + 1}: not an InterventionPlan in proto JSON ({err})") from None
    return plans


# -- commands ---------------------------------------------------------------------------------------


def cmd_generate(client: SteeringClient, args: argparse.Namespace, console: Console) -> None:
    options = dict(
        intervention=build_plan(client, args, tokens=args.scope, preserve_error=not args.no_preserve_error),
        variants=parse_variants(args.variant),
        generation=Generation(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
        seed=args.seed,
        include_default=not args.no_default,
        return_latents=list(args.sae_readout) if args.sae_readout else True,
        latents_top_k=args.top_k,
        return_logprobs=0,
        mitigate_risk_top_n=args.mitigate,
    )
    if args.stream and args.image:
        raise UsageError("--stream takes no --image (GenerateStream is text-only)")
    if args.stream:
        final = None
        for message in client.stream(args.model, args.prompt, **options):
            if message.HasField("token"):
                risk = f" [dim](risk {message.running_risk:.2f})[/dim]" if message.HasField("running_risk") else ""
                console.print(f"{message.token.text!r}{risk}")
            if message.HasField("final"):
                final = message.final
        response = final
    elif args.image:
        response = client.generate_multimodal(args.model, Path(args.image).read_bytes(), args.prompt, **options)
    else:
        response = client.generate(args.model, args.prompt, **options)
    if args.json:
        print(json.dumps(MessageToDict(response), indent=2))
    elif response is not None:
        print_generation(console, response)


def cmd_image(client: SteeringClient, args: argparse.Namespace, console: Console) -> None:
    response = client.generate_image(
        args.model,
        args.prompt,
        intervention=build_plan(client, args, step_start=args.step_start, step_end=args.step_end),
        num_inference_steps=args.steps,
        seed=args.seed,
        include_default=not args.no_default,
    )
    out = Path(args.out)
    out.write_bytes(response.png)
    console.print(f"wrote {out} ({len(response.png)} bytes)")
    if response.default_png:
        twin = out.with_name(out.stem + ".default" + out.suffix)
        twin.write_bytes(response.default_png)
        console.print(f"wrote {twin} (unsteered)")


def cmd_list_models(client: SteeringClient, args: argparse.Namespace, console: Console) -> None:
    table = Table(title="Models")
    for col in ("model", "kind", "SAE", "hook site", "architecture", "width", "labels", "risk probe"):
        table.add_column(col)
    for m in client.list_models():
        for n, s in enumerate(m.saes or [pb.SaeInfo()]):
            table.add_row(
                m.name if n == 0 else "", m.kind if n == 0 else "", s.name, s.hook_name, s.architecture,
                str(s.width or ""), "yes" if s.has_labels else "no", ("yes" if m.has_risk_probe else "no") if n == 0 else "",
            )
    console.print(table)
    for m in client.list_models():
        if m.presets or m.vectors:
            vectors = ", ".join(f"{v.name} @ {v.site}" for v in m.vectors) or "-"
            console.print(f"{m.name}: presets {', '.join(m.presets) or '-'}; vectors {vectors}", highlight=False)


def cmd_search(client: SteeringClient, args: argparse.Namespace, console: Console) -> None:
    features = client.search_features(args.model, args.query, sae=args.sae or "", index=args.index, limit=args.limit,
                                      semantic=args.semantic)  # fmt: skip
    table = Table(title=f"Features of {args.model}")
    for col in ("SAE", "index", "label", "score"):
        table.add_column(col)
    for f in features:
        table.add_row(f.sae, str(f.index), f.label or "-", f"{f.score:.3f}" if f.score else "-")
    console.print(table)


def cmd_steering_vector(client: SteeringClient, args: argparse.Namespace, console: Console) -> None:
    response = client.compute_steering_vector(args.model, args.positive, args.negative, site=args.site or "",
                                              sae=args.sae or "", top_n=args.top_n)  # fmt: skip
    norm = sum(v * v for v in response.values) ** 0.5
    console.print(f"steering vector at {response.site}: {len(response.values)} floats, norm {norm:.4f} "
                  f"({response.n_positive_tokens} positive, {response.n_negative_tokens} negative positions)", highlight=False)
    if response.closest:
        table = Table(title=f"Closest {response.sae} decoder rows")
        for col in ("latent", "label", "cosine"):
            table.add_column(col)
        for m in response.closest:
            table.add_row(str(m.latent), m.label or "-", f"{m.cosine:+.3f}")
        console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"site": response.site, "values": list(response.values)}))
        console.print(f"wrote {args.out} (use it with generate --vector-file {args.out}=VALUE)")


def cmd_encode(client: SteeringClient, args: argparse.Namespace, console: Console) -> None:
    response = client.encode(args.model, args.text, saes=args.sae_readout or (), top_k=args.top_k)
    table = Table(title="Top latents per token")
    table.add_column("pos")
    table.add_column("token")
    table.add_column("latents")
    for p in response.latents:
        table.add_row(str(p.position), p.token, " | ".join(f"{s.sae}: {latents_text(s.before)}" for s in p.saes))
    console.print(table)
    if response.HasField("risk"):
        console.print(f"risk {response.risk.score:.3f}")


def cmd_health(client: SteeringClient, args: argparse.Namespace, console: Console) -> None:
    console.print(client.health(args.service))


def _add_edit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--sae", help="SAE the edits apply to (default: found from the label)")
    p.add_argument("--set", action="append", metavar="LATENT=V", help="clamp a latent (label or index) to V")
    p.add_argument("--add", action="append", metavar="LATENT=V", help="add V to a latent")
    p.add_argument("--scale", action="append", metavar="LATENT=V", help="multiply a latent by V")
    p.add_argument("--cap", action="append", metavar="LATENT=V", help="cap a latent at V")
    p.add_argument("--ablate", action="append", metavar="LATENT", help="zero a latent")
    p.add_argument("--project-set", dest="project_set", action="append", metavar="LATENT=V",
                   help="set the activation's component along the latent's decoder direction to V")
    p.add_argument("--project-cap", dest="project_cap", action="append", metavar="LATENT=V",
                   help="cap the activation's component along the latent's decoder direction at V")
    p.add_argument("--describe", action="append", metavar="TEXT=V", help="clamp the latent whose label best matches TEXT to V")
    p.add_argument("--normalize", action="store_true", help="--add values are fractions of the activation norm")
    p.add_argument("--preset", action="append", metavar="NAME", help="a preset from the model's config (list-models)")
    p.add_argument("--vector", action="append", metavar="NAME=V", help="add V times a declared steering vector")
    p.add_argument("--vector-file", dest="vector_file", action="append", metavar="FILE=V",
                   help="add V times the vector a steering-vector --out file holds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-default", action="store_true", help="skip the unsteered twin")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m services.cli", description="Client for the SAE steering service.")
    root.add_argument("--target", default="localhost:9000", help="gRPC address (default: %(default)s)")
    root.add_argument("--token", help="bearer token, if the service requires one")
    root.add_argument("--timeout", type=float, default=120.0)
    sub = root.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="steered text generation")
    _add_edit_flags(g)
    g.add_argument("prompt")
    g.add_argument("--scope", choices=("all", "prompt", "generated"), default="all")
    g.add_argument("--no-preserve-error", action="store_true", help="replace activations by the SAE reconstruction")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=5, help="latents to show per SAE")
    g.add_argument("--readout", dest="sae_readout", action="append", metavar="SAE", help="SAEs to read (default: all)")
    g.add_argument("--mitigate", type=int, default=0, metavar="N", help="ablate the N most risk-positive latents")
    g.add_argument("--image", metavar="PNG_OR_JPEG", help="an image for a LLaVA model (GenerateMultimodal)")
    g.add_argument("--stop-when", dest="stop_when", metavar="LATENT>V", help="stop where a latent is above (>) or below (<) V")
    g.add_argument("--variant", action="append", metavar="JSON", help="one more plan (proto JSON) run beside the request's")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--json", action="store_true", help="print the response as JSON")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("image", help="steered image generation (SDXL-Turbo models)")
    _add_edit_flags(i)
    i.add_argument("prompt")
    i.add_argument("--steps", type=int, default=1)
    i.add_argument("--step-start", type=int, default=0)
    i.add_argument("--step-end", type=int)
    i.add_argument("--out", default="image.png")
    i.set_defaults(func=cmd_image)

    sub.add_parser("list-models", help="models and their SAEs").set_defaults(func=cmd_list_models)

    s = sub.add_parser("search-features", help="find latents by label substring or index")
    s.add_argument("--model", required=True)
    s.add_argument("--sae")
    s.add_argument("--index", type=int)
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--semantic", action=argparse.BooleanOptionalAction, default=None,
                   help="rank by meaning (--no-semantic: label substring; default: the service's choice)")
    s.add_argument("query", nargs="?", default="")
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("steering-vector", help="DiffMean steering vector between two prompt sets")
    v.add_argument("--model", required=True)
    v.add_argument("--positive", action="append", required=True, metavar="PROMPT")
    v.add_argument("--negative", action="append", required=True, metavar="PROMPT")
    v.add_argument("--site", help="hook site (default: the --sae's site)")
    v.add_argument("--sae", help="compare with this SAE's decoder rows")
    v.add_argument("--top-n", type=int, default=5)
    v.add_argument("--out", metavar="JSON", help="write {site, values} for generate --vector-file")
    v.set_defaults(func=cmd_steering_vector)

    e = sub.add_parser("encode", help="top latents of a text, no generation")
    e.add_argument("--model", required=True)
    e.add_argument("--sae", dest="sae_readout", action="append", metavar="SAE")
    e.add_argument("--top-k", type=int, default=3)
    e.add_argument("text")
    e.set_defaults(func=cmd_encode)

    h = sub.add_parser("health", help="grpc.health.v1 status")
    h.add_argument("--service", default="")
    h.set_defaults(func=cmd_health)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    with SteeringClient(args.target, token=args.token, timeout=args.timeout) as client:
        try:
            args.func(client, args, console)
        except SteeringError as err:
            print_error(console, err)
            return 2
        except UsageError as err:
            console.print(f"[red]usage error[/red]: {err}")
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
