"""SAE transfer between language models by model stitching (Chen et al., arXiv 2506.06609).

:mod:`.maps` fits and stores the affine maps, :mod:`.transfer` carries SAEs, labels, risk probes and
steering directions through them, :mod:`.warmstart` compares training from the transferred
weights with training from scratch. ``python -m sae_runtime.stitch`` is the command line.
"""

from sae_runtime.stitch.maps import Stitch, StitchConfig, fit_stitch, pick_layer, svcca
from sae_runtime.stitch.transfer import transfer_direction, transfer_probe, transfer_sae

__all__ = ["Stitch", "StitchConfig", "fit_stitch", "pick_layer", "svcca", "transfer_direction", "transfer_probe", "transfer_sae"]
