//! The gateway's own functions: `state::get / set / delete / list / incr`, each allowed to a
//! worker only on the scopes its role's grant names, and `mesh::models` (open to every worker). Their payloads (in [`crate::api`]) are the one
//! place the gateway decodes what it receives.

use super::grants::Identity;
use crate::api::{
    DeleteReply, IncrReply, IncrRequest, KeyRequest, ListReply, ListRequest, SetRequest, ValueReply,
};
use crate::protocol::{self, ErrorBody, ErrorCode, Outcome};
use crate::state::{StateError, StateStore};

/// The models the live workers serve (an [`crate::api::ModelList`] without details): how the
/// caller's `/v1/models` learns of every model in the mesh, not only one worker's.
pub const MODELS: &str = "mesh::models";

pub fn is_builtin(function: &str) -> bool {
    function.starts_with("state::") || function.starts_with("mesh::")
}

/// Runs a built-in for a worker of `identity` and shapes its outcome.
pub async fn call(
    state: &StateStore,
    identity: &Identity,
    function: &str,
    payload: &[u8],
) -> Outcome {
    match dispatch(state, identity, function, payload).await {
        Ok(bytes) => Outcome::Ok {
            payload: serde_bytes::ByteBuf::from(bytes),
            http: None,
        },
        Err(e) => Outcome::Error(e),
    }
}

async fn dispatch(
    state: &StateStore,
    identity: &Identity,
    function: &str,
    payload: &[u8],
) -> Result<Vec<u8>, ErrorBody> {
    let allowed = |scope: &str| {
        let operation = function.strip_prefix("state::").unwrap_or(function);
        if identity.grant.may_use_state(operation, scope) {
            Ok(())
        } else {
            Err(ErrorBody::new(
                ErrorCode::Forbidden,
                format!(
                    "`{function}` on scope `{scope}` is outside the grant of role `{}`",
                    identity.role
                ),
            ))
        }
    };
    let reply = match function {
        "state::get" => {
            let r: KeyRequest = protocol::from_payload(payload)?;
            allowed(&r.scope)?;
            protocol::to_payload(&ValueReply {
                value: state.get(&r.scope, &r.key).await.map_err(state_error)?,
            })
        }
        "state::set" => {
            let r: SetRequest = protocol::from_payload(payload)?;
            allowed(&r.scope)?;
            state
                .set(&r.scope, &r.key, &r.value)
                .await
                .map_err(state_error)?;
            protocol::to_payload(&ValueReply { value: None })
        }
        "state::delete" => {
            let r: KeyRequest = protocol::from_payload(payload)?;
            allowed(&r.scope)?;
            let existed = state.delete(&r.scope, &r.key).await.map_err(state_error)?;
            protocol::to_payload(&DeleteReply { existed })
        }
        "state::list" => {
            let r: ListRequest = protocol::from_payload(payload)?;
            allowed(&r.scope)?;
            let limit = r.limit.unwrap_or(crate::state::MAX_LIST);
            let items = state
                .list(&r.scope, &r.prefix, limit)
                .await
                .map_err(state_error)?;
            protocol::to_payload(&ListReply { items })
        }
        "state::incr" => {
            let r: IncrRequest = protocol::from_payload(payload)?;
            allowed(&r.scope)?;
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
        StateError::Unavailable(m) => ErrorBody::new(ErrorCode::StateUnavailable, m),
        other => ErrorBody::new(ErrorCode::Internal, other.to_string()),
    }
}
