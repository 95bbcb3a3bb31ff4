//! The engine thread: owns the llama.cpp context and runs continuous batching.
//!
//! Each decode step carries the next token of every generating sequence, then prompt chunks of
//! newly admitted ones with whatever room is left in the batch, so a long prompt never stalls the
//! others. A sequence that finishes, fails or is cancelled (its receiver dropped) frees its KV
//! cache at once and its slot takes the next queued job.
//!
//! Every call into llama.cpp is checked first: more tokens than `n_batch` in one decode, or
//! sampling an index that did not ask for logits, aborts the whole process.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use llguidance::Matcher;
use tokio::sync::{mpsc, oneshot};

use super::prefix::{PrefixCache, Store};
use super::text::{Released, StopMatcher, Utf8Buffer};
use super::{n_ctx, EngineConfig, Event, FinishReason, Job, Sampling, Stats};

struct Seq {
    id: i32,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens whose KV came from the prefix cache.
    cached: usize,
    /// Every token decoded into this sequence's KV so far, position by position: the prompt's
    /// fed part, then the generated tokens fed back.
    decoded: Vec<LlamaToken>,
    /// Prompt tokens already decoded.
    fed: usize,
    /// Position of the next token to decode.
    pos: i32,
    /// A sampled token waiting to be decoded.
    next: Option<LlamaToken>,
    /// Where this sequence's logits are in the current batch.
    logits_at: Option<i32>,
    /// `None` for plain greedy decoding (temperature 0, no penalties).
    sampler: Option<LlamaSampler>,
    /// What the output must follow (`response_format`).
    grammar: Option<Matcher>,
    /// Alternatives per token when log-probabilities are asked for, and the temperature they
    /// are taken at.
    logprobs: Option<(u8, f32)>,
    /// Log-probabilities of tokens whose text has not been sent yet.
    pending_logprobs: Vec<crate::api::TokenLogprob>,
    events: mpsc::Sender<Event>,
    generated: u32,
    max_tokens: u32,
    utf8: Utf8Buffer,
    stop: StopMatcher,
    /// When the job was queued; cleared once its first token is timed.
    submitted: Option<std::time::Instant>,
    /// Which of the request's `n` choices this is (0: the one that decodes the prompt).
    index: u8,
    /// The slots of the other choices, forked from this one once its prompt is decoded.
    followers: Vec<usize>,
}

