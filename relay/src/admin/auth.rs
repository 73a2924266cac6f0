//! Bearer-token authentication for everything under `/api/` (queue envelopes,
//! retry, delete, quota usage). `/healthz`, `/readyz` and `/metrics` stay open
//! so probes and Prometheus need no credentials.
//!
//! The token comes from `admin.token_file` and/or `MAILRELAY_ADMIN_TOKEN`. The
//! file is stat'ed on every request and re-read when its mtime or size changes,
//! so a mounted Kubernetes Secret rotates without a restart; a stat is cheap next
//! to the queue store round trip the request makes anyway.
//!
//! The file may hold several tokens, one per line (blank lines ignored): during a
//! rotation the new one first and the previous one second, so clients still
//! holding the old token keep working until it is dropped.
//!
//! The token is taken from `Authorization: Bearer T` or from [`TOKEN_HEADER`]. The
//! second exists because the Kubernetes API server's service proxy authenticates
//! the caller by its `Authorization` header and does not pass it on, so
//! `kubectl mailrelay` (which goes through `services/proxy`) must use another one.
//!
//! Without any configured token `/api/` is open only when the admin listener is on
//! loopback; on any other address it refuses with 403 (secure by default).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// The env variable holding a token (in addition to, or instead of, the file).
pub const TOKEN_ENV: &str = "MAILRELAY_ADMIN_TOKEN";
/// The header carrying the token where `Authorization` cannot (the API server's
/// service proxy consumes it).
pub const TOKEN_HEADER: &str = mailrelay_admin_api::TOKEN_HEADER;

/// The header in which a client names the person it acts for (`kubectl mailrelay`
/// sends the Kubernetes username from a SelfSubjectReview). It is a claim made by
/// whoever holds the token, authenticated only through that token: the audit line
/// logs it as `actor` next to the `identity` that really passed authentication.
pub const ACTOR_HEADER: &str = mailrelay_admin_api::ACTOR_HEADER;
/// Longest claimed actor kept (usernames and service account names fit easily).
pub const MAX_ACTOR_LEN: usize = 256;

