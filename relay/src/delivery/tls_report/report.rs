//! The aggregate report of RFC 8460 §4 (JSON, gzipped), the `_smtp._tls` TXT
//! record (§3) and the mail that carries a report (§5.3). IO-free.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;

use serde_json::{Value, json};

use super::{FailureDetail, PolicyDesc};

/// Who sends and the period covered.
#[derive(Debug, Clone)]
pub struct Header {
    pub organization_name: String,
    pub contact_info: String,
    pub submitter: String,
    /// Unix seconds, start inclusive, end exclusive.
    pub start: u64,
    pub end: u64,
}

fn rfc3339(unix: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

impl Header {
    /// `report-id`: unique per submitter, period and policy domain.
    pub fn report_id(&self, domain: &str) -> String {
        format!("{}_{}_{domain}@{}", self.start, self.end, self.submitter)
    }

    /// The attachment's name (§5.1): `submitter!domain!begin!end.json.gz`.
    pub fn filename(&self, domain: &str) -> String {
        format!(
            "{}!{domain}!{}!{}.json.gz",
            self.submitter, self.start, self.end
        )
    }
}

/// The report of `domain` from its counters (see [`super::store`]); `None`
/// when nothing was counted.
pub fn build(h: &Header, domain: &str, fields: &HashMap<String, String>) -> Option<Value> {
    #[derive(Default)]
    struct Acc {
        policy: PolicyDesc,
        ok: i64,
        failed: i64,
        details: Vec<(FailureDetail, i64)>,
    }
    let mut by_type: BTreeMap<String, Acc> = BTreeMap::new();
    for (k, v) in fields {
        let Some((kind, rest)) = k.split_once(':') else {
            continue;
        };
        match kind {
            "p" => {
                if let Ok(p) = serde_json::from_str::<PolicyDesc>(v) {
                    by_type.entry(rest.to_owned()).or_default().policy = p;
                }
            }
            "s" | "f" => {
                let n = v.parse::<i64>().unwrap_or(0);
                let a = by_type.entry(rest.to_owned()).or_default();
                if kind == "s" {
                    a.ok += n;
                } else {
                    a.failed += n;
                }
            }
            "d" => {
                let Some((t, detail)) = rest.split_once(':') else {
                    continue;
                };
                if let Ok(d) = serde_json::from_str::<FailureDetail>(detail) {
                    let n = v.parse::<i64>().unwrap_or(0);
                    by_type
                        .entry(t.to_owned())
                        .or_default()
                        .details
                        .push((d, n));
                }
            }
            _ => {}
        }
    }
    let policies: Vec<Value> = by_type
        .into_iter()
        .filter(|(_, a)| a.ok + a.failed > 0)
        .map(|(t, mut a)| {
            a.details.sort_by(|x, y| {
                y.1.cmp(&x.1)
                    .then_with(|| x.0.result_type.cmp(&y.0.result_type))
            });
            // The key is the type, or `tlsa/<mx>` (see `PolicyDesc::key`).
            let (t, key_mx) = match t.split_once('/') {
                Some((t, mx)) => (t.to_owned(), Some(mx.to_owned())),
                None => (t, None),
            };
            if a.policy.mx_host.is_empty() {
                a.policy.mx_host.extend(key_mx);
            }
            let mut policy = json!({
                "policy-type": t,
                "policy-domain": domain,
            });
            if !a.policy.strings.is_empty() {
                policy["policy-string"] = json!(a.policy.strings);
            }
            if !a.policy.mx_host.is_empty() {
                policy["mx-host"] = json!(a.policy.mx_host);
            }
            let mut p = json!({
                "policy": policy,
                "summary": {
                    "total-successful-session-count": a.ok,
                    "total-failure-session-count": a.failed,
                },
            });
            if !a.details.is_empty() {
                p["failure-details"] = Value::Array(
                    a.details
                        .into_iter()
                        .map(|(d, n)| {
                            let mut v = serde_json::to_value(d).expect("a detail serialises");
                            v["failed-session-count"] = json!(n);
                            v
                        })
                        .collect(),
                );
            }
            p
        })
        .collect();
    if policies.is_empty() {
        return None;
    }
    Some(json!({
        "organization-name": h.organization_name,
        "date-range": {
            "start-datetime": rfc3339(h.start),
            "end-datetime": rfc3339(h.end),
        },
        "contact-info": h.contact_info,
        "report-id": h.report_id(domain),
        "policies": policies,
    }))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("writing to memory");
    e.finish().expect("writing to memory")
}

/// Where reports go (`rua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rua {
    Mailto(String),
    Https(String),
}

