//! SASL PLAIN (RFC 4616) and LOGIN exchanges for SMTP AUTH (RFC 4954), IO-free,
//! plus the credential table they are checked against.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "LOGIN" => Some(Mechanism::Login),
            _ => None,
        }
    }
}

/// Where an exchange stands after a client message.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Send `334 <challenge>` (base64) and wait for the next line.
    Challenge(String),
    /// The client gave credentials; check them.
    Credentials { username: String, password: String },
    /// The client cancelled with `*`.
    Cancelled,
    /// Undecodable or malformed response.
    Malformed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthExchange {
    Plain,
    LoginUser,
    LoginPassword { username: String },
}

impl AuthExchange {
    /// Starts an exchange, with the optional initial response of the AUTH command.
    pub fn start(mech: Mechanism, initial: Option<&str>) -> (Option<AuthExchange>, AuthStep) {
        match (mech, initial) {
            (Mechanism::Plain, None) => (
                Some(AuthExchange::Plain),
                AuthStep::Challenge(String::new()),
            ),
            (Mechanism::Login, None) => (
                Some(AuthExchange::LoginUser),
                AuthStep::Challenge(STANDARD.encode("Username:")),
            ),
            (_, Some(resp)) => AuthExchange::respond(
                if mech == Mechanism::Plain {
                    AuthExchange::Plain
                } else {
                    AuthExchange::LoginUser
                },
                resp,
            ),
        }
    }

    /// Feeds one client response line (base64, without CRLF).
    pub fn respond(self, line: &str) -> (Option<AuthExchange>, AuthStep) {
        let line = line.trim_end();
        if line == "*" {
            return (None, AuthStep::Cancelled);
        }
        // RFC 4954: "=" is an empty initial response.
        let decoded = if line == "=" {
            Some(Vec::new())
        } else {
            STANDARD.decode(line).ok()
        };
        let Some(bytes) = decoded else {
            return (None, AuthStep::Malformed);
        };
        let Ok(text) = String::from_utf8(bytes) else {
            return (None, AuthStep::Malformed);
        };
        match self {
            AuthExchange::Plain => {
                let mut parts = text.split('\0');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(authzid), Some(user), Some(pass), None)
                        if !user.is_empty() && (authzid.is_empty() || authzid == user) =>
                    {
                        (
                            None,
                            AuthStep::Credentials {
                                username: user.to_owned(),
                                password: pass.to_owned(),
                            },
                        )
                    }
                    _ => (None, AuthStep::Malformed),
                }
            }
            AuthExchange::LoginUser => {
                if text.is_empty() || text.contains('\0') {
                    return (None, AuthStep::Malformed);
                }
                (
                    Some(AuthExchange::LoginPassword { username: text }),
                    AuthStep::Challenge(STANDARD.encode("Password:")),
                )
            }
            AuthExchange::LoginPassword { username } => (
                None,
                AuthStep::Credentials {
                    username,
                    password: text,
                },
            ),
        }
    }
}

/// Users allowed to authenticate, from `username:password` lines.
#[derive(Clone, Default)]
pub struct Credentials {
    users: HashMap<String, String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({} users)", self.users.len())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("users file line {line}: {message}")]
pub struct CredentialsError {
    pub line: usize,
    pub message: &'static str,
}

impl Credentials {
    /// Parses `username:password` lines; blank lines and `#` comments are skipped.
    /// Errors name the line, never its content (it holds a password).
    pub fn parse(text: &str) -> Result<Self, CredentialsError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let err = |message| CredentialsError {
                line: i + 1,
                message,
            };
            let (u, p) = line
                .split_once(':')
                .ok_or_else(|| err("expected username:password"))?;
            if u.is_empty() || p.is_empty() {
                return Err(err("empty username or password"));
            }
            if users.insert(u.to_owned(), p.to_owned()).is_some() {
                return Err(err("duplicate username"));
            }
        }
        Ok(Credentials { users })
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Constant-time in the password so timing reveals nothing about it.
    pub fn verify(&self, username: &str, password: &str) -> bool {
        match self.users.get(username) {
            Some(expected) => constant_time_eq(expected.as_bytes(), password.as_bytes()),
            None => {
                // Same work for unknown users.
                let _ = constant_time_eq(password.as_bytes(), password.as_bytes());
                false
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_initial_and_challenge() {
        let resp = STANDARD.encode("\0alice\0s3cret");
        let (_, step) = AuthExchange::start(Mechanism::Plain, Some(&resp));
        assert_eq!(
            step,
            AuthStep::Credentials {
                username: "alice".into(),
                password: "s3cret".into()
            }
        );
        let (ex, step) = AuthExchange::start(Mechanism::Plain, None);
        assert_eq!(step, AuthStep::Challenge(String::new()));
        let (_, step) = ex.unwrap().respond(&STANDARD.encode("alice\0alice\0pw"));
        assert!(matches!(step, AuthStep::Credentials { .. }));
        // Acting as someone else is not supported.
        let (_, step) = AuthExchange::Plain.respond(&STANDARD.encode("bob\0alice\0pw"));
        assert_eq!(step, AuthStep::Malformed);
    }

    #[test]
    fn login_two_steps_and_cancel() {
        let (ex, step) = AuthExchange::start(Mechanism::Login, None);
        assert_eq!(step, AuthStep::Challenge("VXNlcm5hbWU6".into()));
        let (ex, step) = ex.unwrap().respond(&STANDARD.encode("alice"));
        assert_eq!(step, AuthStep::Challenge("UGFzc3dvcmQ6".into()));
        let (_, step) = ex.unwrap().respond(&STANDARD.encode("pw"));
        assert_eq!(
            step,
            AuthStep::Credentials {
                username: "alice".into(),
                password: "pw".into()
            }
        );
        assert_eq!(AuthExchange::LoginUser.respond("*").1, AuthStep::Cancelled);
        assert_eq!(
            AuthExchange::LoginUser.respond("!!notbase64").1,
            AuthStep::Malformed
        );
    }

    #[test]
    fn credentials_file() {
        let c = Credentials::parse("# users\nalice:s3cret\n\nbob:pa:ss\r\n").unwrap();
        assert!(c.verify("alice", "s3cret"));
        assert!(c.verify("bob", "pa:ss"));
        assert!(!c.verify("alice", "s3cre"));
        assert!(!c.verify("alice", "s3cret "));
        assert!(!c.verify("carol", "s3cret"));
        let e = Credentials::parse("ok:1\nnocolon\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(!e.to_string().contains("nocolon"));
    }
}
