"""docs/openapi.yaml against `meshd up` (real processes, real model), deterministically.

The server runs with an API key, as a deployed gateway does. Two properties, over a fixed table of
requests at and around every documented bound:
  * every response conforms to the spec: documented status, content type, `x-request-id`
    header, and body schema (SSE events included), as Schemathesis checks them;
  * the spec's request schema and the server agree on what is valid: a body the schema accepts is
    never refused with 400 `bad_request`, and a body it refuses always is.
`scripts/api-fuzz` fuzzes the same spec with generated requests. Needs `schemathesis` (pinned there),
and is skipped without it.
"""

import json
import urllib.error
import urllib.request

import pytest

schemathesis = pytest.importorskip("schemathesis")
yaml = pytest.importorskip("yaml")
jsonschema_rs = pytest.importorskip("jsonschema_rs")
from schemathesis import checks as st_checks  # noqa: E402

from meshd_proc import ROOT, up  # noqa: E402

SPEC = ROOT / "docs" / "openapi.yaml"
CTX = 512
API_KEY = "test-openapi-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def base_url():
    with up("--slots", "4", "--ctx-per-slot", str(CTX), "--threads", "1", api_key=API_KEY) as http:
        yield "http://" + http


@pytest.fixture(scope="module")
def schema():
    return schemathesis.openapi.from_path(str(SPEC))


@pytest.fixture(scope="module")
def raw_spec():
    return yaml.safe_load(SPEC.read_text())


def request_validator(raw_spec, name):
    """A validator for one request schema of the spec, its `$ref`s resolved within the document."""
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": raw_spec["components"]})


def header(resp, name):
    """One header of a Schemathesis response (its headers map names to lists of values)."""
    values = {k.lower(): v for k, v in resp.headers.items()}.get(name.lower())
    if isinstance(values, list):
        return values[0] if values else None
    return values


def call(schema, base_url, method, path, body=None, headers=None, auth=True):
    op = schema[path][method]
    headers = {**(AUTH if auth else {}), **(headers or {})}
    case = op.Case(body=body, headers=headers) if body is not None else op.Case(headers=headers)
    resp = case.call(base_url=base_url, timeout=60)
    case.validate_response(resp, checks=CHECKS)
    assert header(resp, "x-request-id"), f"{method} {path}: no x-request-id"
    return resp


# ------------------------------------------------------------------------------- built-in and GETs

@pytest.mark.parametrize("path,status,content_type", [
    ("/healthz", 200, "application/json"),
    ("/readyz", 200, "application/json"),
    ("/metrics", 200, "text/plain"),
    ("/status", 200, "application/json"),
    ("/v1/models", 200, "application/json"),
    ("/v1/engine/stats", 200, "application/json"),
])
def test_get_endpoints_conform(schema, base_url, path, status, content_type):
    resp = call(schema, base_url, "GET", path)
    assert resp.status_code == status
    assert header(resp, "content-type").startswith(content_type)


def test_request_id_is_echoed_or_taken_from_traceparent(schema, base_url):
    resp = call(schema, base_url, "GET", "/healthz", headers={"x-request-id": "fuzz.Req_1-2"})
    assert header(resp, "x-request-id") == "fuzz.Req_1-2"
    tp = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
    resp = call(schema, base_url, "GET", "/healthz", headers={"traceparent": tp})
    assert header(resp, "x-request-id") == "4bf92f3577b34da6a3ce929d0e0e4736"
    resp = call(schema, base_url, "GET", "/healthz", headers={"x-request-id": "bad id!"})
    assert header(resp, "x-request-id") != "bad id!"


