//! The mesh wire: the only module that knows how workers and the gateway talk.
//!
//! Transport is WebSocket binary frames; one frame carries one MessagePack-encoded [`Message`] with
//! named fields (`rmp_serde::to_vec_named`), so a field added later (always optional) never breaks an
//! older decoder, and a message type an older peer does not know decodes as [`Message::Unknown`].
//! Payloads are opaque bytes: the gateway routes them, it does not re-decode them.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Bumped only on an incompatible change; a worker with another version is refused at `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts unless configured otherwise (payload plus envelope).
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// Largest first frame (the `Hello`) the gateway reads before the worker's token is checked: a
/// peer that has not authenticated costs a few KiB, whatever it sends.
pub const MAX_HELLO_FRAME: usize = 4 * 1024;

/// One message on the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First frame a worker sends.
    Hello {
        protocol: u32,
        name: String,
        token: String,
    },
    /// The gateway's answer to an accepted `Hello`.
    Welcome {
        worker_id: String,
    },
    /// Sent by the gateway just before it closes a connection it refuses.
    Refused {
        reason: String,
    },
    RegisterFunction {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        /// The worker reports `Started` when an invocation really begins; until then the gateway
        /// may re-send it to another worker if this one disconnects.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumable: bool,
        /// The models this worker serves (an infer worker's); an invocation that names a model
        /// goes only to a worker that serves it. Empty: the worker takes any.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        models: Vec<String>,
    },
    UnregisterFunction {
        name: String,
    },
    /// Maps an HTTP method + path on the gateway to a function.
    RegisterTrigger {
        method: String,
        path: String,
        function: String,
        /// Functions the trigger's function calls; `/readyz` waits for them too.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        requires: Vec<String>,
    },
    /// Calls a function. `id` is chosen by the sender and unique per connection.
    Invoke {
        id: u64,
        function: String,
        payload: ByteBuf,
        /// Milliseconds the caller is willing to wait, counted from when the message is sent.
        timeout_ms: u64,
        trace_id: String,
        /// Present when the invocation comes from an HTTP trigger.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http: Option<HttpRequestHead>,
        /// The W3C `traceparent` of the span that made the call (when OpenTelemetry export is on),
        /// so every hop's span joins one trace. The gateway drops one that is not well formed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// How the gateway should pick the worker, beyond least-loaded (boxed: most invocations
        /// carry none, and every message is as large as its largest variant).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<Box<RouteHint>>,
    },
    /// The one answer to a non-streaming invocation, or the head of a streaming one.
    Result {
        id: u64,
        outcome: Outcome,
    },
    /// Part of a streaming answer: starts with `StreamStart`, any number of `StreamChunk`s, one `StreamEnd`.
    StreamStart {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http: Option<HttpResponseHead>,
    },
    StreamChunk {
        id: u64,
        data: ByteBuf,
    },
    StreamEnd {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorBody>,
    },
    /// An invocation of a resumable function has begun (nothing may be re-sent after this).
    Started {
        id: u64,
    },
    /// Stops an invocation; travels the whole chain.
    Cancel {
        id: u64,
    },
    /// Tells the gateway to stop routing new work here (drain before shutdown).
    Draining {},
    /// A heartbeat: each end sends one every heartbeat interval and answers the other's.
    Ping {
        nonce: u64,
        /// An infer worker's engine, on every heartbeat it sends.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health: Option<Health>,
        /// The gateway addresses the worker is joined to (a worker's pings only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gateways: Vec<String>,
    },
    Pong {
        nonce: u64,
    },
    /// Any message type this build does not know; ignored by the receiver.
    #[serde(other)]
    Unknown,
}

/// What a caller tells the gateway about where an invocation should run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHint {
    /// Only a worker serving this model may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Invocations with the same key go to the same worker while the load allows (a hash of a
    /// conversation's start: that worker holds its prefix in its KV cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<u64>,
}

/// FNV-1a, 64 bits: a hash that is the same in every process and build (affinity keys, and the
/// gateway's rendezvous scores).
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// How a worker's engine is doing, sent with its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Decode steps completed since the engine started.
    pub steps: u64,
    /// The engine holds work (running or queued).
    pub busy: bool,
    /// Busy with no step for the worker's `engine_stall_secs`: the gateway routes nothing to it
    /// and fails or moves what it had, until it makes progress again.
    pub stalled: bool,
    /// Requests its engine holds for others (an upstream server shared with other clients): the
    /// gateway counts them in the worker's load.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backlog: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok {
        payload: ByteBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http: Option<HttpResponseHead>,
    },
    Error(ErrorBody),
}

