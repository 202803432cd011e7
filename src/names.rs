//! Names that came from other nodes (party, player and host names) end up on terminals and web
//! pages. One rule says which characters are unsafe there, for every place that cleans,
//! checks or prints them: control characters (terminal escapes) and the Unicode bidirectional
//! controls that make a name display as another.

/// Whether `c` must not appear in a name shown to a user.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
        )
}

/// Whether `name` has nothing unsafe in it.
pub fn is_safe(name: &str) -> bool {
    !name.chars().any(is_unsafe)
}

/// `text` (e.g. an error message from a server) cut to `max` characters with every unsafe
/// character replaced, fit for a log line or a terminal.
pub fn printable(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| if is_unsafe(c) { '\u{FFFD}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_cuts_and_replaces() {
        assert_eq!(printable("a\u{1b}[2Jb", 100), "a\u{FFFD}[2Jb");
        assert_eq!(printable("abcdef", 3), "abc");
    }

    #[test]
    fn escapes_and_bidi_controls_are_unsafe() {
        for bad in [
            "\u{1b}[2J",
            "a\u{7}",
            "x\u{202e}y",
            "\u{2066}",
            "\u{61c}",
            "\u{9b}",
        ] {
            assert!(!is_safe(bad), "{bad:?}");
        }
        for good in ["bob", "Zoë 🎮", "名前", "a b"] {
            assert!(is_safe(good), "{good:?}");
        }
    }
}
