//! Authentication: bearer tokens, stored only as BLAKE3 hashes, and the rule that a listener reachable from
//! other hosts needs them. Pure logic apart from reading the tokens file.
//!
//! A token is `bft_` followed by 43 base64url characters (32 random bytes). The tokens file holds one line per
//! token, `blake3:<64 hex digits>` (the hash of the whole token string), with `#` comments and blank lines
//! allowed; `bf serve token new` prints a token and its line. The server never sees the tokens themselves
//! until a client presents one: a leaked tokens file lets nobody in. A client sends
//! `Authorization: Bearer <token>`; browsers, which cannot send that, may give the token as the password of
//! HTTP Basic authentication (any user name).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The prefix of every token (makes them recognisable in logs and secret scanners).
pub const TOKEN_PREFIX: &str = "bft_";

/// The prefix of a hash line in the tokens file.
pub const HASH_PREFIX: &str = "blake3:";

/// Errors of the tokens file and of the exposure rule.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The tokens file cannot be read.
    #[error("reading the tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `blake3:<64 hex digits>`.
    #[error("{path} line {line}: expected blake3:<64 hex digits> (bf serve token new prints one)")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The file holds no token hash.
    #[error("{path} holds no token hash")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A non-loopback listener without authentication.
    #[error(
        "refusing to listen on {addr} without authentication: it is not a loopback address, so anyone who can \
         reach it could read every file (give --token-file or --tls-client-ca, or --insecure to serve it openly \
         anyway)"
    )]
    Exposed {
        /// The listening address.
        addr: SocketAddr,
    },
    /// The system's random source failed.
    #[error("no randomness for a new token: {0}")]
    Random(String),
}

/// The accepted tokens, as hashes.
#[derive(Clone, Debug)]
pub struct TokenSet {
    hashes: Vec<blake3::Hash>,
}

impl TokenSet {
    /// Parses a tokens file's text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthError> {
        let mut hashes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = || AuthError::BadLine { path: path.to_path_buf(), line: i + 1 };
            let hex = line.strip_prefix(HASH_PREFIX).ok_or_else(bad)?;
            hashes.push(blake3::Hash::from_hex(hex).map_err(|_| bad())?);
        }
        if hashes.is_empty() {
            return Err(AuthError::Empty { path: path.to_path_buf() });
        }
        Ok(TokenSet { hashes })
    }

    /// Reads a tokens file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Whether `token` is one of the set. Every stored hash is compared, each in constant time
    /// (`blake3::Hash`'s equality), so the time taken says nothing about which or how much matched.
    pub fn accepts(&self, token: &str) -> bool {
        let h = blake3::hash(token.as_bytes());
        self.hashes.iter().fold(false, |found, stored| found | (*stored == h))
    }

    /// Whether an `Authorization` header value carries an accepted token (`Bearer <token>`, or `Basic` with
    /// the token as password).
    pub fn authorizes(&self, header: Option<&str>) -> bool {
        header.and_then(presented_token).is_some_and(|t| self.accepts(&t))
    }
}

/// The token in an `Authorization` value: `Bearer <token>` or `Basic base64(user:token)`.
fn presented_token(header: &str) -> Option<String> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = String::from_utf8(base64_decode(rest)?).ok()?;
        return decoded.split_once(':').map(|(_, p)| p.to_string());
    }
    None
}

/// Standard base64 (with or without padding); `None` on anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// A new random token and its tokens-file line.
pub fn new_token() -> Result<(String, String), AuthError> {
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw).map_err(|e| AuthError::Random(e.to_string()))?;
    let token = format!("{TOKEN_PREFIX}{}", base64url(&raw));
    let line = hash_line(&token);
    Ok((token, line))
}

/// The tokens-file line for `token`.
pub fn hash_line(token: &str) -> String {
    format!("{HASH_PREFIX}{}", blake3::hash(token.as_bytes()).to_hex())
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &b| (n << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The exposure rule: without authentication (tokens or client certificates), only a loopback address may be
/// served, unless `insecure`.
pub fn check_exposure(addr: SocketAddr, authenticated: bool, insecure: bool) -> Result<(), AuthError> {
    if authenticated || insecure || addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(AuthError::Exposed { addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tokens_are_accepted_by_their_line_only() {
        let (t1, l1) = new_token().unwrap();
        let (t2, _) = new_token().unwrap();
        assert!(t1.starts_with(TOKEN_PREFIX) && t1.len() == TOKEN_PREFIX.len() + 43, "{t1}");
        assert_ne!(t1, t2);
        let set = TokenSet::parse(&format!("# ops team\n\n{l1}  # laptop\n"), Path::new("t")).unwrap();
        assert!(set.accepts(&t1));
        assert!(!set.accepts(&t2));
        assert!(!set.accepts(""));
        assert!(set.authorizes(Some(&format!("Bearer {t1}"))));
        assert!(set.authorizes(Some(&format!("bearer   {t1} "))));
        assert!(!set.authorizes(Some(&format!("Bearer {t2}"))));
        assert!(!set.authorizes(Some(&t1)));
        assert!(!set.authorizes(None));
    }

    #[test]
    fn basic_auth_carries_the_token_as_password() {
        let set = TokenSet::parse(&hash_line("secret"), Path::new("t")).unwrap();
        // "me:secret"
        assert!(set.authorizes(Some("Basic bWU6c2VjcmV0")));
        // "me:wrong"
        assert!(!set.authorizes(Some("Basic bWU6d3Jvbmc=")));
        assert!(!set.authorizes(Some("Basic !!!")));
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let e = TokenSet::parse("blake3:00\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("f line 1"), "{e}");
        let e = TokenSet::parse("bft_plaintexttoken\n", Path::new("f")).unwrap_err();
        assert!(matches!(e, AuthError::BadLine { line: 1, .. }));
        assert!(matches!(TokenSet::parse("# nothing\n", Path::new("f")), Err(AuthError::Empty { .. })));
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
    }

    #[test]
    fn only_loopback_may_go_without_tokens() {
        let lo: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let lo6: SocketAddr = "[::1]:80".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert!(check_exposure(lo, false, false).is_ok());
        assert!(check_exposure(lo6, false, false).is_ok());
        assert!(matches!(check_exposure(any, false, false), Err(AuthError::Exposed { .. })));
        assert!(check_exposure(any, true, false).is_ok());
        assert!(check_exposure(any, false, true).is_ok());
    }
}
