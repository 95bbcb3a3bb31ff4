//! Which token prefixes the engine keeps the KV of, for reuse by later prompts.
//!
//! A finished (or cancelled) sequence's KV stays in the context under a cache sequence id of its
//! own, up to a budget of tokens; a new prompt starts from the longest cached prefix it shares and
//! decodes only the rest. Multi-turn chat resends the whole conversation every turn, so each turn
//! finds the previous one here. The least recently used entries go first. This module decides
//! what is held; the scheduler moves the KV (`seq_cp`, `seq_rm`) as it says.

use llama_cpp_2::token::LlamaToken;

struct Entry {
    seq: i32,
    tokens: Vec<LlamaToken>,
    used: u64,
}

/// The cache's book of entries: each holds the tokens at positions `0..len` of its sequence id.
pub(super) struct PrefixCache {
    /// Most tokens held over all entries (their cells may be shared; this counts them apart).
    budget: usize,
    held: usize,
    entries: Vec<Entry>,
    free_ids: Vec<i32>,
    clock: u64,
}

/// What a finished sequence's tokens become.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Store {
    /// Copy the KV into this sequence id, after clearing the `evicted` ones.
    Into { seq: i32, evicted: Vec<i32> },
    /// Nothing to keep: an entry already holds these tokens, or they exceed the budget.
    Skip { evicted: Vec<i32> },
}

impl PrefixCache {
    /// `ids` sequence ids (`first..first + ids`) are the cache's own; `budget` tokens at most.
    pub fn new(first: i32, ids: usize, budget: usize) -> Self {
        PrefixCache {
            budget,
            held: 0,
            entries: Vec::new(),
            free_ids: (first..first + ids as i32).rev().collect(),
            clock: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0 && (!self.free_ids.is_empty() || !self.entries.is_empty())
    }

    /// Tokens held over all entries.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The entry sharing the longest prefix with `prompt`, and that length (at least one token).
    pub fn lookup(&mut self, prompt: &[LlamaToken]) -> Option<(i32, usize)> {
        let (i, common) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .max_by_key(|&(i, n)| (n, self.entries[i].used))?;
        if common == 0 {
            return None;
        }
        self.clock += 1;
        self.entries[i].used = self.clock;
        Some((self.entries[i].seq, common))
    }

    /// Books `tokens` (the KV a sequence holds at positions `0..tokens.len()`): an entry that is a
    /// prefix of them is replaced, as the new one offers all it did.
    pub fn store(&mut self, tokens: &[LlamaToken]) -> Store {
        self.clock += 1;
        let mut evicted = Vec::new();
        if tokens.is_empty() || tokens.len() > self.budget {
            return Store::Skip { evicted };
        }
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(tokens))
        {
            e.used = self.clock;
            return Store::Skip { evicted };
        }
        while let Some(i) = self
            .entries
            .iter()
            .position(|e| tokens.starts_with(&e.tokens))
        {
            evicted.push(self.remove(i));
        }
        while self.held + tokens.len() > self.budget || self.free_ids.is_empty() {
            match self.evict_oldest() {
                Some(seq) => evicted.push(seq),
                None => return Store::Skip { evicted },
            }
        }
        let seq = self.free_ids.pop().expect("an id was freed above");
        self.held += tokens.len();
        self.entries.push(Entry {
            seq,
            tokens: tokens.to_vec(),
            used: self.clock,
        });
        Store::Into { seq, evicted }
    }

    /// Drops the least recently used entry; its sequence id, for the caller to clear.
    pub fn evict_oldest(&mut self) -> Option<i32> {
        let i = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used)?;
        Some(self.remove(i))
    }

    /// Drops the entry of sequence `seq` (its KV turned out unusable).
    pub fn forget(&mut self, seq: i32) {
        if let Some(i) = self.entries.iter().position(|e| e.seq == seq) {
            self.remove(i);
        }
    }

    fn remove(&mut self, i: usize) -> i32 {
        let e = self.entries.swap_remove(i);
        self.held -= e.tokens.len();
        self.free_ids.push(e.seq);
        e.seq
    }
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().map(|&i| LlamaToken::new(i)).collect()
    }

    #[test]
    fn the_longest_shared_prefix_wins() {
        let mut c = PrefixCache::new(8, 4, 100);
        assert_eq!(c.lookup(&toks(&[1, 2, 3])), None);
        let Store::Into { seq: a, .. } = c.store(&toks(&[1, 2, 3, 4])) else {
            panic!("stored")
        };
        let Store::Into { seq: b, .. } = c.store(&toks(&[1, 2, 9, 9, 9])) else {
            panic!("stored")
        };
        assert_ne!(a, b);
        assert!((8..12).contains(&a) && (8..12).contains(&b));
        assert_eq!(c.lookup(&toks(&[1, 2, 3, 4, 5])), Some((a, 4)));
        assert_eq!(c.lookup(&toks(&[1, 2, 9, 7])), Some((b, 3)));
        assert_eq!(c.lookup(&toks(&[5])), None);
        assert_eq!(c.held(), 9);
    }

    #[test]
    fn a_longer_turn_replaces_its_prefix_and_a_held_prefix_is_not_stored_twice() {
        let mut c = PrefixCache::new(0, 4, 100);
        let Store::Into { seq: a, .. } = c.store(&toks(&[1, 2])) else {
            panic!()
        };
        assert_eq!(
            c.store(&toks(&[1, 2, 3])),
            Store::Into {
                seq: a,
                evicted: vec![a]
            }
        );
        assert_eq!(c.held(), 3);
        assert_eq!(c.store(&toks(&[1, 2])), Store::Skip { evicted: vec![] });
        assert_eq!(c.held(), 3);
    }

    #[test]
    fn the_budget_and_the_ids_evict_the_least_recently_used() {
        let mut c = PrefixCache::new(0, 2, 10);
        let Store::Into { seq: a, .. } = c.store(&toks(&[1; 4])) else {
            panic!()
        };
        let Store::Into { seq: b, .. } = c.store(&toks(&[2; 4])) else {
            panic!()
        };
        // `a` is used again: `b` is now the oldest, and a third entry needs an id.
        assert!(c.lookup(&toks(&[1, 1])).is_some());
        let Store::Into { evicted, .. } = c.store(&toks(&[3; 2])) else {
            panic!()
        };
        assert_eq!(evicted, vec![b]);
        // 4 + 2 held; 6 more exceed the budget of 10: the oldest (`a`) goes.
        let Store::Into { evicted, .. } = c.store(&toks(&[4; 6])) else {
            panic!()
        };
        assert_eq!(evicted, vec![a]);
        assert_eq!(c.held(), 8);
        // More than the whole budget is never held.
        assert_eq!(c.store(&toks(&[5; 11])), Store::Skip { evicted: vec![] });
        assert!(c.evict_oldest().is_some());
        assert!(c.evict_oldest().is_some());
        assert_eq!(c.evict_oldest(), None);
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn a_zero_budget_is_off() {
        let mut c = PrefixCache::new(0, 4, 0);
        assert!(!c.enabled());
        assert_eq!(c.store(&toks(&[1])), Store::Skip { evicted: vec![] });
    }
}
