//! Which grammar engine should enforce `response_format`: llama.cpp's GBNF sampler (fed by
//! `json_schema_to_grammar`, what meshd used) or llguidance (llama-cpp-2's `llguidance` feature,
//! run through meshd's own `engine::grammar`: what meshd uses now), measured on the real model in
//! one run.
//!
//! - **Completeness.** Two corpora: one schema per JSON Schema feature applications send, and 200
//!   random schemas shaped like the property test's (objects, arrays, enums, nesting, bounds; one
//!   in ten carries a keyword meshd refuses today). Each engine either refuses a schema when it
//!   compiles it, or generates greedily under it; the output is then checked with the `jsonschema`
//!   crate (formats included). An engine is complete for a schema when every output it lets
//!   through validates: "invalid" means it silently did not enforce a keyword.
//! - **Speed.** Compile time per schema, and the constraint's time per generated token (decode
//!   excluded), for each engine two ways: a mask over the whole vocabulary for every token (what
//!   llama-server does), and meshd's path, which checks the unconstrained choice alone and masks
//!   only when it is refused (for GBNF, which is slow to mask, a 256-token shortlist first: what
//!   meshd did before it moved to llguidance).
//!
//! Measured here (2 shared cores, Gemma 3 270M Q4_K_M, one run, 2026-12-01):
//!
//! | | GBNF (llama.cpp 0.1.161) | llguidance 1.9.1 |
//! |---|---|---|
//! | 34 feature schemas: valid / INVALID / refused / unfinished | 26 / **4** / 1 / 3 | 24 / **0** / 7 / 3 |
//! | 200 random schemas: valid / refused | 200 / 0 | 187 / 13 |
//! | compile, median / p99 | 0.13 / 0.29 ms | 0.51 / 0.83 ms |
//! | mask over the whole vocabulary, median / p99 | 29.9 / 93.8 ms | 0.11 / 3.07 ms |
//! | meshd's check-first path per token (arg-max included), median / p99 | 0.38 / 27.6 ms | 0.28 / 0.63 ms |
//!
//! GBNF's four INVALID outputs are keywords its converter drops without a word (`allOf` of partial
//! schemas, `contains`, `if`/`then`/`else`, bounds on a number); its one refusal is `prefixItems`
//! (an FFI error, no reason). llguidance refuses by name (`uniqueItems`, `contains`, `not`,
//! `propertyNames`, `dependentRequired`, `if`/`then`/`else`, `minProperties` over optional
//! properties) and nothing it accepts came out invalid. The 13 random refusals are the one-in-ten
//! schemas that carry `uniqueItems` or `not`: GBNF "passed" those by luck, ignoring them. The
//! unfinished rows are the base model's (digits or a URL without end), the same on both.
//!
//! `cargo bench --features grammar-bench --bench grammar_engines` (env `RANDOM`, default 200 random
//! schemas; `MAX_TOKENS`, 192; `FULL_MASK_TOKENS`, 4000: how many tokens also time GBNF's full mask,
//! which costs tens of milliseconds each).

mod harness;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use llguidance::Matcher;
use meshd::api::OutputFormat;
use meshd::engine::grammar::{constrained, Grammars};
use serde_json::{json, Value};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug)]
enum Engine {
    Gbnf,
    Llguidance,
}

/// What an engine did with one schema.
#[derive(Debug)]
enum Outcome {
    Refused(String),
    Valid,
    Invalid(String),
    /// `MAX_TOKENS` reached before the grammar let the model stop: the text so far.
    Unfinished(String),
}

#[derive(Default)]
struct Timings {
    compile: Vec<Duration>,
    /// Per token: the check-first path that chooses the token.
    per_token: Vec<Duration>,
    /// Per token (up to `FULL_MASK_TOKENS` for GBNF): a mask over the whole vocabulary.
    full_mask: Vec<Duration>,
}

/// A compiled schema.
enum Constraint {
    Gbnf(LlamaSampler),
    Llguidance(Box<Matcher>),
}

struct Bench<'a> {
    model: &'a LlamaModel,
    ctx: LlamaContext<'a>,
    grammars: Grammars,
    prompt: Vec<LlamaToken>,
    max_tokens: usize,
    full_mask_budget: usize,
}

