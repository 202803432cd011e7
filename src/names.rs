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

#[cfg(test)]
mod tests {
    use super::*;

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
