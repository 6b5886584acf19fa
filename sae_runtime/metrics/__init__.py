"""Dictionary quality metrics (issue 13; definitions in shared/design/seed-methods.md).

- reconstruction: L0, FVU, loss recovered, dead and dense latent shares (:func:`reconstruction_metrics`)
- ms: the Monosemanticity Score of Pach et al. in its exact O(N) form (:func:`monosemanticity`)
- fms: FMS@p of Härle et al. with scikit-learn gini trees (:func:`fms`)
- absorption: SAEBench's mean absorption fraction and full-absorption rate (:func:`absorption`)

Every metric takes tensors (activations, latents, labels), so it serves any dictionary: an SAE, a
transcoder such as FF-KV (its target is the MLP output, :func:`target_of`) or raw neurons.
"""

from sae_runtime.metrics.reconstruction import ReconstructionMetrics, dictionary_outputs, reconstruction_metrics, target_of

__all__ = ["ReconstructionMetrics", "dictionary_outputs", "reconstruction_metrics", "target_of"]
