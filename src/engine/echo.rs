//! `generator = "echo"`: a stand-in for the model, for tests of the mesh and its faults that do
//! not test inference, and for measuring the mesh alone. It loads no model and is not one: it
//! never pretends to be (it logs a warning at start, and `/v1/engine/stats` reports
//! `"generator": "echo"` through the worker's logs only — the API is the same as the real engine's).
//!
//! What it keeps of a real engine: the same [`Generate`] contract, `slots` sequences at once with
//! a bounded queue (429 beyond it), the context check with the same error, stop strings held back
//! like the engine's, `Started`/delta/`Done` events with token counts, cancellation when the
//! receiver is dropped, and the counters a stall is judged on. Its "tokens" are whitespace-split
//! words; its output is a deterministic function of the prompt (and of the seed when sampling),
//! one word every `token_delay`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};

use super::text::{Released, StopMatcher};
use super::{fit, EngineError, Event, Generate, Generation, Stats};
use crate::api::{FinishReason, Prompt, StatsSnapshot, ValidGenerate};

/// Words the echo generator writes.
const WORDS: [&str; 16] = [
    "mesh",
    "token",
    "worker",
    "gateway",
    "stream",
    "batch",
    "slot",
    "echo",
    "route",
    "state",
    "grant",
    "trigger",
    "heartbeat",
    "kernel",
    "decode",
    "prompt",
];

#[derive(Debug, Clone)]
pub struct EchoConfig {
    pub model_id: String,
    pub slots: u32,
    pub ctx_per_slot: u32,
    pub max_queued: usize,
    /// Time per generated word.
    pub token_delay: Duration,
    pub stall_limit: Duration,
}

#[derive(Clone)]
pub struct Echo {
    config: Arc<EchoConfig>,
    slots: Arc<Semaphore>,
    stats: Arc<Stats>,
}

impl Echo {
    pub fn new(config: EchoConfig) -> Echo {
        tracing::warn!(
            model_id = %config.model_id,
            "serving the echo generator: deterministic filler text, not a model (generator = \"echo\")"
        );
        Echo {
            slots: Arc::new(Semaphore::new(config.slots as usize)),
            config: Arc::new(config),
            stats: Arc::new(Stats::default()),
        }
    }
}

/// The prompt's words: for chat, each message's role and content, as a template would.
fn prompt_words(prompt: &Prompt) -> Vec<&str> {
    match prompt {
        Prompt::Text { text } => text.split_whitespace().collect(),
        Prompt::Chat { messages } => messages
            .iter()
            .flat_map(|m| std::iter::once(m.role.as_str()).chain(m.content.split_whitespace()))
            .collect(),
    }
}

