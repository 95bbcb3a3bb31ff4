//! Who may do what on the mesh. Each worker token names a role; the role's [`Grant`] lists the
//! functions its workers may serve, the HTTP triggers they may bind, the state they may touch,
//! and which of their functions are resumable. The gateway checks every registration and every
//! `state::*` call against the grant of the connection's token, so a worker holding the infer
//! token cannot take over `POST /v1/chat/completions`, serve `http::*`, or write the caller's state.
//!
//! Patterns are exact names, or a prefix ending in `*` (`inference::*`, `/v1/*`, `*`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// What one role may do. In config: `[grants.<role>]`; `caller` and `infer` have built-in grants
/// ([`Grant::builtin`]) that a `[grants.caller]` or `[grants.infer]` table replaces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Functions it may serve: `inference::*`, `math::add`.
    #[serde(default)]
    pub functions: Vec<String>,
    /// Triggers it may bind, as `METHOD /path` (`*` for any method; the path may end in `*`).
    /// The trigger's function must be one the role may serve.
    #[serde(default)]
    pub triggers: Vec<String>,
    /// State calls it may make, as `OPERATION scope` (`get`, `set`, `delete`, `list`, `incr` or
    /// `*`; the scope may end in `*`).
    #[serde(default)]
    pub state: Vec<String>,
    /// Its functions whose unstarted invocations may move to another worker: the gateway decides
    /// this, a worker's own `resumable` flag only counts where the grant allows it.
    #[serde(default)]
    pub resumable: Vec<String>,
}

/// A refused registration or state call: the metric label and what the peer and the log are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl Grant {
    /// The built-in grants of meshd's own roles.
    pub fn builtin() -> BTreeMap<String, Grant> {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        BTreeMap::from([
            (
                "caller".to_string(),
                Grant {
                    functions: list(&[
                        "http::*",
                        "math::add_two_numbers",
                        "inference::get_response",
                    ]),
                    triggers: list(&[
                        "POST /v1/chat/completions",
                        "POST /v1/completions",
                        "POST /v1/responses",
                        "POST /v1/embeddings",
                        "GET /v1/models",
                        "POST /math/add-two-numbers",
                    ]),
                    state: Vec::new(),
                    resumable: Vec::new(),
                },
            ),
            (
                "infer".to_string(),
                Grant {
                    functions: list(&[
                        "inference::run_inference",
                        "inference::models",
                        "inference::stats",
                        "inference::embed",
                        "math::add",
                    ]),
                    triggers: list(&["GET /v1/engine/stats"]),
                    state: list(&["incr math"]),
                    resumable: list(&["inference::run_inference"]),
                },
            ),
        ])
    }

    /// The single-token dev mode (`worker_token`): every function, trigger and state call, and
    /// the functions any of `grants` makes resumable.
    pub fn everything(grants: &BTreeMap<String, Grant>) -> Grant {
        let mut resumable: Vec<String> = grants
            .values()
            .flat_map(|g| g.resumable.iter().cloned())
            .collect();
        resumable.sort();
        resumable.dedup();
        Grant {
            functions: vec!["*".into()],
            triggers: vec!["* *".into()],
            state: vec!["* *".into()],
            resumable,
        }
    }

    /// Checks the shape of every entry; answers what is wrong with the first bad one.
    pub fn check(&self, role: &str) -> Result<(), String> {
        let pair = |entry: &str, what: &str| -> Result<(), String> {
            match entry.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok(()),
                _ => Err(format!(
                    "grants.{role}.{what}: `{entry}` is not `{}`",
                    if what == "triggers" {
                        "METHOD /path"
                    } else {
                        "OPERATION scope"
                    }
                )),
            }
        };
        for t in &self.triggers {
            pair(t, "triggers")?;
        }
        for s in &self.state {
            pair(s, "state")?;
            let op = s.split(' ').next().unwrap_or_default();
            if !["*", "get", "set", "delete", "list", "incr"].contains(&op) {
                return Err(format!(
                    "grants.{role}.state: `{op}` is not get, set, delete, list, incr or *"
                ));
            }
        }
        Ok(())
    }

    pub fn may_serve(&self, function: &str) -> bool {
        self.functions.iter().any(|p| matches(p, function))
    }

    pub fn may_bind(&self, method: &str, path: &str, function: &str) -> bool {
        self.may_serve(function)
            && self.triggers.iter().any(|t| {
                let (m, p) = t.split_once(' ').unwrap_or((t, ""));
                (m == "*" || m.eq_ignore_ascii_case(method)) && matches(p, path)
            })
    }

    /// `operation` is the built-in's name after `state::`.
    pub fn may_use_state(&self, operation: &str, scope: &str) -> bool {
        self.state.iter().any(|s| {
            let (op, sc) = s.split_once(' ').unwrap_or((s, ""));
            (op == "*" || op == operation) && matches(sc, scope)
        })
    }

    pub fn is_resumable(&self, function: &str) -> bool {
        self.resumable.iter().any(|p| matches(p, function))
    }
}

/// A token's role and grant.
#[derive(Debug, Clone)]
pub struct Identity {
    pub role: String,
    pub grant: Arc<Grant>,
}

impl Identity {
    pub fn refuse_function(&self, function: &str) -> Refusal {
        Refusal {
            reason: "grant",
            message: format!(
                "function `{function}` is outside the grant of role `{}`",
                self.role
            ),
        }
    }