/// An error travelling the mesh. `code` is one of [`ErrorCode`]'s names, kept a string on the wire
/// so that a newer peer's code still reaches an older one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// An HTTP status the function chose; the gateway uses it as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// The HTTP request behind an invocation made by a trigger. The body is the invocation's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequestHead {
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub query: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// The HTTP response a function chose. The body is the outcome's payload (or the stream's chunks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResponseHead {
    pub status: u16,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// Every error meshd raises. [`ErrorCode::row`] is the one table from an error to its wire code,
/// HTTP status and OpenAI error `type`: no call site picks a status of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    /// The prompt plus `max_tokens` does not fit the model's context.
    ContextLengthExceeded,
    InvalidApiKey,
    Unauthorized,
    /// An authenticated peer asked for something outside its grant.
    Forbidden,
    NotFound,
    ModelNotFound,
    /// The path exists, with other methods.
    MethodNotAllowed,
    /// The request body did not arrive within `http_body_timeout_secs`.
    RequestTimeout,
    Conflict,
    PayloadTooLarge,
    Overloaded,
    Cancelled,
    Internal,
    WorkerLost,
    /// A worker's answer the gateway cannot pass on (say, an HTTP status that is not one).
    BadWorkerAnswer,
    NoWorker,
    DeadlineExceeded,
    /// The state backend (Redis) cannot be reached or did not answer in time.
    StateUnavailable,
    /// An API key passed its requests or tokens per minute.
    RateLimited,
}

/// One row of the error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorRow {
    /// The `code` on the mesh, in the OpenAI error body and in metric labels.
    pub code: &'static str,
    pub status: u16,
    /// The OpenAI error `type`.
    pub kind: &'static str,
}

const INVALID: &str = "invalid_request_error";
const SERVER: &str = "server_error";

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        Self::BadRequest,
        Self::ContextLengthExceeded,
        Self::InvalidApiKey,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::ModelNotFound,
        Self::MethodNotAllowed,
        Self::RequestTimeout,
        Self::Conflict,
        Self::PayloadTooLarge,
        Self::Overloaded,
        Self::Cancelled,
        Self::Internal,
        Self::WorkerLost,
        Self::BadWorkerAnswer,
        Self::NoWorker,
        Self::DeadlineExceeded,
        Self::StateUnavailable,
        Self::RateLimited,
    ];

    /// The table.
    pub const fn row(self) -> ErrorRow {
        let (code, status, kind) = match self {
            Self::BadRequest => ("bad_request", 400, INVALID),
            Self::ContextLengthExceeded => ("context_length_exceeded", 400, INVALID),
            Self::InvalidApiKey => ("invalid_api_key", 401, "authentication_error"),
            Self::Unauthorized => ("unauthorized", 401, "authentication_error"),
            Self::Forbidden => ("forbidden", 403, "permission_error"),
            Self::NotFound => ("not_found", 404, INVALID),
            Self::ModelNotFound => ("model_not_found", 404, INVALID),
            Self::MethodNotAllowed => ("method_not_allowed", 405, INVALID),
            Self::RequestTimeout => ("request_timeout", 408, INVALID),
            Self::Conflict => ("conflict", 409, INVALID),
            Self::PayloadTooLarge => ("payload_too_large", 413, INVALID),
            Self::Overloaded => ("overloaded", 429, "rate_limit_error"),
            Self::Cancelled => ("cancelled", 499, INVALID),
            Self::Internal => ("internal_error", 500, SERVER),
            Self::WorkerLost => ("worker_lost", 502, SERVER),
            Self::BadWorkerAnswer => ("bad_worker_answer", 502, SERVER),
            Self::NoWorker => ("no_worker", 503, SERVER),
            Self::DeadlineExceeded => ("deadline_exceeded", 504, SERVER),
            Self::StateUnavailable => ("state_unavailable", 503, SERVER),
            Self::RateLimited => ("rate_limit_exceeded", 429, "rate_limit_error"),
        };
        ErrorRow { code, status, kind }
    }

    pub fn as_str(self) -> &'static str {
        self.row().code
    }

    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }

    pub fn http_status(self) -> u16 {
        self.row().status
    }
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_string(),
            message: message.into(),
            param: None,
            status: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// This error's row of the table. A code the table does not know (a newer peer's, or a
    /// custom worker's) takes the status its sender chose if that is an error status (400–599: a
    /// peer's `status` is never trusted further), else 500.
    pub fn row(&self) -> ErrorRow {
        if let Some(known) = ErrorCode::parse(&self.code) {
            return known.row();
        }
        let status = self
            .status
            .filter(|s| (400..=599).contains(s))
            .unwrap_or(500);
        let kind = match status {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            400..=499 => INVALID,
            _ => SERVER,
        };
        ErrorRow {
            code: "",
            status,
            kind,
        }
    }

    pub fn http_status(&self) -> u16 {
        self.row().status
    }

    /// `{"error":{"message","type","param","code"}}`: the body of every HTTP error meshd sends.
    pub fn openai_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.row().kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// The first frame as the gateway reads it, into a struct of its own: only these fields are
