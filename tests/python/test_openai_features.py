"""The OpenAI features applications reach for, through the newest official `openai` client against
`meshd up` on the real model: structured outputs (`parse()` with a Pydantic model, whole and
streamed; `json_object`; a property test of random JSON schemas, each answered with output that
parses and validates, or refused with a 400 before any generation), log-probabilities, and the
Responses API."""

import concurrent.futures
import json
import pathlib
import random
import subprocess

import jsonschema
import openai
import pydantic
import pytest

from meshd_proc import up

MODEL = "gemma-3-270m"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=120)
    retired: bool


@pytest.fixture(scope="module")
def client():
    # No prefix cache: tests here compare two answers to one prompt, and llama.cpp is not batch
    # invariant (a prompt's cached KV, computed in another batch, may differ in the last bits).
    with up("--slots", "8", "--ctx-per-slot", "512", "--prefix-cache-tokens", "0") as http:
        yield openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


def test_parse_returns_the_pydantic_object(client):
    done = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, max_tokens=120,
                                         temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_a_streamed_parse_gives_the_same_object(client):
    whole = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, max_tokens=120,
                                          temperature=0)
    with client.chat.completions.stream(model=MODEL, messages=ASK, response_format=Person, max_tokens=120,
                                        temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1, "the JSON arrived in pieces"
    assert final.choices[0].message.parsed == whole.choices[0].message.parsed


def test_json_object_output_parses(client):
    # Any object may go on for ever (this base model likes to add keys), so some answers reach
    # max_tokens; every one that ends must be an object.
    ended = 0
    for seed in range(12):
        done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                              max_tokens=300, temperature=1.0, seed=seed,
                                              response_format={"type": "json_object"})
        if done.choices[0].finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(done.choices[0].message.content), dict)
    assert ended >= 2, f"only {ended} of 12 answers ended: the test checked too little"


def test_completions_take_a_schema_too(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    done = client.completions.create(model=MODEL, prompt="A number:", max_tokens=40, temperature=0,
                                      extra_body={"response_format": {"type": "json_schema",
                                                                      "json_schema": {"name": "n", "schema": schema}}})
    jsonschema.validate(json.loads(done.choices[0].text), schema)


def test_an_unsupported_keyword_is_a_400_naming_it(client):
    schema = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"},
                                                     "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "uniqueItems" in e.value.message
    assert e.value.param == "response_format"


def test_keywords_llama_cpps_grammars_dropped_are_enforced(client):
    """`multipleOf`, number bounds and an `allOf` of partial schemas: llama.cpp's GBNF converter
    ignored these (benches/grammar_engines.rs); the output must now satisfy them."""
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 99, "multipleOf": 7},
        "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "v": {"allOf": [{"type": "integer"}, {"minimum": 2, "maximum": 4}]}},
        "required": ["n", "x", "v"], "additionalProperties": False}
    ended = 0
    for seed in range(4):
        done = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=120, temperature=0.9, seed=seed, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        if done.choices[0].finish_reason == "stop":
            ended += 1
            jsonschema.validate(json.loads(done.choices[0].message.content), schema)
    assert ended >= 2, f"only {ended} of 4 answers ended: the test checked too little"


# --- the property test -------------------------------------------------------------------------

# Keywords the matcher cannot enforce: each one a 400 naming it.
UNSUPPORTED = [("uniqueItems", True), ("not", {"type": "null"}), ("contains", {"type": "string"}),
               ("dependentRequired", {"id": ["name"]})]


