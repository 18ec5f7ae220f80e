//! Stop strings over a stream of text deltas.
//!
//! A client must never see text that turns out to belong to a stop string: once sent, a streamed
//! chunk cannot be taken back. The matcher therefore holds back the longest tail of the text that
//! is still the beginning of some stop string, and releases it only once it can no longer be part
//! of a match (or at the end of the request). Text before the earliest such tail cannot begin a
//! match whatever comes next, so it is released at once; the held tail is shorter than the longest
//! stop string, so each push costs O(delta + longest) per stop string.

/// What one [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Text that can no longer be part of a stop string: safe to send.
    pub text: String,
    /// A stop string was completed; `text` ends right before it and the request should stop.
    pub stopped: bool,
}

/// Watches a request's generated text for its stop strings, holding back possible beginnings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Received but not released: the longest tail that may still begin a stop string.
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Appends `delta` and returns the text it releases. When a stop string is completed, the text
    /// is cut right before it (the earliest-starting of the stop strings completed; earlier text
    /// holds none, or an earlier push would have stopped) and the held text is dropped.
    pub fn push(&mut self, delta: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: delta.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            self.held.truncate(at);
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.possible_start();
        let rest = self.held.split_off(keep);
        Released {
            text: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// Releases whatever is held: the request ended without a stop string (EOS, length,
    /// cancellation), so the held text is ordinary output.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The earliest byte offset in `held` from which the rest is a proper prefix of a stop string
    /// (`held.len()` when none is). Only character boundaries can start one: a stop string starts
    /// with a whole character.
    fn possible_start(&self) -> usize {
        let bytes = self.held.as_bytes();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let from = bytes.len().saturating_sub(longest.saturating_sub(1));
        (from..bytes.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &bytes[i..];
                self.stops.iter().any(|s| s.as_bytes().starts_with(tail))
            })
            .unwrap_or(bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(text: &str, stopped: bool) -> Released {
        Released {
            text: text.into(),
            stopped,
        }
    }

    /// Pushes every delta; returns the concatenated released text, whether it stopped, and the
    /// released text after each push.
    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool, Vec<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut all = String::new();
        let mut each = Vec::new();
        for d in deltas {
            let r = m.push(d);
            all.push_str(&r.text);
            each.push(r.text);
            if r.stopped {
                return (all, true, each);
            }
        }
        all.push_str(&m.flush());
        (all, false, each)
    }

    #[test]
    fn holds_a_stop_prefix_back_and_cuts_before_the_stop() {
        // A stop string such as "###" arriving one character at a time never reaches the client.
        let mut m = StopMatcher::new(vec!["###".into(), String::new()]);
        assert_eq!(m.push("ok "), released("ok ", false));
        assert_eq!(m.push("#"), released("", false));
        assert_eq!(m.push("#"), released("", false));
        assert_eq!(m.clone().flush(), "##");
        assert_eq!(m.push("#"), released("", true));
        // Spanning deltas, cut inside one.
        let (text, stopped, each) = run(&["END"], &["hello E", "NDing"]);
        assert_eq!((text.as_str(), stopped), ("hello ", true));
        assert_eq!(each, ["hello ", ""]);
        let (text, stopped, _) = run(&["wor"], &["hello world"]);
        assert_eq!((text.as_str(), stopped), ("hello ", true));
    }

    #[test]
    fn releases_held_text_once_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), released("abc ", false));
        assert_eq!(m.push("N"), released("", false));
        // "ENx" can no longer become "END": all of it goes out.
        assert_eq!(m.push("x"), released("ENx", false));
        // A held "E" followed by another "E": the first is released, the second is held.
        assert_eq!(m.push("E"), released("", false));
        assert_eq!(m.push("E"), released("E", false));
        assert_eq!(m.clone().flush(), "E");
        // Without stop strings nothing is ever held.
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("E"), released("E", false));
        assert_eq!(none.flush(), "");
    }

    #[test]
    fn flushes_held_text_when_the_request_ends_otherwise() {
        let (text, stopped, each) = run(&["</s>"], &["a", "b<", "/"]);
        assert!(!stopped);
        assert_eq!(each, ["a", "b", ""]);
        assert_eq!(text, "ab</");
        let mut m = StopMatcher::new(vec!["xyz".into()]);
        m.push("..xy");
        assert_eq!(m.flush(), "xy");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn overlapping_stop_strings() {
        // A stop string that is a prefix of another: the first completed wins.
        let (text, stopped, _) = run(&["abcd", "ab"], &["xa", "b", "cd"]);
        assert_eq!((text.as_str(), stopped), ("x", true));
        // Two completed in the same delta: cut before the earlier start.
        let (text, stopped, _) = run(&["cd", "bcde"], &["ab", "cde"]);
        assert_eq!((text.as_str(), stopped), ("a", true));
        // "bcd" completes before the earlier-starting "abcdz" could.
        let (text, stopped, _) = run(&["abcdz", "bcd"], &["a", "b", "c", "d"]);
        assert_eq!((text.as_str(), stopped), ("a", true));
        // Self-overlap: "aab" in "aaab" starts at 1.
        let (text, stopped, each) = run(&["aab"], &["a", "a", "a", "b"]);
        assert_eq!((text.as_str(), stopped), ("a", true));
        assert_eq!(each, ["", "", "a", ""]);
        // A held tail that is the prefix of one stop string but not of the other.
        let mut m = StopMatcher::new(vec!["<|end|>".into(), "\n\n".into()]);
        assert_eq!(m.push("hi\n<|"), released("hi\n", false));
        assert_eq!(m.push("x"), released("<|x", false));
    }

    #[test]
    fn multi_byte_characters_are_never_split() {
        // A stop string of multi-byte characters, arriving a character at a time.
        let (text, stopped, each) = run(&["€€"], &["5 ", "€", "€", " more"]);
        assert_eq!((text.as_str(), stopped), ("5 ", true));
        assert_eq!(each, ["5 ", "", ""]);
        // "₂" (E2 82 82) shares two bytes with "€" (E2 82 AC) but is not its beginning.
        let mut m = StopMatcher::new(vec!["€x".into()]);
        assert_eq!(m.push("CO₂"), released("CO₂", false));
        assert_eq!(m.push("é€"), released("é", false));
        assert_eq!(m.clone().flush(), "€");
        assert_eq!(m.push("y"), released("€y", false));
        // A stop string starting with a multi-byte character after other multi-byte text.
        let (text, stopped, _) = run(&["日本"], &["こんにちは日", "本語"]);
        assert_eq!((text.as_str(), stopped), ("こんにちは", true));
        let (text, stopped, each) = run(&["語る"], &["日本語"]);
        assert!(!stopped);
        assert_eq!(each, ["日本"]);
        assert_eq!(text, "日本語");
    }

    #[test]
    fn released_text_is_always_a_prefix_of_the_cut_text() {
        // Every split of a text into deltas gives the same result as the whole text at once.
        let full = "the end is near: ##EN# END ###";
        for stops in [
            vec!["###"],
            vec!["END", "#E"],
            vec!["near: #", "is n"],
            vec!["zz"],
        ] {
            let cut = stops
                .iter()
                .filter_map(|s| full.find(s))
                .min()
                .map_or(full, |i| &full[..i]);
            for size in 1..6 {
                let chars: Vec<char> = full.chars().collect();
                let deltas: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
                let d: Vec<&str> = deltas.iter().map(String::as_str).collect();
                let (text, stopped, each) = run(&stops, &d);
                assert_eq!(text, cut, "{stops:?} in deltas of {size}");
                assert_eq!(stopped, cut.len() < full.len());
                let mut so_far = String::new();
                for e in each {
                    so_far.push_str(&e);
                    assert!(cut.starts_with(&so_far), "{stops:?}: sent {so_far:?}");
                }
            }
        }
    }
}
