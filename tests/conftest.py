"""Session-wide test settings: no Ray token auth, one torch thread on a 2-core machine."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny test models run faster single-threaded, and Ray replicas need the other core.
torch.set_num_threads(1)
