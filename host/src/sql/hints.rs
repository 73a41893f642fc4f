//! Routing hints: `key=value` pairs in a leading `/* signalbox: ... */`
//! comment, passed to the policy.
//!
//! ```
//! use signalbox::sql::hints;
//! let h = hints::parse("/* signalbox: route=primary, tenant='acme' */ SELECT 1");
//! assert_eq!(h, vec![("route".into(), "primary".into()), ("tenant".into(), "acme".into())]);
//! ```

/// Hints from every leading `/* signalbox: ... */` comment (keys lower-cased).
pub fn parse(sql: &str) -> Vec<(String, String)> {
    let mut hints = Vec::new();
    let mut rest = sql;
    while let Some((comment, after)) = next_leading_comment(rest) {
        if let Some(body) = comment.trim().strip_prefix("signalbox:") {
            for pair in body.split(|c: char| c == ',' || c.is_whitespace()) {
                if let Some((k, v)) = pair.split_once('=') {
                    let v = v.trim_matches(|c| c == '\'' || c == '"');
                    if !k.is_empty() {
                        hints.push((k.to_ascii_lowercase(), v.to_owned()));
                    }
                }
            }
        }
        rest = after;
    }
    hints
}

/// The SQL after any leading whitespace and comments.
pub fn strip_leading_comments(sql: &str) -> &str {
    let mut rest = sql;
    while let Some((_, after)) = next_leading_comment(rest) {
        rest = after;
    }
    rest.trim_start()
}

/// The first comment's body (for `/* */`; empty for `--`) and the text after it.
fn next_leading_comment(sql: &str) -> Option<(&str, &str)> {
    let s = sql.trim_start();
    if let Some(after) = s.strip_prefix("--") {
        let end = after.find('\n').map(|i| i + 1).unwrap_or(after.len());
        return Some(("", &after[end..]));
    }
    let after = s.strip_prefix("/*")?;
    // PostgreSQL block comments nest.
    let bytes = after.as_bytes();
    let (mut depth, mut i) = (1usize, 0usize);
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                if depth == 0 {
                    return Some((&after[..i], &after[i + 2..]));
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_leading_hints_only() {
        assert_eq!(
            parse("-- note\n/* signalbox: route=primary */\n/* other */ SELECT 1 /* signalbox: x=y */"),
            vec![("route".into(), "primary".into())]
        );
        assert!(parse("SELECT 1").is_empty());
        assert!(parse("/* unterminated signalbox: a=b").is_empty());
        assert_eq!(
            parse("/* signalbox: A=1 b=\"two\" /* nested */ */ SELECT"),
            vec![("a".into(), "1".into()), ("b".into(), "two".into())]
        );
    }

    #[test]
    fn strips_comments() {
        assert_eq!(
            strip_leading_comments(" /* a /* b */ */ -- c\n SELECT 1"),
            "SELECT 1"
        );
    }
}
