//! Structured outputs: `response_format` turned into a llama.cpp grammar (GBNF) that the sampler
//! enforces token by token, so the output always parses as JSON and, for a schema, validates.
//!
//! The schema goes through llama.cpp's own `json_schema_to_grammar`. That converter silently
//! ignores keywords it cannot enforce, so a schema is first checked here: any keyword outside
//! [`SUPPORTED`] is refused with a 400 naming it, before any generation, rather than producing
//! output that parses but does not validate.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use serde_json::Value;

use super::EngineError;
use crate::api::OutputFormat;

/// The keywords a schema may use: each one is enforced by the grammar, or is an annotation.
const SUPPORTED: [&str; 30] = [
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    // Annotations: nothing to enforce.
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
];

/// `format` values the grammar enforces.
const FORMATS: [&str; 4] = ["date", "time", "date-time", "uuid"];

/// Most nesting a schema may have: deeper ones are refused (the grammar grows with it).
const MAX_DEPTH: usize = 32;

/// The grammar for `format`, checked by compiling it against the model's vocabulary.
pub fn compile(model: &LlamaModel, format: &OutputFormat) -> Result<String, EngineError> {
    let schema = match format {
        OutputFormat::JsonObject => r#"{"type": "object"}"#.to_string(),
        OutputFormat::JsonSchema { schema, .. } => {
            let value: Value = serde_json::from_str(schema)
                .map_err(|e| refuse(format!("the schema is not JSON: {e}")))?;
            check(&value, "#", 0)?;
            schema.clone()
        }
    };
    let gbnf = llama_cpp_2::json_schema_to_grammar(&schema)
        .map_err(|e| refuse(format!("the schema cannot be turned into a grammar ({e})")))?;
    LlamaSampler::grammar(model, &gbnf, "root")
        .map_err(|e| refuse(format!("the schema's grammar does not compile ({e})")))?;
    Ok(gbnf)
}

/// A sampler enforcing a grammar made by [`compile`].
pub fn sampler(model: &LlamaModel, gbnf: &str) -> Result<LlamaSampler, String> {
    LlamaSampler::grammar(model, gbnf, "root").map_err(|e| format!("the grammar: {e}"))
}

fn refuse(message: String) -> EngineError {
    EngineError::Invalid(format!("response_format: {message}"))
}

/// Refuses any keyword the grammar would not enforce, naming it and where it is.
fn check(schema: &Value, at: &str, depth: usize) -> Result<(), EngineError> {
    if depth > MAX_DEPTH {
        return Err(refuse(format!(
            "the schema nests deeper than {MAX_DEPTH} levels"
        )));
    }
    let obj = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => {
            return Err(refuse(format!(
                "{at} is not a schema (an object or a boolean)"
            )))
        }
    };
    for (key, value) in obj {
        if !SUPPORTED.contains(&key.as_str()) {
            return Err(refuse(format!(
                "the keyword `{key}` (at {at}) is not supported: supported are {}",
                SUPPORTED[..24].join(", ")
            )));
        }
        let here = format!("{at}/{key}");
        match key.as_str() {
            "format" => {
                let f = value.as_str().unwrap_or("");
                if !FORMATS.contains(&f) {
                    return Err(refuse(format!(
                        "`format: {value}` (at {at}) is not supported: supported are {}",
                        FORMATS.join(", ")
                    )));
                }
            }
            "$ref" if !value.as_str().is_some_and(|r| r.starts_with("#/")) => {
                return Err(refuse(format!(
                    "only local `$ref`s (`#/…`) are supported (at {at})"
                )));
            }
            // The grammar bounds integers only.
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum"
                if obj.get("type").and_then(Value::as_str) != Some("integer") =>
            {
                return Err(refuse(format!(
                    "`{key}` (at {at}) is supported on integers only"
                )));
            }
            "properties" | "$defs" | "definitions" => {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    check(sub, &format!("{here}/{name}"), depth + 1)?;
                }
            }
            "items" | "additionalProperties" if value.is_object() => {
                check(value, &here, depth + 1)?;
            }
            "prefixItems" | "anyOf" | "oneOf" | "allOf" => {
                for (i, sub) in value.as_array().into_iter().flatten().enumerate() {
                    check(sub, &format!("{here}/{i}"), depth + 1)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(schema: Value) -> String {
        match check(&schema, "#", 0) {
            Err(EngineError::Invalid(m)) => m,
            other => panic!("{schema} was not refused: {other:?}"),
        }
    }

    #[test]
    fn keywords_the_grammar_cannot_enforce_are_refused_by_name() {
        let ok = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20, "description": "who"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                "when": {"type": "string", "format": "date"},
                "kind": {"anyOf": [{"const": 1}, {"$ref": "#/$defs/k"}]},
            },
            "required": ["name"],
            "additionalProperties": false,
            "$defs": {"k": {"type": "boolean"}},
        });
        check(&ok, "#", 0).unwrap();
        let m = refused(
            json!({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}),
        );
        assert!(
            m.contains("`multipleOf`") && m.contains("#/properties/n"),
            "{m}"
        );
        assert!(refused(json!({"uniqueItems": true})).contains("uniqueItems"));
        assert!(refused(json!({"type": "string", "format": "email"})).contains("email"));
        assert!(refused(json!({"$ref": "https://example.com/s.json"})).contains("local"));
        assert!(refused(json!({"type": "number", "minimum": 0.5})).contains("integers only"));
        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(refused(deep).contains("deeper"));
    }
}
