"""OpenAI's inference API under /openai/v1, driven by the official `openai` client, unchanged:
models, chat completions and completions on a base and on a trained version, streamed or not."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from conftest import write_jsonl  # noqa: E402
from test_api_support import LiveServer  # noqa: E402
from tunery.store import base_version_id  # noqa: E402
from tunery.train.recipe import train  # noqa: E402

MESSAGES = [{"role": "user", "content": "Item: the red cat. Animal?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("openai")
    live = LiveServer(root / "home")
    store = live.store
    store.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
    store.create_model("alice", "dest")
    rows = [{"messages": [{"role": "user", "content": f"Item: the {c} cat. Animal?"},
                          {"role": "assistant", "content": "cat"}]} for c in ["red", "blue", "green"] * 8]
    data = write_jsonl(root / "chat.jsonl", rows)
    run = train({"train_data": str(data), "max_steps": 2, "num_validation_samples": 4}, base=str(tiny_model_dir),
                output_dir=root / "run", progress=False)
    training = store.create_training("alice", model="tunery/tiny", version_id=base_version_id("tiny"),
                                     destination="alice/dest", input={}, job={})
    store.claim_training("w", 30)
    _, version = store.succeed_training(training.id, "w", run_url=str(run.run_dir), weights_url="u", metrics={})
    live.version = version
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=server.store.create_token("alice"),
                         max_retries=0)


def test_models_lists_bases_and_trained_versions(server, client):
    ids = {m.id for m in client.models.list()}
    assert {"tunery/tiny", "alice/dest", f"alice/dest:{server.version.id}"} <= ids
    assert client.models.retrieve("tunery/tiny").id == "tunery/tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("bob/nothing")
    assert info.value.code == "model_not_found"


def test_chat_completion_renders_the_chat_template_and_reports_usage(client, tokenizer):
    reply = client.chat.completions.create(model="tunery/tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=True).input_ids)
    assert 1 <= reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if reply.usage.completion_tokens == 5:
        assert choice.finish_reason == "length"


def test_streamed_chat_gives_the_same_text_and_usage_at_the_end(client):
    whole = client.chat.completions.create(model="tunery/tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tunery/tiny", messages=MESSAGES, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_a_trained_version_and_stops(server, client):
    reply = client.completions.create(model="tunery/tiny", prompt="Item: the red cat.\nAnimal:", max_tokens=6,
                                      temperature=0, seed=3)
    assert reply.object == "text_completion" and isinstance(reply.choices[0].text, str)
    tuned = client.chat.completions.create(model=f"alice/dest:{server.version.id}", messages=MESSAGES,
                                           max_completion_tokens=4, temperature=0)
    assert tuned.model == f"alice/dest:{server.version.id}" and tuned.usage.completion_tokens <= 4
    latest = client.chat.completions.create(model="alice/dest", messages=MESSAGES, max_completion_tokens=4,
                                            temperature=0)
    assert latest.choices[0].message.content == tuned.choices[0].message.content
    if reply.choices[0].text:
        first = reply.choices[0].text[0]
        cut = client.completions.create(model="tunery/tiny", prompt="Item: the red cat.\nAnimal:", max_tokens=6,
                                        temperature=0, seed=3, stop=[first])
        assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop"


def test_vllms_ignore_eos_and_min_tokens(client):
    from tunery.server.openai.inference import ChatBody, _params

    # What each asks of the engine (a tiny random model rarely samples eos, so the answers alone
    # could not tell an ignored flag).
    ask = {"model": "m", "messages": MESSAGES, "max_tokens": 12}
    assert _params(ChatBody(**ask, ignore_eos=True)).min_new_tokens == 12
    assert _params(ChatBody(**ask, min_tokens=5)).min_new_tokens == 5
    assert _params(ChatBody(**ask)).min_new_tokens == 0
    for extra in ({"ignore_eos": True}, {"min_tokens": 12}):
        reply = client.chat.completions.create(model="alice/dest", messages=MESSAGES, max_tokens=12, temperature=0.8,
                                               seed=5, extra_body=extra)
        assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tunery/tiny", messages=MESSAGES, max_tokens=4,
                                       extra_body={"min_tokens": 5})
    assert info.value.param == "min_tokens" and "at most max_tokens" in info.value.message


def test_bad_requests_are_answered_in_openais_shape(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tunery/tiny", messages=MESSAGES, n=2)
    assert "only n=1 is supported" in info.value.message and info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tunery/tiny", messages=MESSAGES, temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tunery/nothing", messages=MESSAGES)


def test_azure_ml_scoring_answers_in_the_seeds_shape(server, client):
    import httpx

    token = server.store.create_token("alice")
    body = {"input_data": {"input_string": ["I believe the meaning of life is", "Item: the red cat.\nAnimal:"],
                           "parameters": {"top_p": 0.9, "temperature": 0.7, "max_new_tokens": 6, "do_sample": True,
                                          "seed": 1}}}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        scored = http.post(f"/v1/models/tunery/tiny/versions/{base_version_id('tiny')}/score", json=body)
        assert scored.status_code == 200, scored.text
        records = scored.json()
        assert [list(r) for r in records] == [["0"], ["0"]]
        assert records[0]["0"].startswith("I believe the meaning of life is")
        assert records[1]["0"].startswith("Item: the red cat.\nAnimal:")
        greedy = {"input_data": {"input_string": ["Item: the red cat.\nAnimal:"],
                                 "parameters": {"max_new_tokens": 6, "return_full_text": False}}}
        alone = http.post("/v1/models/alice/dest/score", json=greedy).json()[0]["0"]
        same = client.completions.create(model="alice/dest", prompt="Item: the red cat.\nAnimal:", max_tokens=6,
                                         temperature=0).choices[0].text
        assert alone == same  # do_sample false is greedy, the same text the OpenAI route gives
        bad = http.post("/v1/models/alice/dest/score", json={"input_data": {"input_string": ["x"],
                                                                             "parameters": {"beams": 4}}})
        assert bad.status_code == 422 and "unknown parameter 'beams'" in bad.json()["detail"]
