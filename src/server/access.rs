//! Who may call the server. [`Tokens`]: bearer tokens from `serve.auth_token_file` (or
//! `SEGCTL_AUTH_TOKEN_FILE`), compared in constant time; [`HostRule`]: the `Host` names the
//! server answers (`serve.allowed_hosts`), so that a page on a foreign name that resolves to
//! 127.0.0.1 (DNS rebinding) cannot reach a server listening on loopback.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Routes answered without a token: the probes (orchestrators call them bare), and the page
/// (static HTML that asks for the token; every API call it makes carries it).
pub fn is_open_route(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/v2/health/live" | "/v2/health/ready")
}

/// The token lines of a token file, with their 1-based line numbers: trimmed, blank lines and
/// `#` comments skipped (`serve.auth_token_file`, `predict --token-file`).
pub fn token_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, t)| !t.is_empty() && !t.starts_with('#'))
}

/// The accepted bearer tokens, kept only as SHA-256 digests.
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

/// Shows how many tokens there are, never their digests.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

impl Tokens {
    /// The token file `serve.auth_token_file` names, else `SEGCTL_AUTH_TOKEN_FILE`'s; `None`
    /// when neither is set (no authentication).
    pub fn configured(file: Option<&Path>) -> Option<PathBuf> {
        file.map(Path::to_path_buf).or_else(|| std::env::var_os("SEGCTL_AUTH_TOKEN_FILE").filter(|v| !v.is_empty()).map(PathBuf::from))
    }

    /// Reads one token per line (blank lines and `#` comments skipped). Errors name the file
    /// and the line, never a token.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the token file `{}` (serve.auth_token_file)", path.display()))?;
        let mut digests = Vec::new();
        for (line, token) in token_lines(&text) {
            // RFC 6750's token68 alphabet: what fits in `Authorization: Bearer <token>`.
            let fits = token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b));
            if !fits {
                bail!("token file `{}` line {}: a token may hold only letters, digits and `-._~+/=`", path.display(), line);
            }
            if token.len() < 16 {
                bail!("token file `{}` line {}: a token must be at least 16 characters long", path.display(), line);
            }
            digests.push(Sha256::digest(token.as_bytes()).into());
        }
        if digests.is_empty() {
            bail!("token file `{}` holds no token (one per line; serve.auth_token_file)", path.display());
        }
        Ok(Self { digests })
    }

    /// Whether `presented` is one of the tokens. Digests of equal length are compared without
    /// an early exit, against every token, so the time taken says nothing about how much of a
    /// guess was right.
    pub fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut matched = 0u8;
        for known in &self.digests {
            let mut differ = 0u8;
            for (a, b) in known.iter().zip(&digest) {
                differ |= a ^ b;
            }
            matched |= u8::from(std::hint::black_box(differ) == 0);
        }
        matched == 1
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

/// The bearer token of an `Authorization` header value (`Bearer <token>`, scheme in any case).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Which `Host` names are answered.
#[derive(Debug, Clone, PartialEq)]
pub enum HostRule {
    /// Any (listening on a non-loopback address with `serve.allowed_hosts` empty).
    Any,
    /// Only these names: exact (lower-case), or `*.suffix` for subdomains.
    Only(Vec<String>),
}

/// The loopback names answered by default on a loopback address.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

impl HostRule {
    /// The rule for `serve.allowed_hosts` on a server listening on `listen_host`.
    pub fn new(allowed: &[String], listen_host: &str) -> Self {
        if !allowed.is_empty() {
            return Self::Only(allowed.iter().map(|h| h.to_ascii_lowercase()).collect());
        }
        if is_loopback(listen_host) {
            return Self::Only(LOOPBACK_NAMES.iter().map(|h| h.to_string()).collect());
        }
        Self::Any
    }

    /// Whether a request with this `Host` header value (port included or not) is answered.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Self::Only(names) = self else { return true };
        let Some(name) = host.map(host_name) else { return false };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        names.iter().any(|allowed| match allowed.strip_prefix("*.") {
            Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(suffix) && name.as_bytes()[name.len() - suffix.len() - 1] == b'.',
            None => *allowed == name,
        })
    }
}

/// Whether `host` (an address or a name) is a loopback address.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The name part of a `Host` value: `[::1]:8080` → `[::1]`, `example.com:80` → `example.com`.
fn host_name(value: &str) -> &str {
    let value = value.trim();
    if value.starts_with('[') {
        return value.find(']').map_or(value, |end| &value[..=end]);
    }
    value.rsplit_once(':').map_or(value, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_one_per_line_and_compared_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# serving tokens\n\n  first-token-0123456789  \nsecond.token_ABCDEFGHIJ\n").unwrap();
        let tokens = Tokens::load(&file).unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.accepts("first-token-0123456789"));
        assert!(tokens.accepts("second.token_ABCDEFGHIJ"));
        for wrong in ["", "first-token-012345678", "first-token-01234567890", "FIRST-TOKEN-0123456789", "# serving tokens"] {
            assert!(!tokens.accepts(wrong), "{wrong:?}");
        }
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(Tokens::load(&file).unwrap_err().to_string().contains("holds no token"));
        std::fs::write(&file, "has a space in-it-0123456789\n").unwrap();
        let e = Tokens::load(&file).unwrap_err().to_string();
        assert!(e.contains("line 1") && !e.contains("in-it"), "{e}");
        std::fs::write(&file, "short\n").unwrap();
        assert!(Tokens::load(&file).unwrap_err().to_string().contains("at least 16"));
        assert!(Tokens::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn bearer_values_are_parsed() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn hosts_follow_the_listen_address_and_the_list() {
        let loopback = HostRule::new(&[], "127.0.0.1");
        for ok in ["localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080", "LOCALHOST", "localhost."] {
            assert!(loopback.allows(Some(ok)), "{ok}");
        }
        for refused in ["evil.example", "evil.example:8080", "127.0.0.2", "localhost.evil.example", "[::2]:80"] {
            assert!(!loopback.allows(Some(refused)), "{refused}");
        }
        assert!(!loopback.allows(None));
        assert_eq!(HostRule::new(&[], "::1"), loopback);
        assert_eq!(HostRule::new(&[], "0.0.0.0"), HostRule::Any);
        assert!(HostRule::new(&[], "0.0.0.0").allows(Some("anything")));
        let listed = HostRule::new(&["pets.example.com".into(), "*.internal.example".into()], "0.0.0.0");
        assert!(listed.allows(Some("Pets.Example.com:443")));
        assert!(listed.allows(Some("a.internal.example")));
        assert!(listed.allows(Some("b.a.internal.example:8080")));
        assert!(!listed.allows(Some("internal.example")));
        assert!(!listed.allows(Some("xinternal.example")));
        assert!(!listed.allows(Some("localhost")), "a non-empty list is always enforced");
    }
}
