//! What a failed child process (an agent or a peer) last wrote to its log, for the error
//! that reports it: the cause is then in the bench's own output, not only in a file that a
//! temporary directory or a CI machine may no longer hold.

use std::path::Path;

/// How many of a log's last lines an error quotes.
pub const QUOTED_LINES: usize = 12;

/// The last `lines` lines of the log at `path`, each indented, or a line saying why it
/// could not be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => quote_last_lines(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("  (its log {} could not be read: {e})", path.display()),
    }
}

fn quote_last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return "  (its log is empty)".to_string();
    }
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_lines_are_quoted() {
        let log = "one\ntwo\nthree\nError: address in use\n";
        assert_eq!(
            quote_last_lines(log, 2),
            "  | three\n  | Error: address in use"
        );
        assert_eq!(quote_last_lines(log, 10).lines().count(), 4);
    }

    #[test]
    fn an_empty_or_missing_log_is_said_to_be_so() {
        assert_eq!(quote_last_lines("", 3), "  (its log is empty)");
        let dir = tempfile::tempdir().unwrap();
        let missing = tail(&dir.path().join("nope.log"), 3);
        assert!(missing.contains("nope.log could not be read"), "{missing}");
    }
}
