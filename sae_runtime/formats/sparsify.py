"""EleutherAI sparsify: one directory per hookpoint (e.g. ``layers.10``) with ``cfg.json`` + ``sae.safetensors``.

cfg.json: ``activation`` (topk | groupmax), ``num_latents`` (0: ``expansion_factor * d_in``), ``k``,
``expansion_factor``, ``normalize_decoder``, ``multi_topk``, ``skip_connection``, ``transcode``, ``d_in``.
Tensors: ``encoder.weight`` (num_latents, d_in), ``encoder.bias`` (num_latents,), ``W_dec``
(num_latents, d_in), ``b_dec`` (d_in,), optional ``W_skip`` (d_in, d_in).

Encode: topk(relu(encoder(x - b_dec))), i.e. our ``topk`` with W_enc = encoder.weight.T and
b_enc = encoder.bias. ``multi_topk`` only changes the training loss. Not supported (FormatError):
``groupmax`` activations, transcoders, and skip connections (their output depends on x, not on f).
The hookpoint (directory name) becomes ``hook_name``: the output of that module of ``model.base_model``.
"""

from __future__ import annotations

from pathlib import Path

from sae_runtime.errors import FormatError
from sae_runtime.formats.common import LoadOptions, assemble, dtype_name, get_int, read_json, read_safetensors, take
from sae_runtime.saes import Sae, SaeConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def is_sparsify_dir(directory: Path) -> bool:
    return (directory / CFG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def hookpoints(parent: Path) -> list[str]:
    """Names of the hookpoint subdirectories of a multi-hookpoint sparsify checkpoint."""
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.is_dir() and is_sparsify_dir(p))


def load(directory: Path, opts: LoadOptions) -> Sae:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    raw = read_json(cfg_path)
    tensors = read_safetensors(weights_path)

    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise FormatError(f"key 'activation': {activation!r} is not supported (only 'topk')", field=str(cfg_path))
    if raw.get("transcode"):
        raise FormatError("key 'transcode': transcoders are not supported (they are not autoencoders)",
                          field=str(cfg_path))
    if raw.get("skip_connection") or "W_skip" in tensors:
        raise FormatError("tensor 'W_skip' / key 'skip_connection': skip connections are not supported",
                          field=str(weights_path))

    d_in = get_int(raw, "d_in", cfg_path, None)
    if d_in is None:  # older checkpoints: infer from the tensors
        if "b_dec" not in tensors:
            raise FormatError("tensor 'b_dec' missing and cfg.json has no 'd_in'", field=str(weights_path))
        d_in = int(tensors["b_dec"].shape[-1])
    d_sae = get_int(raw, "num_latents", cfg_path, 0, minimum=0)
    if d_sae == 0:
        d_sae = d_in * get_int(raw, "expansion_factor", cfg_path)

    encoder_weight = take(tensors, "encoder.weight", (d_sae, d_in), weights_path, transposable=True)
    state = {
        "W_enc": encoder_weight.T.contiguous(),
        "b_enc": take(tensors, "encoder.bias", (d_sae,), weights_path),
        "W_dec": take(tensors, "W_dec", (d_sae, d_in), weights_path, transposable=True),
        "b_dec": take(tensors, "b_dec", (d_in,), weights_path),
    }
    extra = sorted(set(tensors) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise FormatError(f"unexpected tensor(s) {', '.join(map(repr, extra))}", field=str(weights_path))

    metadata = {key: raw[key] for key in ("expansion_factor", "normalize_decoder", "multi_topk") if key in raw}
    cfg = SaeConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype_name(tensors["W_dec"].dtype),
        apply_b_dec_to_input=True,
        k=get_int(raw, "k", cfg_path),
        hook_name=directory.name,
        metadata={"source_format": "sparsify", **metadata},
    )
    return assemble(cfg, state, weights_path, opts, file_dtype=tensors["W_dec"].dtype)
