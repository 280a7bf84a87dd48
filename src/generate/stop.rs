//! Stop strings: the answer ends just before the first occurrence of any of them, and text
//! that might be the start of one is held back from the stream until it is known not to be.

/// Tracks the answer's text against a list of stop strings.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl StopText {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopText {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    /// Add a piece of the answer; returns the text that can be streamed now (possibly empty)
    /// and whether a stop string has been completed (the text then ends before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let search_from = floor_boundary(&self.text, self.emitted.saturating_sub(longest));
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min()
            .map(|at| search_from + at);
        if let Some(at) = hit {
            self.text.truncate(at);
            self.stopped = true;
            return (self.take(self.text.len()), true);
        }
        let held = self.held_back();
        (self.take(self.text.len() - held), false)
    }

    /// The text not streamed yet (held back as a possible stop-string start), at the end of
    /// the answer.
    pub fn flush(&mut self) -> String {
        self.take(self.text.len())
    }

    /// The answer so far, cut before a stop string if one was found.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    fn take(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > best && self.text.ends_with(&s[..k]) {
                    best = k;
                }
            }
        }
        best
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopText::new(&stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (emit, hit) = m.push(p);
            out.push(emit);
            if hit {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push(m.flush());
        }
        (out, m.text().to_string(), stopped)
    }

    #[test]
    fn the_answer_ends_before_a_stop_string_split_over_pieces() {
        let (out, text, stopped) = run(&["END"], &["a cat E", "N", "D and more"]);
        assert!(stopped);
        assert_eq!(text, "a cat ");
        assert_eq!(out, vec!["a cat ", "", ""]);
    }

    #[test]
    fn a_false_start_is_released() {
        let (out, text, stopped) = run(&["END"], &["a cat E", "x", " dog"]);
        assert!(!stopped);
        assert_eq!(text, "a cat Ex dog");
        assert_eq!(out.concat(), text);
        assert_eq!(out[0], "a cat ", "the possible start is held back");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (_, text, stopped) = run(&["dog", "; "], &["cat ; dog"]);
        assert!(stopped);
        assert_eq!(text, "cat ");
    }

    #[test]
    fn multibyte_text_and_no_stops() {
        let (out, text, stopped) = run(&[], &["é猫", "🐈"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "é猫🐈");
        assert_eq!(text, "é猫🐈");
        let (_, text, stopped) = run(&["猫🐈"], &["é猫", "🐈 x"]);
        assert!(stopped);
        assert_eq!(text, "é");
    }
}
