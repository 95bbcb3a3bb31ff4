//! Structured outputs: `response_format` compiled by llguidance into a matcher that knows, token by
//! token, what the output may continue with, so it always parses as JSON and, for a schema,
//! validates.
//!
//! llguidance, not llama.cpp's GBNF grammars (`json_schema_to_grammar`), measured side by side in
//! `benches/grammar_engines.rs`: the GBNF converter silently drops keywords it cannot enforce
//! (`allOf` of partial schemas, `contains`, `if`/`then`/`else`, number bounds), so its output can
//! parse and still fail the schema, while llguidance refuses every keyword it cannot enforce by
//! name, before any generation; it also enforces more (`prefixItems`, `multipleOf`,
//! `patternProperties`, number bounds, more formats) and masks Gemma's 262k-token vocabulary in
//! about a millisecond where the GBNF sampler needs about thirty.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::EngineError;
use crate::api::OutputFormat;

/// The whitespace allowed between JSON tokens: what llama.cpp's JSON grammars allow (a space, or
/// one or two newlines and an indent of at most 20). llguidance's default allows any amount, and a
/// small model then pads with newlines until it runs out of tokens.
const SPACE: &str = r"(?: |\n{1,2}[ \t]{0,20})";

/// Most nesting a schema may have, counted in JSON values: deeper ones are refused before the
/// compiler (which recurses) sees them.
const MAX_NESTING: usize = 96;

/// Compiles schemas against one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// Walks the model's vocabulary once into llguidance's token trie and precomputed slices
    /// (about 1 s for Gemma's 262k tokens on this machine: 0.26 s the trie, 0.75 s the slices).
    pub fn new(model: &LlamaModel) -> Result<Grammars, String> {
        Grammars::with_env(&LlamaSampler::llguidance_tok_env(model))
    }

    fn with_env(env: &toktrie::TokEnv) -> Result<Grammars, String> {
        let mut factory = ParserFactory::new_simple(env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// The matcher for `format`; a schema it cannot enforce is refused with the reason.
    pub fn compile(&self, format: &OutputFormat) -> Result<Matcher, EngineError> {
        let mut schema = match format {
            OutputFormat::JsonObject => json!({"type": "object"}),
            OutputFormat::JsonSchema { schema, .. } => serde_json::from_str(schema)
                .map_err(|e| refuse(format!("the schema is not JSON: {e}")))?,
        };
        if nesting(&schema) > MAX_NESTING {
            return Err(refuse(format!(
                "the schema nests deeper than {MAX_NESTING} levels"
            )));
        }
        if schema == Value::Bool(true) {
            schema = json!({});
        }
        let Some(root) = schema.as_object_mut() else {
            return Err(refuse(
                "a schema is a JSON object (or `true`: any JSON value)".into(),
            ));
        };
        // Ours, whatever the client sent: its own `x-guidance` could make the compiler lenient
        // (ignoring what it cannot enforce) or allow unbounded whitespace.
        root.insert("x-guidance".into(), json!({"whitespace_pattern": SPACE}));
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| refuse(format!("the schema cannot be enforced: {e}")))?;
        Ok(Matcher::new(Ok(parser)))
    }
}

/// How many of the most likely allowed tokens the sampler chooses among when the matcher refused
/// its first choice: inside a JSON string the matcher allows almost the whole vocabulary, and
/// running the sampler chain over 262k candidates a second time would cost as much as the first.
const GRAMMAR_SHORTLIST: usize = 256;

/// A token the grammar allows. The sampler (or the arg-max) first chooses as if unconstrained,
/// and the matcher checks that one token: the common case, a few microseconds. Only when it
/// refuses does the matcher compute its mask over the whole vocabulary (about a millisecond for
/// Gemma's 262k tokens), and the sampler chooses again among the [`GRAMMAR_SHORTLIST`] most
/// likely tokens it allows: for greedy, exactly the token a full mask would have given. An error
/// (the matcher's step limits) ends the sequence with that error. The engine's path for every
/// constrained token, and what `benches/grammar_engines.rs` times.
pub fn constrained(
    logits: &[f32],
    grammar: &mut Matcher,
    mut chain: Option<&mut LlamaSampler>,
    is_eog: impl Fn(LlamaToken) -> bool,
) -> Result<LlamaToken, String> {
    let data = |i: usize| LlamaTokenData::new(LlamaToken::new(i as i32), logits[i], 0.0);
    let failed = |e: anyhow::Error| format!("structured output: {e}");
    let first = match chain.as_deref_mut() {
        None => super::scheduler::argmax(logits),
        Some(chain) => {
            let mut all = LlamaTokenDataArray::from_iter((0..logits.len()).map(data), false);
            chain.apply(&mut all);
            all.selected_token().unwrap_or_else(|| best_of(&all))
        }
    };
    let token = if grammar.validate_tokens(&[first.0 as u32]).map_err(failed)? == 1 {
        first
    } else {
        let mask = grammar.compute_mask_or_eos().map_err(failed)?;
        let mut allowed = Vec::new();
        mask.iter_set_entries(|i| {
            if i < logits.len() {
                allowed.push(data(i));
            }
        });
        if allowed.is_empty() {
            return Err("structured output: the schema allows no token here".into());
        }
        if allowed.len() > GRAMMAR_SHORTLIST {
            allowed
                .select_nth_unstable_by(GRAMMAR_SHORTLIST, |a, b| b.logit().total_cmp(&a.logit()));
            allowed.truncate(GRAMMAR_SHORTLIST);
        }
        let mut pool = LlamaTokenDataArray::new(allowed, false);
        match chain.as_deref_mut() {
            Some(chain) => {
                chain.apply(&mut pool);
                pool.selected_token().unwrap_or_else(|| best_of(&pool))
            }
            None => best_of(&pool),
        }
    };
    if let Some(chain) = chain {
        chain.accept(token);
    }
    // An end-of-generation token ends the sequence: nothing follows it for the matcher to check.
    if !is_eog(token) {
        grammar.consume_token(token.0 as u32).map_err(failed)?;
    }
    Ok(token)
}

