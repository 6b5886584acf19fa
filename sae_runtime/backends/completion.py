"""Per-row bookkeeping of a text generation: incremental detokenisation, stop strings, finish reasons.

A :class:`RowText` receives the token ids one row generates, one per decode step, and decides
when the row is finished:

- ``eos``: the model produced an end-of-sequence id (the id is not part of the completion);
- ``stop``: the generated text contains one of the request's stop strings; the completion's
  text is cut right before the first occurrence, and its tokens end with the token that
  completed the stop string;
- ``length``: ``max_new_tokens`` tokens were generated.

Token texts are decoded incrementally, each from a window of the last few ids (O(1) per token),
so that joining them gives the decoded text, even when a tokenizer merges or strips characters
across token boundaries; bytes of an unfinished UTF-8 character wait for the token completing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


def id_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` equal to ``tokenizer.decode(ids, skip_special_tokens=True)``.

    For a transformers fast tokenizer that does no clean-up of tokenisation spaces, that is the
    Rust tokenizer's own decode: calling it directly skips transformers' per-call Python layer
    (argument conversion and dispatch, ~30 us per call, which made detokenisation about a tenth
    of a batched decode step's CPU time on the demo LM).
    """
    fast = getattr(tokenizer, "_tokenizer", None)
    if fast is not None and hasattr(fast, "decode") and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: fast.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class TokenRecord:
    """One generated token as the loop saw it, before readouts are attached."""

    id: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[str, float], ...] = ()


@dataclass
class RowText:
    """Text state of one generating row. ``tokenizer`` is any HF tokenizer (``decode``)."""

    tokenizer: Any
    stop: Sequence[str]
    max_new_tokens: int
    eos_ids: frozenset[int]
    ids: list[int] = field(default_factory=list)
    records: list[TokenRecord] = field(default_factory=list)
    decoded: str = ""
    finish_reason: str | None = None
    stop_at: int | None = None  # character offset where a stop string begins
    # Incremental detokenisation (vLLM's scheme): text is decoded over a short window of ids,
    # ids[prefix:], and the new piece is what that window adds beyond ids[prefix:read].
    _prefix: int = 0
    _read: int = 0
    _decode: Callable[[list[int]], str] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The completion text, cut before the stop string if one was hit."""
        return self.decoded if self.stop_at is None else self.decoded[: self.stop_at]

    def _next_piece(self) -> str:
        """The text the newest id adds, decoding only the ids since the last emitted piece."""
        if self._decode is None:
            self._decode = id_decoder(self.tokenizer)
        decode = self._decode
        shown = decode(self.ids[self._prefix:self._read])
        window = decode(self.ids[self._prefix:])
        if window.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next id
            return ""
        piece = window[len(shown):] if window.startswith(shown) else decode(self.ids[-1:])
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def replace_with(self, ids: list[int], text: str, finish_reason: str) -> None:
        """End the row with a given completion (an abstention): ``ids`` as one record each, ``text``
        as the decoded text (split at the records so their texts join to it)."""
        self.ids = list(ids)
        pieces = [self.tokenizer.decode(self.ids[: j + 1], skip_special_tokens=True) for j in range(len(self.ids))]
        self.records = [TokenRecord(id=i, text=b[len(a):] if b.startswith(a) else b)
                        for i, a, b in zip(self.ids, [""] + pieces[:-1], pieces)]
        self.decoded, self.stop_at, self.finish_reason = text, None, finish_reason

    def push(self, token_id: int, logprob: float | None = None, top: tuple[tuple[str, float], ...] = ()) -> TokenRecord | None:
        """Add one generated id; returns its record, or None for an end-of-sequence id."""
        if self.done:
            raise RuntimeError("push() on a finished row")
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return None
        self.ids.append(token_id)
        piece = self._next_piece()
        full = self.decoded + piece
        searched_from = max(0, len(self.decoded) - max((len(s) for s in self.stop), default=0))
        self.decoded = full
        record = TokenRecord(id=token_id, text=piece, logprob=logprob, top_logprobs=top)
        self.records.append(record)
        hits = [i for i in (self.decoded.find(s, searched_from) for s in self.stop if s) if i >= 0]
        if hits:
            self.stop_at = min(hits)
            self.finish_reason = "stop"
        elif len(self.ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return record


def eos_ids_of(model_config: Any, generation_config: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the generation config (int or list), else the tokenizer's."""
    for source in (generation_config, model_config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        return frozenset([value] if isinstance(value, int) else [int(v) for v in value])
    return frozenset()
