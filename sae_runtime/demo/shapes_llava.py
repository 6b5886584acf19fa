"""The shapes-world LLaVA: a tiny LlavaForConditionalGeneration trained to answer questions about shapes.

Architecture (llava-hf layout, loaded by ``LlavaForConditionalGeneration.from_pretrained``):
a CLIP vision tower (32x32 images, 16x16 patches -> one patch per quadrant + CLS, hidden 64, 3 layers; the
projector reads ``hidden_states[-2]``, the output of ``vision.layers.1``, without CLS, as in
LLaVA-1.5), the LLaVA MLP projector, and a Llama language model (hidden 64, 2 layers) with the
shapes world's word-level tokenizer. Saved with a LlavaProcessor (PIL CLIP image processor,
``num_additional_image_tokens=1``), so a prompt's ``<image>`` expands to 4 image tokens.

Training: cross-entropy on the answer tokens (and ``</s>``) of ``<s> <image>x16 question ...
answer : <answer> </s>``, images drawn from :mod:`.shapes_world` with jitter and noise
(``train_noise``: the model learns to answer through moderate noise; past it, it guesses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from sae_runtime.demo import shapes_world as sw

IMAGE_SIZE = sw.SIDE
PATCH = 16
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2
VISION_SITE = "vision.layers.1"  # what the projector reads (vision_feature_layer = -2 of 3 layers)
LM_SITE = "blocks.1.hook_resid_post"


@dataclass(frozen=True)
class LlavaTrainConfig:
    seed: int = 0
    vision_hidden: int = 128
    text_hidden: int = 64
    vision_steps: int = 1000
    vision_batch: int = 64
    steps: int = 300
    batch_size: int = 48
    lr: float = 3e-3
    warmup: int = 50
    train_noise: tuple[float, ...] = (0.0, 0.0, 0.0, 0.1, 0.25, 0.4)
    #: vision pretraining loss weight of the colour, shape and position heads
    head_weights: tuple[float, float, float] = (1.0, 3.0, 1.0)

    def quick(self) -> "LlavaTrainConfig":
        from dataclasses import replace

        return replace(self, vision_hidden=32, text_hidden=32, vision_steps=10, steps=20, batch_size=16)


def build_untrained(cfg: LlavaTrainConfig) -> tuple[Any, Any]:
    """(model, processor) with weights drawn from ``cfg.seed``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from sae_runtime.demo.tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer

    words = list(sw.WORDS)
    tokenizer = build_tiny_tokenizer(len(SPECIAL_TOKENS) + len(words) + 1, words)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * cfg.text_hidden, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden, num_hidden_layers=3,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=cfg.vision_hidden,
    )
    lcfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    lcfg.pad_token_id, lcfg.bos_token_id, lcfg.eos_token_id = 0, 1, 2
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(lcfg)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def pixel_values(processor: Any, images: Sequence[np.ndarray], chunk: int = 256) -> Tensor:
    """(N, 3, 32, 32) float pixel values through the processor's own image processor."""
    from PIL import Image

    out = [processor.image_processor([Image.fromarray(a) for a in images[s : s + chunk]], return_tensors="pt")["pixel_values"]
           for s in range(0, len(images), chunk)]
    return torch.cat(out)


def prompt_ids(processor: Any, question: str) -> list[int]:
    """Token ids of ``<image>\\n<question>`` as the LLaVA backend builds them (image tokens expanded)."""
    from PIL import Image

    blank = Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    return processor(images=[blank], text=[f"<image>\n{question}"], return_tensors="pt")["input_ids"][0].tolist()


def answer_ids(processor: Any, answer: str) -> list[int]:
    tok = processor.tokenizer
    return tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def make_batch(processor: Any, scenes: Sequence[sw.Scene], kinds: Sequence[Sequence[str]], prompts: dict[str, list[int]]) -> dict[str, Tensor]:
    """input_ids / attention_mask / labels (right-padded) and pixel_values, one row per scene.

    ``kinds[i]`` lists the questions of row i: the first is asked right after the image, as the
    backend prompts; later ones follow the previous answer (``question : ... answer : <a>``), so
    one image forward supervises several answers. Labels cover answers and their ``</s>``.
    """
    tok = processor.tokenizer
    rows, labels = [], []
    for s, ks in zip(scenes, kinds):
        ids, lab = [], []
        for j, k in enumerate(ks):
            p = prompts[k] if j == 0 else tok(sw.QUESTIONS[k], add_special_tokens=False)["input_ids"]
            a = answer_ids(processor, s.answer(k))
            ids += p + a
            lab += [-100] * len(p) + a
        rows.append(ids)
        labels.append(lab)
    n = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (n - len(l)) for l in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab,
            "pixel_values": pixel_values(processor, [sw.render(s) for s in scenes])}


