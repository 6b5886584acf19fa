"""SAE architectures. Importing this package registers every architecture."""

from sae_runtime.saes.base import SAE_REGISTRY, Norm, Sae, SaeConfig, build_sae, register
from sae_runtime.saes import standard  # noqa: F401  (registers standard, jumprelu)

__all__ = ["SAE_REGISTRY", "Norm", "Sae", "SaeConfig", "build_sae", "register"]
