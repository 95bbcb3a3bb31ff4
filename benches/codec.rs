//! The mesh codec: encode + decode of an invoke and of a result, as they cross every hop.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use meshd::protocol::{decode, encode, HttpRequestHead, Message, Outcome, DEFAULT_MAX_FRAME};
use serde_bytes::ByteBuf;

fn invoke() -> Message {
    Message::Invoke {
        id: 123_456,
        function: "math::add_two_numbers".into(),
        payload: ByteBuf::from(br#"{"a": 100, "b": 200}"#.to_vec()),
        timeout_ms: 30_000,
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        http: Some(HttpRequestHead {
            method: "POST".into(),
            path: "/math/add-two-numbers".into(),
            query: String::new(),
            headers: vec![("content-type".into(), "application/json".into())],
        }),
        traceparent: None,
        route: None,
    }
}

fn result() -> Message {
    Message::Result {
        id: 123_456,
        outcome: Outcome::Ok {
            payload: ByteBuf::from(vec![0x82; 48]),
            http: None,
        },
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for (name, msg) in [("invoke", invoke()), ("result", result())] {
        g.bench_function(format!("{name}_roundtrip"), |b| {
            b.iter(|| {
                let bytes = encode(black_box(&msg)).unwrap();
                decode(black_box(&bytes), DEFAULT_MAX_FRAME).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
