"""The HTTP API end to end: a real local Ray, `serve.run(build_app(...))`, real HTTP with httpx and
the openai SDK, the tiny model with two real PEFT adapters registered through the app args."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from benchmarks.common import wait_until
from deployments.request_limits import LIMITS
from deployments.tenants import OPEN_ACCESS_WARNING
from tests.support.ray_cluster import local_ray

pytestmark = pytest.mark.integration

BASE_URL = "http://127.0.0.1:8000"
BASE_MODEL = "tiny-random-llama"
ADAPTERS = ("acme/pirate", "globex/poet")
MAX_NEW_TOKENS = 24
MAX_SEQ_LEN = 128


def replica_settings(adapters: dict[str, str]) -> dict:
    return {
        "base_model": BASE_MODEL,
        "compile": "off",
        "num_slots": 2,
        "max_num_seqs": 4,
        "max_seq_len": MAX_SEQ_LEN,
        "max_new_tokens": MAX_NEW_TOKENS,
        "adapters": adapters,
    }


def app_args(adapters: dict[str, str]) -> dict:
    return {"num_replicas": 2, "replica_num_cpus": 1, "tenants": {"auth": "none"}, "replica": replica_settings(adapters)}


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory) -> dict[str, str]:
    from tests.support.adapters import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    folders = {
        adapter_id: str(make_peft_adapter(root / adapter_id.replace("/", "__"), seed=index, r=4 * (index + 1)))
        for index, adapter_id in enumerate(ADAPTERS)
    }
    folders["shared/spare"] = str(make_peft_adapter(root / "spare", seed=7, r=16))
    return folders


@pytest.fixture(scope="module")
def served(adapter_folders):
    """A local Ray with the app running; always shut down, and no raylet left after."""
    from ray import serve

    from deployments.app import build_app

    with local_ray():
        started = time.perf_counter()
        serve.run(build_app(app_args({a: adapter_folders[a] for a in ADAPTERS})), name="lora-serve", route_prefix="/")
        print(f"app up in {time.perf_counter() - started:.1f} s")
        yield build_app


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=BASE_URL, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(served):
    import openai

    return openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(http, **body) -> dict:
    response = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream; `[DONE]` must come last."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(event) for event in events[:-1]]


# ---- the happy paths -----------------------------------------------------------------------------


def test_healthz(http):
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "base_model": BASE_MODEL, "warning": OPEN_ACCESS_WARNING}


def test_models_lists_the_base_model_and_every_adapter(http, openai_client):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [BASE_MODEL, *sorted(ADAPTERS)]
    assert body["data"][1]["owned_by"] == "acme" and body["data"][1]["parent"] == BASE_MODEL
    assert [model.id for model in openai_client.models.list()] == [BASE_MODEL, *sorted(ADAPTERS)]


def test_completion_has_openai_shape_and_usage(http):
    body = complete(http, model="acme/pirate")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "acme/pirate" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len("Once upon a time".encode())  # the tiny tokenizer: one token per byte
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_is_deterministic_and_each_adapter_changes_the_text(http):
    texts = {model: complete(http, model=model, max_tokens=16)["choices"][0]["text"] for model in (BASE_MODEL, *ADAPTERS)}
    assert texts == {model: complete(http, model=model, max_tokens=16)["choices"][0]["text"] for model in texts}
    assert len(set(texts.values())) == 3, texts


def test_openai_sdk_completions_and_chat(openai_client):
    completion = openai_client.completions.create(model="globex/poet", prompt="Hello", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    chat = openai_client.chat.completions.create(
        model="acme/pirate",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        max_tokens=10,
        temperature=0,
        seed=3,
        user="someone",  # fields the server does not use are ignored
    )
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert 1 <= chat.usage.completion_tokens <= 10


def test_chat_without_max_tokens_generates_up_to_the_limit(http):
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Go on"}], "temperature": 0}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["completion_tokens"] <= MAX_NEW_TOKENS
    if response.json()["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == MAX_NEW_TOKENS


@pytest.mark.parametrize("model", [BASE_MODEL, "acme/pirate"])
def test_streamed_completion_adds_up_to_the_plain_one(http, model):
    plain = complete(http, model=model, max_tokens=16)
    with http.stream(
        "POST", "/v1/completions",
        json={"model": model, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as response:
        assert response.status_code == 200
        response.read()
    chunks = sse_events(response)
    assert all(chunk["object"] == "text_completion" and chunk["id"] == chunks[0]["id"] for chunk in chunks)
    text_chunks = [chunk for chunk in chunks if chunk["choices"]]
    assert len(text_chunks) > 1  # really streamed, not one blob
    assert "".join(chunk["choices"][0]["text"] for chunk in text_chunks) == plain["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_streamed_chat_with_the_openai_sdk_adds_up_to_the_plain_one(openai_client):
    request = {"model": "globex/poet", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 16, "temperature": 0}
    plain = openai_client.chat.completions.create(**request)
    stream = openai_client.chat.completions.create(**request, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


# ---- bad input -----------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}

BAD_REQUESTS = [
    # (name, path, body, status, error type)
    ("unknown adapter", "/v1/completions", {"model": "acme/nope", "prompt": "hi"}, 404, "adapter_not_found"),
    ("unknown adapter, chat", "/v1/chat/completions", {"model": "nobody/none", **CHAT}, 404, "adapter_not_found"),
    ("unknown adapter, streamed", "/v1/completions", {"model": "acme/nope", "prompt": "hi", "stream": True}, 404, "adapter_not_found"),
    ("no model", "/v1/completions", {"prompt": "hi"}, 422, "invalid_request_body"),
    ("no messages", "/v1/chat/completions", {"model": BASE_MODEL}, 422, "invalid_request_body"),
    ("bad role", "/v1/chat/completions", {"model": BASE_MODEL, "messages": [{"role": "robot", "content": "x"}]}, 422, "invalid_request_body"),
    ("prompt not a string", "/v1/completions", {"model": BASE_MODEL, "prompt": 5}, 422, "invalid_request_body"),
    ("n over 1", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "n": 2}, 422, "invalid_request_body"),
    ("temperature out of range", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "temperature": 5}, 422, "invalid_request_body"),
    ("nine stop strings", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "stop": list("abcdefghi")}, 422, "invalid_request_body"),
    ("max_tokens over the limit", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "max_tokens": MAX_NEW_TOKENS + 1}, 400, "invalid_request"),
    ("max_tokens over the limit, streamed", "/v1/chat/completions", {"model": "acme/pirate", **CHAT, "max_tokens": 10_000, "stream": True}, 400, "invalid_request"),
    ("prompt too long", "/v1/completions", {"model": BASE_MODEL, "prompt": "x" * MAX_SEQ_LEN, "max_tokens": 4}, 400, "invalid_request"),
    ("chat too long", "/v1/chat/completions", {"model": "acme/pirate", "messages": [{"role": "user", "content": "y" * MAX_SEQ_LEN}]}, 400, "invalid_request"),
    # vLLM's extensions, validated like OpenAI's fields
    ("top_k below -1", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "top_k": -2}, 422, "invalid_request_body"),
    ("repetition_penalty 0", "/v1/chat/completions", {"model": BASE_MODEL, **CHAT, "repetition_penalty": 0}, 422, "invalid_request_body"),
    ("min_tokens negative", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "min_tokens": -1}, 422, "invalid_request_body"),
    ("stop_token_ids negative", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "stop_token_ids": [-3]}, 422, "invalid_request_body"),
    ("65 stop_token_ids", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "stop_token_ids": list(range(65))}, 422, "invalid_request_body"),
    ("min_tokens over max_tokens", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "invalid_request"),
    ("ignore_eos not a bool", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "ignore_eos": "sometimes"}, 422, "invalid_request_body"),
    # the request limits (deployments.request_limits)
    ("body over 1 MiB", "/v1/completions", {"model": BASE_MODEL, "prompt": "x" * (LIMITS.max_body_bytes + 1)}, 413, "body_too_large"),
    ("prompt over max_prompt_chars", "/v1/completions", {"model": BASE_MODEL, "prompt": "x" * (LIMITS.max_prompt_chars + 1)}, 422, "invalid_request_body"),
    ("257 messages", "/v1/chat/completions", {"model": BASE_MODEL, "messages": CHAT["messages"] * (LIMITS.max_messages + 1)}, 422, "invalid_request_body"),
    ("a stop string over 256 chars", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "stop": ["s" * 257]}, 422, "invalid_request_body"),
    ("max_tokens negative", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "max_tokens": -1}, 422, "invalid_request_body"),
    ("max_tokens huge", "/v1/completions", {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 10**30}, 400, "invalid_request"),
    ("a model id with path tricks", "/v1/completions", {"model": "acme/../globex/poet", "prompt": "hi"}, 404, "adapter_not_found"),
    ("model over 256 chars", "/v1/completions", {"model": "m" * 300, "prompt": "hi"}, 422, "invalid_request_body"),
]


@pytest.mark.parametrize("name, path, body, status, error_type", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_its_status_and_a_json_error(http, name, path, body, status, error_type):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == error_type and error["message"]


def test_vllm_extensions_reach_the_engine(http):
    """`ignore_eos` runs to `max_tokens` (what `vllm bench serve` relies on), `min_tokens` holds the
    end off, and a sampled request with `top_k: 1` is greedy, whatever the temperature."""
    exact = complete(http, model="acme/pirate", max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    assert exact["usage"]["completion_tokens"] == MAX_NEW_TOKENS and exact["choices"][0]["finish_reason"] == "length"
    at_least = complete(http, model=BASE_MODEL, max_tokens=10, min_tokens=10, repetition_penalty=1.3)
    assert at_least["usage"]["completion_tokens"] == 10
    greedy = complete(http, model="globex/poet", max_tokens=8)
    top_one = complete(http, model="globex/poet", max_tokens=8, temperature=1.5, top_k=1, seed=3)
    assert top_one["choices"][0]["text"] == greedy["choices"][0]["text"]


@pytest.mark.parametrize("content", [b"{not json", b'{"model": "\xff\xfe", "prompt": "hi"}', b"", b"[]", b"null"])
def test_a_body_that_is_not_a_json_object_is_422(http, content):
    response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "invalid_request_body"


def test_openai_sdk_raises_typed_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="acme/nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "adapter_not_found"
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model=BASE_MODEL, prompt="hi", max_tokens=MAX_NEW_TOKENS + 1)


# ---- reconfigure ---------------------------------------------------------------------------------


def replica_stats(rounds: int = 8) -> list[dict]:
    from ray import serve

    handle = serve.get_deployment_handle("LoraReplica", app_name="lora-serve")
    return [handle.stats.remote().result() for _ in range(rounds)]


def test_a_replica_killed_under_load_fails_no_plain_request_and_ends_every_stream(served):
    """Six callers send plain and streamed completions while one of the two replicas is killed:
    every plain request is answered 200 (retried on the other replica), every stream ends with
    `[DONE]` (an error event before it if the replica died mid-stream), and Serve replaces it."""
    import threading

    import ray

    replicas = [name for name in ray.util.list_named_actors(all_namespaces=True)
                if "LoraReplica" in name["name"]]
    assert len(replicas) == 2, replicas
    stop = threading.Event()
    plain: list[int] = []
    streams: list[list] = []
    failures: list[str] = []

    def caller(index: int) -> None:
        with httpx.Client(base_url=BASE_URL, timeout=60) as client:
            sent = 0
            while not stop.is_set():
                sent += 1  # both adapters from every caller: each replica has requests in flight
                body = {"model": ADAPTERS[sent % 2], "prompt": "Once upon a time", "max_tokens": MAX_NEW_TOKENS}
                try:
                    if index % 2:
                        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                            response.read()
                            streams.append(sse_events(response) if response.status_code == 200
                                           else [response.status_code, response.text])
                    else:
                        response = client.post("/v1/completions", json=body)
                        plain.append(response.status_code)
                        if response.status_code != 200:
                            failures.append(response.text)
                except Exception as error:  # a cut connection or a stream without [DONE]
                    failures.append(repr(error))

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    ray.kill(victim, no_restart=True)
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert plain and streams and not failures, failures[:3]
    assert set(plain) == {200}
    for events in streams:
        assert isinstance(events[0], dict), events  # 200 and an event stream ending in [DONE]
        assert all("error" not in e or e["error"]["type"] == "replica_unavailable" for e in events), events
    wait_until(lambda: len({s["replica_id"] for s in replica_stats()}) == 2, 90,
               "Serve to replace the killed replica", interval_s=1)


def deploy(adapters: dict[str, str], router_user_config: dict | None = None) -> None:
    """What `serve deploy` sends, handed to the controller without the dashboard."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    deployments = [{"name": "LoraReplica", "user_config": {"adapters": adapters}}]
    if router_user_config is not None:
        deployments.append({"name": "Router", "user_config": router_user_config})
    config = {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [{"name": "lora-serve", "route_prefix": "/", "import_path": "deployments.app:build_app",
                          "args": app_args({}), "deployments": deployments}],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def test_a_deploy_that_changes_only_the_adapters_reconfigures_in_place(served, http, adapter_folders):
    """`serve deploy` with a new user_config for LoraReplica (only its adapters): the same replica processes and
    engines (no rebuild), the new adapter serves, the dropped one is 404. Runs near the end: it
    changes the app."""
    deploy({a: adapter_folders[a] for a in ADAPTERS})  # from `serve.run` to a config deploy: a restart
    before = replica_stats()
    assert all(s["engine_builds"] == 1 and s["adapters"] == sorted(ADAPTERS) for s in before)
    assert all(s["torch_threads"] == 1 for s in before)  # num_cpus=1 per replica

    deploy({"acme/pirate": adapter_folders["acme/pirate"], "shared/spare": adapter_folders["shared/spare"]})
    after = wait_until(lambda: (stats := replica_stats()) and all(s["adapters"] == ["acme/pirate", "shared/spare"]
                                                                  for s in stats) and stats,
                       60, "every replica to take the new adapters", interval_s=0.5)
    assert {s["replica_id"] for s in after} <= {s["replica_id"] for s in before}  # not restarted
    assert all(s["engine_builds"] == 1 for s in after)  # not rebuilt
    assert [card["id"] for card in http.get("/v1/models").json()["data"]] == [BASE_MODEL, "acme/pirate", "shared/spare"]
    complete(http, model="shared/spare")
    assert http.post("/v1/completions", json={"model": "globex/poet", "prompt": "hi"}).status_code == 404


def test_a_request_past_the_deadline_is_504_and_frees_its_row(http, adapter_folders):
    """The Router's `request_timeout_s`, changed in place: a 1 ms deadline answers 504 (plain) and
    ends a stream with a 504 error event and [DONE]; no row stays taken; back to the default, all
    is served again."""
    adapters = {"acme/pirate": adapter_folders["acme/pirate"]}
    deploy(adapters, {"request_timeout_s": 0.001})
    body = {"model": "acme/pirate", "prompt": "Once upon a time", "max_tokens": MAX_NEW_TOKENS, "ignore_eos": True}
    response = wait_until(lambda: (r := http.post("/v1/completions", json=body)).status_code == 504 and r, 30,
                          "the new deadline to apply", interval_s=0.5)
    assert response.json()["error"]["type"] == "deadline_exceeded"
    streamed = http.post("/v1/completions", json={**body, "stream": True})
    assert streamed.status_code == 504 or sse_events(streamed)[-1]["error"]["type"] == "deadline_exceeded"
    deploy(adapters, {})
    wait_until(lambda: http.post("/v1/completions", json=body).status_code == 200, 30, "the default deadline")
    wait_until(lambda: all(s["running"] == 0 for s in replica_stats()), 10, "every row to be freed", interval_s=0.2)