pub(super) fn run(
    backend: &'static LlamaBackend,
    model: Arc<LlamaModel>,
    cfg: EngineConfig,
    n_swa: i32,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<Stats>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let threads = match cfg.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
        n => n as i32,
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(n_ctx(&cfg))
        .with_n_batch(cfg.batch_size)
        .with_n_ubatch(cfg.batch_size)
        .with_n_seq_max(cfg.slots + cache_ids(&cfg) as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_kv_unified(true);
    let mut ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot create the context: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let vocab = model.vocab();
    let budget_max = cfg.batch_size as usize;
    let mut batch = LlamaBatch::new(budget_max, 1);
    // Sequence ids past the slots' hold the prefix cache's entries.
    let mut cache = PrefixCache::new(
        cfg.slots as i32,
        cache_ids(&cfg),
        cfg.prefix_cache_tokens as usize,
    );
    let mut slots: Vec<Option<Seq>> = (0..cfg.slots).map(|_| None).collect();
    // Admission order, so earlier prompts get their chunks first.
    let mut order: Vec<usize> = Vec::new();
    // A job of several choices waiting for enough free slots.
    let mut held: Option<Job> = None;

    loop {
        // Admit queued jobs into free slots; sleep only when nothing runs. A job of `n` choices
        // waits (holding the queue's head) until `n` slots are free.
        loop {
            let free_count = slots.iter().filter(|s| s.is_none()).count();
            if free_count == 0 {
                break;
            }
            let job = match held.take() {
                Some(j) => j,
                None if order.is_empty() => match jobs.blocking_recv() {
                    Some(j) => j,
                    None => return,
                },
                None => match jobs.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                },
            };
            let n = usize::from(job.prepared.n.max(1));
            if n > free_count {
                held = Some(job);
                break;
            }
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if job.events.try_send(Event::Started).is_err() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut p = job.prepared;
            // Every choice its own matcher, all at the start of the output: the compiled one
            // for the first, copies for the others of `n`.
            let mut grammars: Vec<Option<Matcher>> = (1..n)
                .map(|_| p.grammar.as_ref().map(Matcher::deep_clone))
                .collect();
            grammars.insert(0, p.grammar.take());
            stats
                .prompt_tokens
                .fetch_add(p.tokens.len() as u64, Ordering::Relaxed);
            let free_slots: Vec<usize> = (0..slots.len())
                .filter(|i| slots[*i].is_none())
                .take(n)
                .collect();
            let leader = free_slots[0];
            let id = leader as i32;
            let cached = reuse_prefix(&mut ctx, &mut cache, n_swa, id, &p.tokens);
            stats
                .cached_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            for (k, (slot, grammar)) in free_slots.iter().zip(grammars).enumerate() {
                stats.active.fetch_add(1, Ordering::Relaxed);
                // Each choice its own seed: different choices, one reproducible request.
                let mut sampling = p.sampling.clone();
                sampling.seed = sampling.seed.wrapping_add(k as u32);
                let lead = k == 0;
                slots[*slot] = Some(Seq {
                    id: *slot as i32,
                    cached: if lead { cached } else { 0 },
                    // A follower's KV and position come from the leader when it forks.
                    decoded: if lead {
                        p.tokens[..cached].to_vec()
                    } else {
                        Vec::new()
                    },
                    prompt: p.tokens.clone(),
                    fed: if lead { cached } else { p.tokens.len() },
                    pos: if lead { cached as i32 } else { 0 },
                    next: None,
                    logits_at: None,
                    sampler: sampler(&sampling, model.n_vocab()),
                    grammar,
                    logprobs: p.logprobs.map(|n| (n, p.sampling.temperature)),
                    pending_logprobs: Vec::new(),
                    events: job.events.clone(),
                    generated: 0,
                    max_tokens: p.max_tokens,
                    utf8: Utf8Buffer::default(),
                    stop: StopMatcher::new(p.stop.clone()),
                    submitted: lead.then_some(job.submitted),
                    index: k as u8,
                    followers: if lead {
                        free_slots[1..].to_vec()
                    } else {
                        Vec::new()
                    },
                });
                order.push(*slot);
            }
        }

        // Free the slots of cancelled sequences.
        for &i in &order {
            if slots[i].as_ref().is_some_and(|s| s.events.is_closed()) {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                free(&mut ctx, &mut slots[i], &stats, Some(&mut cache));
            }
        }
        order.retain(|&i| slots[i].is_some());
        if order.is_empty() {
            continue;
        }

        // Build one batch: every generating sequence's next token, then prompt chunks.
        batch.clear();
        let mut budget = budget_max;
        for &i in &order {
            let seq = slots[i].as_mut().expect("ordered slots are occupied");
            if let Some(tok) = seq.next.take() {
                batch
                    .add(tok, seq.pos, &[seq.id], true)
                    .expect("budget checked");
                seq.decoded.push(tok);
                seq.logits_at = Some(batch.n_tokens() - 1);
                seq.pos += 1;
                budget -= 1;
            }
        }
        // Leaders whose prompt ends in this batch, and the row of its logits.
        let mut forks: Vec<(usize, i32)> = Vec::new();
        for &i in &order {
            if budget == 0 {
                break;
            }
            let seq = slots[i].as_mut().expect("ordered slots are occupied");
            let left = seq.prompt.len() - seq.fed;
            if left == 0 {
                continue;
            }
            let n = left.min(budget);
            for k in 0..n {
                let last = seq.fed + k + 1 == seq.prompt.len();
                batch
                    .add(seq.prompt[seq.fed + k], seq.pos, &[seq.id], last)
                    .expect("budget checked");
                if last {
                    seq.logits_at = Some(batch.n_tokens() - 1);
                    if !seq.followers.is_empty() {
                        forks.push((i, batch.n_tokens() - 1));
                    }
                }
                seq.pos += 1;
            }
            seq.decoded
                .extend_from_slice(&seq.prompt[seq.fed..seq.fed + n]);
            seq.fed += n;
            budget -= n;
        }
        if batch.n_tokens() == 0 {
            continue;
        }

        super::stall_for_fault_injection();
        let mut decoded = ctx.decode(&mut batch);
        // The cache's entries fill cells the slots may need: give them back, oldest first.
        while matches!(decoded, Err(DecodeError::NoKvCacheSlot)) {
            let Some(seq) = cache.evict_oldest() else {
                break;
            };
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            decoded = ctx.decode(&mut batch);
        }
        stats
            .cache_held_tokens
            .store(cache.held() as u64, Ordering::Relaxed);
        if let Err(e) = decoded {
            tracing::error!(error = %e, tokens = batch.n_tokens(), "decode failed");
            for &i in &order {
                if let Some(seq) = slots[i].as_ref() {
                    let _ = seq
                        .events
                        .try_send(Event::Error(format!("decode failed: {e}")));
                }
                free(&mut ctx, &mut slots[i], &stats, None);
            }
            order.clear();
            continue;
        }
        stats.decode_steps.fetch_add(1, Ordering::Relaxed);

        // The other choices fork from their leader: its prompt's KV (shared cells), its position,
        // and its logits row, which each samples with its own sampler below.
        for (leader, row) in forks {
            let (id, pos, decoded, followers) = {
                let l = slots[leader].as_mut().expect("a forking leader");
                (
                    l.id,
                    l.pos,
                    l.decoded.clone(),
                    std::mem::take(&mut l.followers),
                )
            };
            for f in followers {
                if let Some(seq) = slots[f].as_mut() {
                    let _ = ctx.copy_kv_cache_seq(id, seq.id, None, None);
                    seq.pos = pos;
                    seq.decoded = decoded.clone();
                    seq.logits_at = Some(row);
                }
            }
        }

        // Sample where logits were asked for; finish what is done.
        for &i in &order {
            let seq = slots[i].as_mut().expect("ordered slots are occupied");
            let Some(at) = seq.logits_at.take() else {
                continue;
            };
            let token = match (seq.grammar.as_mut(), seq.sampler.as_mut()) {
                (Some(g), chain) => {
                    let logits = ctx.get_logits_ith(at);
                    match super::grammar::constrained(logits, g, chain, |t| vocab.is_eog(t)) {
                        Ok(t) => t,
                        Err(e) => {
                            if let Some(seq) = free(&mut ctx, &mut slots[i], &stats, None) {
                                let _ = seq.events.try_send(of(seq.index, Event::Error(e)));
                            }
                            continue;
                        }
                    }
                }
                (None, Some(s)) => s.sample(&ctx, at),
                // Plain greedy: the arg-max of the logits, without building llama.cpp's
                // candidate array over the whole vocabulary (262k entries) for every token.
                (None, None) => argmax(ctx.get_logits_ith(at)),
            };
            if let Some((top, temperature)) = seq.logprobs {
                if !vocab.is_eog(token) {
                    let entry = logprob_of(ctx.get_logits_ith(at), token, top, temperature, |t| {
                        vocab.token_to_piece(t, false, None)
                    });
                    seq.pending_logprobs.push(entry);
                }
            }
            if let Some(t) = seq.submitted.take() {
                if let Ok(mut h) = stats.ttft.lock() {
                    h.observe(t.elapsed().as_secs_f64());
                }
            }
            let finished = if vocab.is_eog(token) {
                Some(FinishReason::Stop)
            } else {
                seq.generated += 1;
                stats.completion_tokens.fetch_add(1, Ordering::Relaxed);
                let piece = vocab.token_to_piece(token, false, None);
                let text = seq.utf8.push(&piece);
                match seq.stop.push(&text) {
                    Released::Stop(before) => {
                        send(seq, before);
                        Some(FinishReason::Stop)
                    }
                    Released::Text(t) => {
                        send(seq, t);
                        if seq.generated >= seq.max_tokens {
                            Some(FinishReason::Length)
                        } else {
                            seq.next = Some(token);
                            None
                        }
                    }
                }
            };
            if let Some(reason) = finished {
                if reason == FinishReason::Length || vocab.is_eog(token) {
                    let rest = seq.utf8.finish();
                    let held = seq.stop.push(&rest);
                    let tail = match held {
                        Released::Text(t) | Released::Stop(t) => t + &seq.stop.finish(),
                    };
                    send(seq, tail);
                }
                let done = Event::Done {
                    finish_reason: reason,
                    prompt_tokens: seq.prompt.len() as u32,
                    completion_tokens: seq.generated,
                    cached_tokens: seq.cached as u32,
                };
                // Count and free first: a client that has its answer reads settled statistics.
                stats.completed.fetch_add(1, Ordering::Relaxed);
                if let Some(mut seq) = free(&mut ctx, &mut slots[i], &stats, Some(&mut cache)) {
                    flush_logprobs(&mut seq);
                    let _ = seq.events.try_send(of(seq.index, done));
                }
            }
        }
        order.retain(|&i| slots[i].is_some());
    }
}