/// Client-supplied text made safe for a log line: visible ASCII is kept, every
/// other byte (space, control characters, line breaks, non-ASCII) becomes `%XX`,
/// and the result is cut to `max` characters without splitting an escape. Used
/// for the claimed actor and the user agent, so a header can never start a new
/// log line, smuggle terminal escapes, or (having no space) pose as another
/// `key=value` field of the text log format.
pub fn audit_text(raw: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &b in raw {
        let piece = if b.is_ascii_graphic() {
            (b as char).to_string()
        } else {
            format!("%{b:02X}")
        };
        if out.len() + piece.len() > max {
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin.token_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin.token_file {path}: the file holds no token")]
    Empty { path: PathBuf },
}

/// Who passed authentication; handlers log it on every state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity(pub &'static str);

/// Without a configured token the API is open: that is [`Identity`] "anonymous".
pub const ANONYMOUS: Identity = Identity("anonymous");

#[derive(Default)]
struct Cached {
    stamp: Option<(SystemTime, u64)>,
    tokens: Option<Vec<Vec<u8>>>,
}

/// The configured tokens. Cloning shares the file cache.
#[derive(Clone)]
pub struct AdminAuth {
    file: Option<PathBuf>,
    env: Option<Vec<u8>>,
    cache: Arc<Mutex<Cached>>,
    /// Without a token: serve `/api/` open (loopback listener) or refuse it.
    open_without_token: bool,
}

impl std::fmt::Debug for AdminAuth {
    // Never print the token itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("file", &self.file)
            .field("env", &self.env.as_ref().map(|_| "<set>"))
            .field("open_without_token", &self.open_without_token)
            .finish()
    }
}

/// The tokens of the file, one per line. Secrets written by hand often end with a
/// newline (or CRLF); white space around a line is not part of its token.
fn read_tokens(path: &Path) -> Result<Vec<Vec<u8>>, TokenError> {
    let raw = std::fs::read(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let tokens: Vec<Vec<u8>> = raw
        .split(|b| *b == b'\n')
        .map(|l| l.trim_ascii().to_vec())
        .filter(|l| !l.is_empty())
        .collect();
    if tokens.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

impl AdminAuth {
    /// Loads the tokens; a configured file that cannot be read or is empty is an
    /// error now, so a broken Secret mount stops startup instead of locking out
    /// (or opening) the API later.
    pub fn new(file: Option<PathBuf>, env: Option<String>) -> Result<Self, TokenError> {
        let auth = AdminAuth {
            file,
            env: env
                .map(|t| t.trim().as_bytes().to_vec())
                .filter(|t| !t.is_empty()),
            cache: Arc::default(),
            open_without_token: true,
        };
        if let Some(path) = &auth.file {
            read_tokens(path)?;
        }
        Ok(auth)
    }

    /// Sets what happens without a configured token from the admin listener's
    /// address: open on loopback (only this host can call), refused (403) on any
    /// other address, so an unconfigured relay in a pod is not open to the network.
    pub fn for_address(mut self, addr: std::net::SocketAddr) -> Self {
        self.open_without_token = addr.ip().is_loopback();
        self
    }

    /// Whether `/api/` is served without a token (no token configured, loopback).
    pub fn is_open(&self) -> bool {
        !self.enabled() && self.open_without_token
    }

    /// From the config's `admin.token_file` and the process environment.
    pub fn from_env(file: Option<PathBuf>) -> Result<Self, TokenError> {
        Self::new(file, std::env::var(TOKEN_ENV).ok())
    }

    /// True when some token is configured, i.e. `/api/` requires one.
    pub fn enabled(&self) -> bool {
        self.file.is_some() || self.env.is_some()
    }

    /// The file's current tokens, re-read only when the file changed.
    fn file_tokens(&self, path: &Path) -> Result<Vec<Vec<u8>>, TokenError> {
        let meta = std::fs::metadata(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.stamp != Some(stamp) || cache.tokens.is_none() {
            let tokens = read_tokens(path)?;
            cache.tokens = Some(tokens);
            cache.stamp = Some(stamp);
        }
        Ok(cache.tokens.clone().unwrap_or_default())
    }

    /// Checks a presented token against every configured one (the env token and
    /// each line of the file), each compared in constant time and all of them
    /// always (no early exit that would tell which line matched). The comparison
    /// of lengths is not hidden: the length of a random token is no secret worth
    /// keeping.
    pub fn check(&self, presented: &[u8]) -> Result<Option<Identity>, TokenError> {
        let mut ok = None;
        if let Some(env) = &self.env
            && bool::from(env.as_slice().ct_eq(presented))
        {
            ok = Some(Identity("token:env"));
        }
        if let Some(path) = &self.file {
            for (i, token) in self.file_tokens(path)?.iter().enumerate() {
                if bool::from(token.as_slice().ct_eq(presented)) && ok.is_none() {
                    // The audit log tells a client still on the previous token apart.
                    ok = Some(Identity(if i == 0 {
                        "token:file"
                    } else {
                        "token:file-previous"
                    }));
                }
            }
        }
        Ok(ok)
    }
}

fn unauthorized(msg: &str, error: Option<&str>) -> Response {
    let challenge = match error {
        Some(e) => format!("Bearer realm=\"mailrelay-admin\", error=\"{e}\""),
        None => "Bearer realm=\"mailrelay-admin\"".to_owned(),
    };
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({ "error": msg })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// Middleware for the `/api/` routes.
pub async fn require_token(
    State(auth): State<AdminAuth>,
    mut req: Request,
    next: Next,
) -> Response {
    if !auth.enabled() {
        if auth.open_without_token {
            req.extensions_mut().insert(ANONYMOUS);
            return next.run(req).await;
        }
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({
                "error": "admin API: no admin token is configured (admin.token_file or MAILRELAY_ADMIN_TOKEN), and the admin listener is not on loopback: /api/ is refused"
            })),
        )
            .into_response();
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().as_bytes().to_vec())
        });
    // The header wins: behind the service proxy an `Authorization` that arrives
    // at all belongs to someone else.
    let presented = req
        .headers()
        .get(TOKEN_HEADER)
        .map(|v| v.as_bytes().trim_ascii().to_vec())
        .or(bearer);
    let Some(presented) = presented else {
        return unauthorized(
            "admin API: token required (Authorization: Bearer or X-Mailrelay-Admin-Token)",
            None,
        );
    };
    match auth.check(&presented) {
        Ok(Some(id)) => {
            req.extensions_mut().insert(id);
            next.run(req).await
        }
        Ok(None) => {
            tracing::warn!(path = %req.uri().path(), "admin API: wrong bearer token refused");
            unauthorized("admin API: invalid admin token", Some("invalid_token"))
        }
        Err(e) => {
            // Fail closed: a vanished Secret must not open the API.
            tracing::error!(error = %e, "admin API: cannot read the admin token");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(
                    serde_json::json!({ "error": "admin token unavailable (see relay log)" }),
                ),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_token_rotates_and_env_token_also_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let auth = AdminAuth::new(Some(path.clone()), Some("env-token".into())).unwrap();
        assert!(auth.enabled());
        assert_eq!(
            auth.check(b"first-token").unwrap(),
            Some(Identity("token:file"))
        );
        assert_eq!(
            auth.check(b"env-token").unwrap(),
            Some(Identity("token:env"))
        );
        assert_eq!(auth.check(b"first-toke").unwrap(), None);
        assert_eq!(auth.check(b"").unwrap(), None);
        // A rotated Secret: different size, so the stamp changes even within one mtime tick.
        std::fs::write(&path, "second-token-longer").unwrap();
        assert_eq!(auth.check(b"first-token").unwrap(), None);
        assert_eq!(
            auth.check(b"second-token-longer").unwrap(),
            Some(Identity("token:file"))
        );
        std::fs::remove_file(&path).unwrap();
        assert!(auth.check(b"second-token-longer").is_err(), "fails closed");
    }

    #[test]
    fn every_line_of_the_file_is_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "new-token\r\n\n  old-token  \n").unwrap();
        let auth = AdminAuth::new(Some(path.clone()), None).unwrap();
        assert_eq!(
            auth.check(b"new-token").unwrap(),
            Some(Identity("token:file"))
        );
        assert_eq!(
            auth.check(b"old-token").unwrap(),
            Some(Identity("token:file-previous"))
        );
        for wrong in [&b"new-token\nold-token"[..], b"", b"old-toke", b"\n"] {
            assert_eq!(auth.check(wrong).unwrap(), None, "{wrong:?}");
        }
        // The grace period is over: the previous line is dropped, and refused.
        std::fs::write(&path, "new-token\n").unwrap();
        assert_eq!(auth.check(b"old-token").unwrap(), None);
    }

    #[test]
    fn without_a_token_only_loopback_is_open() {
        let none = || AdminAuth::new(None, None).unwrap();
        assert!(none().is_open(), "the library default stays open");
        assert!(
            none()
                .for_address("127.0.0.1:9325".parse().unwrap())
                .is_open()
        );
        assert!(none().for_address("[::1]:9325".parse().unwrap()).is_open());
        assert!(
            !none()
                .for_address("0.0.0.0:9325".parse().unwrap())
                .is_open()
        );
        assert!(
            !none()
                .for_address("10.1.2.3:9325".parse().unwrap())
                .is_open()
        );
        let with = AdminAuth::new(None, Some("t".into()))
            .unwrap()
            .for_address("0.0.0.0:9325".parse().unwrap());
        assert!(!with.is_open() && with.enabled());
    }

    #[test]
    fn missing_or_empty_file_is_an_error_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let e = AdminAuth::new(Some(path.clone()), None).unwrap_err();
        assert!(e.to_string().starts_with("admin.token_file"), "{e}");
        std::fs::write(&path, " \n").unwrap();
        let e = AdminAuth::new(Some(path), None).unwrap_err();
        assert!(e.to_string().contains("no token"), "{e}");
        assert!(!AdminAuth::new(None, Some("  ".into())).unwrap().enabled());
    }

    #[test]
    fn audit_text_is_one_bounded_printable_line() {
        assert_eq!(
            audit_text(b"alice@example.com", MAX_ACTOR_LEN),
            "alice@example.com"
        );
        let hostile = "bob\r\nINFO admin: queue delete identity=token:file\x1b[2J\0é";
        let clean = audit_text(hostile.as_bytes(), MAX_ACTOR_LEN);
        assert_eq!(
            clean,
            "bob%0D%0AINFO%20admin:%20queue%20delete%20identity=token:file%1B[2J%00%C3%A9"
        );
        assert!(clean.bytes().all(|b| b.is_ascii_graphic()), "{clean}");
        // Bounded, and an escape is never cut in half.
        assert_eq!(
            audit_text(&[b'a'; 1000], MAX_ACTOR_LEN).len(),
            MAX_ACTOR_LEN
        );
        assert_eq!(audit_text(b"ab\n", 4), "ab");
        assert_eq!(audit_text(b"ab\n", 5), "ab%0A");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let auth = AdminAuth::new(None, Some("s3cret-value".into())).unwrap();
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
