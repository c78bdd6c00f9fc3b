//! Splits a multi-document YAML file into its documents as written, so the hub parses the user's
//! own text and its errors (an unknown field, a wrong type) give the line of the file, not a
//! column of some JSON the CLI made of it.

/// One document of a file: its text, padded with blank lines so that line numbers within it are
/// the file's.
pub(crate) struct Document {
    /// 1-based, in the file.
    pub index: usize,
    pub text: String,
}

/// The documents of `text`, split at `---` lines as YAML does; empty ones (only comments or
/// blanks) are left out.
pub(crate) fn split(text: &str) -> Vec<Document> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut first_line = 1;
    let mut index = 0;
    let mut flush = |current: &mut String, first_line: usize| {
        let body = std::mem::take(current);
        let blank = body
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        // As YAML counts: comments before the first `---` are no document; an empty document
        // between two `---` is one.
        if !(blank && first_line == 1) {
            index += 1;
        }
        if !blank {
            out.push(Document {
                index,
                text: format!("{}{body}", "\n".repeat(first_line - 1)),
            });
        }
    };
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            if n > 0 || !current.is_empty() {
                flush(&mut current, first_line);
            }
            first_line = n + 2;
            continue;
        }
        if trimmed == "..." {
            continue;
        }
        current.push_str(line);
    }
    flush(&mut current, first_line);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_the_file_s_line_numbers() {
        let text = "# apps\n---\na: 1\n---\n# nothing here\n---\nb: 2\n  c: 3\n";
        let docs = split(text);
        let got: Vec<(usize, &str)> = docs.iter().map(|d| (d.index, d.text.trim())).collect();
        assert_eq!(got, [(1, "a: 1"), (3, "b: 2\n  c: 3")]);
        // The second document's error is at the file's line 8.
        let err = serde_yaml_ng::from_str::<serde_json::Value>(&docs[1].text).unwrap_err();
        assert!(err.to_string().contains("line 8"), "{err}");
        assert_eq!(split("a: 1\n").len(), 1, "a single document without ---");
        assert!(split("").is_empty());
    }
}
