//! The quota usage API's JSON (`GET /api/v1/quotas[/{name}]`): the types are the
//! admin API crate's, shared by the admin server, `mailrelay quota`, the operator
//! and the kubectl plugin. Here: the configuration's enums in the API's words,
//! each an exhaustive match, so a new variant is a compile error until the API
//! names it.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use mailrelay_admin_api::types::{
    Connections, KeyUsage, QuotaAction, QuotaDirection, QuotaList, QuotaScope, QuotaUsage,
    WindowUsage,
};

use super::config::{Action, Direction, Scope};

/// `2026-11-29T05:01:00Z` (rounded up to the second).
pub fn rfc3339(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp(ms.div_ceil(1000) as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

impl From<Direction> for QuotaDirection {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Ingress => QuotaDirection::Ingress,
            Direction::Egress => QuotaDirection::Egress,
        }
    }
}

impl From<Scope> for QuotaScope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::PerKey => QuotaScope::PerKey,
            Scope::Shared => QuotaScope::Shared,
        }
    }
}

impl From<Action> for Option<QuotaAction> {
    fn from(a: Action) -> Self {
        Some(match a {
            Action::Reject => QuotaAction::Reject,
            Action::Defer => QuotaAction::Defer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_enums_read_as_the_api_writes_them() {
        // The relay's config and the API spell them alike (snake_case).
        for d in [Direction::Ingress, Direction::Egress] {
            assert_eq!(
                serde_json::to_value(d).unwrap(),
                serde_json::to_value(QuotaDirection::from(d)).unwrap()
            );
        }
        for s in [Scope::PerKey, Scope::Shared] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::to_value(QuotaScope::from(s)).unwrap()
            );
        }
        for a in [Action::Reject, Action::Defer] {
            assert_eq!(
                serde_json::to_value(a).unwrap(),
                serde_json::to_value(Option::<QuotaAction>::from(a)).unwrap()
            );
        }
    }
}
