"""The official `openai` Python client against `meshd up` (real processes, real model): once with
the built-in engine, once with the `openai` backend in front of a real llama-server."""

import contextlib
import re
import shutil
import subprocess
import urllib.request

import openai
import pytest

from meshd_proc import llama_server, up


@contextlib.contextmanager
def meshd(backend):
    if backend == "llama.cpp":
        with up("--slots", "4", "--ctx-per-slot", "512") as http:
            yield http
    else:
        # The same shape upstream: 4 sequences of 512 positions, served under the same name.
        with llama_server("-np", "4", "-c", "2048", "-t", "2", "--alias", "gemma-3-270m") as url, \
                up("--backend", "openai", "--upstream-url", url) as http:
            yield http


@pytest.fixture(scope="module", params=["llama.cpp", "openai"])
def client(request):
    with meshd(request.param) as http:
        c = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)
        c.meshd_http = http
        yield c


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
    text = urllib.request.urlopen(f"http://{client.meshd_http}/metrics", timeout=10).read().decode()
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
