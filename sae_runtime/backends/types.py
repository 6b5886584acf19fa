"""Request and result dataclasses shared by every backend, and the Backend interface.

This is the contract between ``sae_runtime`` and ``services``: the service converts a proto
message into one of the ``*Request`` specs, calls the backend, and converts the ``*Result`` back.
Requests are validated once, by :meth:`Backend.validate`, which raises typed errors
(sae_runtime.errors) naming the request field.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

from sae_runtime.errors import NotFound
from sae_runtime.plan import InterventionPlan, ReadoutSpec


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters. ``temperature == 0`` means greedy; ``seed`` makes sampling reproducible
    and independent of what else shares the batch (each request owns a torch.Generator)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TextRequest:
    """One text (or image + text, for LLaVA) generation request."""

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()  # used instead of prompt, through the chat template
    image: bytes | None = None  # PNG/JPEG bytes (LLaVA only)
    plan: InterventionPlan = InterventionPlan()
    sampling: SamplingParams = SamplingParams()
    readout: ReadoutSpec | None = None
    include_default: bool = False  # also return the unsteered twin (same seed, same batch)
    logprobs: int = 0  # top-n log-probs per generated token (0 = none)
    mitigate_risk_top_n: int = 0  # ablate the risk probe's N most risk-positive latents
    mitigation: Any = None  # a sae_runtime.mitigation.MitigationSpec: risk-gated, decided after the prefill
    #: Further plans run beside ``plan`` in the same batch, each with the request's prompt, sampling
    #: parameters and seed; the result has one :class:`VariantResult` per entry, in order.
    variants: tuple[InterventionPlan, ...] = ()


@dataclass(frozen=True)
class LatentActivation:
    index: int
    value: float
    label: str | None = None


@dataclass(frozen=True)
class PositionLatents:
    """Top-k latents of one SAE at one position, before and after the plan's edits."""

    sae: str
    before: tuple[LatentActivation, ...]
    after: tuple[LatentActivation, ...]


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[str, float], ...] = ()
    latents: tuple[PositionLatents, ...] = ()


@dataclass(frozen=True)
class ConditionHit:
    """Where a plan's ``stop_when`` held: the generated position (0-based among generated tokens)
    whose latents, read when that token was input to the model, met the condition (that token is
    the last one kept), and the first leaf latent that was true there."""

    position: int
    sae: str
    latent: int
    value: float


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[GeneratedToken, ...]
    finish_reason: str  # "length" | "stop" | "eos" | "condition" (the plan's stop_when held)
    stopped_by: ConditionHit | None = None  # set when finish_reason == "condition"


@dataclass(frozen=True)
class RiskContribution:
    sae: str
    latent: int
    label: str | None
    contribution: float  # additive contribution to the probe's logit


@dataclass(frozen=True)
class RiskScore:
    probability: float  # predicted probability of hallucination, in [0, 1]
    contributions: tuple[RiskContribution, ...] = ()


@dataclass(frozen=True)
class PooledLatents:
    """Per-sequence pooled activations of one SAE: the top latents by mean and by max."""

    sae: str
    top_mean: tuple[LatentActivation, ...]
    top_max: tuple[LatentActivation, ...]


@dataclass(frozen=True)
class Timings:
    """Milliseconds: waiting for admission, admission to the end, admission to the first token;
    ``batch_size`` = requests running in the engine once it was admitted (its own included; image
    models: requests in its batch)."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    first_token_ms: float = 0.0
    batch_size: int = 1


@dataclass(frozen=True)
class TextResult:
    steered: Completion
    default: Completion | None = None
    prompt_latents: tuple[tuple[PositionLatents, ...], ...] = ()  # per prompt position
    pooled: tuple[PooledLatents, ...] = ()
    risk_prompt: RiskScore | None = None  # from the prompt alone, before generation
    risk_final: RiskScore | None = None  # from prompt and generated tokens
    timings: Timings = Timings()
    #: LLaVA: per vision-encoder position of the image (CLS first, then patches row-major), the top
    #: latents of the vision SAEs the readout names. Empty for text-only models and requests.
    vision_latents: tuple[tuple[PositionLatents, ...], ...] = ()
    #: What the request's mitigation did: "" (none asked, or not gated), "abstain" or "steer".
    mitigation: str = ""
    #: The steered row's plan as run: presets expanded, labels and ``describe`` resolved to latents
    #: (what a description chose), vectors resolved. None when the request had no plan.
    plan: InterventionPlan | None = None
    #: One per ``TextRequest.variants`` entry, in order.
    variants: tuple["VariantResult", ...] = ()


@dataclass(frozen=True)
class VariantResult:
    """One variant's completion, its risk over prompt and generated tokens, and its plan as run."""

    completion: Completion
    risk_final: RiskScore | None = None
    plan: InterventionPlan | None = None


@dataclass(frozen=True)
class StreamEvent:
    """One streamed token with the running risk score; the last event carries the full result,
    or the error the request ended with (cancelled, past its deadline, failed)."""

    token: GeneratedToken | None
    risk: float | None = None
    result: TextResult | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    plan: InterventionPlan = InterventionPlan()
    readout: ReadoutSpec | None = None
    include_default: bool = False