def test_no_route_and_wrong_method_are_error_shaped(base_url):
    for method, path, status in [("GET", "/nope", 404), ("POST", "/healthz", 404),
                                 ("GET", "/v1/chat/completions", 405)]:
        req = urllib.request.Request(base_url + path, method=method, data=b"{}" if method == "POST" else None,
                                     headers=AUTH)
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError(f"{method} {path} succeeded")
        except urllib.error.HTTPError as e:
            assert e.code == status
            assert e.headers.get("x-request-id")
            err = json.loads(e.read())["error"]
            assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/models", None), ("GET", "/v1/engine/stats", None), ("GET", "/metrics", None),
    ("GET", "/status", None), ("POST", "/math/add-two-numbers", {"a": 1, "b": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic " + API_KEY, API_KEY])
def test_protected_endpoints_need_the_key(schema, base_url, method, path, body, authorization):
    headers = {"Authorization": authorization} if authorization else None
    resp = call(schema, base_url, method, path, body=body, headers=headers, auth=False)
    assert resp.status_code == 401
    assert header(resp, "www-authenticate") == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key_and_unknown_paths_are_401_before_404(schema, base_url):
    assert call(schema, base_url, "GET", "/healthz", auth=False).status_code == 200
    assert call(schema, base_url, "GET", "/readyz", auth=False).status_code == 200
    try:
        urllib.request.urlopen(base_url + "/nope", timeout=10)
        raise AssertionError("GET /nope succeeded")
    except urllib.error.HTTPError as e:
        assert e.code == 401


def test_idempotency_key_applies_once(schema, base_url):
    def add(a, b, key=None):
        headers = {"Idempotency-Key": key} if key is not None else None
        return call(schema, base_url, "POST", "/math/add-two-numbers", body={"a": a, "b": b}, headers=headers)

    def total():
        """The running total now: 0 + 0, without a key, reads it without moving it."""
        resp = add(0, 0)
        assert resp.status_code == 200
        return resp.json()["running_total"]

    before = total()
    first = add(3, 4, "idem-1")
    assert first.status_code == 200
    assert first.json()["running_total"] == before + 7
    replay = add(3, 4, "idem-1")
    assert replay.status_code == 200
    assert replay.json()["running_total"] == first.json()["running_total"]
    conflict = add(3, 5, "idem-1")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"
    bad = add(3, 4, "x" * 129)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "Idempotency-Key"
    # The replay answered the first body; it must not have applied the increment again behind it (nor may the
    # conflicting or malformed requests have applied theirs).
    assert total() == before + 7, "a replay (or a refused request) moved the running total"


# ------------------------------------------------------------------------------- request bounds

def chat(**extra):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def completion(**extra):
    return {"prompt": "zebra", "max_tokens": 2, **extra}


I64_MAX = 2**63 - 1
CHAT_BODIES = [
    chat(), chat(temperature=0), chat(temperature=2), chat(temperature=2.0001), chat(temperature=-0.1),
    chat(top_p=1), chat(top_p=0.5), chat(top_p=0), chat(top_p=1.1),
    chat(top_k=0), chat(top_k=1_000_000), chat(top_k=-1), chat(top_k=1_000_001),
    chat(min_p=0), chat(min_p=1), chat(min_p=1.5),
    chat(repetition_penalty=0.01), chat(repetition_penalty=10), chat(repetition_penalty=0),
    chat(repetition_penalty=10.5),
    chat(presence_penalty=-2), chat(presence_penalty=2), chat(presence_penalty=2.5),
    chat(frequency_penalty=-2), chat(frequency_penalty=-2.1),
    chat(seed=-(2**63)), chat(seed=I64_MAX), chat(seed=2**63), chat(seed="1"),
    chat(n=1), chat(n=None), chat(n=2),
    chat(stop=["a", "b", "c", "d"]), chat(stop=["a", "b", "c", "d", "e"]), chat(stop=""), chat(stop="x"),
    chat(stop="a" * 256), chat(stop="a" * 257), chat(stop=[]), chat(stop=None), chat(stop=7),
    chat(max_tokens=1), chat(max_tokens=0), chat(max_tokens=2**20 + 1), chat(max_tokens="2"),
    chat(max_completion_tokens=1), chat(max_completion_tokens=0),
    chat(model="gemma-3-270m"), chat(model=None), chat(model=""), chat(model="m" * 257), chat(model=7),
    chat(stream=False), chat(stream=None), chat(stream="yes"),
    chat(stream=True), chat(stream=True, stream_options={"include_usage": True}),
    chat(stream_options=None), chat(stream_options=1), chat(stream_options={"include_usage": "x"}),
    chat(logprobs=False), chat(logprobs=None), chat(logprobs=True), chat(logprobs=1),
    chat(tools=None), chat(tools=[]), chat(response_format={"type": "json_object"}), chat(frobnicate=1),
    chat(user="u", metadata={"k": "v"}, store=False, service_tier="auto", parallel_tool_calls=True),
    {"messages": [], "max_tokens": 2},
    {"messages": "hi", "max_tokens": 2},
    {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
     "max_tokens": 2},
    {"messages": [{"role": "assistant", "content": "hi"}], "max_tokens": 2},
    {"messages": [{"role": "tool", "content": "x"}], "max_tokens": 2},
    {"messages": [{"role": "user"}], "max_tokens": 2},
    {"messages": [{"role": "user", "content": None}], "max_tokens": 2},
    {"messages": [{"role": "user", "content": "a\u0000b"}], "max_tokens": 2},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
     "max_tokens": 2},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "max_tokens": 2},
    {"messages": [{"role": "user", "content": "hi", "name": "ann"}], "max_tokens": 2},
    {"messages": [{"role": "user", "content": "hi"}] * 1025, "max_tokens": 2},
    [1, 2], "text",
    # Known server quirks: the spec documents the intended behaviour; these flag when it changes.
    chat(top_p=1e-50),
    chat(max_tokens=2.0),
]
COMPLETION_BODIES = [
    completion(), completion(prompt=["zebra"]), completion(prompt=""), completion(prompt=[]),
    completion(prompt=["a", "b"]), completion(prompt=[""]), completion(prompt=5),
    completion(echo=False), completion(echo=True), completion(suffix=None), completion(suffix="x"),
    completion(best_of=1), completion(stream=True), completion(stream=True, stream_options={"include_usage": True}),
    completion(messages=[{"role": "user", "content": "hi"}]), completion(top_p=0), completion(seed=3),
    {"max_tokens": 2},
]
ADD_BODIES = [
    {"a": 1, "b": 2}, {"a": -5, "b": 0, "c": "ignored"}, {"a": 1}, {"a": "1", "b": 2}, {"a": 1.5, "b": 1},
    {"a": 2**63, "b": 0}, {"a": -(2**62), "b": 0}, [1, 2],
]