def random_schema(rng, depth=0):
    """A random schema of the kinds applications send: objects, arrays, enums, nesting,
    required and optional properties, every string and array bounded."""
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] * 2 if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", "amber"], rng.randint(1, 4))}
    if kind == "array":
        item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["a", "b"]},
                           {"type": "boolean"}])
        return {"type": "array", "items": item, "maxItems": rng.randint(0, 3)}
    names = rng.sample(["id", "name", "size", "kind", "tags", "ok", "inner", "count"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def one_case(client, i):
    rng = random.Random(i)
    schema = random_schema(rng, depth=0 if i % 3 else 1)
    if schema.get("type") != "object":
        schema = {"type": "object", "properties": {"v": schema}, "required": ["v"], "additionalProperties": False}
    bad = None
    if i % 10 == 9:
        bad, value = rng.choice(UNSUPPORTED)
        schema[bad] = value
    request = dict(model=MODEL, messages=[{"role": "user", "content": f"Case {i}: answer in JSON."}],
                   max_tokens=300, temperature=0 if i % 2 else 0.8, seed=i,
                   response_format={"type": "json_schema", "json_schema": {"name": f"case{i}", "schema": schema}})
    try:
        done = client.chat.completions.create(**request)
    except openai.BadRequestError as e:
        assert bad is not None, f"case {i}: a supported schema was refused: {e.message}\n{schema}"
        assert bad in e.value.message if hasattr(e, "value") else bad in e.message
        return "refused"
    assert bad is None, f"case {i}: `{bad}` was accepted"
    choice = done.choices[0]
    assert choice.finish_reason == "stop", f"case {i}: {choice.finish_reason}: {choice.message.content!r}"
    jsonschema.validate(json.loads(choice.message.content), schema)
    return "valid"


def test_two_hundred_random_schemas_parse_and_validate_or_are_refused(client):
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda i: one_case(client, i), range(200)))
    assert outcomes.count("refused") == 20
    assert outcomes.count("valid") == 180


# --- the Responses API -------------------------------------------------------------------------

def test_responses_create_returns_text(client):
    r = client.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=16,
                                temperature=0)
    assert r.status in ("completed", "incomplete")
    assert r.output_text
    assert r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    chat = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                          messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Say hello."}])
    assert r.output_text == chat.choices[0].message.content, "the same generation as chat"


def test_a_responses_stream_gives_the_same_text(client):
    whole = client.responses.create(model=MODEL, input="Count to five.", max_output_tokens=20, temperature=0)
    with client.responses.stream(model=MODEL, input="Count to five.", max_output_tokens=20, temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    # Reaching max_output_tokens ends it as OpenAI does: `response.incomplete`, not `completed`.
    assert kinds[-1] == f"response.{whole.status}"
    assert kinds.count("response.output_text.delta") > 1
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_parse_with_a_pydantic_model(client):
    r = client.responses.parse(model=MODEL, input="Describe a person as JSON.", text_format=Person,
                               max_output_tokens=120, temperature=0)
    assert isinstance(r.output_parsed, Person)


def test_responses_refuse_what_needs_storage(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert e.value.param == "previous_response_id"


# --- log-probabilities --------------------------------------------------------------------------

def test_logprobs_give_the_alternatives_and_greedy_takes_the_best(client):
    done = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens
    assert "".join(t.token for t in content) == done.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob <= 0
        assert t.logprob == max(a.logprob for a in t.top_logprobs), "greedy takes the most likely token"
        assert t.top_logprobs[0].token == t.token
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)


def test_streamed_logprobs_equal_the_whole_ones(client):
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in whole]


def test_completion_logprobs_in_the_legacy_shape(client):
    done = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(alts) == 2 for alts in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_top_logprobs_out_of_range_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, logprobs=True, top_logprobs=21)
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, top_logprobs=2)
    assert e.value.param == "top_logprobs"


# --- tool calls ---------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_named_tool_call_has_arguments_that_validate(client):
    done = client.chat.completions.create(model=MODEL, messages=WEATHER_Q, tools=TOOLS, max_tokens=80, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_a_streamed_tool_call_is_the_same_call(client):
    kwargs = dict(model=MODEL, messages=WEATHER_Q, tools=TOOLS, max_tokens=80, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kwargs) as stream:
        pieces = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert len(pieces) > 1, "the arguments arrived in pieces"
    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"


def test_required_chooses_one_of_the_tools_and_results_go_back(client):
    done = client.chat.completions.create(model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
                                          max_tokens=80, temperature=0)
    call = done.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "add")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER if call.function.name == "get_weather" else ADD)
    # The call and its result go back into the conversation; the next turn answers in text.
    follow = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=WEATHER_Q + [
        done.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}], tools=TOOLS, tool_choice="none")
    assert follow.choices[0].message.content
    assert not follow.choices[0].message.tool_calls


def test_auto_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=WEATHER_Q, tools=TOOLS, max_tokens=4)
    assert e.value.param == "tool_choice"
    assert "auto" in e.value.message


# --- embeddings ---------------------------------------------------------------------------------