/// FNV-1a: a stable hash (std's is randomly keyed per process).
fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Generate for Echo {
    fn model_id(&self) -> &str {
        &self.config.model_id
    }

    fn model_info(&self) -> crate::api::ModelInfo {
        crate::api::ModelInfo {
            id: self.config.model_id.clone(),
            context_length: self.config.ctx_per_slot,
            // No model: nothing else is known, and nothing pretends to be.
            ..crate::api::ModelInfo::default()
        }
    }

    fn generate(&self, request: &ValidGenerate) -> Result<Generation, EngineError> {
        let words = prompt_words(request.prompt());
        if words.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if request.format().is_some() || request.logprobs().is_some() || request.n() > 1 {
            return Err(EngineError::Invalid(
                "response_format, logprobs and n > 1 need a model: the echo generator writes filler words"
                    .into(),
            ));
        }
        // One "beginning of text" token, like the real tokenizer's.
        let prompt_tokens = words.len() as u32 + 1;
        let budget = fit(
            self.config.ctx_per_slot,
            prompt_tokens,
            request.max_tokens(),
        )?;
        let queued = self.stats.queued.load(Ordering::Relaxed) as usize;
        if queued >= self.config.max_queued {
            return Err(EngineError::Overloaded {
                queued: self.config.max_queued,
            });
        }
        let sampling = request.sampling();
        let mut seed = fnv(words.iter().flat_map(|w| w.bytes()), 0xcbf2_9ce4_8422_2325);
        if sampling.temperature > 0.0 {
            seed = fnv(sampling.seed.to_le_bytes(), seed);
        }
        let stops = request.stop().to_vec();
        let (tx, events) = mpsc::channel(256);
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            echo: self.clone(),
            tx,
            seed,
            budget,
            prompt_tokens,
            stops,
        };
        tokio::runtime::Handle::current().spawn(job.run());
        Ok(Generation {
            prompt_tokens,
            events,
        })
    }

    fn snapshot(&self) -> StatsSnapshot {
        let c = &self.config;
        self.stats.snapshot(&c.model_id, c.slots, c.ctx_per_slot)
    }

    fn progress(&self) -> crate::liveness::Progress {
        self.stats.progress()
    }

    fn stall_limit(&self) -> Duration {
        self.config.stall_limit
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

struct Job {
    echo: Echo,
    tx: mpsc::Sender<Event>,
    seed: u64,
    budget: u32,
    prompt_tokens: u32,
    stops: Vec<String>,
}

impl Job {
    async fn run(self) {
        let stats = &self.echo.stats;
        let submitted = Instant::now();
        let permit = tokio::select! {
            p = self.echo.slots.acquire() => p.ok(),
            _ = self.tx.closed() => None,
        };
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        let Some(_permit) = permit else {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        };
        stats.active.fetch_add(1, Ordering::Relaxed);
        let finished = self.generate(submitted).await;
        stats.active.fetch_sub(1, Ordering::Relaxed);
        let counter = if finished {
            &stats.completed
        } else {
            &stats.cancelled
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers whether it ran to the end (rather than being cancelled).
    async fn generate(&self, submitted: Instant) -> bool {
        let stats = &self.echo.stats;
        if self.tx.send(Event::Started).await.is_err() {
            return false;
        }
        stats
            .prompt_tokens
            .fetch_add(u64::from(self.prompt_tokens), Ordering::Relaxed);
        let mut stop = StopMatcher::new(self.stops.clone());
        let mut state = self.seed;
        let mut finish = FinishReason::Length;
        let mut completion = 0;
        while completion < self.budget {
            tokio::time::sleep(self.echo.config.token_delay).await;
            state = fnv(completion.to_le_bytes(), state);
            let word = WORDS[(state >> 60) as usize];
            completion += 1;
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats.completion_tokens.fetch_add(1, Ordering::Relaxed);
            if completion == 1 {
                if let Ok(mut h) = stats.ttft.lock() {
                    h.observe(submitted.elapsed().as_secs_f64());
                }
            }
            let (text, last) = match stop.push(&format!(" {word}")) {
                Released::Text(t) => (t, false),
                Released::Stop(t) => (t, true),
            };
            if !text.is_empty() && self.tx.send(Event::Delta(text)).await.is_err() {
                return false;
            }
            if last {
                finish = FinishReason::Stop;
                break;
            }
        }
        let held = stop.finish();
        if !held.is_empty() && self.tx.send(Event::Delta(held)).await.is_err() {
            return false;
        }
        let done = Event::Done {
            finish_reason: finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            // The stand-in keeps no KV: nothing is cached.
            cached_tokens: 0,
        };
        self.tx.send(done).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GenerateRequest, Sampling};

    fn echo(slots: u32, max_queued: usize) -> Echo {
        Echo::new(EchoConfig {
            model_id: "echo-test".into(),
            slots,
            ctx_per_slot: 32,
            max_queued,
            token_delay: Duration::from_millis(1),
            stall_limit: Duration::from_secs(15),
        })
    }

    fn request(text: &str, max_tokens: Option<u32>, stop: &[&str]) -> ValidGenerate {
        ValidGenerate::try_from(GenerateRequest {
            model: None,
            prompt: Prompt::Text { text: text.into() },
            max_tokens,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            sampling: Sampling {
                temperature: 0.0,
                ..Sampling::default()
            },
            format: None,
            logprobs: None,
            n: 1,
        })
        .unwrap()
    }

    async fn run(g: &Echo, r: &ValidGenerate) -> (String, Event) {
        let mut events = g.generate(r).unwrap().events;
        assert_eq!(events.recv().await, Some(Event::Started));
        let mut text = String::new();
        loop {
            match events.recv().await.unwrap() {
                Event::Delta(t) => text.push_str(&t),
                last => return (text, last),
            }
        }
    }

    #[tokio::test]
    async fn the_same_request_gives_the_same_words_and_counts() {
        let g = echo(2, 4);
        let r = request("one two three", Some(5), &[]);
        let (a, done) = run(&g, &r).await;
        let (b, _) = run(&g, &r).await;
        assert_eq!(a, b);
        assert_eq!(a.split_whitespace().count(), 5);
        assert_eq!(
            done,
            Event::Done {
                finish_reason: FinishReason::Length,
                prompt_tokens: 4,
                completion_tokens: 5,
                cached_tokens: 0,
            }
        );
        let (other, _) = run(&g, &request("four five six", Some(5), &[])).await;
        assert_ne!(a, other);
        assert_eq!(g.snapshot().completed, 3);
    }

    #[tokio::test]
    async fn a_stop_string_ends_the_text_before_it() {
        let g = echo(1, 4);
        let (full, _) = run(&g, &request("one two three", Some(8), &[])).await;
        let third = full.split_whitespace().nth(2).unwrap().to_string();
        let r = request("one two three", Some(8), &[&third]);
        let (cut, done) = run(&g, &r).await;
        assert!(
            full.starts_with(&cut) && !cut.contains(&third),
            "{full} / {cut}"
        );
        assert!(matches!(
            done,
            Event::Done {
                finish_reason: FinishReason::Stop,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn the_context_and_the_queue_are_limits() {
        let g = echo(1, 1);
        let long = vec!["w"; 40].join(" ");
        assert!(matches!(
            g.generate(&request(&long, Some(1), &[])),
            Err(EngineError::ContextLength { limit: 32, .. })
        ));
        let busy = g.generate(&request("a", Some(20), &[])).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let waiting = g.generate(&request("b", Some(20), &[])).unwrap();
        // One running, one queued: the queue (1) is full.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(
            g.generate(&request("c", Some(2), &[])),
            Err(EngineError::Overloaded { .. })
        ));
        drop((busy, waiting));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = g.snapshot();
        assert_eq!((s.active_sequences, s.queued_sequences), (0, 0));
        assert_eq!(s.cancelled, 2);
    }
}
