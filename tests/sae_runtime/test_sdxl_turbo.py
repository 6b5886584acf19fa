"""SDXL-Turbo backend on a tiny random pipeline saved and reloaded with from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sae_runtime.backends.images import png_to_array
from sae_runtime.backends.sdxl_turbo import SdxlTurboBackend
from sae_runtime.backends.spec import Limits, ModelSpec, SaeSpec
from sae_runtime.backends.types import EncodeRequest, ImageRequest
from sae_runtime.demo import tiny_saes
from sae_runtime.demo.tiny_sdxl import save_tiny_sdxl
from sae_runtime.errors import FormatError, InvalidArgument, NotFound, TooLarge
from sae_runtime.formats import save_native
from sae_runtime.plan import CfgHalf, EditOp, InterventionPlan, LatentEdit, ReadoutSpec, Scope
from sae_runtime.sites import HookSite

MID = "unet.mid_block.attentions.0"
UP = "unet.up_blocks.0.attentions.1"


def random_sae(hook: str, seed: int, d_in: int = 64, d_sae: int = 128):
    return tiny_saes.random_sae(d_in, d_sae, hook, seed=seed)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="module")
def backend(pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_saes")
    specs = []
    for name, hook, seed in (("mid", MID, 1), ("up", UP, 2)):
        save_native(random_sae(hook, seed), root / name)
        specs.append(SaeSpec(name=name, path=str(root / name)))
    b = SdxlTurboBackend.from_spec(ModelSpec(name="tiny-sdxl", kind="sdxl_turbo", path=str(pipe_dir), saes=tuple(specs),
                                             limits=Limits(max_inference_steps=4)))
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference_pipe(pipe_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_image(pipe, prompt: str, seed: int, steps: int, guidance: float = 0.0) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
               generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0])


def run(backend, **kw):
    req = backend.validate(ImageRequest(**kw))
    return backend.generate_images([req])[0]


def block_updates(backend, block: str, **kw) -> list[torch.Tensor]:
    """A block's update (output - input, NHWC) at each denoising step of one solo request, edits included.

    The recorder is registered before the call, so it runs after the steering hooks (prepended
    when the call starts). Solo runs of the same request are bitwise reproducible.
    """
    module = backend.pipe.unet.get_submodule(block.removeprefix("unet."))
    seen: list[torch.Tensor] = []

    def hook(mod, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        seen.append((out - args[0]).permute(0, 2, 3, 1).detach().clone())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        result = run(backend, **kw)
    finally:
        handle.remove()
    block_updates.last_result = result
    return seen


def test_empty_plan_reproduces_pipeline_image_exactly(backend, reference_pipe):
    for steps in (1, 2):
        got = png_to_array(run(backend, prompt="a red cat", seed=7, num_inference_steps=steps).png)
        want = pipe_image(reference_pipe, "a red cat", seed=7, steps=steps)
        assert got.shape == (64, 64, 3)
        np.testing.assert_array_equal(got, want)


def test_clamp_changes_image_and_default_twin_is_unsteered(backend, reference_pipe):
    plan = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.SET, latents=(3, 5), value=60.0),))
    res = run(backend, prompt="a red cat", seed=3, num_inference_steps=2, plan=plan, include_default=True)
    steered, default = png_to_array(res.png), png_to_array(res.default_png)
    want = pipe_image(reference_pipe, "a red cat", seed=3, steps=2)
    assert np.abs(steered.astype(int) - want.astype(int)).max() > 10
    # The twin shares the steered row's batch; batched rows may differ from a solo run by rounding.
    assert np.abs(default.astype(int) - want.astype(int)).max() <= 1


def test_masked_edit_changes_update_only_inside_mask(backend):
    mask = torch.zeros(64, 64)
    mask[8:40, 20:50] = 1.0  # not aligned with the 16x16 grid of the block (4 px cells): soft edges
    value, latent = 25.0, 11
    plan = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.ADD, latents=(latent,), value=value),), scope=Scope(mask=mask))
    request = dict(prompt="a house", seed=1, num_inference_steps=1)
    (before,) = block_updates(backend, MID, **request)
    (after,) = block_updates(backend, MID, plan=plan, **request)
    before, after = before[0], after[0]  # (16, 16, 64)
    cells = mask.reshape(16, 4, 16, 4).mean(dim=(1, 3))  # area fraction of each cell, computed here
    expected = cells[:, :, None] * value * backend.saes["mid"].W_dec[latent]
    diff = after - before
    outside = cells == 0
    assert outside.any() and (~outside).any()
    assert torch.equal(diff[outside], torch.zeros_like(diff[outside]))
    assert diff[~outside].abs().max() > 1.0
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-4)


def test_step_window_outside_run_changes_nothing(backend, reference_pipe):
    edit = LatentEdit(sae="up", op=EditOp.SET, latents=(0, 1, 2), value=80.0)
    want = pipe_image(reference_pipe, "a blue sea", seed=5, steps=2)
    outside = InterventionPlan(edits=(edit,), scope=Scope(step_start=2))
    got = png_to_array(run(backend, prompt="a blue sea", seed=5, num_inference_steps=2, plan=outside).png)
    np.testing.assert_array_equal(got, want)
    # Positive controls: the same edit inside the window acts, and only on the steps it names.
    first = InterventionPlan(edits=(edit,), scope=Scope(step_start=0, step_end=1))
    got = png_to_array(run(backend, prompt="a blue sea", seed=5, num_inference_steps=2, plan=first).png)
    assert np.abs(got.astype(int) - want.astype(int)).max() > 10
    second = InterventionPlan(edits=(edit,), scope=Scope(step_start=1, step_end=2))
    clean = block_updates(backend, UP, prompt="a blue sea", seed=5, num_inference_steps=2)
    edited = block_updates(backend, UP, prompt="a blue sea", seed=5, num_inference_steps=2, plan=second)
    assert len(clean) == len(edited) == 2
    assert torch.equal(edited[0], clean[0])
    assert (edited[1] - clean[1]).abs().max() > 1.0


def test_cfg_half_cond_edits_only_cond_rows(backend):
    plan = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.SET, latents=(4,), value=40.0),), scope=Scope(cfg_half=CfgHalf.COND))
    request = dict(prompt="a dog", negative_prompt="blurry", seed=2, num_inference_steps=1, guidance_scale=2.0)
    (before,) = block_updates(backend, MID, **request)
    (after,) = block_updates(backend, MID, plan=plan, **request)
    assert before.shape[0] == 2  # [uncond, cond]
    assert torch.equal(after[0], before[0])
    assert (after[1] - before[1]).abs().max() > 1.0


def test_readout_maps_match_an_independent_encode(backend):
    (update,) = block_updates(backend, MID, prompt="a green tree", seed=4, num_inference_steps=1, readout=ReadoutSpec(saes=("mid",), top_k=3))
    res = block_updates.last_result
    update = update[0]  # (16, 16, 64)
    sae = backend.saes["mid"]
    latents = torch.relu((update - sae.b_dec) @ sae.W_enc + sae.b_enc)  # the standard SAE, by hand
    means = latents.mean(dim=(0, 1))
    want_top = torch.topk(means, 3).indices.tolist()
    maps = res.latent_maps
    assert [m.latent for m in maps] == want_top and all(m.sae == "mid" for m in maps)
    for m in maps:
        vals = torch.tensor(m.values)
        assert vals.shape == (16, 16)
        torch.testing.assert_close(vals, latents[:, :, m.latent], rtol=1e-4, atol=1e-4)
        assert m.mean == pytest.approx(float(means[m.latent]), rel=1e-4)
        assert png_to_array(m.heatmap_png).shape == (64, 64, 3)


def test_readout_maps_of_a_steered_image_read_the_edited_update(backend):
    plan = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.SET, latents=(21,), value=30.0),))
    updates = block_updates(backend, MID, prompt="a green tree", seed=4, num_inference_steps=2, plan=plan,
                            readout=ReadoutSpec(saes=("mid",), top_k=2))
    res = block_updates.last_result
    sae = backend.saes["mid"]
    latents = torch.stack([torch.relu((u[0] - sae.b_dec) @ sae.W_enc + sae.b_enc) for u in updates]).mean(0)  # over steps
    for m in res.latent_maps:
        torch.testing.assert_close(torch.tensor(m.values), latents[:, :, m.latent], rtol=1e-4, atol=1e-4)


def test_batched_rows_keep_their_own_plans_and_seeds(backend):
    plan = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.SET, latents=(3,), value=60.0),))
    reqs = [backend.validate(ImageRequest(prompt="a cat", seed=11, num_inference_steps=1, plan=plan)),
            backend.validate(ImageRequest(prompt="a cat", seed=12, num_inference_steps=1))]
    batched = [png_to_array(r.png).astype(int) for r in backend.generate_images(reqs)]
    solo = [png_to_array(backend.generate_images([r])[0].png).astype(int) for r in reqs]
    for b, s in zip(batched, solo):
        assert np.abs(b - s).max() <= 1
    assert np.abs(batched[0] - batched[1]).max() > 10


def test_validation_names_fields(backend):
    with pytest.raises(TooLarge) as e:
        backend.validate(ImageRequest(prompt="x", num_inference_steps=5))
    assert e.value.field == "num_inference_steps"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(ImageRequest(prompt="x", height=60))
    assert e.value.field == "height"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(ImageRequest(prompt="x", plan=InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.ADD, latents=(1,), value=1.0),), scope=Scope(mask=torch.ones(32, 32)))))
    assert e.value.field == "plan.scope.mask"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(ImageRequest(prompt="x", plan=InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.ADD, latents=(1,), value=1.0),), scope=Scope(cfg_half=CfgHalf.UNCOND))))
    assert e.value.field == "plan.scope.cfg_half"
    with pytest.raises(NotFound) as e:
        backend.validate(ImageRequest(prompt="x", readout=ReadoutSpec(saes=("nope",))))
    assert e.value.field == "readout.saes[0]"
    with pytest.raises(InvalidArgument) as e:
        backend.validate(EncodeRequest(text="x", image=b"\x89PNG"))
    assert e.value.field == "image"
    with pytest.raises(NotFound):
        SdxlTurboBackend(backend.pipe, {"bad": random_sae("unet.down_blocks.0.resnets.0", 3)})
    with pytest.raises(InvalidArgument) as e:
        SdxlTurboBackend(backend.pipe, {"narrow": random_sae(MID, 3, d_in=32)})
    assert e.value.field == "narrow"
    with pytest.raises(FormatError):
        SdxlTurboBackend.from_spec(ModelSpec(name="x", kind="sdxl_turbo", path="/nonexistent/sdxl"))


def test_encode_pools_block_latents(backend):
    res = backend.encode(EncodeRequest(text="a red cat", saes=("mid",), top_k=4))
    (pooled,) = res.pooled
    assert pooled.sae == "mid" and len(pooled.top_mean) == 4
    means = [a.value for a in pooled.top_mean]
    assert means == sorted(means, reverse=True)
    assert all(mx.value >= means[-1] for mx in pooled.top_max)


def test_batches_over_the_limit_run_in_passes_and_errors_name_the_request(backend, reference_pipe):
    small = SdxlTurboBackend(backend.pipe, backend.saes, limits=Limits(max_batch_size=2, max_inference_steps=4))
    try:
        plan = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.SET, latents=(3,), value=60.0),))
        reqs = [ImageRequest(prompt=p, seed=s, plan=plan, include_default=True) for p, s in (("a cat", 1), ("a dog", 2), ("a sun", 3))]
        sizes: list[int] = []
        handle = backend.pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        try:
            results = small.generate_images(reqs)
        finally:
            handle.remove()
        assert sizes == [2, 2, 2]  # three passes of one request and its twin
        for (p, s), res in zip((("a cat", 1), ("a dog", 2), ("a sun", 3)), results):
            want = pipe_image(reference_pipe, p, seed=s, steps=1)
            assert np.abs(png_to_array(res.default_png).astype(int) - want.astype(int)).max() <= 1
            assert np.abs(png_to_array(res.png).astype(int) - want.astype(int)).max() > 10
        with pytest.raises(TooLarge) as e:
            small.generate_images([ImageRequest(prompt="a"), ImageRequest(prompt="b", num_inference_steps=9)])
        assert e.value.field == "requests[1].num_inference_steps"
    finally:
        small.close()


def test_presets_and_vectors_on_a_unet_block(pipe_dir, tmp_path):
    """A preset by name gives the image its inline edits give; a steering vector at a U-Net block
    adds v * d to the block's update at every position (checked on the recorded update)."""
    from safetensors.torch import save_file

    from sae_runtime.backends.spec import VectorSpec
    from sae_runtime.plan import VectorEdit

    save_native(random_sae(MID, 1), tmp_path / "mid")
    width = 64
    save_file({"d": torch.randn(width, generator=torch.Generator().manual_seed(4))}, str(tmp_path / "v.safetensors"))
    clamp = InterventionPlan(edits=(LatentEdit(sae="mid", op=EditOp.SET, latents=(3, 5), value=60.0),))
    b = SdxlTurboBackend.from_spec(ModelSpec(
        name="tiny-sdxl", kind="sdxl_turbo", path=str(pipe_dir), saes=(SaeSpec("mid", str(tmp_path / "mid")),),
        vectors=(VectorSpec("v", str(tmp_path / "v.safetensors"), MID),), presets=(("clamp", clamp),)))
    try:
        assert b.info().presets == ("clamp",) and b.info().vectors == (("v", HookSite.parse(MID).name),)
        by_name = run(b, prompt="a red cat", seed=3, num_inference_steps=1, plan=InterventionPlan(presets=("clamp",)))
        inline = run(b, prompt="a red cat", seed=3, num_inference_steps=1, plan=clamp)
        assert by_name.png == inline.png
        plain = block_updates(b, MID, prompt="a red cat", seed=3, num_inference_steps=1)
        pushed = block_updates(b, MID, prompt="a red cat", seed=3, num_inference_steps=1,
                               plan=InterventionPlan(vectors=(VectorEdit(vector="v", value=0.5),)))
        d = b.plan_resources.vectors["v"].direction
        torch.testing.assert_close(pushed[0], plain[0] + 0.5 * d, atol=1e-5, rtol=0)
    finally:
        b.close()
