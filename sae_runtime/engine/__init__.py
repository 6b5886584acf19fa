"""The serving engine: continuous batching with per-request steering plans (vLLM's split).

- :mod:`.request`: the one validated request (:class:`PreparedText`) and its lifecycle;
- :mod:`.scheduler`: admission each step (token budget, running-row cap, KV bound);
- :mod:`.step`: the step descriptor the hooks read and the step runner (prefill / decode forwards);
- :mod:`.kv`: the KV cache behind one interface (a left-padded slot cache here);
- :mod:`.plans`: the plan table, plans compiled once per slot and gathered per forward;
- :mod:`.readout`: incremental per-token readouts, pooled statistics and running risk;
- :mod:`.engine`: the step loop (submit / stream / cancel), used by the model deployment;
- :mod:`.images`: the request-level batches of image models, on the same queue discipline.
"""

from sae_runtime.backends.spec import EngineConfig
from sae_runtime.engine.engine import StepStats, TextEngine
from sae_runtime.engine.request import PreparedText, RequestRun, RequestStatus

__all__ = ["EngineConfig", "PreparedText", "RequestRun", "RequestStatus", "StepStats", "TextEngine"]