/// Sends a text delta; a consumer that cannot keep up is treated as gone.
fn send(seq: &mut Seq, text: String) {
    if text.is_empty() {
        return;
    }
    flush_logprobs(seq);
    if seq
        .events
        .try_send(of(seq.index, Event::Delta(text)))
        .is_err()
    {
        tracing::warn!(
            seq = seq.id,
            "event receiver full or gone; cancelling the sequence"
        );
        let (closed, _) = mpsc::channel(1);
        seq.events = closed;
    }
}

/// An event of choice `index` (the first choice's go as they are).
fn of(index: u8, event: Event) -> Event {
    match index {
        0 => event,
        i => Event::Choice(i, Box::new(event)),
    }
}

/// Sends the log-probabilities of the tokens whose text is about to go out.
fn flush_logprobs(seq: &mut Seq) {
    if !seq.pending_logprobs.is_empty() {
        let tokens = std::mem::take(&mut seq.pending_logprobs);
        let _ = seq.events.try_send(of(seq.index, Event::Logprobs(tokens)));
    }
}

/// The log-probability of `token` and the `top` most likely tokens at a position, under the
/// model's distribution at `temperature` (the distribution the sampler draws from before top-k,
/// top-p and min-p cut it; temperature 0, greedy, reports the model's own, temperature 1).
fn logprob_of(
    logits: &[f32],
    token: LlamaToken,
    top: u8,
    temperature: f32,
    piece: impl Fn(LlamaToken) -> Vec<u8>,
) -> crate::api::TokenLogprob {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, l| m.max(*l)) / t;
    let sum: f64 = logits.iter().map(|l| f64::from(l / t - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |i: usize| (f64::from(logits[i] / t) - log_z) as f32;
    let text = |tok: LlamaToken| {
        let bytes = piece(tok);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = usize::from(top).min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, |a, b| logits[*b].total_cmp(&logits[*a]));
    }
    let mut best: Vec<usize> = order[..k].to_vec();
    best.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    let (token_text, bytes) = text(token);
    crate::api::TokenLogprob {
        token: token_text,
        logprob: lp(token.0 as usize),
        bytes,
        top: best
            .into_iter()
            .map(|i| {
                let (token, bytes) = text(LlamaToken::new(i as i32));
                crate::api::TopLogprob {
                    token,
                    logprob: lp(i),
                    bytes,
                }
            })
            .collect(),
    }
}

