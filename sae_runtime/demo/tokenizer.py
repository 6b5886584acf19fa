"""A word-level tokenizer for the concept world, built with ``tokenizers`` and saved the HF way.

Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, 3 ``<unk>``, then :func:`world.vocabulary` in order.
Texts are split on whitespace (the world puts spaces around punctuation), ``<bos>`` is prepended
by the post-processor, and decoding joins words with single spaces, so ``decode(encode(t))``
returns ``t`` for any text of world words.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from sae_runtime.demo.world import vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

#: A minimal chat template: the user's turns become the prompt text, nothing else is added, so a
#: chat request and a plain prompt of the same words tokenize identically.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} {% endif %}{% endfor %}"
)


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer over ``words`` (default: the world's vocabulary)."""
    words = vocabulary() if words is None else words
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tok.save_pretrained(str(directory))
