//! What the agent's and the control plane's Prometheus/OpenMetrics renderers share.

/// Appends a label value with backslash, double quote and line feed escaped (the text format
/// 0.0.4 and OpenMetrics escape the same three).
pub fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        let mut out = String::new();
        super::escape_label_value(&mut out, "a\\b\"c\nd");
        assert_eq!(out, "a\\\\b\\\"c\\nd");
    }
}
