//! The gateway's own functions, callable by any worker: `state::get / set / delete / list / incr`.
//! Their payloads are the one place the gateway decodes what it receives.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::{self, ErrorBody, ErrorCode, Outcome};
use crate::state::{Item, StateError, StateStore};

pub fn is_builtin(function: &str) -> bool {
    function.starts_with("state::")
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeyRequest {
    pub scope: String,
    pub key: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SetRequest {
    pub scope: String,
    pub key: String,
    pub value: Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListRequest {
    pub scope: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IncrRequest {
    pub scope: String,
    pub key: String,
    pub by: i64,
    /// Applies the increment at most once per key (replays answer the first value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ValueReply {
    pub value: Option<Value>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct IncrReply {
    pub value: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DeleteReply {
    pub existed: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ListReply {
    pub items: Vec<Item>,
}

/// Runs a built-in and shapes its outcome.
pub async fn call(state: &StateStore, function: &str, payload: &[u8]) -> Outcome {
    match dispatch(state, function, payload).await {
        Ok(bytes) => Outcome::Ok {
            payload: serde_bytes::ByteBuf::from(bytes),
            http: None,
        },
        Err(e) => Outcome::Error(e),
    }
}

async fn dispatch(
    state: &StateStore,
    function: &str,
    payload: &[u8],
) -> Result<Vec<u8>, ErrorBody> {
    let reply = match function {
        "state::get" => {
            let r: KeyRequest = protocol::from_payload(payload)?;
            protocol::to_payload(&ValueReply {
                value: state.get(&r.scope, &r.key).map_err(state_error)?,
            })
        }
        "state::set" => {
            let r: SetRequest = protocol::from_payload(payload)?;
            state
                .set(&r.scope, &r.key, &r.value)
                .await
                .map_err(state_error)?;
            protocol::to_payload(&ValueReply { value: None })
        }
        "state::delete" => {
            let r: KeyRequest = protocol::from_payload(payload)?;
            let existed = state.delete(&r.scope, &r.key).await.map_err(state_error)?;
            protocol::to_payload(&DeleteReply { existed })
        }
        "state::list" => {
            let r: ListRequest = protocol::from_payload(payload)?;
            let limit = r.limit.unwrap_or(crate::state::MAX_LIST);
            let items = state
                .list(&r.scope, &r.prefix, limit)
                .map_err(state_error)?;
            protocol::to_payload(&ListReply { items })
        }
        "state::incr" => {
            let r: IncrRequest = protocol::from_payload(payload)?;
            let value = match r.idempotency_key.as_deref() {
                Some(k) => state.incr_once(&r.scope, &r.key, r.by, k).await,
                None => state.incr(&r.scope, &r.key, r.by).await,
            }
            .map_err(state_error)?;
            protocol::to_payload(&IncrReply { value })
        }
        other => {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no built-in function `{other}`"),
            ))
        }
    };
    Ok(reply)
}

fn state_error(e: StateError) -> ErrorBody {
    match e {
        StateError::Invalid(m) => ErrorBody::new(ErrorCode::BadRequest, m),
        StateError::Conflict(m) => ErrorBody::new(ErrorCode::Conflict, m),
        other => ErrorBody::new(ErrorCode::Internal, other.to_string()),
    }
}
