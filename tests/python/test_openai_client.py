"""The official `openai` Python client against `meshd up` (real processes, real model): with the
built-in engine, with the `openai` backend in front of a real llama-server, and with the built-in
engine keeping its state (and its API keys' rate limits) in a real redis-server."""

import contextlib
import re
import shutil
import subprocess
import time
import urllib.request

import openai
import pytest

from meshd_proc import llama_server, redis_server, up


KEY = "unused-on-loopback"
# A second key, limited to one request a minute.
LIMITED = "limited-key"


@contextlib.contextmanager
def meshd(backend):
    if backend == "llama.cpp":
        with up("--slots", "4", "--ctx-per-slot", "512") as http:
            yield http
    elif backend == "redis":
        with redis_server() as url, \
                up("--slots", "4", "--ctx-per-slot", "512", "--state-url", url, "--requests-per-minute", "1000",
                   api_key=f"{KEY}\n{LIMITED} rpm=1") as http:
            yield http
    else:
        # The same shape upstream: 4 sequences of 512 positions, served under the same name.
        with llama_server("-np", "4", "-c", "2048", "-t", "2", "--alias", "gemma-3-270m") as url, \
                up("--backend", "openai", "--upstream-url", url) as http:
            yield http


@pytest.fixture(scope="module", params=["llama.cpp", "openai", "redis"])
def client(request):
    with meshd(request.param) as http:
        c = openai.OpenAI(base_url=f"http://{http}/v1", api_key=KEY, max_retries=0, timeout=60)
        c.meshd_http = http
        c.meshd_backend = request.param
        yield c


def test_rate_limits_reach_the_client(client):
    if client.meshd_backend != "redis":
        pytest.skip("rate limits are configured on the redis run")
    raw = client.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 1000
    limited = openai.OpenAI(base_url=client.base_url, api_key=LIMITED, max_retries=0, timeout=60)
    first = limited.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    if seconds(first.headers["x-ratelimit-reset-requests"]) < 3:
        # The window is about to turn: start in the next one.
        time.sleep(4)
        limited.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        limited.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.code == "rate_limit_exceeded"
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "what color is apple?"}],
        max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming(client):
    args = dict(model="gemma-3-270m", messages=[{"role": "user", "content": "Say something."}],
                max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["gemma-3-270m"]


def test_bad_request_raises_with_code(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "zebra " * 600}], max_tokens=4)
    assert e.value.status_code == 400
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_metrics_pass_promtool(client):
    client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    req = urllib.request.Request(f"http://{client.meshd_http}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    # A sample line of each (a `# HELP` line alone, with no sample, does not count).
    for name in ["meshd_http_requests_total", "meshd_tokens_generated_total", "meshd_time_to_first_token_seconds_bucket",
                 "meshd_active_sequences", "meshd_function_inflight", "meshd_function_workers",
                 "meshd_workers_connected"]:
        assert re.search(rf"^{name}(\{{[^}}]*\}})? [0-9.e+-]+$", text, re.M), f"no sample of {name}"
    # Counters of events that have not happened here are declared with no sample yet.
    for name in ["meshd_workers_refused_total", "meshd_workers_lost_total"]:
        assert re.search(rf"^# TYPE {name} counter$", text, re.M), f"{name} is not declared"
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (Debian package prometheus; scripts/test installs it)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def seconds(duration):
    """`250ms`, `12.5s` or `1m3s` (OpenAI's way of writing a reset) in seconds."""
    m = re.fullmatch(r"(?:(\d+)m)?(?:([\d.]+)s)?|([\d.]+)ms", duration)
    assert m, duration
    if m.group(3):
        return float(m.group(3)) / 1000
    return int(m.group(1) or 0) * 60 + float(m.group(2) or 0)
