//! The seed's math pipeline: `math::add_two_numbers` (caller, behind `POST /math/add-two-numbers`)
//! validates the HTTP body and calls `math::add` (infer), which adds and bumps the durable
//! `running_total` through the gateway's `state::incr`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{IncrReply, IncrRequest};
use crate::protocol::{self, ErrorBody, ErrorCode, HttpResponseHead};
use crate::worker::{Call, Response};

pub const SUCCESS: &str = "You've connected two workers and they're interoperating seamlessly, now let's add a few more workers to expand this project's functionality.";

/// The request `math::add` accepts: already validated.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ValidAdd {
    pub a: i64,
    pub b: i64,
    /// From the `Idempotency-Key` header: a retry with the same key is applied once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct AddReply {
    pub c: i64,
    pub running_total: i64,
}

/// Validates an HTTP body into a [`ValidAdd`].
pub fn validate(body: &[u8]) -> Result<ValidAdd, ErrorBody> {
    let bad =
        |msg: String, param: &str| ErrorBody::new(ErrorCode::BadRequest, msg).with_param(param);
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let obj = value.as_object().ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            "body must be a JSON object like {\"a\": 1, \"b\": 2}",
        )
    })?;
    let number = |name: &str| -> Result<i64, ErrorBody> {
        let v = obj
            .get(name)
            .ok_or_else(|| bad(format!("`{name}` is missing"), name))?;
        if let Some(n) = v.as_i64() {
            return Ok(n);
        }
        match v.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => Ok(f as i64),
            Some(_) if v.is_u64() => Err(bad(
                format!("`{name}` is out of the 64-bit integer range"),
                name,
            )),
            Some(f) => Err(bad(format!("`{name}` must be an integer, got {f}"), name)),
            None => Err(bad(format!("`{name}` must be a number, got {v}"), name)),
        }
    };
    Ok(ValidAdd {
        a: number("a")?,
        b: number("b")?,
        idempotency_key: None,
    })
}

/// The `Idempotency-Key` header, checked.
fn idempotency_key(call: &Call) -> Result<Option<String>, ErrorBody> {
    let Some(head) = &call.http else {
        return Ok(None);
    };
    let Some((_, v)) = head
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("idempotency-key"))
    else {
        return Ok(None);
    };
    let ok = !v.is_empty()
        && v.len() <= crate::state::MAX_IDEMPOTENCY_KEY
        && v.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "Idempotency-Key must be 1 to 128 visible ASCII characters",
        )
        .with_param("Idempotency-Key"));
    }
    Ok(Some(v.clone()))
}

/// `math::add_two_numbers` (caller): HTTP JSON in, HTTP JSON out.
pub async fn add_two_numbers(call: Call) -> Result<Response, ErrorBody> {
    let mut valid = validate(&call.payload)?;
    valid.idempotency_key = idempotency_key(&call)?;
    let reply = call
        .mesh
        .call(
            "math::add",
            protocol::to_payload(&valid),
            &call.trace_id,
            call.deadline,
        )
        .await?;
    let reply: AddReply = protocol::from_payload(&reply)?;
    let body = serde_json::json!({
        "c": reply.c,
        "running_total": reply.running_total,
        "success": SUCCESS,
    });
    Ok(Response::Full {
        payload: body.to_string().into_bytes(),
        http: Some(HttpResponseHead {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
        }),
    })
}

/// `math::add` (infer): adds, then makes the new running total durable before answering.
pub async fn add(call: Call) -> Result<Response, ErrorBody> {
    let req: ValidAdd = protocol::from_payload(&call.payload)?;
    let c = req.a.checked_add(req.b).ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{} + {} overflows a 64-bit integer", req.a, req.b),
        )
    })?;
    let incr = IncrRequest {
        scope: "math".into(),
        key: "running_total".into(),
        by: c,
        idempotency_key: req.idempotency_key,
    };
    let total = call
        .mesh
        .call(
            "state::incr",
            protocol::to_payload(&incr),
            &call.trace_id,
            call.deadline,
        )
        .await?;
    let total: IncrReply = protocol::from_payload(&total)?;
    tracing::debug!(c, running_total = total.value, "added");
    Ok(Response::payload(protocol::to_payload(&AddReply {
        c,
        running_total: total.value,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_integers_and_whole_floats() {
        assert_eq!(
            validate(br#"{"a":100,"b":200}"#).unwrap(),
            ValidAdd {
                a: 100,
                b: 200,
                idempotency_key: None
            }
        );
        assert_eq!(
            validate(br#"{"a":1.0,"b":-2}"#).unwrap(),
            ValidAdd {
                a: 1,
                b: -2,
                idempotency_key: None
            }
        );
    }

    #[test]
    fn names_what_is_wrong() {
        let cases: [(&[u8], &str); 7] = [
            (b"not json", "not valid JSON"),
            (b"[1,2]", "JSON object"),
            (br#"{"b":1}"#, "`a` is missing"),
            (br#"{"a":"x","b":1}"#, "`a` must be a number"),
            (br#"{"a":1,"b":1.5}"#, "`b` must be an integer"),
            (br#"{"a":1e400,"b":1}"#, "not valid JSON"),
            (br#"{"a":18446744073709551615,"b":1}"#, "out of the 64-bit"),
        ];
        for (body, want) in cases {
            let err = validate(body).unwrap_err();
            assert!(
                err.message.contains(want),
                "{}: {}",
                String::from_utf8_lossy(body),
                err.message
            );
            assert_eq!(err.http_status(), 400);
        }
    }
}
