//! Property tests for the two parsers that face untrusted input: the mesh decoder (any bytes a
//! peer may send) and the OpenAI request validator (any body a client may send). Neither may
//! panic; the decoder round-trips what the encoder writes; every refusal is a 400 naming a cause.

use meshd::openai::{validate, Kind};
use meshd::protocol::{decode, encode, ErrorBody, HttpRequestHead, Message, Outcome};
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