    pub fn refuse_trigger(&self, method: &str, path: &str, function: &str) -> Refusal {
        Refusal {
            reason: "grant",
            message: format!(
                "trigger `{method} {path}` → `{function}` is outside the grant of role `{}`",
                self.role
            ),
        }
    }
}

/// Every accepted worker token and what it grants.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    tokens: Vec<(String, Identity)>,
}

impl Identities {
    /// `dev`: the single token of `worker_token`, granting every role. `roles`: role → token.
    /// Every role with a token needs a grant; no two roles may share a token.
    pub fn new(
        dev: Option<String>,
        roles: &BTreeMap<String, String>,
        grants: &BTreeMap<String, Grant>,
    ) -> Result<Identities, String> {
        let mut tokens = Vec::new();
        if let Some(token) = dev {
            let grant = Arc::new(Grant::everything(grants));
            tokens.push((
                token,
                Identity {
                    role: "dev (every role)".into(),
                    grant,
                },
            ));
        }
        for (role, token) in roles {
            let grant = grants.get(role).ok_or_else(|| {
                format!(
                    "worker_tokens.{role}: no grant for role `{role}` (known: {}); add [grants.{role}]",
                    grants.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            if token.is_empty() {
                return Err(format!("worker_tokens.{role} is empty"));
            }
            if tokens.iter().any(|(t, _)| t == token) {
                return Err(format!(
                    "worker_tokens.{role} is the same token as another role's: each role needs its own"
                ));
            }
            tokens.push((
                token.clone(),
                Identity {
                    role: role.clone(),
                    grant: Arc::new(grant.clone()),
                },
            ));
        }
        Ok(Identities { tokens })
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The identity of a presented token: compared in constant time with every token (no early
    /// exit, so the time does not tell which one came close). An empty token matches nothing.
    pub fn identify(&self, presented: &str) -> Option<Identity> {
        let mut found = None;
        for (token, identity) in &self.tokens {
            let same =
                !token.is_empty() && bool::from(presented.as_bytes().ct_eq(token.as_bytes()));
            if same && found.is_none() {
                found = Some(identity.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identities() -> Identities {
        let roles = BTreeMap::from([
            ("caller".to_string(), "c-token".to_string()),
            ("infer".to_string(), "i-token".to_string()),
        ]);
        Identities::new(Some("dev".into()), &roles, &Grant::builtin()).unwrap()
    }

    #[test]
    fn tokens_name_their_role_exactly() {
        let ids = identities();
        assert_eq!(ids.identify("c-token").unwrap().role, "caller");
        assert_eq!(ids.identify("i-token").unwrap().role, "infer");
        assert!(ids.identify("dev").unwrap().role.starts_with("dev"));
        assert!(ids.identify("i-toke").is_none());
        assert!(ids.identify("").is_none());
    }

    #[test]
    fn the_infer_grant_serves_inference_and_nothing_of_the_callers() {
        let infer = identities().identify("i-token").unwrap().grant;
        assert!(infer.may_serve("inference::run_inference"));
        assert!(infer.may_serve("math::add"));
        assert!(!infer.may_serve("math::add_two_numbers"));
        assert!(!infer.may_serve("inference::get_response"), "the caller's");
        assert!(!infer.may_serve("http::run_inference_over_http"));
        assert!(infer.may_bind("GET", "/v1/engine/stats", "inference::stats"));
        assert!(!infer.may_bind("POST", "/v1/chat/completions", "inference::stats"));
        assert!(infer.may_use_state("incr", "math"));
        assert!(!infer.may_use_state("set", "math"));
        assert!(!infer.may_use_state("incr", "mathx"));
        assert!(infer.is_resumable("inference::run_inference"));
        assert!(!infer.is_resumable("math::add"));
    }

    #[test]
    fn a_trigger_needs_both_its_route_and_its_function_in_the_grant() {
        let caller = identities().identify("c-token").unwrap().grant;
        assert!(caller.may_bind(
            "post",
            "/v1/chat/completions",
            "http::run_inference_over_http"
        ));
        assert!(!caller.may_bind("POST", "/v1/chat/completions", "inference::stats"));
        assert!(!caller.may_bind("GET", "/v1/chat/completions", "http::x"));
        assert!(!caller.may_use_state("get", "math"));
    }

    #[test]
    fn the_dev_token_grants_everything_and_resumability_still_comes_from_the_grants() {
        let dev = identities().identify("dev").unwrap().grant;
        assert!(dev.may_serve("anything::at_all"));
        assert!(dev.may_bind("DELETE", "/x", "y"));
        assert!(dev.may_use_state("set", "any"));
        assert!(dev.is_resumable("inference::run_inference"));
        assert!(!dev.is_resumable("math::add"));
    }

    #[test]
    fn bad_configuration_is_named() {
        let grants = Grant::builtin();
        let shared = BTreeMap::from([
            ("caller".to_string(), "same".to_string()),
            ("infer".to_string(), "same".to_string()),
        ]);
        let e = Identities::new(None, &shared, &grants).unwrap_err();
        assert!(e.contains("same token"), "{e}");
        let unknown = BTreeMap::from([("janitor".to_string(), "t".to_string())]);
        let e = Identities::new(None, &unknown, &grants).unwrap_err();
        assert!(e.contains("[grants.janitor]"), "{e}");
        let bad = Grant {
            state: vec!["write math".into()],
            ..Grant::default()
        };
        assert!(bad.check("x").unwrap_err().contains("`write`"));
        let bad = Grant {
            triggers: vec!["/v1/x".into()],
            ..Grant::default()
        };
        assert!(bad.check("x").unwrap_err().contains("METHOD /path"));
    }
}
