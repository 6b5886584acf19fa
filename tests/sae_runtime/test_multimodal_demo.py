"""The LLaVA / SDXL-Turbo mechanics demos: built from a seed, cached, loadable by their backends."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sae_runtime.backends.images import png_to_array
from sae_runtime.backends.llava import LlavaBackend
from sae_runtime.backends.sdxl_turbo import SdxlTurboBackend
from sae_runtime.backends.types import ImageRequest, SamplingParams, TextRequest
from sae_runtime.demo.multimodal import PALETTE, DemoSize, ensure_llava_demo, ensure_sdxl_demo, read_manifest, synthetic_images
from sae_runtime.plan import EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope

SMALL = DemoSize(images=96, prompts=24, sdxl_prompts=12, steps=40, batch_size=128, d_sae=64, k=4)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="module")
def llava_spec(cache):
    return ensure_llava_demo(cache, seed=3, size=SMALL)


@pytest.fixture(scope="module")
def sdxl_spec(cache):
    return ensure_sdxl_demo(cache, seed=3, size=SMALL)


def test_synthetic_images_tag_each_patch_with_its_majority_colour():
    images, tags = synthetic_images(4, seed=0)
    assert images[0].shape == (16, 16, 3) and len(tags[0]) == 16
    for img, per_patch in zip(images, tags):
        for n, t in enumerate(per_patch):
            (tag,) = t
            py, px = divmod(n, 4)
            patch = img[py * 4 : py * 4 + 4, px * 4 : px * 4 + 4].reshape(-1, 3)
            colours, counts = np.unique(patch, axis=0, return_counts=True)
            assert PALETTE[tag.split(":")[1]] == tuple(colours[counts.argmax()])


def test_llava_demo_is_cached_and_deterministic(llava_spec, cache, tmp_path):
    root = cache / "demo-llava-seed3-v1"
    stamp = (root / "manifest.json").stat().st_mtime_ns
    again = ensure_llava_demo(cache, seed=3, size=SMALL)
    assert again == llava_spec and (root / "manifest.json").stat().st_mtime_ns == stamp  # not rebuilt
    other = ensure_llava_demo(tmp_path, seed=3, size=SMALL)
    for sae in ("vision", "lm"):
        a = load_file(f"{llava_spec.saes[0].path.rsplit('/', 1)[0]}/{sae}/sae.safetensors")
        b = load_file(f"{other.saes[0].path.rsplit('/', 1)[0]}/{sae}/sae.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = read_manifest(root)
    assert m["seed"] == 3 and m["saes"]["vision"]["rows"] == SMALL.images * 17
    assert "RANDOM weights" in llava_spec.description


def test_llava_demo_serves_label_steering(llava_spec):
    backend = LlavaBackend.from_spec(llava_spec)
    labels = backend.feature_labels("vision")
    assert labels, "the vision SAE should have colour labels"
    label = sorted(labels)[0]
    images, _ = synthetic_images(1, seed=99)
    plan = InterventionPlan(edits=(LatentEdit(sae="vision", op=EditOp.SET, labels=(label,), value=40.0),))
    req = backend.validate(TextRequest(prompt="what is the cat", image=png_bytes(images[0]), plan=plan, include_default=True,
                                       sampling=SamplingParams(max_new_tokens=3), logprobs=2, readout=ReadoutSpec(saes=("vision",), top_k=3)))
    assert req.plan.edits[0].latents == (labels[label],)
    [res] = backend.generate([req])
    assert [t.top_logprobs for t in res.steered.tokens] != [t.top_logprobs for t in res.default.tokens]
    assert any(a.index == labels[label] and a.value == pytest.approx(40.0) for p in res.vision_latents for e in p for a in e.after)


def test_sdxl_demo_serves_masked_steering_and_maps(sdxl_spec):
    backend = SdxlTurboBackend.from_spec(sdxl_spec)
    assert "RANDOM weights" in backend.info().description
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0
    plan = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.ADD, latents=(0,), value=200.0),), scope=Scope(mask=mask))
    req = backend.validate(ImageRequest(prompt="a red cat", seed=1, plan=plan, include_default=True, readout=ReadoutSpec(saes=("mid",), top_k=2)))
    [res] = backend.generate_images([req])
    steered, default = png_to_array(res.png).astype(int), png_to_array(res.default_png).astype(int)
    assert steered.shape == (64, 64, 3)
    assert np.abs(steered - default).max() > 0
    assert len(res.latent_maps) == 2 and len(res.latent_maps[0].values) == 16
    backend.close()
