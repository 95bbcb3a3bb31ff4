//! The seam between the infer role and what generates: [`Generate`]. The real implementation is
//! [`super::Engine`] (llama.cpp); [`super::echo::Echo`] is a deterministic stand-in with the same
//! limits and events, for mesh and fault tests that do not test inference (and load no model).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{EngineError, Event};
use crate::api::{StatsSnapshot, ValidGenerate};
use crate::liveness::Progress;

/// A queued generation: its prompt's size, and its events (`Started`, deltas, then one `Done` or
/// `Error`). Dropping `events` cancels it.
pub struct Generation {
    pub prompt_tokens: u32,
    pub events: mpsc::Receiver<Event>,
}

/// Embedding vectors and the tokens read for them, once computed.
pub type Embedding<'a> =
    Pin<Box<dyn Future<Output = Result<(Vec<Vec<f32>>, u32), EngineError>> + Send + 'a>>;

/// What the infer role needs from a generator.
pub trait Generate: Send + Sync + 'static {
    /// The model name the API reports and accepts.
    fn model_id(&self) -> &str;

    /// The model's id, context, quantisation and size, for `/v1/models`.
    fn model_info(&self) -> crate::api::ModelInfo;

    /// Formats, tokenizes, checks the context and queues a request. May block for a while (a long
    /// prompt): call it off the async threads.
    fn generate(&self, request: &ValidGenerate) -> Result<Generation, EngineError>;

    /// Counters for `/v1/engine/stats` and the gateway's metrics.
    fn snapshot(&self) -> StatsSnapshot;

    /// Steps so far and whether it holds work: what a stall is judged on.
    fn progress(&self) -> Progress;

    /// Busy with no step for this long is a stall.
    fn stall_limit(&self) -> Duration;

    /// Completes when the generator can never run anything again.
    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;

    /// One L2-normalised vector per input, and the tokens read; only a generator with a model
    /// makes them.
    fn embed<'a>(&'a self, inputs: &'a [crate::api::EmbedInput]) -> Embedding<'a> {
        let _ = inputs;
        Box::pin(async {
            Err(EngineError::Invalid(
                "embeddings need the llama.cpp generator (a loaded model)".into(),
            ))
        })
    }
}
