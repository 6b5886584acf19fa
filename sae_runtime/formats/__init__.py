"""On-disk SAE formats: one loader module per format, detection, and writers (native, SAELens).

Public API::

    load_sae(path, *, format=None, hookpoint=None, dtype=None, device=None, norm_scaling_factor=None) -> Sae
    detect_format(path, *, hookpoint=None) -> str   # native | saelens | sparsify | dictionary_learning | openai_topk
    save_native(sae, path) -> Path
    save_saelens(sae, path) -> Path
"""

from sae_runtime.formats.detect import LOADERS, detect_format, load_sae
from sae_runtime.formats.native import save as save_native
from sae_runtime.formats.saelens import save as save_saelens

__all__ = ["LOADERS", "detect_format", "load_sae", "save_native", "save_saelens"]
