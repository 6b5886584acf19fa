"""Activation store: a model's activations at one hook site over a list of texts.

Activations are collected batch by batch (tokenizer + model given, padding positions dropped) and
kept either in memory or as sharded safetensors in a directory:

- ``activations.json``: ``{"format": "sae_runtime.activations", "version": 1, "hook_name",
  "model_name", "d_in", "n_tokens", "shards": [{"file", "n"}]}``
- ``shard_00000.safetensors`` ...: ``activations`` (n, d_in) float32, ``token_ids`` (n,) int64 and
  ``sequence`` (n,) int64 (index of the text each row came from).

Rows are in text order, positions in order within a text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_runtime.errors import FormatError, InvalidArgument
from sae_runtime.training import site_hooks

STORE_JSON = "activations.json"
FORMAT_NAME = "sae_runtime.activations"


@dataclass
class _Shard:
    n: int
    data: dict[str, Tensor] | None = None  # in memory
    file: Path | None = None  # on disk

    def load(self) -> dict[str, Tensor]:
        if self.data is not None:
            return self.data
        assert self.file is not None
        try:
            return load_file(str(self.file))
        except Exception as err:  # safetensors raises its own error types
            raise FormatError(f"unreadable shard: {err}", field=str(self.file)) from None


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids and attention_mask, (B, T) int64."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def capture(model: nn.Module, hook_name: str, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Activation (B, T, d_in) at ``hook_name`` for one batch; stops the forward right after the site."""
    out: list[Tensor] = []

    class _Stop(Exception):
        pass

    def grab(x: Tensor) -> None:
        out.append(x.detach())
        raise _Stop

    handle = site_hooks.attach(model, hook_name, grab)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not out:
        raise InvalidArgument(f"hook site {hook_name!r} was not reached in the forward pass", field="hook_name")
    return out[0]