def _schedule(opt: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))


def patch_concepts(scene: sw.Scene) -> list[tuple[str, ...]]:
    """Concept tags of each patch at the vision SAE's site: every patch carries the image's
    concepts, as late CLIP patch tokens carry the image's content (the vision pretraining makes it so)."""
    return [scene.concepts] * N_PATCHES


def patch_targets(scenes: Sequence[sw.Scene]) -> Tensor:
    """(N, patches, 3) class ids per patch, from :func:`patch_concepts`: colour, shape, position."""
    colours, positions = list(sw.COLOURS), list(sw.POSITIONS)
    ids = [[colours.index(s.colour), sw.SHAPES.index(s.shape), positions.index(s.position)] for s in scenes]
    return torch.tensor(ids).unsqueeze(1).expand(-1, N_PATCHES, -1)


def pretrain_vision(model: Any, processor: Any, cfg: LlavaTrainConfig, log=print) -> dict[str, Any]:
    """Stage 1, the stand-in for LLaVA's pretrained CLIP: train the vision tower so that every patch
    of the layer the projector reads names the image's colour, shape and position (linear heads,
    discarded afterwards; the shape head weighs most, circles and squares being close at 32 px).
    Patches that carry the whole image's content make a vision-SAE clamp on all positions read as
    one consistent image, as in the VLM paper's CLIP, rather than as new shapes in empty quadrants."""
    tower = model.model.vision_tower
    layer = int(VISION_SITE.rsplit(".", 1)[1]) + 1  # hidden_states index of that layer's output
    heads = torch.nn.ModuleList([torch.nn.Linear(cfg.vision_hidden, n) for n in (len(sw.COLOURS), len(sw.SHAPES), len(sw.POSITIONS))])
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.warmup, cfg.vision_steps)
    rng = np.random.default_rng(cfg.seed + 3)
    tower.train()
    losses = []
    for step in range(cfg.vision_steps):
        scenes = sw.random_scenes(cfg.vision_batch, int(rng.integers(2**31)), noise_levels=cfg.train_noise)
        feats = tower(pixel_values(processor, [sw.render(s) for s in scenes]), output_hidden_states=True).hidden_states[layer][:, 1:]
        target = patch_targets(scenes)
        loss = sum(w * torch.nn.functional.cross_entropy(h(feats).flatten(0, 1), target[..., j].flatten())
                   for j, (h, w) in enumerate(zip(heads, cfg.head_weights)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    log(f"  vision pretraining {cfg.vision_steps} steps, patch loss {np.mean(losses[-30:]):.4f}")
    tower.eval().requires_grad_(False)
    return {"vision_steps": cfg.vision_steps, "vision_patch_loss": float(np.mean(losses[-30:]))}


def train(cfg: LlavaTrainConfig, log=print) -> tuple[Any, Any, dict[str, Any]]:
    """Build, pretrain the vision tower, then train projector + language model on the questions
    (vision tower frozen). Returns (model in eval mode, processor, metrics)."""
    torch.manual_seed(cfg.seed + 2)
    model, processor = build_untrained(cfg)
    metrics = pretrain_vision(model, processor, cfg, log)
    prompts = {k: prompt_ids(processor, q) for k, q in sw.QUESTIONS.items()}
    kinds = list(sw.QUESTIONS)
    rng = np.random.default_rng(cfg.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.warmup, cfg.steps)
    model.model.multi_modal_projector.train(), model.model.language_model.train()
    losses = []
    for step in range(cfg.steps):
        scenes = sw.random_scenes(cfg.batch_size, int(rng.integers(2**31)), noise_levels=cfg.train_noise)
        batch = make_batch(processor, scenes, [[kinds[int(j)] for j in rng.permutation(3)] for _ in scenes], prompts)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(cfg.steps // 5, 1) == 0:
            log(f"  llava step {step + 1}/{cfg.steps} loss {np.mean(losses[-50:]):.4f}")
    model.eval()
    return model, processor, metrics | {"steps": cfg.steps, "final_loss": float(np.mean(losses[-50:]))}


def save(model: Any, processor: Any, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


__all__ = ["LM_SITE", "LlavaTrainConfig", "N_PATCHES", "PATCH", "patch_concepts", "VISION_SITE", "answer_ids", "build_untrained", "make_batch",
           "pixel_values", "prompt_ids", "save", "train"]
