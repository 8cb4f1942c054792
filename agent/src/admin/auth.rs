//! The admin bearer token: read from a file, compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// A bearer token (kept as its sha256, so comparisons take the same time whatever the
/// presented token's length or content).
#[derive(Clone)]
pub struct Token([u8; 32]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from its text (surrounding whitespace ignored); refuses short ones.
    pub fn new(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the admin token has {} characters; use at least {MIN_TOKEN_LEN}",
                t.len()
            ));
        }
        Ok(Self(Sha256::digest(t.as_bytes()).into()))
    }

    /// Reads a token file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("admin.token_file: cannot read {}: {e}", path.display()))?;
        Self::new(&text).map_err(|e| format!("admin.token_file {}: {e}", path.display()))
    }

    /// Whether `presented` is the token, in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let p: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&p).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_token_and_refuses_short_ones() {
        let t = Token::new("  correct-horse-battery-staple\n").unwrap();
        assert!(t.matches("correct-horse-battery-staple"));
        assert!(!t.matches("correct-horse-battery-stapl"));
        assert!(!t.matches(""));
        assert!(Token::new("short").unwrap_err().contains("at least 16"));
        assert!(!format!("{t:?}").contains("horse"));
    }
}