/// The candidate with the highest logit.
fn best_of(candidates: &LlamaTokenDataArray) -> LlamaToken {
    candidates
        .data
        .iter()
        .max_by(|a, b| a.logit().total_cmp(&b.logit()))
        .map_or(LlamaToken::new(0), |d| d.id())
}

fn refuse(message: String) -> EngineError {
    EngineError::Invalid(format!("response_format: {message}"))
}

fn nesting(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(nesting).max().unwrap_or(0),
        Value::Object(o) => o.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> Grammars {
        Grammars::with_env(&toktrie::ApproximateTokEnv::single_byte_env()).unwrap()
    }

    fn compile(schema: Value) -> Result<Matcher, EngineError> {
        grammars().compile(&OutputFormat::JsonSchema {
            name: "t".into(),
            schema: schema.to_string(),
        })
    }

    fn refused(schema: Value) -> String {
        match compile(schema.clone()) {
            Err(EngineError::Invalid(m)) => m,
            Err(e) => panic!("{schema}: {e}"),
            Ok(_) => panic!("{schema} was not refused"),
        }
    }

    /// Feeds `text` byte by byte (the single-byte vocabulary): whether the matcher takes it all
    /// and may stop there.
    fn accepts(m: &mut Matcher, text: &str) -> bool {
        text.bytes().all(|b| {
            m.validate_tokens(&[u32::from(b)]).unwrap() == 1
                && m.consume_token(u32::from(b)).is_ok()
        }) && m.is_accepting().unwrap()
    }

    #[test]
    fn keywords_the_matcher_cannot_enforce_are_refused_by_name() {
        let ok = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20, "description": "who"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "n": {"type": "integer", "multipleOf": 3},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                "when": {"type": "string", "format": "date"},
                "mail": {"type": "string", "format": "email"},
                "kind": {"anyOf": [{"const": 1}, {"$ref": "#/$defs/k"}]},
                "both": {"allOf": [{"type": "integer"}, {"minimum": 2, "maximum": 4}]},
            },
            "required": ["name"],
            "additionalProperties": false,
            "$defs": {"k": {"type": "boolean"}},
        });
        compile(ok).unwrap();
        for key in [
            "uniqueItems",
            "contains",
            "not",
            "propertyNames",
            "dependentRequired",
        ] {
            let value = if key == "uniqueItems" {
                json!(true)
            } else {
                json!({})
            };
            let m = refused(json!({"type": "object", key: value}));
            assert!(m.contains(key), "{m}");
        }
        let m = refused(json!({"type": "object", "if": {}, "then": {}}));
        assert!(m.contains("if") && m.contains("then"), "{m}");
        assert!(refused(json!({"type": "string", "format": "color"})).contains("color"));
        assert!(refused(json!({"$ref": "https://example.com/s.json"})).contains("example.com"));
        assert!(refused(json!(false)).contains("JSON object"));
        assert!(refused(json!([1])).contains("JSON object"));
        compile(json!(true)).unwrap();
        let mut deep = json!({"type": "string"});
        for _ in 0..100 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(refused(deep).contains("deeper"));
    }

    #[test]
    fn the_matcher_enforces_what_the_gbnf_converter_dropped() {
        let schema = json!({"type": "object", "properties": {
            "v": {"allOf": [{"type": "integer"}, {"minimum": 2, "maximum": 4}]}},
            "required": ["v"], "additionalProperties": false});
        assert!(accepts(
            &mut compile(schema.clone()).unwrap(),
            r#"{"v": 3}"#
        ));
        assert!(!accepts(
            &mut compile(schema.clone()).unwrap(),
            r#"{"v": 5}"#
        ));
        assert!(!accepts(&mut compile(schema).unwrap(), r#"{"v": {}}"#));
        let x = json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1});
        assert!(accepts(&mut compile(x.clone()).unwrap(), "0.5"));
        assert!(!accepts(&mut compile(x).unwrap(), "1"));
    }

    #[test]
    fn a_clients_own_x_guidance_cannot_loosen_the_matcher() {
        let schema =
            json!({"type": "object", "uniqueItems": true, "x-guidance": {"lenient": true}});
        assert!(refused(schema).contains("uniqueItems"));
        let spaces = json!({"type": "object", "x-guidance": {"whitespace_pattern": "[ ]*"}});
        assert!(!accepts(&mut compile(spaces.clone()).unwrap(), "{    }"));
        assert!(accepts(&mut compile(spaces).unwrap(), "{ }"));
    }
}