/// Frees a slot's KV cache and counts it inactive; hands back its sequence, whose receiver may
/// still need the last event. With `cache`, what the sequence decoded is kept there first.
fn free(
    ctx: &mut LlamaContext<'_>,
    slot: &mut Option<Seq>,
    stats: &Stats,
    cache: Option<&mut PrefixCache>,
) -> Option<Seq> {
    let seq = slot.take()?;
    if let Some(cache) = cache {
        let (into, evicted) = match cache.store(&seq.decoded) {
            Store::Into { seq, evicted } => (Some(seq), evicted),
            Store::Skip { evicted } => (None, evicted),
        };
        for e in evicted {
            let _ = ctx.clear_kv_cache_seq(Some(e as u32), None, None);
        }
        if let Some(entry) = into {
            // In a unified KV cache a copy shares the cells: no data moves.
            let _ = ctx.copy_kv_cache_seq(seq.id, entry, None, None);
        }
        stats
            .cache_held_tokens
            .store(cache.held() as u64, Ordering::Relaxed);
    }
    let _ = ctx.clear_kv_cache_seq(Some(seq.id as u32), None, None);
    stats.active.fetch_sub(1, Ordering::Relaxed);
    Some(seq)
}

/// Sequence ids the prefix cache may use: as many as llama.cpp allows past the slots, at most 64.
fn cache_ids(cfg: &EngineConfig) -> usize {
    if cfg.prefix_cache_tokens == 0 {
        return 0;
    }
    (256usize.saturating_sub(cfg.slots as usize)).min(64)
}

/// Starts slot `id` from the longest cached prefix of `prompt` and returns its length (0: none).
/// At least the prompt's last token is decoded again, for its logits. A sliding-window model's
/// window layers may have given the oldest cells of an entry to other sequences: its prefix is
/// only usable when the `n_swa` positions before the cut are still held.
fn reuse_prefix(
    ctx: &mut LlamaContext<'_>,
    cache: &mut PrefixCache,
    n_swa: i32,
    id: i32,
    prompt: &[LlamaToken],
) -> usize {
    if !cache.enabled() || prompt.len() < 2 {
        return 0;
    }
    let Some((entry, common)) = cache.lookup(&prompt[..prompt.len() - 1]) else {
        return 0;
    };
    if n_swa > 0 {
        let held_from = ctx.kv_cache_seq_pos_min(entry);
        if held_from < 0 || held_from > (common as i32 - n_swa).max(0) {
            tracing::debug!(entry, held_from, common, "cached prefix outside the window");
            return 0;
        }
    }
    if ctx
        .copy_kv_cache_seq(entry, id, Some(0), Some(common as u32))
        .is_err()
    {
        cache.forget(entry);
        let _ = ctx.clear_kv_cache_seq(Some(entry as u32), None, None);
        return 0;
    }
    common
}

/// The highest logit's token (the first on ties, as llama.cpp's greedy sampler picks).
pub(super) fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    LlamaToken::new(best as i32)
}

/// One sampler chain per sequence; `None` for plain greedy, which needs no chain.
fn sampler(s: &Sampling, n_vocab: i32) -> Option<LlamaSampler> {
    let penalties =
        s.repetition_penalty != 1.0 || s.presence_penalty != 0.0 || s.frequency_penalty != 0.0;
    if s.temperature <= 0.0 && !penalties {
        return None;
    }
    let mut chain = Vec::new();
    if penalties {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            64,
            s.repetition_penalty,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed));
    }
    Some(LlamaSampler::chain_simple(chain))
}
