"""Tiny, deterministic, randomly initialised HF models for tests and benchmarks.

Each builder creates a model from a config with a fixed seed, ``save_pretrained``s it (with a
tokenizer / processor where the model needs one) into ``path`` and returns ``path``. Load the
result back with the ordinary ``from_pretrained`` calls: nothing here needs network access.

- :func:`build_tiny_causal_lm`: Llama, GPT-2, Qwen2 or Gemma architecture + a word-level tokenizer.
- :func:`build_tiny_llava`: LlavaForConditionalGeneration (tiny CLIP vision tower + tiny Llama) with
  a LlavaProcessor (PIL image processor, works offline).
- :func:`build_tiny_unet`: UNet2DConditionModel with cross-attention transformer blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

#: Special tokens of the tiny tokenizer, in id order (ids 0..4).
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")

#: A small fixed word list: every tiny tokenizer knows these words (then w0, w1, ... up to the vocab size).
BASE_WORDS = (
    "the a an and or not is are was be to of in on at with for from by it this that he she they we you i "
    "red green blue yellow black white cat dog bird fish car tree house sun moon sky sea river city "
    "big small happy sad fast slow hot cold good bad old new one two three four five yes no what who "
    "where when why how can will do does did have has had say said go went see saw make made"
).split()

#: A plain chat template for the tiny tokenizer (role: content lines, then "assistant:").
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 128, words: Sequence[str] | None = None, *, byte_level: bool = False):
    """A tiny PreTrainedTokenizerFast with bos/eos/pad/unk and an ``<image>`` token (ids 0..4).

    Default: word level; words split on whitespace and punctuation, unknown words map to ``<unk>``.
    The vocabulary is SPECIAL_TOKENS, ``words`` (default BASE_WORDS, plus ":"), then fillers
    ``w0, w1, ...`` up to ``vocab_size``; prompts encode with a leading ``<s>``.

    ``byte_level``: a byte-level BPE trained (deterministically) on the words, with Qwen2's
    pre-tokenizer, because transformers 5 always loads a ``qwen2`` checkpoint's tokenizer as a
    byte-level ``Qwen2Tokenizer``. It holds the 256 byte symbols plus merges, up to
    ``max(vocab_size, 512)`` entries: size the model with ``len(tokenizer)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    word_list = list(dict.fromkeys([*(words if words is not None else BASE_WORDS), ":"]))
    if byte_level:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=max(vocab_size, 512), special_tokens=list(SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        )
        tok.train_from_iterator([" " + " ".join(word_list)] * 2 + [f" {w}" for w in word_list], trainer)
    else:
        vocab_words = list(dict.fromkeys([*SPECIAL_TOKENS, *word_list]))
        if len(vocab_words) > vocab_size:
            raise ValueError(f"{len(vocab_words)} words do not fit a vocabulary of {vocab_size}")
        vocab_words += [f"w{i}" for i in range(vocab_size - len(vocab_words))]
        vocab = {w: i for i, w in enumerate(vocab_words)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _causal_lm_config(family: str, vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, max_pos: int):
    from transformers import GPT2Config, GemmaConfig, LlamaConfig, Qwen2Config

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
            n_positions=max_pos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=intermediate, max_position_embeddings=max_pos,
        tie_word_embeddings=False, **ids,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=hidden // heads)
    raise ValueError(f"unknown family {family!r} (llama, gpt2, qwen2, gemma)")


def build_tiny_causal_lm(
    path: str | Path,
    family: str = "llama",
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 256,
    words: Sequence[str] | None = None,
    with_tokenizer: bool = True,
    init_std: float | None = None,
) -> Path:
    """Save a tiny random causal LM of ``family`` (llama | gpt2 | qwen2 | gemma) and its tokenizer.

    The qwen2 family gets a byte-level tokenizer (see :func:`build_tiny_tokenizer`) and a
    vocabulary of at least ``len(tokenizer)``.

    ``init_std`` overrides the config's initializer_range (a larger value gives logits that depend
    more visibly on the input). Same seed and arguments give identical weights.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer(vocab_size, words, byte_level=family == "qwen2") if with_tokenizer else None
    if tokenizer is not None:
        vocab_size = max(vocab_size, len(tokenizer))
    cfg = _causal_lm_config(family, vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings)
    if init_std is not None:
        cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def build_tiny_llava(
    path: str | Path,
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 3,
    image_size: int = 16,
    patch_size: int = 4,
) -> Path:
    """Save a tiny LlavaForConditionalGeneration and a LlavaProcessor that work offline.

    Vision tower: CLIP with ``(image_size / patch_size)**2`` patches + CLS; the projector reads
    ``hidden_states[-2]`` without CLS (LLaVA-1.5 defaults), so a prompt's single ``<image>`` expands
    to ``(image_size / patch_size)**2`` image tokens.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    tokenizer = build_tiny_tokenizer(vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden_size,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


def build_tiny_unet(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny UNet2DConditionModel (sample 16x16, 4 channels) with cross-attention blocks.

    Layout: down_blocks [CrossAttnDownBlock2D x2, DownBlock2D], mid_block with one attention,
    up_blocks [UpBlock2D, CrossAttnUpBlock2D x2]; block widths (32, 64, 64), cross-attention dim 32.
    So ``unet.down_blocks.1.attentions.0`` (64 ch, 8x8), ``unet.mid_block.attentions.0`` (64 ch, 4x4)
    and ``unet.up_blocks.1.attentions.0`` (64 ch, 8x8) exist. ``overrides`` update the config.
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    cfg: dict[str, Any] = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    unet.save_pretrained(path)
    return path


__all__ = ["build_tiny_causal_lm", "build_tiny_llava", "build_tiny_unet", "build_tiny_tokenizer", "SPECIAL_TOKENS", "BASE_WORDS"]
