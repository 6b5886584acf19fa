"""The OpenAI-compatible endpoints with the ``openai`` package itself as the client: completions and
chat completions (unary and streamed, n, seed, stop, logprobs), steering through ``extra_body``, the
``steering`` object in responses, /v1/models, and errors as the client raises them. Outputs are
checked against the same requests sent over gRPC."""

from __future__ import annotations

import base64
import contextlib
import io

import openai
import pytest
from steering.v1 import steering_pb2 as pb

from tests.services.helpers import IMAGE, LM, LM_LABELS, LM_SAE, SERVED_MODELS, VLM, png_bytes

RED = LM_LABELS["color:red"]
STEERING = {"edits": [{"sae": LM_SAE, "op": "EDIT_OP_SET", "labels": ["color:red"], "value": 8}]}


@pytest.fixture(scope="module")
def oai(service):
    return openai.OpenAI(base_url=service.http_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def grpc_generate(stub, *, seed: int, max_new_tokens: int, temperature: float = 0.0, prompt: str = "", messages=(),
                  steered: bool = True, logprobs: int = 0, stop=()) -> pb.GenerateResponse:
    request = pb.GenerateRequest(model=LM, prompt=prompt, seed=seed, include_default=steered, return_logprobs=logprobs,
                                 messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    request.params.max_new_tokens = max_new_tokens
    request.params.temperature = temperature
    request.params.stop.extend(stop)
    if steered:
        request.plan.edits.add(sae=LM_SAE, op=pb.EDIT_OP_SET, labels=["color:red"], value=8.0)
    return stub.Generate(request, timeout=120)


def test_completion_with_steering_equals_grpc_and_carries_the_steering_object(oai, stub):
    response = oai.completions.create(
        model=LM, prompt="the cat", max_tokens=5, temperature=0, seed=11, logprobs=2,
        extra_body={"steering": STEERING, "include_default": True},
    )
    expected = grpc_generate(stub, seed=11, max_new_tokens=5, prompt="the cat", logprobs=2)
    (choice,) = response.choices
    assert response.object == "text_completion" and response.model == LM
    assert choice.text == expected.completion.text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [t.text for t in expected.completion.tokens]
    assert choice.logprobs.token_logprobs == pytest.approx([t.logprob for t in expected.completion.tokens], abs=1e-5)
    assert [list(d) for d in choice.logprobs.top_logprobs] == [[lp.token for lp in t.top_logprobs] for t in expected.completion.tokens]
    assert choice.logprobs.text_offset == [len("".join(t.text for t in expected.completion.tokens[:i])) for i in range(5)]
    # The steering extension: the unsteered twin, risk scores, versions.
    steering = choice.model_extra["steering"]
    assert steering["defaultCompletion"]["text"] == expected.default_completion.text != choice.text
    assert steering["risk"]["score"] == pytest.approx(expected.risk.score, abs=1e-6)
    assert steering["riskPrompt"]["score"] == pytest.approx(expected.risk_prompt.score, abs=1e-6)
    top = response.model_extra["steering"]
    assert top["steered"] is True
    assert top["versions"]["saes"][LM_SAE] == expected.versions.saes[LM_SAE]
    assert response.system_fingerprint == expected.versions.model_version


def test_chat_completion_n_seed_and_stop(oai, stub):
    messages = [{"role": "user", "content": "name a colour"}]
    response = oai.chat.completions.create(model=LM, messages=messages, max_tokens=6, temperature=1.0, seed=40, n=3, extra_body={"steering": STEERING})
    assert response.object == "chat.completion" and [c.index for c in response.choices] == [0, 1, 2]
    for i, choice in enumerate(response.choices):  # choice i samples with seed + i
        expected = grpc_generate(stub, seed=40 + i, max_new_tokens=6, temperature=1.0, messages=[("user", "name a colour")])
        assert choice.message.role == "assistant" and choice.message.content == expected.completion.text
    assert len({c.message.content for c in response.choices}) > 1  # distinct seeds, distinct samples

    # stop: generation ends at the stop string, and the finish reason says so.
    plain = grpc_generate(stub, seed=1, max_new_tokens=8, prompt="the cat", steered=False)
    stop_at = plain.completion.tokens[2].text.strip()
    stopped = oai.completions.create(model=LM, prompt="the cat", max_tokens=8, temperature=0, seed=1, stop=[stop_at])
    expected = grpc_generate(stub, seed=1, max_new_tokens=8, prompt="the cat", steered=False, stop=[stop_at])
    assert stopped.choices[0].text == expected.completion.text
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].text) < len(plain.completion.text)