/// The `rua` of a domain's `_smtp._tls` TXT records (each record's strings
/// joined): exactly one record must start with `v=TLSRPTv1`. Unknown URI schemes
/// are skipped (§3).
pub fn parse_txt<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Rua>, String> {
    let ours: Vec<String> = records
        .into_iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .filter(|r| {
            let r = r.trim_start();
            r.starts_with("v=TLSRPTv1")
                && r["v=TLSRPTv1".len()..]
                    .trim_start()
                    .is_empty_or_starts_with(';')
        })
        .collect();
    let record = match ours.as_slice() {
        [] => return Err("no TXT record starting with v=TLSRPTv1".into()),
        [one] => one,
        _ => return Err(format!("{} TLSRPTv1 records (one is allowed)", ours.len())),
    };
    let mut out = Vec::new();
    let mut seen_rua = false;
    for field in record.split(';').skip(1) {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("rua") {
            continue;
        }
        seen_rua = true;
        for uri in v.split(',') {
            let uri = uri.trim();
            if let Some(addr) = strip_prefix_ci(uri, "mailto:") {
                let addr =
                    percent_encoding::percent_decode_str(addr.split('?').next().unwrap_or(""))
                        .decode_utf8_lossy()
                        .into_owned();
                if addr
                    .rsplit_once('@')
                    .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
                    && !addr.contains(['\r', '\n', '<', '>', ' '])
                {
                    out.push(Rua::Mailto(addr));
                }
            } else if strip_prefix_ci(uri, "https://").is_some() {
                out.push(Rua::Https(uri.to_owned()));
            }
        }
    }
    if !seen_rua {
        return Err("the TLSRPTv1 record has no rua".into());
    }
    if out.is_empty() {
        return Err("no usable mailto: or https: address in rua".into());
    }
    Ok(out)
}

trait EmptyOr {
    fn is_empty_or_starts_with(&self, c: char) -> bool;
}

impl EmptyOr for str {
    fn is_empty_or_starts_with(&self, c: char) -> bool {
        self.is_empty() || self.starts_with(c)
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// The report mail of §5.3: `multipart/report; report-type="tlsrpt"` with a short
/// text part and the gzipped JSON as `application/tlsrpt+gzip`.
pub fn mail(
    h: &Header,
    domain: &str,
    from: &str,
    to: &str,
    gz: &[u8],
    message_id: &str,
) -> Vec<u8> {
    use base64::Engine as _;
    let boundary = format!("tlsrpt-{}", message_id.split('@').next().unwrap_or("x"));
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let id = h.report_id(domain);
    let mut m = String::new();
    m.push_str(&format!("From: <{from}>\r\n"));
    m.push_str(&format!("To: <{to}>\r\n"));
    m.push_str(&format!(
        "Subject: Report Domain: {domain} Submitter: {} Report-ID: <{id}>\r\n",
        h.submitter
    ));
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!("Message-ID: <{message_id}>\r\n"));
    m.push_str(&format!("TLS-Report-Domain: {domain}\r\n"));
    m.push_str(&format!("TLS-Report-Submitter: {}\r\n", h.submitter));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is an SMTP TLS report (RFC 8460).\r\n\r\n");
    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str("Content-Type: text/plain; charset=us-ascii\r\n\r\n");
    m.push_str(&format!(
        "SMTP TLS report for {domain} from {} ({}), {} to {}.\r\n\r\n",
        h.organization_name,
        h.submitter,
        rfc3339(h.start),
        rfc3339(h.end)
    ));
    m.push_str(&format!("--{boundary}\r\n"));
    let name = h.filename(domain);
    m.push_str("Content-Type: application/tlsrpt+gzip\r\n");
    m.push_str("Content-Transfer-Encoding: base64\r\n");
    m.push_str(&format!(
        "Content-Disposition: attachment;\r\n\tfilename=\"{name}\"\r\n\r\n"
    ));
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
    for chunk in b64.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        m.push_str("\r\n");
    }
    m.push_str(&format!("\r\n--{boundary}--\r\n"));
    m.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tls_report::store;

