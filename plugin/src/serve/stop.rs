//! Stop strings: finds the first stop string in the text generated so far.

/// Watches a request's generated text for its stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    longest: usize,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher {
            stops,
            text: String::new(),
            longest,
        }
    }

    /// Appends `delta`; when a stop string now appears, returns how many bytes of `delta` to keep
    /// (the text is cut right before the stop string).
    pub fn push(&mut self, delta: &str) -> Option<usize> {
        if self.stops.is_empty() || delta.is_empty() {
            return None;
        }
        let before = self.text.len();
        self.text.push_str(delta);
        // Only a match ending inside `delta` is new: search from `longest` bytes before it.
        let mut from = before.saturating_sub(self.longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()?;
        Some(hit.saturating_sub(before))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_before_a_stop_string_spanning_deltas() {
        let mut m = StopMatcher::new(vec!["END".into(), String::new()]);
        assert_eq!(m.push("hello E"), None);
        assert_eq!(m.push("NDing"), Some(0));
        let mut m = StopMatcher::new(vec!["lo".into()]);
        assert_eq!(m.push("hel"), None);
        assert_eq!(m.push("lo world"), Some(0));
        let mut m = StopMatcher::new(vec!["wor".into()]);
        assert_eq!(m.push("hello world"), Some(6));
        assert_eq!(StopMatcher::new(vec![]).push("x"), None);
    }
}
