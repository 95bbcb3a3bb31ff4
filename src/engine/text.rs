//! Turning token pieces into text safely: UTF-8 characters split across tokens are held until
//! complete, and text that might be the start of a stop string is held until it is known not to be.

/// Accumulates token bytes and releases only whole UTF-8 characters.
#[derive(Default)]
pub struct Utf8Buffer {
    pending: Vec<u8>,
}

impl Utf8Buffer {
    /// Adds a token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("valid prefix"),
                    );
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be valid: replace them, go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end of generation (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Holds back text that could still turn into a stop string.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What the matcher lets out after new text.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// Text safe to send; generation goes on.
    Text(String),
    /// A stop string was found: the text before it, and generation ends.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let before = self.held[..at].to_string();
            self.held.clear();
            return Released::Stop(before);
        }
        // Keep the longest tail of `held` that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released::Text(out)
    }

    /// Text still held when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a prefix of `stop` (shorter than `stop`),
/// on a character boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop
                    .as_bytes()
                    .starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_across_tokens_comes_out_whole() {
        let mut b = Utf8Buffer::default();
        let bytes = "é🍎".as_bytes();
        let mut out = String::new();
        for byte in bytes {
            out.push_str(&b.push(&[*byte]));
        }
        assert_eq!(out, "é🍎");
        assert_eq!(b.push(&[0xF0, 0x9F]), "");
        assert_eq!(b.finish(), "\u{FFFD}");
        assert_eq!(b.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
    }

    #[test]
    fn stop_strings_are_held_back_then_cut() {
        let mut m = StopMatcher::new(vec!["STOP".into(), "\n\n".into()]);
        assert_eq!(m.push("hello S"), Released::Text("hello ".into()));
        assert_eq!(m.push("T"), Released::Text("".into()));
        assert_eq!(m.push("x"), Released::Text("STx".into()));
        assert_eq!(m.push(" end\n"), Released::Text(" end".into()));
        assert_eq!(m.push("\nmore"), Released::Stop("".into()));
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xxa"), Released::Text("xx".into()));
        assert_eq!(m.finish(), "a");
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("caféé"), Released::Text("café".into()));
        assert_eq!(m.push("!"), Released::Stop("".into()));
    }

    #[test]
    fn no_stops_releases_everything() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("abc"), Released::Text("abc".into()));
    }
}
