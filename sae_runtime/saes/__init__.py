"""SAE architectures. Importing this package registers every architecture.

Registered names: standard, jumprelu, batchtopk (standard.py), gated (gated.py), topk (topk.py),
topk-sigmoid (gsae.py), spade (spade.py), ffkv (ffkv.py: built from a model's MLP, no file).
"""

from sae_runtime.saes.base import SAE_REGISTRY, Norm, Sae, SaeConfig, build_sae, register
from sae_runtime.saes import ffkv, gated, gsae, spade, standard, topk  # noqa: F401  (registers the architectures)

__all__ = ["SAE_REGISTRY", "Norm", "Sae", "SaeConfig", "build_sae", "register"]
