//! Property tests for the parsers that face untrusted input: the mesh decoder before
//! authentication (the first frame, any bytes) and after it (any bytes a worker may send), and
//! the OpenAI request validator (any body a client may send). None may panic; the decoder
//! round-trips what the encoder writes; every refusal is a 400 naming a cause.

use meshd::openai::{validate, Kind};
use meshd::protocol::{
    decode, decode_hello, encode, ErrorBody, HttpRequestHead, Message, Outcome, MAX_HELLO_FRAME,
    PROTOCOL_VERSION,
};
use proptest::prelude::*;
use serde_bytes::ByteBuf;
use serde_json::Value;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec!["user", "assistant", "system", "tool", "text", "zebra"])
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "messages",
                    "role",
                    "content",
                    "model",
                    "stream",
                    "max_tokens",
                    "temperature",
                    "top_p",
                    "stop",
                    "n",
                    "seed",
                    "prompt",
                    "stream_options",
                    "include_usage",
                    "type",
                    "text",
                    "tools",
                ])
                .prop_map(str::to_string),
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        ".{0,20}",
        prop::collection::vec(any::<u8>(), 0..64),
        any::<u64>(),
        ".{0,8}",
        any::<bool>(),
    )
        .prop_flat_map(|(id, function, payload, timeout_ms, trace_id, with_http)| {
            let invoke = Message::Invoke {
                id,
                function: function.clone(),
                payload: ByteBuf::from(payload.clone()),
                timeout_ms,
                trace_id: trace_id.clone(),
                http: with_http.then(|| HttpRequestHead {
                    method: "POST".into(),
                    path: function.clone(),
                    query: trace_id.clone(),
                    headers: vec![(trace_id.clone(), function.clone())],
                }),
                traceparent: with_http.then(|| format!("00-{trace_id}-01")),
                route: with_http.then(|| {
                    Box::new(meshd::protocol::RouteHint {
                        model: Some(function.clone()),
                        affinity: Some(id),
                    })
                }),
            };
            let result = Message::Result {
                id,
                outcome: if with_http {
                    Outcome::Ok {
                        payload: ByteBuf::from(payload),
                        http: None,
                    }
                } else {
                    Outcome::Error(ErrorBody::new(
                        meshd::protocol::ErrorCode::Internal,
                        function.clone(),
                    ))
                },
            };
            prop_oneof![
                Just(invoke),
                Just(result),
                Just(Message::Cancel { id }),
                Just(Message::StreamEnd { id, error: None })
            ]
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_decoder_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, 1024);
    }

    /// Before authentication: the first frame of a connection, any bytes at all.
    #[test]
    fn the_hello_decoder_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
        if decode_hello(&bytes).is_ok() {
            prop_assert!(bytes.len() <= MAX_HELLO_FRAME);
        }
    }

    /// A real Hello, cut short or with a byte flipped: an error or a Hello, never a panic, and an
    /// intact one reads back exactly.
    #[test]
    fn a_damaged_hello_is_an_error_or_a_hello(name in ".{0,40}", token in ".{0,80}", cut in 0usize..200, flip in any::<u8>()) {
        let hello = Message::Hello { protocol: PROTOCOL_VERSION, name: name.clone(), token: token.clone() };
        let mut bytes = encode(&hello).unwrap();
        let intact = decode_hello(&bytes).unwrap();
        prop_assert_eq!((intact.kind.as_str(), intact.name, intact.token), ("hello", name, token));
        let at = cut % (bytes.len() + 1);
        bytes.truncate(at);
        if let Some(b) = bytes.last_mut() {
            *b ^= flip;
        }
        let _ = decode_hello(&bytes);
    }

    #[test]
    fn the_decoder_reads_back_what_the_encoder_writes(msg in message()) {
        let bytes = encode(&msg).unwrap();
        prop_assert_eq!(decode(&bytes, 1 << 20).unwrap(), msg);
    }

    #[test]
    fn a_truncated_or_flipped_frame_is_an_error_or_a_message_never_a_panic(msg in message(), cut in 0usize..64, flip in any::<u8>()) {
        let mut bytes = encode(&msg).unwrap();
        let at = cut % (bytes.len() + 1);
        bytes.truncate(at);
        if let Some(b) = bytes.last_mut() {
            *b ^= flip;
        }
        let _ = decode(&bytes, 1 << 20);
    }

    #[test]
    fn the_chat_validator_never_panics_and_refuses_with_a_400(body in json_value()) {
        for kind in [Kind::Chat, Kind::Completion] {
            match validate(kind, body.to_string().as_bytes(), 1) {
                Ok(v) => {
                    prop_assert!(v.generate.max_tokens.is_none_or(|n| n >= 1));
                    prop_assert!(v.generate.stop.len() <= 4);
                }
                Err(e) => {
                    prop_assert_eq!(e.http_status(), 400);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn the_chat_validator_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if validate(Kind::Chat, &bytes, 1).is_ok() {
            let parsed = serde_json::from_slice::<Value>(&bytes);
            prop_assert!(parsed.map(|v| v.is_object()).unwrap_or(false));
        }
    }
}

/// A valid chat body with one field changed (or removed) to a value that may or may not be
/// valid for it: unlike random JSON, this reaches the accepting branch and every refusal rule.
fn mutated_chat_body() -> impl Strategy<Value = Value> {
    let fields = prop::sample::select(vec![
        "messages",
        "model",
        "stream",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "n",
        "seed",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "tools",
    ]);
    let value = prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        any::<bool>().prop_map(|b| Some(Value::Bool(b))),
        (-5i64..5000).prop_map(|n| Some(Value::from(n))),
        (-3.0f64..3.0).prop_map(|f| Some(Value::from(f))),
        prop::sample::select(vec!["gemma-3-270m", "gpt-9", "", "END"])
            .prop_map(|s| Some(Value::String(s.into()))),
        prop::collection::vec("[a-z]{0,3}", 0..6)
            .prop_map(|v| Some(Value::Array(v.into_iter().map(Value::String).collect()))),
        prop::sample::select(vec![
            serde_json::json!([{"role": "user", "content": "hi"}]),
            serde_json::json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
            serde_json::json!([]),
            serde_json::json!([{"role": "wizard", "content": "hi"}]),
            serde_json::json!([{"role": "user"}]),
            serde_json::json!({"include_usage": true}),
            serde_json::json!({"include_usage": "yes"}),
        ])
        .prop_map(Some),
    ];
    (fields, value).prop_map(|(field, value)| {
        let mut body = serde_json::json!({
            "model": "gemma-3-270m",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 16,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["\n\n"],
            "seed": 7,
        });
        let obj = body.as_object_mut().unwrap();
        match value {
            None => {
                obj.remove(field);
            }
            Some(v) => {
                obj.insert(field.to_string(), v);
            }
        }
        body
    })
}

#[test]
fn a_valid_body_with_one_field_changed_is_accepted_or_refused_with_a_400_naming_it() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 3000,
        ..Config::default()
    });
    let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    runner
        .run(&mutated_chat_body(), |body| {
            match validate(Kind::Chat, body.to_string().as_bytes(), 1) {
                Ok(v) => {
                    accepted.set(accepted.get() + 1);
                    prop_assert!(v.generate.max_tokens.is_none_or(|n| n >= 1));
                    prop_assert!(v.generate.stop.len() <= 4);
                }
                Err(e) => {
                    refused.set(refused.get() + 1);
                    prop_assert_eq!(e.http_status(), 400);
                    prop_assert!(!e.message.is_empty());
                }
            }
            Ok(())
        })
        .unwrap();
    let (a, r) = (accepted.get(), refused.get());
    let share = f64::from(a) / f64::from(a + r);
    println!("{a} accepted, {r} refused ({:.0}% accepted)", share * 100.0);
    // Both branches must run often, or the property says little about one of them.
    assert!(share >= 0.2, "only {a} of {} accepted", a + r);
    assert!(share <= 0.8, "only {r} of {} refused", a + r);
}
