//! meshd: a private, OpenAI-compatible LLM endpoint behind a secure worker mesh.
//!
//! One binary runs every role: the [`gateway`] (public HTTP, private mesh, state), workers built on
//! [`worker`] (the caller and infer roles in [`roles`]), and all of them at once ([`up`]).

pub mod api;
pub mod config;
pub mod engine;
pub mod gateway;
pub mod liveness;
pub mod metrics;
pub mod openai;
pub mod protocol;
pub mod pull;
pub mod repl;
pub mod responses;
pub mod roles;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod up;
pub mod worker;