/// kept, anything else is skipped without being buffered (an internally tagged [`Message`] would
/// buffer every field before it knew the variant).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HelloFrame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub protocol: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub token: String,
}

/// Decodes the first frame of a connection, refusing one larger than [`MAX_HELLO_FRAME`].
pub fn decode_hello(frame: &[u8]) -> Result<HelloFrame, CodecError> {
    if frame.len() > MAX_HELLO_FRAME {
        return Err(CodecError::TooLarge {
            size: frame.len(),
            limit: MAX_HELLO_FRAME,
        });
    }
    Ok(rmp_serde::from_slice(frame)?)
}

/// Encodes one message as a frame body.
pub fn encode(msg: &Message) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(msg)?)
}

/// Decodes one frame body, refusing frames larger than `limit`.
pub fn decode(frame: &[u8], limit: usize) -> Result<Message, CodecError> {
    if frame.len() > limit {
        return Err(CodecError::TooLarge {
            size: frame.len(),
            limit,
        });
    }
    Ok(rmp_serde::from_slice(frame)?)
}

/// Encodes a payload value (what functions exchange) as MessagePack with named fields.
pub fn to_payload<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("payload types always serialize")
}

/// Decodes a payload value.
pub fn from_payload<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ErrorBody> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| ErrorBody::new(ErrorCode::BadRequest, format!("malformed payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                protocol: PROTOCOL_VERSION,
                name: "infer-1".into(),
                token: "secret".into(),
            },
            Message::Welcome {
                worker_id: "w1".into(),
            },
            Message::Refused {
                reason: "bad token".into(),
            },
            Message::RegisterFunction {
                name: "math::add".into(),
                description: None,
                resumable: true,
                models: vec!["gemma-3-270m".into()],
            },
            Message::UnregisterFunction {
                name: "math::add".into(),
            },
            Message::RegisterTrigger {
                method: "POST".into(),
                path: "/math/add-two-numbers".into(),
                function: "math::add_two_numbers".into(),
                requires: vec!["math::add".into()],
            },
            Message::Invoke {
                id: 7,
                function: "math::add".into(),
                payload: ByteBuf::from(vec![0, 1, 2, 255]),
                timeout_ms: 30_000,
                trace_id: "abc".into(),
                http: Some(HttpRequestHead {
                    method: "POST".into(),
                    path: "/x".into(),
                    query: "a=1".into(),
                    headers: vec![("content-type".into(), "application/json".into())],
                }),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                route: Some(Box::new(RouteHint {
                    model: Some("gemma-3-270m".into()),
                    affinity: Some(u64::MAX),
                })),
            },
            Message::Result {
                id: 7,
                outcome: Outcome::Ok {
                    payload: ByteBuf::from(b"{}".to_vec()),
                    http: Some(HttpResponseHead {
                        status: 200,
                        headers: vec![],
                    }),
                },
            },
            Message::Result {
                id: 8,
                outcome: Outcome::Error(
                    ErrorBody::new(ErrorCode::ContextLengthExceeded, "no").with_param("a"),
                ),
            },
            Message::StreamStart { id: 9, http: None },
            Message::StreamChunk {
                id: 9,
                data: ByteBuf::from(b"tok".to_vec()),
            },
            Message::StreamEnd { id: 9, error: None },
            Message::Cancel { id: 9 },
            Message::Started { id: 9 },
            Message::Draining {},
            Message::Ping {
                nonce: 1,
                health: None,
                gateways: vec!["10.0.0.1:49134".into()],
            },
            Message::Ping {
                nonce: 2,
                health: Some(Health {
                    steps: 7,
                    busy: true,
                    stalled: false,
                    backlog: 3,
                }),
                gateways: vec![],
            },
            Message::Pong { nonce: 1 },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let bytes = encode(&msg).unwrap();
            assert_eq!(decode(&bytes, DEFAULT_MAX_FRAME).unwrap(), msg);
        }
    }

    #[test]
    fn an_older_decoder_reads_a_message_with_a_new_optional_field() {
        // A newer peer adds a field this build does not know: it is ignored, not an error.
        #[derive(Serialize)]
        struct NewerCancel {
            r#type: &'static str,
            id: u64,
            reason: Option<String>,
        }
        let bytes = rmp_serde::to_vec_named(&NewerCancel {
            r#type: "cancel",
            id: 42,
            reason: Some("client went away".into()),
        })
        .unwrap();
        assert_eq!(
            decode(&bytes, DEFAULT_MAX_FRAME).unwrap(),
            Message::Cancel { id: 42 }
        );
    }

    #[test]
    fn a_message_type_from_the_future_decodes_as_unknown() {
        #[derive(Serialize)]
        struct Future {
            r#type: &'static str,
            x: u32,
        }
        let bytes = rmp_serde::to_vec_named(&Future {
            r#type: "teleport",
            x: 1,
        })
        .unwrap();
        assert_eq!(decode(&bytes, DEFAULT_MAX_FRAME).unwrap(), Message::Unknown);
    }

    #[test]
    fn the_hello_decodes_on_its_own_and_nothing_big_is_read_before_it() {
        let hello = encode(&Message::Hello {
            protocol: PROTOCOL_VERSION,
            name: "infer-1".into(),
            token: "secret".into(),
        })
        .unwrap();
        let h = decode_hello(&hello).unwrap();
        assert_eq!(
            (
                h.kind.as_str(),
                h.protocol,
                h.name.as_str(),
                h.token.as_str()
            ),
            ("hello", PROTOCOL_VERSION, "infer-1", "secret")
        );
        // Another message type still decodes: the gateway refuses it by its `kind`.
        let cancel = encode(&Message::Cancel { id: 1 }).unwrap();
        assert_eq!(decode_hello(&cancel).unwrap().kind, "cancel");
        // A Hello padded with an extra field past the limit is refused by its size alone.
        #[derive(Serialize)]
        struct Padded {
            r#type: &'static str,
            token: &'static str,
            pad: Vec<u64>,
        }
        let padded = rmp_serde::to_vec_named(&Padded {
            r#type: "hello",
            token: "x",
            pad: vec![u64::MAX; 1024],
        })
        .unwrap();
        assert!(matches!(
            decode_hello(&padded),
            Err(CodecError::TooLarge {
                limit: MAX_HELLO_FRAME,
                ..
            })
        ));
        assert!(decode_hello(&[0xc1]).is_err());
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let big = vec![0u8; 100];
        assert!(matches!(
            decode(&big, 10),
            Err(CodecError::TooLarge { size: 100, .. })
        ));
        assert!(matches!(
            decode(&[0xc1, 0xff, 0x00], 10),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn every_error_code_has_one_row_and_parses_back() {
        let mut codes = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let row = code.row();
            assert_eq!(ErrorCode::parse(row.code), Some(code));
            assert!(codes.insert(row.code), "{} twice", row.code);
            assert!((400..600).contains(&row.status));
            let body = ErrorBody::new(code, "m").openai_json();
            assert_eq!(body["error"]["type"], row.kind);
            assert_eq!(body["error"]["code"], row.code);
        }
    }

    #[test]
    fn a_known_code_ignores_the_status_a_peer_sends_and_an_unknown_one_is_clamped() {
        let sent = |code: &str, status| ErrorBody {
            code: code.into(),
            message: "?".into(),
            param: None,
            status,
        };
        assert_eq!(sent("bad_request", Some(503)).http_status(), 400);
        assert_eq!(sent("martian", Some(418)).http_status(), 418);
        assert_eq!(
            sent("martian", Some(418)).row().kind,
            "invalid_request_error"
        );
        // A status a peer made up (not an error, or not HTTP at all) is not used.
        for bogus in [0, 99, 200, 302, 600, 1000, u16::MAX] {
            assert_eq!(sent("martian", Some(bogus)).http_status(), 500, "{bogus}");
        }
        assert_eq!(sent("martian", None).http_status(), 500);
    }
}
