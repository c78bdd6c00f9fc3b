//! Text that came from an agent, a repository or a user is shown to an operator's terminal only
//! escaped: a report message with a newline could forge a table row, and an escape sequence could
//! clear the screen or rewrite what was printed (kubectl's CVE-2021-25743). One place for every
//! table and detail view; JSON keeps the text intact, escaped as JSON.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must not reach a terminal as is: C0 and C1 controls (newlines and ESC among them),
/// DEL, and the bidirectional overrides that reorder what is shown ("Trojan Source").
fn dangerous(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` as one line safe for a terminal: newlines and tabs shown as `\n` and `\t`, every other
/// dangerous character as `\u{…}`; everything else unchanged.
pub(crate) fn cell(text: &str) -> Cow<'_, str> {
    if !text.chars().any(dangerous) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if dangerous(c) => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Serialized JSON made safe for a terminal without changing its value: serde_json escapes C0
/// controls but leaves DEL, C1 controls and bidi overrides raw, which can only occur inside
/// strings, where `\uXXXX` means the same character.
pub(crate) fn json(serialized: &str) -> Cow<'_, str> {
    if !serialized.chars().any(|c| dangerous(c) && c != '\n') {
        return Cow::Borrowed(serialized);
    }
    let mut out = String::with_capacity(serialized.len() + 8);
    for c in serialized.chars() {
        if c != '\n' && dangerous(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_that_moves_the_cursor_or_forges_a_line_reaches_the_terminal() {
        let table = [
            ("Synced", "Synced"),
            (
                "ok\nbeta web sha Synced Healthy",
                "ok\\nbeta web sha Synced Healthy",
            ),
            ("\u{1b}[2J\u{1b}[31mred", "\\u{1b}[2J\\u{1b}[31mred"),
            ("csi\u{9b}2J", "csi\\u{9b}2J"),
            ("tab\there\r", "tab\\there\\r"),
            ("del\u{7f}", "del\\u{7f}"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("ünïcode ✓", "ünïcode ✓"),
        ];
        for (raw, shown) in table {
            assert_eq!(cell(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn json_keeps_its_value() {
        let v = serde_json::json!({"m": "a\u{9b}b\u{1b}c\nd\u{202e}"});
        let text = serde_json::to_string_pretty(&v).unwrap();
        let safe = json(&text);
        assert!(!safe.chars().any(|c| c != '\n' && dangerous(c)), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }
}