def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_embeddings_have_one_size_and_tell_texts_apart(client):
    r = client.embeddings.create(model=MODEL, input=["the cat sat on the mat", "the cat sat on the mat",
                                                     "quarterly revenue rose by four percent"])
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100
    assert abs(cosine(vectors[0], vectors[1]) - 1.0) < 1e-5, "identical inputs, identical vectors"
    assert cosine(vectors[0], vectors[2]) < 0.999
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens
    # One input alone, in another batch, gives the same vector; floats equal base64.
    alone = client.embeddings.create(model=MODEL, input="the cat sat on the mat", encoding_format="float")
    assert abs(cosine(alone.data[0].embedding, vectors[0]) - 1.0) < 1e-4
    tokens = client.embeddings.create(model=MODEL, input=[[2, 651, 5866]])
    assert len(tokens.data[0].embedding) == len(vectors[0])


def test_embeddings_take_inputs_at_the_limit(client):
    # A schemathesis find: with one decode's cells split per sequence, a 1024-token input found no
    # room (500). One input at the limit, and inputs that fill several decodes:
    r = client.embeddings.create(model=MODEL, input=[[0] * 1024])
    assert len(r.data) == 1 and r.usage.prompt_tokens == 1024
    r = client.embeddings.create(model=MODEL, input=[[7] * 1000, [7] * 1000] + ["word " * 60] * 40)
    assert [d.index for d in r.data] == list(range(42))
    assert abs(cosine(r.data[2].embedding, r.data[41].embedding) - 1.0) < 1e-4


SECOND_GGUF = pathlib.Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_dedicated_embedding_model_answers_embeddings_while_chat_stays():
    """`--embedding-model`: embeddings come from that GGUF (SmolLM2: 576 dimensions, Gemma's are
    640), chat from `--model`."""
    assert SECOND_GGUF.exists(), "run scripts/fetch-model smollm2 first"
    with up("--slots", "2", "--embedding-model", str(SECOND_GGUF)) as http:
        c = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)
        r = c.embeddings.create(model=MODEL, input=["the cat sat on the mat", "the cat sat on the mat",
                                                    "quarterly revenue rose by four percent"])
        vectors = [d.embedding for d in r.data]
        assert {len(v) for v in vectors} == {576}
        assert abs(cosine(vectors[0], vectors[1]) - 1.0) < 1e-5
        assert cosine(vectors[0], vectors[2]) < 0.999
        # Token ids are checked against SmolLM2's vocabulary (49,152), not Gemma's (262,144).
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(model=MODEL, input=[[100000]])
        assert "0..49152" in e.value.message, e.value.message
        chat = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
        assert chat.model == MODEL and chat.usage.completion_tokens > 0


def test_a_missing_embedding_model_stops_the_start_with_its_name(tmp_path):
    from meshd_proc import BIN, MODEL as GGUF
    run = subprocess.run([BIN, "up", "--http-addr", "127.0.0.1:0", "--data-dir", str(tmp_path), "--model", str(GGUF),
                          "--embedding-model", str(tmp_path / "nope.gguf")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "nope.gguf" in run.stderr and "embedding_model" in run.stderr, run.stderr


def test_embeddings_refuse_what_they_cannot_do(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x", dimensions=64)
    assert e.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input=[[10 ** 9]])
    assert "vocabulary" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="word " * 2000)
    assert "tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input=["a"] * 2049)
    assert e.value.param == "input"


# --- n choices ----------------------------------------------------------------------------------

STORY = [{"role": "user", "content": "Tell me a story."}]


def test_n_choices_have_their_indices_and_usage_counts_them_all(client):
    done = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=6, temperature=0.9, seed=11, n=3)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in done.choices)
    assert len({c.message.content for c in done.choices}) > 1, "seeded choices differ"
    assert done.usage.completion_tokens <= 3 * 6 and done.usage.completion_tokens > 6
    again = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=6, temperature=0.9, seed=11, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in done.choices], \
        "one seed, one answer"
    greedy = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=6, temperature=0, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1, "greedy choices are equal"


def test_streamed_choices_interleave_by_index_and_equal_the_whole(client):
    kwargs = dict(model=MODEL, messages=STORY, max_tokens=6, temperature=0.9, seed=4, n=2)
    whole = client.chat.completions.create(**kwargs)
    texts, finishes = ["", ""], [None, None]
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
        if chunk.usage:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]


def test_n_past_the_slots_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=2, n=9)
    assert "slots" in e.value.message
