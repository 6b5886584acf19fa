"""The KV cache of the running rows, behind one interface.

:class:`KvCache` is what the step runner needs from a cache: which slot each cached row holds,
the attention mask and next position of every row, rows joining after their prefill and rows
leaving when they finish, and how many tokens it holds. :class:`SlotKvCache` is the CPU
implementation (any device works; it is the one testable here): a left-padded HF
``DynamicCache``. Rows join by left-padding the shorter of the two caches to a common length and
concatenating each layer's keys and values along the batch; rows leave by index selection,
after which leading columns that are padding in every row are trimmed. The attention mask is an
explicit (B, L) 0/1 tensor and positions are tracked per row, so a row's positions are those of
its solo run whatever its padding. A paged GPU cache (transformers' PagedAttentionCache with
per-token slot ids) would implement the same interface; see the README's engine section.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import Tensor


class KvCache(Protocol):
    slots: list[int]

    def add(self, cache: Any, mask: Tensor, positions: Tensor, slots: Sequence[int]) -> None: ...
    def keep(self, slots: Sequence[int]) -> None: ...
    def decode_inputs(self) -> tuple[Any, Tensor, Tensor]: ...
    @property
    def tokens_in_use(self) -> int: ...


def _layers(cache: Any) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} exposes no per-layer keys/values (need a transformers DynamicCache)")
    return layers


def _left_pad(t: Tensor, width: int) -> Tensor:
    """Pad (B, H, L, D) keys/values on the left of the sequence axis to ``width`` with zeros."""
    extra = width - t.shape[-2]
    if extra == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], extra, t.shape[-1]), t], dim=-2)


class SlotKvCache:
    """A left-padded DynamicCache over the running rows, one row per slot in ``slots`` order."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.slots: list[int] = []
        self.mask: Tensor | None = None  # (B, L) long, 1 = a real token
        self.next_position: Tensor | None = None  # (B,) long

    @property
    def tokens_in_use(self) -> int:
        """Cached key/value positions, padding included (B x L): what the cache holds in memory."""
        return 0 if self.mask is None else int(self.mask.numel())

    def add(self, cache: Any, mask: Tensor, positions: Tensor, slots: Sequence[int]) -> None:
        """Rows of a prefill's ``cache`` join: ``mask`` (b, l) their attention mask, ``positions``
        (b,) their next position ids, ``slots`` the slot of each row."""
        if self.cache is None or not self.slots:
            self.cache, self.mask, self.next_position, self.slots = cache, mask, positions, list(slots)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(mask)])
        self.next_position = torch.cat([self.next_position, positions])
        self.slots += list(slots)

    def keep(self, slots: Sequence[int]) -> None:
        """Only rows of ``slots`` stay (in their current order); the rest leave the cache."""
        keep = set(slots)
        rows = [i for i, s in enumerate(self.slots) if s in keep]
        if len(rows) == len(self.slots):
            return
        if not rows:
            self.__init__()
            return
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        # Leading columns that are padding in every remaining row carry nothing: trim them.
        start = int((mask.sum(0) > 0).nonzero()[0])
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[..., start:, :]
            layer.values = layer.values.index_select(0, idx)[..., start:, :]
        self.mask = mask[:, start:]
        self.next_position = self.next_position.index_select(0, idx)
        self.slots = [self.slots[i] for i in rows]

    def decode_inputs(self) -> tuple[Any, Tensor, Tensor]:
        """(cache, attention mask (B, L + 1), position ids (B, 1)) for a one-token decode forward of
        every row; the mask and positions are advanced for it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        positions = self.next_position.unsqueeze(1)
        self.next_position = self.next_position + 1
        return self.cache, self.mask, positions


__all__ = ["KvCache", "SlotKvCache"]