    #[test]
    fn txt_records_give_rua_uris() {
        let r = parse_txt([
            b"v=spf1 -all".as_slice(),
            b"v=TLSRPTv1; rua=mailto:tls@rua.test,https://rua.test:8443/r ,ftp://x".as_slice(),
        ])
        .unwrap();
        assert_eq!(
            r,
            vec![
                Rua::Mailto("tls@rua.test".into()),
                Rua::Https("https://rua.test:8443/r".into())
            ]
        );
        assert!(
            parse_txt([
                b"v=TLSRPTv1;rua=mailto:a@b".as_slice(),
                b"v=TLSRPTv1; rua=mailto:c@d".as_slice()
            ])
            .is_err()
        );
        assert!(parse_txt([b"v=TLSRPTv10; rua=mailto:a@b".as_slice()]).is_err());
        assert!(
            parse_txt([b"v=TLSRPTv1".as_slice()])
                .unwrap_err()
                .contains("no rua")
        );
        assert_eq!(
            parse_txt([b"v=TLSRPTv1; rua=mailto:a%40x@b.test?subject=x".as_slice()]).unwrap(),
            vec![Rua::Mailto("a@x@b.test".into())]
        );
    }

    #[test]
    fn reports_follow_the_rfc8460_schema() {
        let h = Header {
            organization_name: "Org".into(),
            contact_info: "postmaster@sub.test".into(),
            submitter: "sub.test".into(),
            start: 86_400,
            end: 2 * 86_400,
        };
        let p = PolicyDesc {
            policy_type: "sts".into(),
            strings: vec!["version: STSv1".into(), "mode: enforce".into()],
            mx_host: vec!["mx.a.test".into()],
        };
        let d = FailureDetail {
            result_type: "certificate-host-mismatch".into(),
            receiving_mx_hostname: Some("mx.a.test".into()),
            receiving_ip: Some("192.0.2.1".into()),
            ..Default::default()
        };
        let mut fields = HashMap::new();
        fields.insert(
            store::policy_field("sts"),
            serde_json::to_string(&p).unwrap(),
        );
        fields.insert(store::success_field("sts"), "3".into());
        fields.insert(store::failure_field("sts"), "2".into());
        fields.insert(store::detail_field("sts", &d), "2".into());
        fields.insert(store::success_field("no-policy-found"), "1".into());
        let r = build(&h, "a.test", &fields).unwrap();
        assert_eq!(r["date-range"]["start-datetime"], "1970-01-02T00:00:00Z");
        assert_eq!(r["date-range"]["end-datetime"], "1970-01-03T00:00:00Z");
        assert_eq!(r["report-id"], "86400_172800_a.test@sub.test");
        let pols = r["policies"].as_array().unwrap();
        assert_eq!(pols.len(), 2);
        let sts = pols
            .iter()
            .find(|p| p["policy"]["policy-type"] == "sts")
            .unwrap();
        assert_eq!(sts["policy"]["policy-domain"], "a.test");
        assert_eq!(sts["policy"]["mx-host"][0], "mx.a.test");
        assert_eq!(sts["summary"]["total-successful-session-count"], 3);
        assert_eq!(sts["summary"]["total-failure-session-count"], 2);
        assert_eq!(
            sts["failure-details"][0]["result-type"],
            "certificate-host-mismatch"
        );
        assert_eq!(sts["failure-details"][0]["failed-session-count"], 2);
        assert_eq!(sts["failure-details"][0]["receiving-ip"], "192.0.2.1");
        assert!(build(&h, "a.test", &HashMap::new()).is_none());
        let m = String::from_utf8(mail(
            &h,
            "a.test",
            "f@sub.test",
            "t@r.test",
            &gzip(b"{}"),
            "x@sub.test",
        ))
        .unwrap();
        assert!(m.contains("Subject: Report Domain: a.test Submitter: sub.test Report-ID: <86400_172800_a.test@sub.test>\r\n"), "{m}");
        assert!(m.contains("report-type=\"tlsrpt\""));
        assert!(m.contains("Content-Type: application/tlsrpt+gzip\r\n"));
        assert!(m.contains("filename=\"sub.test!a.test!86400!172800.json.gz\""));
    }
}