impl Bench<'_> {
    fn compile(&self, engine: Engine, schema: &Value) -> Result<Constraint, String> {
        match engine {
            Engine::Gbnf => {
                let gbnf = llama_cpp_2::json_schema_to_grammar(&schema.to_string())
                    .map_err(|e| e.to_string())?;
                LlamaSampler::grammar(self.model, &gbnf, "root")
                    .map(Constraint::Gbnf)
                    .map_err(|e| e.to_string())
            }
            // meshd's compiler: its whitespace is llama.cpp's, so both engines accept the same
            // texts.
            Engine::Llguidance => self
                .grammars
                .compile(&OutputFormat::JsonSchema {
                    name: "bench".into(),
                    schema: schema.to_string(),
                })
                .map(|m| Constraint::Llguidance(Box::new(m)))
                .map_err(|e| e.to_string()),
        }
    }

    /// Greedy generation under `grammar`: the text, and whether the model stopped by itself.
    fn generate(&mut self, grammar: &mut Constraint, t: &mut Timings) -> (String, bool) {
        let vocab = self.model.vocab();
        self.ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(512, 1);
        let last = self.prompt.len() - 1;
        for (i, tok) in self.prompt.iter().enumerate() {
            batch.add(*tok, i as i32, &[0], i == last).unwrap();
        }
        self.ctx.decode(&mut batch).unwrap();
        let mut at = last as i32;
        let mut out = Vec::new();
        for pos in (self.prompt.len() as i32..).take(self.max_tokens) {
            let logits = self.ctx.get_logits_ith(at);
            let token = match grammar {
                Constraint::Gbnf(g) => {
                    if self.full_mask_budget > 0 {
                        self.full_mask_budget -= 1;
                        let mut all = everything(logits);
                        let start = Instant::now();
                        g.apply(&mut all);
                        t.full_mask.push(start.elapsed());
                    }
                    let start = Instant::now();
                    let token = shortlisted(logits, g);
                    g.accept(token);
                    t.per_token.push(start.elapsed());
                    token
                }
                Constraint::Llguidance(m) => {
                    let start = Instant::now();
                    let mask = m.compute_mask_or_eos().unwrap();
                    let mut best = None;
                    mask.iter_set_entries(|i| {
                        if i < logits.len() && best.is_none_or(|b: usize| logits[i] > logits[b]) {
                            best = Some(i);
                        }
                    });
                    t.full_mask.push(start.elapsed());
                    let start = Instant::now();
                    let token = constrained(logits, m, None, |t| vocab.is_eog(t)).unwrap();
                    t.per_token.push(start.elapsed());
                    let best = best.expect("the matcher allows no token");
                    assert_eq!(
                        logits[token.0 as usize], logits[best],
                        "the two paths disagree"
                    );
                    token
                }
            };
            if vocab.is_eog(token) {
                return (String::from_utf8_lossy(&out).into_owned(), true);
            }
            out.extend(vocab.token_to_piece(token, false, None));
            batch.clear();
            batch.add(token, pos, &[0], true).unwrap();
            self.ctx.decode(&mut batch).unwrap();
            at = 0;
        }
        (String::from_utf8_lossy(&out).into_owned(), false)
    }

    fn run(&mut self, engine: Engine, schema: &Value, t: &mut Timings) -> Outcome {
        let start = Instant::now();
        let mut grammar = match self.compile(engine, schema) {
            Ok(g) => g,
            Err(e) => return Outcome::Refused(e),
        };
        t.compile.push(start.elapsed());
        let (text, stopped) = self.generate(&mut grammar, t);
        if !stopped {
            return Outcome::Unfinished(text);
        }
        let instance: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => return Outcome::Invalid(format!("not JSON ({e}): {text}")),
        };
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .expect("the corpus's schemas are valid");
        match validator.validate(&instance) {
            Ok(()) => Outcome::Valid,
            Err(e) => Outcome::Invalid(format!("{e}: {text}")),
        }
    }
}

fn everything(logits: &[f32]) -> LlamaTokenDataArray {
    LlamaTokenDataArray::from_iter(
        logits
            .iter()
            .enumerate()
            .map(|(i, l)| LlamaTokenData::new(LlamaToken::new(i as i32), *l, 0.0)),
        false,
    )
}

fn best_of(candidates: &LlamaTokenDataArray) -> LlamaToken {
    candidates
        .data
        .iter()
        .filter(|d| d.logit().is_finite())
        .max_by(|a, b| a.logit().total_cmp(&b.logit()))
        .map(|d| d.id())
        .expect("the grammar allows no token")
}

