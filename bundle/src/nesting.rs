//! A linear pre-scan of YAML text that bounds how deeply it can nest, so hostile input (`a: [` ×
//! 32,000) is refused before the YAML parser — whose cost grows faster than linearly with depth —
//! ever sees it. It over-estimates rather than under-estimates; the exact check runs after parsing.

/// Refuses text that may nest deeper than `max` levels; `Err` carries the 1-based line where the
/// estimate first passed `max`.
pub fn check(text: &str, max: usize) -> Result<(), usize> {
    let mut flow = 0usize;
    // Indentation of the open block collections (mappings and sequences).
    let mut indents: Vec<usize> = Vec::new();
    // Inside a block scalar (`|`, `>`): the indentation of its parent line.
    let mut block_scalar: Option<usize> = None;
    let mut quote: Option<u8> = None;
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        let content = &bytes[indent..];
        if let Some(parent) = block_scalar {
            if content.is_empty() || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        if flow == 0 && quote.is_none() {
            if content.is_empty() || content[0] == b'#' {
                continue;
            }
            if content.starts_with(b"---") || content.starts_with(b"...") {
                indents.clear();
                continue;
            }
            while indents.last().is_some_and(|top| *top >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        // `- - - x` nests a sequence per dash on one line.
        let mut i = indent;
        let mut dashes = 0usize;
        while flow == 0
            && quote.is_none()
            && i + 1 < bytes.len()
            && bytes[i] == b'-'
            && bytes[i + 1] == b' '
        {
            dashes += 1;
            i += 2;
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
        }
        // The line's own indentation entry is the first of its dashes' sequences.
        let block_depth = indents.len() + dashes.saturating_sub(1);
        // Where a flow collection may start in block context: at the value's first character.
        let mut at_value_start = true;
        let mut prev = b' ';
        while i < bytes.len() {
            let b = bytes[i];
            match quote {
                Some(q) => {
                    if b == b'\\' && q == b'"' {
                        i += 1;
                    } else if b == q {
                        if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                            i += 1;
                        } else {
                            quote = None;
                        }
                    }
                }
                None => match b {
                    b'#' if prev == b' ' || prev == b'\t' => break,
                    b'"' | b'\'' if flow > 0 || at_value_start => quote = Some(b),
                    b'[' | b'{' if flow > 0 || at_value_start => {
                        flow += 1;
                        if block_depth + flow > max {
                            return Err(n + 1);
                        }
                    }
                    b']' | b'}' if flow > 0 => flow -= 1,
                    b'|' | b'>' if flow == 0 && at_value_start => {
                        block_scalar = Some(indent);
                        break;
                    }
                    b' ' | b'\t' => {}
                    _ => {}
                },
            }
            // A value starts after `: `, `- `, `? ` and (in flow) after `,` or an opening bracket.
            at_value_start = match b {
                b' ' | b'\t' => at_value_start || matches!(prev, b':' | b'-' | b'?' | b','),
                b'[' | b'{' | b',' => flow > 0 && quote.is_none(),
                _ => false,
            };
            prev = b;
            i += 1;
        }
        if block_depth + flow > max {
            return Err(n + 1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_table() {
        let table: &[(&str, usize, bool)] = &[
            ("a: 1\nb: {c: [1, 2]}\n", 4, true),
            ("a: 1\nb: {c: [1, 2]}\n", 2, false),
            // Brackets inside scalars, quotes and comments are not nesting.
            ("re: ^[a-z]+[0-9\nq: \"[[[[\"\ns: '{{{'\n# [[[[[\n", 2, true),
            (
                "script: |\n  if [ -z \"$X\" ]; then [[ x ]]; fi\n  {{{{\n",
                2,
                true,
            ),
            ("- - - - x\n", 3, false),
            ("- - - - x\n", 4, true),
            ("a:\n  b:\n    c:\n      d: 1\n", 4, true),
            ("a:\n  b:\n    c:\n      d: 1\n", 3, false),
            ("---\na:\n  b: 1\n---\nc: 1\n", 2, true),
        ];
        for (text, max, ok) in table {
            assert_eq!(check(text, *max).is_ok(), *ok, "{text:?} max {max}");
        }
    }

    #[test]
    fn hostile_nesting_is_refused_fast_at_its_line() {
        let deep = format!("x: 1\na: {}\n", "[".repeat(100_000));
        let started = std::time::Instant::now();
        assert_eq!(check(&deep, 128), Err(2));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let block: String = (0..200)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert!(check(&block, 128).is_err());
    }
}