class ActivationStore:
    """Rows (N, d_in) of activations of one hook site, in memory or on disk (see module doc)."""

    def __init__(self, shards: list[_Shard], d_in: int, hook_name: str | None = None, model_name: str | None = None, directory: Path | None = None) -> None:
        self.shards = shards
        self.d_in = d_in
        self.hook_name = hook_name
        self.model_name = model_name
        self.directory = directory

    @property
    def n_tokens(self) -> int:
        return sum(s.n for s in self.shards)

    def __len__(self) -> int:
        return self.n_tokens

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_tensor(cls, activations: Tensor, hook_name: str | None = None) -> "ActivationStore":
        """An in-memory store of activations (N, d_in)."""
        if activations.dim() != 2:
            raise InvalidArgument("activations must be (N, d_in)", field="activations")
        n = activations.shape[0]
        data = {"activations": activations.detach().float().cpu(), "token_ids": torch.full((n,), -1), "sequence": torch.full((n,), -1)}
        return cls([_Shard(n, data=data)], activations.shape[1], hook_name)

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        hook_name: str,
        *,
        batch_size: int = 8,
        max_length: int = 128,
        out_dir: str | Path | None = None,
        shard_tokens: int = 65536,
        skip_bos: bool = False,
        model_name: str | None = None,
        progress: bool = True,
    ) -> "ActivationStore":
        """Run ``model`` over ``texts`` and keep the activation of every non-padding position.

        ``out_dir`` None keeps everything in memory; otherwise shards of about ``shard_tokens``
        rows are written there as they fill. ``skip_bos`` drops the first position of each text
        (its activation is often an outlier).
        """
        if not texts:
            raise InvalidArgument("no texts to collect activations from", field="texts")
        directory = Path(out_dir) if out_dir is not None else None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        shards: list[_Shard] = []
        pending: list[dict[str, Tensor]] = []
        pending_n = 0
        d_in = 0

        def flush() -> None:
            nonlocal pending, pending_n
            if not pending_n:
                return
            data = {k: torch.cat([p[k] for p in pending]).contiguous() for k in pending[0]}
            if directory is None:
                shards.append(_Shard(pending_n, data=data))
            else:
                path = directory / f"shard_{len(shards):05d}.safetensors"
                save_file(data, str(path))
                shards.append(_Shard(pending_n, file=path))
            pending, pending_n = [], 0

        was_training = model.training
        model.eval()
        try:
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc=f"activations {hook_name}", disable=not progress, unit="batch"):
                batch = tokenize(tokenizer, texts[start : start + batch_size], max_length)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                acts = capture(model, hook_name, ids, mask)
                keep = mask.bool()
                if skip_bos:
                    keep[:, 0] = False
                d_in = acts.shape[-1]
                seq = torch.arange(start, start + ids.shape[0], device=device)[:, None].expand_as(ids)
                pending.append(
                    {
                        "activations": acts[keep].float().cpu(),
                        "token_ids": ids[keep].long().cpu(),
                        "sequence": seq[keep].long().cpu(),
                    }
                )
                pending_n += int(keep.sum())
                if pending_n >= shard_tokens:
                    flush()
            flush()
        finally:
            model.train(was_training)
        store = cls(shards, d_in, hook_name, model_name, directory)
        if directory is not None:
            store._write_index()
        return store

    def _write_index(self) -> None:
        assert self.directory is not None
        index = {
            "format": FORMAT_NAME,
            "version": 1,
            "hook_name": self.hook_name,
            "model_name": self.model_name,
            "d_in": self.d_in,
            "n_tokens": self.n_tokens,
            "shards": [{"file": s.file.name, "n": s.n} for s in self.shards if s.file is not None],
        }
        (self.directory / STORE_JSON).write_text(json.dumps(index, indent=2))

    @classmethod
    def open(cls, directory: str | Path) -> "ActivationStore":
        """A store written by :meth:`collect` with ``out_dir``; shards are read lazily."""
        d = Path(directory)
        path = d / STORE_JSON
        if not path.is_file():
            raise FormatError("missing activation store index", field=str(path))
        try:
            index = json.loads(path.read_text())
            if index.get("format") != FORMAT_NAME:
                raise ValueError(f"not a {FORMAT_NAME} index")
            shards = [_Shard(int(s["n"]), file=d / str(s["file"])) for s in index["shards"]]
            d_in = int(index["d_in"])
        except (ValueError, KeyError, TypeError) as err:
            raise FormatError(f"bad activation store index: {err}", field=str(path)) from None
        for s in shards:
            if not s.file or not s.file.is_file():
                raise FormatError("missing shard", field=str(s.file))
        return cls(shards, d_in, index.get("hook_name"), index.get("model_name"), d)

    # -- reading ----------------------------------------------------------------------------
    def column(self, key: str = "activations") -> Tensor:
        """All rows of one stored tensor, concatenated (loads every shard)."""
        parts = [s.load()[key] for s in self.shards]
        if key == "activations":
            for s, p in zip(self.shards, parts):
                if p.shape != (s.n, self.d_in):
                    raise FormatError(f"shard holds {tuple(p.shape)}, expected ({s.n}, {self.d_in})", field=str(s.file or "memory"))
        return torch.cat(parts) if parts else torch.zeros(0, self.d_in)

    def tensor(self) -> Tensor:
        """All activations (N, d_in) float32."""
        return self.column("activations")

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, loop: bool = False) -> Iterator[Tensor]:
        """Batches (<= batch_size, d_in). With ``shuffle`` the shard order and the rows inside each
        shard are permuted (seeded); ``loop`` repeats epochs forever (new permutation each)."""
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self.shards), generator=g).tolist() if shuffle else range(len(self.shards))
            carry: Tensor | None = None
            for i in order:
                acts = self.shards[i].load()["activations"]
                if shuffle:
                    acts = acts[torch.randperm(acts.shape[0], generator=g)]
                if carry is not None:
                    acts = torch.cat([carry, acts])
                n_full = acts.shape[0] // batch_size * batch_size
                for j in range(0, n_full, batch_size):
                    yield acts[j : j + batch_size]
                carry = acts[n_full:]
            if carry is not None and carry.shape[0]:
                yield carry
            if not loop:
                return
