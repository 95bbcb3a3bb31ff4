//! Embeddings from the loaded model, or from the GGUF the `embedding_model` setting names: a
//! thread of its own with a second llama.cpp context (`embeddings` on; the GGUF's own pooling
//! when it names one, as embedding models do, else mean pooling), started on the first request.
//! Inputs are batched (up to [`MAX_BATCH_SEQS`] sequences and [`MAX_INPUT_TOKENS`] tokens a
//! decode) and every vector is L2-normalised, as OpenAI's are.

use std::num::NonZeroU32;
use std::sync::Arc;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot};

use super::EngineError;

/// The most tokens one input may have (its sequence is pooled within one decode).
pub const MAX_INPUT_TOKENS: usize = 1024;
/// Sequences one decode carries.
const MAX_BATCH_SEQS: usize = 16;

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, String>>;
/// Tokenized inputs and where their vectors go.
type Job = (Vec<Vec<LlamaToken>>, Reply);

/// The embedding thread's queue; started once, on first use.
pub struct Embedder {
    jobs: tokio::sync::OnceCell<Result<mpsc::Sender<Job>, String>>,
}

impl Embedder {
    pub fn new() -> Embedder {
        Embedder {
            jobs: tokio::sync::OnceCell::new(),
        }
    }

    /// One normalised vector per input (already tokenized, each 1..=[`MAX_INPUT_TOKENS`]).
    pub async fn embed(
        &self,
        backend: &'static LlamaBackend,
        model: &Arc<LlamaModel>,
        threads: i32,
        inputs: Vec<Vec<LlamaToken>>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let model = Arc::clone(model);
        let jobs = self
            .jobs
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || start(backend, model, threads))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            })
            .await
            .as_ref()
            .map_err(|e| EngineError::Decode(format!("the embedding context: {e}")))?;
        let (reply, answer) = oneshot::channel();
        jobs.send((inputs, reply))
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Decode)
    }
}

impl Default for Embedder {
    fn default() -> Self {
        Embedder::new()
    }
}

fn start(
    backend: &'static LlamaBackend,
    model: Arc<LlamaModel>,
    threads: i32,
) -> Result<mpsc::Sender<Job>, String> {
    let (tx, mut rx) = mpsc::channel::<Job>(64);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("meshd-embed".into())
        .spawn(move || {
            let n = MAX_INPUT_TOKENS as u32;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n))
                .with_n_batch(n)
                .with_n_ubatch(n)
                .with_n_seq_max(MAX_BATCH_SEQS as u32)
                // One pool of cells for every sequence: split per sequence, each would get
                // n_ctx / 16, and one long input would find no room.
                .with_kv_unified(true)
                .with_n_threads(threads)
                .with_n_threads_batch(threads)
                .with_embeddings(true)
                .with_pooling_type(if own_pooling(&model) {
                    LlamaPoolingType::Unspecified
                } else {
                    LlamaPoolingType::Mean
                });
            let mut ctx = match model.new_context(backend, params) {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let mut batch = LlamaBatch::new(MAX_INPUT_TOKENS, MAX_BATCH_SEQS as i32);
            while let Some((inputs, reply)) = rx.blocking_recv() {
                let mut out = Vec::with_capacity(inputs.len());
                let mut failed = None;
                // Groups of inputs that fit one decode, in order.
                let mut i = 0;
                while i < inputs.len() && failed.is_none() {
                    batch.clear();
                    ctx.clear_kv_cache();
                    let mut seqs = 0;
                    let mut tokens = 0;
                    while i < inputs.len()
                        && seqs < MAX_BATCH_SEQS
                        && tokens + inputs[i].len() <= MAX_INPUT_TOKENS
                    {
                        for (pos, t) in inputs[i].iter().enumerate() {
                            batch
                                .add(*t, pos as i32, &[seqs as i32], true)
                                .expect("sized to MAX_INPUT_TOKENS");
                        }
                        tokens += inputs[i].len();
                        seqs += 1;
                        i += 1;
                    }
                    if let Err(e) = ctx.decode(&mut batch) {
                        failed = Some(format!("decode failed: {e}"));
                        break;
                    }
                    for s in 0..seqs {
                        match ctx.embeddings_seq_ith(s as i32) {
                            Ok(v) => out.push(normalised(v)),
                            Err(e) => {
                                failed = Some(format!("no embedding: {e}"));
                                break;
                            }
                        }
                    }
                }
                let _ = reply.send(match failed {
                    Some(e) => Err(e),
                    None => Ok(out),
                });
            }
        })
        .map_err(|e| e.to_string())?;
    ready_rx.recv().map_err(|e| e.to_string())??;
    Ok(tx)
}

/// Whether the GGUF names its own pooling (`<arch>.pooling_type`, as embedding models such as
/// bge or nomic-embed do): llama.cpp then pools that way. A generative model names none.
fn own_pooling(model: &LlamaModel) -> bool {
    model
        .meta_val_str("general.architecture")
        .ok()
        .and_then(|arch| model.meta_val_str(&format!("{arch}.pooling_type")).ok())
        .and_then(|p| p.parse::<i32>().ok())
        .is_some_and(|p| p > 0)
}

fn normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}
