//! Default container images. The tag is the workspace version, so a release bumps
//! the chart defaults, the Dockerfile and these constants together; a test
//! (`operator/tests/it/images.rs`) fails when they disagree.

/// Image repository of the relay (`mailrelay serve`).
pub const RELAY_REPOSITORY: &str = "ghcr.io/mailrelay-dev/mailrelay";

/// Image repository of the operator (and the `kubectl-mailrelay` plugin).
pub const OPERATOR_REPOSITORY: &str = "ghcr.io/mailrelay-dev/mailrelay-operator";

/// The relay image a `MailRelay` without `spec.image` runs.
pub const RELAY_IMAGE: &str = concat!(
    "ghcr.io/mailrelay-dev/mailrelay:",
    env!("CARGO_PKG_VERSION")
);

/// The operator's own image (the Helm chart's default).
pub const OPERATOR_IMAGE: &str = concat!(
    "ghcr.io/mailrelay-dev/mailrelay-operator:",
    env!("CARGO_PKG_VERSION")
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_repository_colon_version() {
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(RELAY_IMAGE, format!("{RELAY_REPOSITORY}:{v}"));
        assert_eq!(OPERATOR_IMAGE, format!("{OPERATOR_REPOSITORY}:{v}"));
    }
}