def test_streamed_chat_is_openai_chunks_that_add_up_to_the_unary_answer(oai, stub):
    kwargs = dict(model=LM, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=1.0, seed=5, n=2,
                  logprobs=True, top_logprobs=2, extra_body={"steering": STEERING, "include_default": True})
    unary = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        text = "".join(c.delta.content or "" for c in mine)
        assert text == unary.choices[index].message.content
        assert [c.finish_reason for c in mine][-1] == "length" and all(c.finish_reason is None for c in mine[:-1])
        token_chunks = [c for c in mine if c.delta.content]
        assert [lp.token for c in token_chunks for lp in c.logprobs.content] == [lp.token for lp in unary.choices[index].logprobs.content]
        assert all(len(lp.top_logprobs) == 2 for c in token_chunks for lp in c.logprobs.content)
        running = [c.model_extra["steering"]["runningRisk"] for c in token_chunks]
        assert len(running) == 5 and all(0.0 <= r <= 1.0 for r in running)
        final = mine[-1].model_extra["steering"]
        assert final["defaultCompletion"]["text"] == unary.choices[index].model_extra["steering"]["defaultCompletion"]["text"]
        assert final["risk"]["score"] == pytest.approx(unary.choices[index].model_extra["steering"]["risk"]["score"], abs=1e-6)


def test_streamed_completion_text_chunks(oai, stub):
    stream = oai.completions.create(model=LM, prompt="the dog", max_tokens=4, temperature=0, seed=2, stream=True, extra_body={"steering": STEERING})
    chunks = list(stream)
    expected = grpc_generate(stub, seed=2, max_new_tokens=4, prompt="the dog", steered=True)
    assert [c.choices[0].text for c in chunks[:-1]] == [t.text for t in expected.completion.tokens]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["steering"]["steered"] is True


def test_chat_with_an_image_on_llava(oai, stub):
    image = png_bytes(8)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": url}}]}]
    response = oai.chat.completions.create(model=VLM, messages=messages, max_tokens=3, temperature=0, seed=0)
    request = pb.GenerateMultimodalRequest(model=VLM, image=image, seed=0, messages=[pb.ChatMessage(role="user", content="what is it")])
    request.params.max_new_tokens = 3
    assert response.choices[0].message.content == stub.GenerateMultimodal(request, timeout=120).completion.text
    streamed = list(oai.chat.completions.create(model=VLM, messages=messages, max_tokens=3, temperature=0, seed=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == response.choices[0].message.content


def test_models_lists_every_served_model(oai):
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == set(SERVED_MODELS)
    assert models[LM].model_extra["steering"]["kind"] == "causal_lm"
    assert models[IMAGE].model_extra["steering"]["saes"][0]["width"] == 128


def test_errors_reach_the_openai_client_with_status_code_and_field(oai):
    bad_latent = {"edits": [{"sae": LM_SAE, "op": "EDIT_OP_SET", "latents": [99], "value": 1}]}
    cases = [
        (dict(model=LM, prompt="x", extra_body={"steering": bad_latent}), openai.BadRequestError, "steering.edits[0].latents"),
        (dict(model=LM, prompt="x", extra_body={"steering": {"edits": [{"op": "EDIT_OP_PAINT"}]}}), openai.BadRequestError, "steering.edits[0].op"),
        (dict(model="nope", prompt="x"), openai.NotFoundError, "model"),
        (dict(model=LM, prompt="x", max_tokens=500), openai.APIStatusError, "max_tokens"),
        (dict(model=LM, prompt="x", max_tokens=500, stream=True), openai.APIStatusError, "max_tokens"),
        (dict(model=LM, prompt="x", echo=True), openai.BadRequestError, "echo"),
        (dict(model=LM, prompt="x", n=0), openai.BadRequestError, "n"),
        (dict(model=LM, prompt="x", logprobs=99), openai.BadRequestError, "logprobs"),
        (dict(model=LM, prompt=[1, 2]), openai.BadRequestError, "prompt"),  # token ids: not supported
    ]
    for kwargs, error_type, field in cases:
        with pytest.raises(error_type) as caught:
            response = oai.completions.create(**kwargs)
            if kwargs.get("stream"):
                list(response)
        assert caught.value.param == field, (kwargs, caught.value.message)
        assert caught.value.message.startswith(f"Error code: {caught.value.status_code} - {field}: ")
        if field == "max_tokens":
            assert caught.value.status_code == 413 and caught.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=LM, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert caught.value.param == "messages[0].content[0].image_url.url"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=LM, messages=[{"role": "narrator", "content": "x"}])
    assert caught.value.param == "messages[0].role"


def test_the_readme_openai_snippet_runs(service):
    from tests.services.test_readme import blocks, for_tests

    (snippet,) = [b for b in blocks("python") if "openai.OpenAI" in b]
    snippet = for_tests(snippet, service.target).replace("http://localhost:8000", service.http_url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - our own README
    assert "| unsteered:" in out.getvalue() and "| risk:" in out.getvalue(), out.getvalue()