/// meshd's greedy path before llguidance: check the arg-max alone, then the 256 most likely
/// tokens, and only then the whole vocabulary.
fn shortlisted(logits: &[f32], grammar: &mut LlamaSampler) -> LlamaToken {
    let data = |i: usize| LlamaTokenData::new(LlamaToken::new(i as i32), logits[i], 0.0);
    let first = (0..logits.len())
        .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
        .unwrap();
    let mut one = LlamaTokenDataArray::new(vec![data(first)], false);
    grammar.apply(&mut one);
    if one.data[0].logit().is_finite() {
        return LlamaToken::new(first as i32);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.select_nth_unstable_by(256, |a, b| logits[*b].total_cmp(&logits[*a]));
    let mut short = LlamaTokenDataArray::from_iter(order[..256].iter().map(|&i| data(i)), false);
    grammar.apply(&mut short);
    if short.data.iter().any(|d| d.logit().is_finite()) {
        return best_of(&short);
    }
    let mut all = everything(logits);
    grammar.apply(&mut all);
    best_of(&all)
}

/// One schema per feature: (what it exercises, the schema).
fn features() -> Vec<(&'static str, Value)> {
    let obj = |props: Value, required: Value| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
    vec![
        (
            "string maxLength",
            obj(
                json!({"s": {"type": "string", "maxLength": 8}}),
                json!(["s"]),
            ),
        ),
        (
            "string minLength",
            obj(
                json!({"s": {"type": "string", "minLength": 5, "maxLength": 9}}),
                json!(["s"]),
            ),
        ),
        (
            "pattern",
            obj(
                json!({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
                json!(["code"]),
            ),
        ),
        (
            "format date",
            obj(
                json!({"d": {"type": "string", "format": "date"}}),
                json!(["d"]),
            ),
        ),
        (
            "format time",
            obj(
                json!({"t": {"type": "string", "format": "time"}}),
                json!(["t"]),
            ),
        ),
        (
            "format date-time",
            obj(
                json!({"at": {"type": "string", "format": "date-time"}}),
                json!(["at"]),
            ),
        ),
        (
            "format uuid",
            obj(
                json!({"id": {"type": "string", "format": "uuid"}}),
                json!(["id"]),
            ),
        ),
        (
            "format email",
            obj(
                json!({"mail": {"type": "string", "format": "email"}}),
                json!(["mail"]),
            ),
        ),
        (
            "format uri",
            obj(
                json!({"url": {"type": "string", "format": "uri"}}),
                json!(["url"]),
            ),
        ),
        (
            "format ipv4",
            obj(
                json!({"ip": {"type": "string", "format": "ipv4"}}),
                json!(["ip"]),
            ),
        ),
        (
            "integer bounds",
            obj(
                json!({"n": {"type": "integer", "minimum": 3, "maximum": 7}}),
                json!(["n"]),
            ),
        ),
        (
            "number exclusive bounds",
            obj(
                json!({"x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}),
                json!(["x"]),
            ),
        ),
        (
            "multipleOf",
            obj(
                json!({"n": {"type": "integer", "minimum": 1, "maximum": 99, "multipleOf": 5}}),
                json!(["n"]),
            ),
        ),
        (
            "enum of mixed types",
            obj(json!({"e": {"enum": ["a", 1, null, true]}}), json!(["e"])),
        ),
        ("const", obj(json!({"v": {"const": "fixed"}}), json!(["v"]))),
        (
            "type list with null",
            obj(
                json!({"v": {"type": ["string", "null"], "maxLength": 4}}),
                json!(["v"]),
            ),
        ),
        (
            "array bounds",
            obj(
                json!({"a": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}}),
                json!(["a"]),
            ),
        ),
        (
            "prefixItems",
            obj(
                json!({"p": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 0, "maximum": 9}], "items": false}}),
                json!(["p"]),
            ),
        ),
        (
            "uniqueItems",
            obj(
                json!({"u": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 2, "maxItems": 3, "uniqueItems": true}}),
                json!(["u"]),
            ),
        ),
        (
            "contains",
            obj(
                json!({"c": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4, "contains": {"const": 7}}}),
                json!(["c"]),
            ),
        ),
        (
            "optional properties",
            obj(
                json!({"a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0, "maximum": 5}}),
                json!([]),
            ),
        ),
        (
            "additionalProperties schema",
            json!({"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}, "maxProperties": 3}),
        ),
        (
            "patternProperties",
            json!({"type": "object", "patternProperties": {"^k[0-9]$": {"type": "boolean"}}, "additionalProperties": false, "maxProperties": 2}),
        ),
        (
            "minProperties",
            json!({"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}}, "additionalProperties": false, "minProperties": 2}),
        ),
        (
            "propertyNames",
            json!({"type": "object", "propertyNames": {"pattern": "^[a-c]$"}, "additionalProperties": {"type": "boolean"}, "maxProperties": 2}),
        ),
        (
            "dependentRequired",
            json!({"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}}, "additionalProperties": false, "dependentRequired": {"a": ["b"]}}),
        ),
        (
            "anyOf",
            obj(
                json!({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]}}),
                json!(["v"]),
            ),
        ),
        (
            "oneOf",
            obj(
                json!({"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}}),
                json!(["v"]),
            ),
        ),
        (
            "allOf",
            obj(
                json!({"v": {"allOf": [{"type": "integer"}, {"minimum": 2, "maximum": 4}]}}),
                json!(["v"]),
            ),
        ),
        (
            "$ref and $defs",
            json!({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": false}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"$ref": "#/$defs/p"}}, "required": ["a", "b"], "additionalProperties": false}),
        ),
        (
            "recursive $ref",
            json!({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"], "additionalProperties": false}}, "$ref": "#/$defs/node"}),
        ),
        (
            "not",
            obj(
                json!({"v": {"type": "integer", "minimum": 0, "maximum": 3, "not": {"const": 0}}}),
                json!(["v"]),
            ),
        ),
        (
            "if/then/else",
            json!({"type": "object", "properties": {"k": {"enum": ["n", "s"]}, "v": {}}, "required": ["k", "v"], "additionalProperties": false, "if": {"properties": {"k": {"const": "n"}}}, "then": {"properties": {"v": {"type": "integer"}}}, "else": {"properties": {"v": {"type": "string", "maxLength": 3}}}}),
        ),
        (
            "deep nesting",
            obj(
                json!({"a": obj(json!({"b": obj(json!({"c": obj(json!({"d": {"type": "boolean"}}), json!(["d"]))}), json!(["c"]))}), json!(["b"]))}),
                json!(["a"]),
            ),
        ),
    ]
}

/// A small deterministic generator (SplitMix64), so every run sees the same corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    fn sample<T: Clone>(&mut self, items: &[T], k: usize) -> Vec<T> {
        let mut pool = items.to_vec();
        (0..k.min(pool.len()))
            .map(|_| pool.remove(self.below(pool.len())))
            .collect()
    }
}

/// The property test's generator (tests/python/test_openai_features.py), ported.
fn random_schema(rng: &mut Rng, depth: usize) -> Value {
    let kinds = if depth < 2 { 7 } else { 5 };
    match rng.below(kinds) {
        0 => json!({"type": "string", "maxLength": rng.range(1, 12)}),
        1 => {
            let low = rng.range(-50, 50);
            json!({"type": "integer", "minimum": low, "maximum": low + rng.range(0, 100)})
        }
        2 => json!({"type": "boolean"}),
        3 => {
            let k = rng.range(1, 4) as usize;
            json!({"enum": rng.sample(&["red", "green", "blue", "cyan", "amber"], k)})
        }
        4 => {
            let items = [
                json!({"type": "integer", "minimum": 0, "maximum": 9}),
                json!({"enum": ["a", "b"]}),
                json!({"type": "boolean"}),
            ];
            json!({"type": "array", "items": items[rng.below(3)], "maxItems": rng.range(0, 3)})
        }
        _ => {
            let names = ["id", "name", "size", "kind", "tags", "ok", "inner", "count"];
            let k = rng.range(1, 4) as usize;
            let chosen = rng.sample(&names, k);
            let mut props = serde_json::Map::new();
            let mut required = Vec::new();
            for n in chosen {
                props.insert(n.to_string(), random_schema(rng, depth + 1));
                if rng.below(10) < 6 {
                    required.push(n);
                }
            }
            json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
        }
    }
}

fn random_corpus(n: usize) -> Vec<(String, Value)> {
    let extra = [
        ("multipleOf", json!(2)),
        ("uniqueItems", json!(true)),
        ("minProperties", json!(1)),
        ("not", json!({"type": "null"})),
    ];
    (0..n)
        .map(|i| {
            let mut rng = Rng(i as u64);
            let mut schema = random_schema(&mut rng, if i % 3 == 0 { 1 } else { 0 });
            if schema["type"] != "object" {
                schema = json!({"type": "object", "properties": {"v": schema}, "required": ["v"], "additionalProperties": false});
            }
            let mut name = format!("random {i}");
            if i % 10 == 9 {
                let (k, v) = &extra[rng.below(extra.len())];
                schema[*k] = v.clone();
                name = format!("random {i} +{k}");
            }
            (name, schema)
        })
        .collect()
}

fn quantile(v: &[Duration], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

fn tail(s: &str) -> String {
    let s: Vec<char> = s.replace('\n', "⏎").chars().collect();
    s[s.len().saturating_sub(60)..].iter().collect()
}

fn short(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > 110 {
        format!("{}…", s.chars().take(110).collect::<String>())
    } else {
        s
    }
}

fn main() {
    let (random, max_tokens) = (env("RANDOM", 200), env("MAX_TOKENS", 192));
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let backend = LlamaBackend::init().unwrap();
    let model =
        LlamaModel::load_from_file(&backend, harness::model(), &LlamaModelParams::default())
            .unwrap();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(1024))
        .with_n_batch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = model.new_context(&backend, params).unwrap();
    let start = Instant::now();
    let grammars = Grammars::new(&model).unwrap();
    let tok_env_ms = start.elapsed().as_secs_f64() * 1e3;
    let prompt = model.vocab().tokenize(
        b"Here is the answer as one JSON value that follows the schema:\n",
        true,
        false,
    );
    let mut bench = Bench {
        model: &model,
        ctx,
        grammars,
        prompt,
        max_tokens,
        full_mask_budget: env("FULL_MASK_TOKENS", 4000),
    };
    println!(
        "vocabulary {} tokens; llguidance's token trie built once in {tok_env_ms:.0} ms\n",
        model.n_vocab()
    );

    let corpora: [(&str, Vec<(String, Value)>); 2] = [
        (
            "features",
            features()
                .into_iter()
                .map(|(n, s)| (n.to_string(), s))
                .collect(),
        ),
        ("random", random_corpus(random)),
    ];
    let engines = [Engine::Gbnf, Engine::Llguidance];
    let mut times = [Timings::default(), Timings::default()];
    for (corpus, schemas) in &corpora {
        let mut counts = [[0usize; 4]; 2];
        println!("## corpus `{corpus}`: {} schemas", schemas.len());
        for (name, schema) in schemas {
            let mut line = format!("{name:<30}");
            for (e, engine) in engines.iter().enumerate() {
                let outcome = bench.run(*engine, schema, &mut times[e]);
                let (k, what) = match &outcome {
                    Outcome::Valid => (0, "valid".to_string()),
                    Outcome::Invalid(why) => (1, format!("INVALID ({})", short(why))),
                    Outcome::Refused(why) => (2, format!("refused ({})", short(why))),
                    Outcome::Unfinished(text) => (3, format!("unfinished (…{})", tail(text))),
                };
                counts[e][k] += 1;
                if *corpus == "features" || k != 0 {
                    line += &format!(" | {engine:?}: {what}");
                }
            }
            if *corpus == "features" || line.contains('|') {
                println!("{line}");
            }
        }
        for (e, engine) in engines.iter().enumerate() {
            let [valid, invalid, refused, unfinished] = counts[e];
            println!(
                "{engine:?}: {valid} valid, {invalid} invalid, {refused} refused, {unfinished} unfinished"
            );
        }
        println!();
    }
    println!("## speed (ms; median / p99)");
    for (e, engine) in engines.iter().enumerate() {
        let t = &times[e];
        println!(
            "{engine:?}: compile {:.3} / {:.3} over {} schemas; per token, checking the first choice: {:.3} / {:.3} \
             over {} tokens; masking the whole vocabulary: {:.3} / {:.3} over {} tokens",
            quantile(&t.compile, 0.5),
            quantile(&t.compile, 0.99),
            t.compile.len(),
            quantile(&t.per_token, 0.5),
            quantile(&t.per_token, 0.99),
            t.per_token.len(),
            quantile(&t.full_mask, 0.5),
            quantile(&t.full_mask, 0.99),
            t.full_mask.len(),
        );
    }
}