def agree(raw_spec, schema, base_url, path, schema_name, body):
    valid = request_validator(raw_spec, schema_name).is_valid(body)
    resp = call(schema, base_url, "POST", path, body=body)
    code = resp.json()["error"]["code"] if resp.status_code >= 400 and "json" in header(resp, "content-type") else None
    refused = resp.status_code == 400 and code == "bad_request"
    assert valid != refused, (
        f"spec says {'valid' if valid else 'invalid'} but the server answered {resp.status_code} {code}: "
        f"{json.dumps(body)[:300]} -> {resp.text[:300]}")
    return resp


@pytest.mark.parametrize("body", CHAT_BODIES, ids=lambda b: json.dumps(b)[:80])
def test_chat_bounds_agree_with_the_spec(raw_spec, schema, base_url, body):
    agree(raw_spec, schema, base_url, "/v1/chat/completions", "ChatCompletionRequest", body)


@pytest.mark.parametrize("body", COMPLETION_BODIES, ids=lambda b: json.dumps(b)[:80])
def test_completion_bounds_agree_with_the_spec(raw_spec, schema, base_url, body):
    agree(raw_spec, schema, base_url, "/v1/completions", "CompletionRequest", body)


@pytest.mark.parametrize("body", ADD_BODIES, ids=lambda b: json.dumps(b)[:80])
def test_add_bounds_agree_with_the_spec(raw_spec, schema, base_url, body):
    agree(raw_spec, schema, base_url, "/math/add-two-numbers", "AddRequest", body)


# ------------------------------------------------------------------------------- documented errors

def test_overflow_is_400(schema, base_url):
    resp = call(schema, base_url, "POST", "/math/add-two-numbers", body={"a": I64_MAX, "b": 1})
    assert resp.status_code == 400
    assert "overflows" in resp.json()["error"]["message"]


def test_unknown_model_is_404(schema, base_url):
    resp = call(schema, base_url, "POST", "/v1/chat/completions", body=chat(model="no-such-model"))
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"


def test_context_length_is_400(schema, base_url):
    resp = call(schema, base_url, "POST", "/v1/chat/completions", body=chat(max_tokens=CTX))
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    assert resp.json()["error"]["param"] == "messages"


def test_oversized_body_is_413(schema, base_url):
    body = chat(user="x" * (1 << 20))
    resp = call(schema, base_url, "POST", "/v1/chat/completions", body=body)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


def test_streams_end_with_done_and_usage(schema, base_url):
    for path, body in [("/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True})),
                       ("/v1/completions", completion(stream=True, stream_options={"include_usage": True}))]:
        resp = call(schema, base_url, "POST", path, body=body)
        assert header(resp, "content-type").startswith("text/event-stream")
        events = [e[len("data: "):] for e in resp.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])
        assert usage["choices"] == [] and 0 <= usage["usage"]["completion_tokens"] <= 2
