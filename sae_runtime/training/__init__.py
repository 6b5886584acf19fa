"""SAE training toolkit (pure PyTorch).

- activations: ActivationStore (collect at a hook site; memory or sharded safetensors)
- trainer: TrainConfig, SaeTrainer, train_sae (topk, batchtopk -> jumprelu, jumprelu, standard)
- evaluation: l0, fvu, lm_loss, loss_recovered
- labelling: precision/recall of latents vs concept tags, sae.labels
- logistic: sparse logistic regression (FISTA), auroc, stratified_split (used by sae_runtime.risk)
- risk_data: pooled latents of labelled completions for the risk probe
"""
