//! Client subcommands of the `mailrelay` binary that talk to a running relay.

pub mod events;
pub mod queue;
pub mod quota;
pub mod shaping;
pub mod suppression;

/// Runs `fut` on a small runtime: its output goes to stdout, its error to stderr
/// with exit code 1.
fn run_printing<E: std::fmt::Display>(
    fut: impl std::future::Future<Output = Result<String, E>>,
) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailrelay: starting the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailrelay: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Where the CLI finds the admin API's bearer token. The first that is set wins:
/// `--admin-token-file` (or `MAILRELAY_ADMIN_TOKEN_FILE`), `MAILRELAY_ADMIN_TOKEN`,
/// then `admin.token_file` of the relay config given with `--config` (so on a relay
/// host or inside the pod the same Secret file is used). None of them: no token is
/// sent, which a relay without a token accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenArgs {
    /// File holding the admin API bearer token.
    #[arg(long, env = "MAILRELAY_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Relay config whose `admin.token_file` holds the token.
    #[arg(long, global = true)]
    pub config: Option<std::path::PathBuf>,
}

impl TokenArgs {
    /// The token to send, if any; errors name the flag or field that led to an
    /// unreadable file. The token itself never appears in an error.
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.admin_token_file {
            return read_token(p, "--admin-token-file").map(Some);
        }
        if let Ok(t) = std::env::var(crate::admin::auth::TOKEN_ENV)
            && !t.trim().is_empty()
        {
            return Ok(Some(t.trim().to_owned()));
        }
        if let Some(cfg) = &self.config {
            let c = crate::config::RelayConfig::from_file(cfg)
                .map_err(|e| format!("--config {}: {e}", cfg.display()))?;
            if let Some(p) = &c.admin.token_file {
                return read_token(p, "admin.token_file").map(Some);
            }
        }
        Ok(None)
    }
}

fn read_token(path: &std::path::Path, what: &str) -> Result<String, String> {
    let raw =
        std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    // A relay's token file may hold the current token and, during a rotation, the
    // previous one on the next line: the first is the one to send.
    let t = raw
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if t.is_empty() {
        return Err(format!(
            "{what} {}: the file holds no token",
            path.display()
        ));
    }
    // A control character (a bare CR, say) would corrupt the Authorization header.
    if t.chars().any(char::is_control) {
        return Err(format!(
            "{what} {}: the token holds control characters",
            path.display()
        ));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("token");
        std::fs::write(&tf, "abc\n").unwrap();
        let cfg = dir.path().join("relay.yaml");
        std::fs::write(&cfg, format!("admin: {{token_file: '{}'}}\n", tf.display())).unwrap();
        let by_config = TokenArgs {
            admin_token_file: None,
            config: Some(cfg.clone()),
        };
        if std::env::var(crate::admin::auth::TOKEN_ENV).is_err() {
            assert_eq!(by_config.token().unwrap().as_deref(), Some("abc"));
        }
        let by_file = TokenArgs {
            admin_token_file: Some(tf.clone()),
            config: Some(dir.path().join("missing.yaml")),
        };
        assert_eq!(
            by_file.token().unwrap().as_deref(),
            Some("abc"),
            "the flag wins"
        );

        // A rotated Secret: current token first, previous second.
        std::fs::write(&tf, "\nnew\r\nabc\n").unwrap();
        assert_eq!(by_file.token().unwrap().as_deref(), Some("new"));
        std::fs::write(&tf, "ab\x07c\nX-Evil: 1").unwrap();
        let e = by_file.token().unwrap_err();
        assert!(
            e.starts_with("--admin-token-file") && e.contains("control"),
            "{e}"
        );
        std::fs::remove_file(&tf).unwrap();
        let e = by_file.token().unwrap_err();
        assert!(e.starts_with("--admin-token-file"), "{e}");
        if std::env::var(crate::admin::auth::TOKEN_ENV).is_err() {
            let e = by_config.token().unwrap_err();
            assert!(e.starts_with("admin.token_file"), "{e}");
        }
    }
}