@dataclass(frozen=True)
class LatentMap:
    """Spatial activation map of one latent at one U-Net block, (H, W) at the block's resolution."""

    sae: str
    latent: int
    label: str | None
    mean: float
    heatmap_png: bytes  # rendered over the image
    values: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class ImageResult:
    png: bytes
    default_png: bytes | None = None
    latent_maps: tuple[LatentMap, ...] = ()
    timings: Timings = Timings()


@dataclass(frozen=True)
class EncodeRequest:
    text: str = ""
    image: bytes | None = None
    saes: tuple[str, ...] = ()
    top_k: int = 5


@dataclass(frozen=True)
class EncodeResult:
    tokens: tuple[str, ...]
    latents: tuple[tuple[PositionLatents, ...], ...]  # per position
    pooled: tuple[PooledLatents, ...] = ()
    risk: RiskScore | None = None
    #: LLaVA: per vision-encoder position (CLS first), the top latents of the vision SAEs named.
    vision_latents: tuple[tuple[PositionLatents, ...], ...] = ()


@dataclass(frozen=True)
class SaeInfo:
    name: str
    hook_name: str
    architecture: str
    d_in: int
    d_sae: int
    has_labels: bool
    version: str


@dataclass(frozen=True)
class SteeringVectorRequest:
    """Two prompt sets and a hook site; ``sae`` (optional) names an SAE whose decoder rows the
    result is compared with, returning the ``top_n`` closest latents by cosine."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    site: str
    sae: str = ""
    top_n: int = 5


@dataclass(frozen=True)
class SteeringVectorResult:
    """``direction`` (d_site,) float32: mean(positive) - mean(negative), not normalised;
    ``closest``: (latent, label, cosine) of the SAE's decoder rows, highest cosine first."""

    site: str
    direction: Any  # torch.Tensor
    n_positive_tokens: int
    n_negative_tokens: int
    sae: str = ""
    closest: tuple[tuple[int, str | None, float], ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "causal_lm" | "llava" | "sdxl_turbo"
    description: str
    saes: tuple[SaeInfo, ...]
    has_risk_probe: bool
    version: str
    #: Named plans from the config (``presets:``), usable by name in a request's plan.
    presets: tuple[str, ...] = ()
    #: Declared steering vectors: name -> hook site.
    vectors: tuple[tuple[str, str], ...] = ()


class Backend(abc.ABC):
    """A loaded base model with its SAEs (and risk probe). One instance per model replica."""

    kind: str
    #: Seconds each SAE took to load (name -> s), set by ``from_spec``; exported as a metric.
    load_timings: Mapping[str, float] = MappingProxyType({})
    #: SAE name -> sae_runtime.search.SemanticIndex (its labels' sentence embeddings), set by
    #: ``from_spec``; empty = search and ``describe`` match label substrings.
    label_indexes: Mapping[str, Any] = MappingProxyType({})

    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def validate(self, request: TextRequest | ImageRequest | EncodeRequest, field_prefix: str = "") -> TextRequest | ImageRequest | EncodeRequest:
        """Check a request against this model's limits and SAEs; return it with labels resolved."""

    def generate(self, requests: Sequence[TextRequest]) -> list[TextResult]:
        """Generate for a batch of validated requests in one batched pass, per-row plans applied."""
        raise NotImplementedError(f"{type(self).__name__} does not generate text")

    def stream(self, request: TextRequest) -> Iterator[StreamEvent]:
        raise NotImplementedError(f"{type(self).__name__} does not stream text")

    def generate_images(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        raise NotImplementedError(f"{type(self).__name__} does not generate images")

    @abc.abstractmethod
    def encode(self, request: EncodeRequest) -> EncodeResult: ...

    def compute_steering_vector(self, request: "SteeringVectorRequest") -> "SteeringVectorResult":
        """DiffMean (CAA): mean activation at ``request.site`` over the positive prompts' positions
        minus that over the negative prompts' positions (every prompt position, padding excluded)."""
        raise NotImplementedError(f"{type(self).__name__} does not compute steering vectors")

    def feature_labels(self, sae: str) -> Mapping[str, int]:
        """Concept labels of one SAE, label -> latent index (empty when it has none).

        The default reads ``self.saes`` (name -> Sae), where the bundled backends keep their SAEs.
        Raises NotFound naming the field ``sae`` for an unknown SAE.
        """
        saes = getattr(self, "saes", {})
        if sae not in saes:
            raise NotFound(f"unknown SAE {sae!r} (available: {', '.join(sorted(saes)) or 'none'})", field="sae")
        return dict(saes[sae].labels)

    def describe(self, sae: str, text: str, top_n: int, field_prefix: str = "") -> list[int]:
        """The ``top_n`` latents of ``sae`` whose labels best match the description ``text``, best
        first (by meaning with ``label_indexes``, else label substrings): the ``describe`` callable
        of :meth:`InterventionPlan.resolve`. Errors name ``{field_prefix}describe`` / ``top_n`` /
        ``sae`` (see :func:`sae_runtime.search.describe_latents`)."""
        from sae_runtime.search import describe_latents

        saes = getattr(self, "saes", {})
        return describe_latents(self.label_indexes, saes, sae, text, top_n, field_prefix=field_prefix)


def label_of(labels: Mapping[str, int], index: int) -> str | None:
    """Inverse label lookup (first label naming ``index``), for results."""
    for name, i in labels.items():
        if i == index:
            return name
    return None


__all__ = [name for name in dir() if name[0].isupper()] + ["label_of"]
