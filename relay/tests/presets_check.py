#!/usr/bin/env python3
"""Checks the provider presets (relay/src/shaping/presets/*.yaml) without the engine.

Run: python3 relay/tests/presets_check.py            (exit 1 and a list of errors on failure)
     python3 relay/tests/presets_check.py --self-test (feeds broken copies: every one must fail)
     python3 relay/tests/presets_check.py --write-doc (regenerates the value table in
                                                     docs/sending-to-providers.md)

What it checks, per /work/RULES-SCHEMA.md (issue 18):
  * the file shape: known keys only, required keys, `name` equal to the file name,
    `version` a date, at least one destination selector;
  * every rule: name `<preset>-...` (1-63 of [A-Za-z0-9._-], unique over all presets),
    a match with codes / enhanced / text, codes 200-599 or "4xx"/"5xx", enhanced globs,
    stages from the known set, action-specific fields (scope, tenant_key, duration
    1s..7d, throttle factor/rate/max_connections, reclassify), regexes that compile
    and use no syntax the Rust `regex` crate lacks (look-around, back-references);
  * the sources: every value line carries a comment naming a source key defined in
    the file's "Sources" header (with an address) or saying "project choice";
  * behaviour: the sample replies in relay/tests/data/provider-replies.txt, run
    through each preset's rules (first match wins, as the relay does), hit the
    expected rule (or none), and every rule is hit by at least one sample.
"""

import fnmatch
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESET_DIR = ROOT / "relay" / "src" / "shaping" / "presets"
CORPUS = ROOT / "relay" / "tests" / "data" / "provider-replies.txt"

TOP_KEYS = {"name", "version", "title", "destination", "pacing", "rules"}
DEST_KEYS = {"mx_hosts", "destination_domains", "smarthost"}
PACING_KEYS = {"max_connections", "limits"}
RULE_KEYS = {"name", "destination", "match", "action", "scope", "tenant_key",
             "duration", "throttle", "reclassify", "enabled"}
MATCH_KEYS = {"codes", "enhanced", "text", "stages"}
STAGES = {"connect", "greeting", "ehlo", "mail", "rcpt", "data"}
ACTIONS = {"suspend", "throttle", "reclassify", "bounce"}
SCOPES = {"site", "tenant"}
TENANT_KEYS = {"sender_domain", "from_domain", "dkim_domain", "auth_user", "egress_key"}
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
ENHANCED_RE = re.compile(r"^[245*](\.([0-9]{1,3}|\*)){0,2}$|^[245]\.[0-9*]{1,3}\.[0-9*]{1,7}$")
# Rust's `regex` has no look-around and no back-references; Python would accept them.
RUST_UNSUPPORTED = re.compile(r"\(\?<?[=!]|\(\?>|\(\?P=|\\[1-9]")
MAX_REGEX_LEN = 512
MIN_DURATION_S, MAX_DURATION_S = 1, 7 * 86400


def parse_duration(s):
    """The relay's duration syntax (relay/src/config/duration.rs), in seconds."""
    if isinstance(s, int) and not isinstance(s, bool):
        return float(s)
    if not isinstance(s, str):
        raise ValueError(f"{s!r} is not a duration")
    m = re.fullmatch(r"\s*([0-9]+)\s*(ms|s|m|h|d|)\s*", s)
    if not m:
        raise ValueError(f"{s!r} is not a duration like 30s, 5m, 2h")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def parse_limit(s):
    """The relay's Limit syntax (relay/src/config/quota.rs): `100/1m`, `1000/h`."""
    if not isinstance(s, str) or "/" not in s:
        raise ValueError(f"{s!r} is not a limit like 100/1m, 1000/h or 50000/1d")
    n, w = s.split("/", 1)
    if not n.strip().isdigit():
        raise ValueError(f"{s!r}: {n!r} is not a whole number")
    w = w.strip()
    window = parse_duration(w if w[:1].isdigit() else "1" + w)
    if window <= 0:
        raise ValueError(f"{s!r}: the window must be longer than zero")
    return int(n), window


def source_keys(text):
    """Source keys defined in the header comment: `#   [G1] address ...`."""
    keys, current = {}, None
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s{1,3}\[([A-Z][0-9]?|-)\]\s*(.*)", line)
        if m:
            current = m.group(1)
            keys[current] = m.group(2)
        elif current and re.match(r"#\s{4,}\S", line):
            keys[current] += " " + line.lstrip("# ")
        else:
            current = None
    return keys


def check_source_comments(fname, text, errors):
    keys = source_keys(text)
    if not keys:
        errors.append(f"{fname}: no 'Sources' header (# [KEY] address ...)")
    for key, body in keys.items():
        if key != "-" and not re.search(r"[a-z0-9-]+\.[a-z]{2,}", body):
            errors.append(f"{fname}: source [{key}] names no address")
    in_body = False
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if re.match(r"(destination|pacing|rules)\s*:", line):
            in_body = True
        if not in_body:
            continue
        code, _, comment = line.partition(" #")
        code = code.strip()
        # Structural lines (a key opening a block) and rule names carry no value.
        if re.fullmatch(r"(- )?[a-z_]+:", code) or re.fullmatch(r"- name: \S+", code):
            continue
        if not comment:
            errors.append(f"{fname}:{no}: value without a source comment: {code}")
            continue
        # Source keys look like [G1], [K] or [-]; other brackets ([TSS04]) are reply text.
        used = re.findall(r"\[([A-Z][0-9]?|-)\]", comment)
        if "project choice" in comment:
            continue
        if not used:
            errors.append(f"{fname}:{no}: comment names no source key or 'project choice'")
        for key in used:
            if key not in keys:
                errors.append(f"{fname}:{no}: source [{key}] is not defined in the header")


def check_regex(where, pattern, errors):
    if not isinstance(pattern, str) or not pattern:
        errors.append(f"{where}.text: must be a non-empty string")
        return None
    if len(pattern) > MAX_REGEX_LEN:
        errors.append(f"{where}.text: longer than {MAX_REGEX_LEN} characters")
    if RUST_UNSUPPORTED.search(pattern):
        errors.append(f"{where}.text: look-around or back-reference (the Rust regex crate has neither)")
    try:
        return re.compile(pattern)
    except re.error as e:
        errors.append(f"{where}.text: invalid regex: {e}")
        return None


def check_duration(where, value, errors):
    try:
        secs = parse_duration(value)
    except ValueError as e:
        errors.append(f"{where}.duration: {e}")
        return
    if not MIN_DURATION_S <= secs <= MAX_DURATION_S:
        errors.append(f"{where}.duration: {value!r} is outside 1s..7d")


def check_destination(where, dest, errors):
    if not isinstance(dest, dict) or not dest:
        errors.append(f"{where}.destination: needs at least one selector")
        return
    for k in set(dest) - DEST_KEYS:
        errors.append(f"{where}.destination.{k}: unknown field")
    if not any(dest.get(k) for k in DEST_KEYS):
        errors.append(f"{where}.destination: needs at least one selector")
    for k in ("mx_hosts", "destination_domains"):
        v = dest.get(k)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and x for x in v)):
            errors.append(f"{where}.destination.{k}: must be a list of globs")
    if "smarthost" in dest and not isinstance(dest["smarthost"], bool):
        errors.append(f"{where}.destination.smarthost: must be true or false")


def check_rule(preset, i, rule, errors):
    where = f"{preset}.rules[{i}]"
    if not isinstance(rule, dict):
        errors.append(f"{where}: must be a mapping")
        return None
    name = rule.get("name")
    if isinstance(name, str):
        where = f"{preset}.rules[{name}]"
    for k in set(rule) - RULE_KEYS:
        errors.append(f"{where}.{k}: unknown field")
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.append(f"{where}.name: 1-63 of [A-Za-z0-9._-] required")
    elif not name.startswith(preset + "-"):
        errors.append(f"{where}.name: must start with '{preset}-'")
    if "destination" in rule:
        check_destination(where, rule["destination"], errors)
    match = rule.get("match")
    compiled = None
    if not isinstance(match, dict) or not (set(match) & {"codes", "enhanced", "text"}):
        errors.append(f"{where}.match: needs codes, enhanced or text")
        match = {}
    for k in set(match) - MATCH_KEYS:
        errors.append(f"{where}.match.{k}: unknown field")
    codes = match.get("codes")
    if codes is not None:
        if not isinstance(codes, list) or not codes:
            errors.append(f"{where}.match.codes: must be a non-empty list")
        else:
            for c in codes:
                ok = (isinstance(c, int) and not isinstance(c, bool) and 200 <= c <= 599) or c in ("4xx", "5xx")
                if not ok:
                    errors.append(f"{where}.match.codes: {c!r} is not a reply code 200-599 or 4xx/5xx")
    enhanced = match.get("enhanced")
    if enhanced is not None:
        if not isinstance(enhanced, list) or not enhanced:
            errors.append(f"{where}.match.enhanced: must be a non-empty list")
        else:
            for e in enhanced:
                if not isinstance(e, str) or not ENHANCED_RE.match(e):
                    errors.append(f"{where}.match.enhanced: {e!r} is not an enhanced status glob like 4.7.28 or 4.7.*")
    if "text" in match:
        compiled = check_regex(f"{where}.match", match["text"], errors)
    stages = match.get("stages")
    if stages is not None:
        if not isinstance(stages, list) or not stages or not set(stages) <= STAGES:
            errors.append(f"{where}.match.stages: must be a list from {sorted(STAGES)}")
    action = rule.get("action")
    if action not in ACTIONS:
        errors.append(f"{where}.action: must be one of {sorted(ACTIONS)}")
    if action in ("suspend", "throttle"):
        scope = rule.get("scope")
        if scope not in SCOPES:
            errors.append(f"{where}.scope: must be site or tenant")
        if scope == "tenant" and rule.get("tenant_key") not in TENANT_KEYS:
            errors.append(f"{where}.tenant_key: must be one of {sorted(TENANT_KEYS)} for scope tenant")
        if scope == "site" and "tenant_key" in rule:
            errors.append(f"{where}.tenant_key: only for scope tenant")
        if "duration" not in rule:
            errors.append(f"{where}.duration: required for {action}")
        else:
            check_duration(where, rule["duration"], errors)
    else:
        for k in ("scope", "tenant_key", "duration"):
            if k in rule:
                errors.append(f"{where}.{k}: only for suspend and throttle")
    if action == "throttle":
        t = rule.get("throttle")
        if not isinstance(t, dict) or not (set(t) & {"factor", "rate", "max_connections"}):
            errors.append(f"{where}.throttle: needs factor, rate or max_connections")
            t = {}
        for k in set(t) - {"factor", "rate", "max_connections"}:
            errors.append(f"{where}.throttle.{k}: unknown field")
        if "factor" in t and not (isinstance(t["factor"], (int, float)) and 0 < t["factor"] < 1):
            errors.append(f"{where}.throttle.factor: must be between 0 and 1 (exclusive)")
        if "rate" in t:
            try:
                parse_limit(t["rate"])
            except ValueError as e:
                errors.append(f"{where}.throttle.rate: {e}")
        if "max_connections" in t and not (isinstance(t["max_connections"], int) and t["max_connections"] >= 1):
            errors.append(f"{where}.throttle.max_connections: must be a whole number >= 1")
    elif "throttle" in rule:
        errors.append(f"{where}.throttle: only for action throttle")
    if action == "reclassify":
        r = rule.get("reclassify")
        if r not in ("temporary", "permanent"):
            errors.append(f"{where}.reclassify: must be temporary or permanent")
        elif isinstance(codes, list) and codes:
            # Reclassifying a reply into the class it already has does nothing.
            classes = {str(c)[0] for c in codes}
            if r == "temporary" and classes == {"4"} or r == "permanent" and classes == {"5"}:
                errors.append(f"{where}.reclassify: {r} on {codes} changes nothing")
    elif "reclassify" in rule:
        errors.append(f"{where}.reclassify: only for action reclassify")
    return compiled


def check_preset(fname, text, errors):
    stem = pathlib.Path(fname).stem
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        errors.append(f"{fname}: not YAML: {e}")
        return None
    if not isinstance(doc, dict):
        errors.append(f"{fname}: must be a mapping")
        return None
    for k in set(doc) - TOP_KEYS:
        errors.append(f"{fname}: {k}: unknown field")
    for k in TOP_KEYS:
        if k not in doc:
            errors.append(f"{fname}: {k}: required")
    if doc.get("name") != stem:
        errors.append(f"{fname}: name must be {stem!r} (the file name)")
    if stem == "all":
        errors.append(f"{fname}: 'all' is reserved (it selects every preset)")
    if not isinstance(doc.get("version"), str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc.get("version", "")):
        errors.append(f"{fname}: version must be a quoted date like \"2026-12-07\"")
    if not isinstance(doc.get("title"), str) or not doc.get("title"):
        errors.append(f"{fname}: title must be a non-empty string")
    check_destination(stem, doc.get("destination"), errors)
    pacing = doc.get("pacing")
    if not isinstance(pacing, dict):
        errors.append(f"{fname}: pacing must be a mapping (values may be null / [])")
        pacing = {}
    for k in set(pacing) - PACING_KEYS:
        errors.append(f"{fname}: pacing.{k}: unknown field")
    mc = pacing.get("max_connections")
    if mc is not None and not (isinstance(mc, int) and not isinstance(mc, bool) and mc >= 1):
        errors.append(f"{fname}: pacing.max_connections: null or a whole number >= 1")
    limits = pacing.get("limits", [])
    if not isinstance(limits, list):
        errors.append(f"{fname}: pacing.limits: must be a list")
        limits = []
    for lim in limits:
        try:
            parse_limit(lim)
        except ValueError as e:
            errors.append(f"{fname}: pacing.limits: {e}")
    rules = doc.get("rules")
    if not isinstance(rules, list):
        errors.append(f"{fname}: rules must be a list ([] when the provider publishes no replies)")
        rules = []
    compiled = []
    for i, rule in enumerate(rules):
        rx = check_rule(stem, i, rule, errors)
        compiled.append((rule if isinstance(rule, dict) else {}, rx))
    check_source_comments(fname, text, errors)
    return stem, compiled


def parse_reply(reply):
    m = re.match(r"([2-5][0-9]{2})(?:[ -]([245]\.[0-9]{1,3}\.[0-9]{1,3}))?", reply)
    if not m:
        raise ValueError(f"reply {reply!r} does not start with a reply code")
    return int(m.group(1)), m.group(2)


def rule_matches(rule, rx, code, enhanced, stage, reply):
    match = rule.get("match") or {}
    codes = match.get("codes")
    if codes and not any(c == code or (isinstance(c, str) and c[0] == str(code)[0]) for c in codes):
        return False
    globs = match.get("enhanced")
    if globs and not (enhanced and any(fnmatch.fnmatchcase(enhanced, g) for g in globs)):
        return False
    if "text" in match and not (rx and rx.search(reply)):
        return False
    stages = match.get("stages")
    if stages and stage not in stages:
        return False
    return True


def check_corpus(presets, corpus_text, errors):
    hit = {name: set() for name in presets}
    for no, line in enumerate(corpus_text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(" | ", 4)]
        if len(parts) != 5 or not all(parts):
            errors.append(f"corpus:{no}: want 'preset | rule | stage | source | reply'")
            continue
        preset, expect, stage, source, reply = parts
        if preset not in presets:
            errors.append(f"corpus:{no}: unknown preset {preset!r}")
            continue
        if stage not in STAGES:
            errors.append(f"corpus:{no}: unknown stage {stage!r}")
        if not re.search(r"[a-z0-9-]+\.[a-z]{2,}|issue", source):
            errors.append(f"corpus:{no}: the source names no address")
        try:
            code, enhanced = parse_reply(reply)
        except ValueError as e:
            errors.append(f"corpus:{no}: {e}")
            continue
        got = "-"
        for rule, rx in presets[preset]:
            if rule.get("enabled", True) and rule_matches(rule, rx, code, enhanced, stage, reply):
                got = rule.get("name")
                break
        if got != expect:
            errors.append(f"corpus:{no}: {preset}: expected {expect}, got {got} for {reply[:70]!r}")
        if got != "-":
            hit[preset].add(got)
    for preset, rules in presets.items():
        for rule, _ in rules:
            if rule.get("name") and rule["name"] not in hit[preset]:
                errors.append(f"{preset}: rule {rule['name']} is not exercised by any sample reply")


def run(files, corpus_text):
    """files: [(file name, text)]. Returns the list of errors."""
    errors, presets, seen = [], {}, {}
    if not files:
        errors.append("no preset files found")
    for fname, text in files:
        got = check_preset(fname, text, errors)
        if got:
            stem, compiled = got
            presets[stem] = compiled
            for rule, _ in compiled:
                n = rule.get("name")
                if n in seen:
                    errors.append(f"{fname}: rule name {n} also used in {seen[n]}")
                seen[n] = fname
    check_corpus(presets, corpus_text, errors)
    return errors


DOC = ROOT / "docs" / "sending-to-providers.md"
DOC_BEGIN = "<!-- preset-values:begin (generated: python3 relay/tests/presets_check.py --write-doc) -->"
DOC_END = "<!-- preset-values:end -->"


def value_rows(text):
    """(where, field, value, comment) for every value line of a preset file."""
    rows, stack, rule, section = [], [], None, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        code, _, comment = line.partition(" #")
        indent = len(code) - len(code.lstrip(" -"))
        body = code.strip()
        if body.startswith("- "):
            body = body[2:]
        key, _, value = body.partition(":")
        key, value = key.strip(), value.strip()
        if indent == 0:
            section, stack = key, []
            if section in ("destination", "pacing", "rules") and value:
                rows.append((section, section, value, comment.strip()))
            continue
        if section not in ("destination", "pacing", "rules"):
            continue
        if section == "rules" and code.strip().startswith("- name:"):
            rule, stack = value, []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not value:
            stack.append((indent, key))
            continue
        field = ".".join([k for _, k in stack] + [key])
        rows.append((rule if section == "rules" else section, field, value, comment.strip()))
    return rows


def rule_summary(rule):
    m = rule.get("match") or {}
    parts = []
    if m.get("codes"):
        parts.append("/".join(str(c) for c in m["codes"]))
    if m.get("enhanced"):
        parts.append(", ".join(m["enhanced"]))
    if m.get("text"):
        parts.append("text `" + m["text"].replace("|", "\\|") + "`")
    if m.get("stages"):
        parts.append("at " + ", ".join(m["stages"]))
    action = rule.get("action", "")
    if action == "throttle":
        t = rule.get("throttle") or {}
        action += " (" + ", ".join(f"{k} {v}" for k, v in t.items()) + ")"
    if action == "reclassify":
        action += " " + str(rule.get("reclassify"))
    scope = rule.get("scope", "–")
    if scope == "tenant":
        scope += f" ({rule.get('tenant_key')})"
    return " ".join(parts), action, scope, rule.get("duration", "–")


def doc_table(files):
    out = [DOC_BEGIN, "", "### At a glance", ""]
    out.append("| Preset | Selects | Pacing | Rule | Reply matched | Action | Scope | Duration |")
    out.append("|---|---|---|---|---|---|---|---|")
    for fname, text in files:
        doc = yaml.safe_load(text)
        dest = doc["destination"]
        sel = "; ".join(f"{k} " + ", ".join(f"`{x}`" for x in v) for k, v in dest.items() if isinstance(v, list))
        pac = doc.get("pacing") or {}
        pacing = ", ".join(filter(None, [
            f"max_connections {pac['max_connections']}" if pac.get("max_connections") else "",
            ("limits " + ", ".join(pac["limits"])) if pac.get("limits") else "",
        ])) or "none (no public figure)"
        rules = doc.get("rules") or []
        if not rules:
            out.append(f"| `{doc['name']}` | {sel} | {pacing} | – | – | – | – | – |")
        for i, rule in enumerate(rules):
            match, action, scope, duration = rule_summary(rule)
            first = (f"`{doc['name']}`", sel, pacing) if i == 0 else ("", "", "")
            out.append(f"| {first[0]} | {first[1]} | {first[2]} | `{rule['name']}` | {match} | {action} | {scope} | {duration} |")
    out += ["", "### Every value with its source", ""]
    for fname, text in files:
        doc = yaml.safe_load(text)
        out.append(f"#### `{doc['name']}` — {doc['title']} (version {doc['version']})")
        out.append("")
        out.append("Sources:")
        out.append("")
        for key, body in source_keys(text).items():
            out.append(f"- **[{key}]** {' '.join(body.split())}")
        out.append("")
        out.append("| Rule / section | Field | Value | Source and what it says |")
        out.append("|---|---|---|---|")
        for where, field, value, comment in value_rows(text):
            cell = lambda s: s.replace("|", "\\|")
            out.append(f"| `{where}` | `{field}` | `{cell(value)}` | {cell(comment)} |")
        out.append("")
    out.append(DOC_END)
    return "\n".join(out)


def check_doc(files, errors):
    if not DOC.exists():
        errors.append(f"{DOC}: missing")
        return
    text = DOC.read_text(encoding="utf-8")
    want = doc_table(files)
    if want not in text:
        errors.append(f"{DOC.name}: the preset value table is out of date; regenerate it with --doc-table")


def load():
    files = [(p.name, p.read_text(encoding="utf-8")) for p in sorted(PRESET_DIR.glob("*.yaml"))]
    return files, CORPUS.read_text(encoding="utf-8")


def self_test():
    """Every broken copy must be reported; proves the checks can fail."""
    files, corpus = load()
    base = dict(files)
    gmail = base["gmail.yaml"]

    def with_gmail(text):
        return [(n, text if n == "gmail.yaml" else t) for n, t in files]

    cases = {
        "regex that does not compile": (with_gmail(gmail.replace('text: "DKIM"', 'text: "(DKIM"', 1)), corpus),
        "look-around regex": (with_gmail(gmail.replace('text: "DKIM"', 'text: "(?=DKIM)"', 1)), corpus),
        "duration over 7d": (with_gmail(gmail.replace("duration: 15m ", "duration: 8d  ", 1)), corpus),
        "duration not a duration": (with_gmail(gmail.replace("duration: 15m ", "duration: 15x ", 1)), corpus),
        "missing source comment": (with_gmail(re.sub(r"(duration: 15m)\s+#.*", r"\1", gmail, count=1)), corpus),
        "undefined source key": (with_gmail(gmail.replace("[G1] 421 4.7.28: unusual", "[Z9] 421 4.7.28: unusual", 1)), corpus),
        "name without the preset prefix": (with_gmail(gmail.replace("name: gmail-rate-4.7.28-dkim", "name: rate-4.7.28-dkim", 1)), corpus),
        "duplicate rule name": (with_gmail(gmail.replace("name: gmail-rate-4.7.28-spf", "name: gmail-rate-4.7.28-dkim", 1)), corpus),
        "unknown action": (with_gmail(gmail.replace("action: throttle ", "action: slowdown ", 1)), corpus),
        "tenant scope without a key": (with_gmail(gmail.replace("tenant_key: dkim_domain ", "", 1)), corpus),
        "throttle factor out of range": (with_gmail(gmail.replace("factor: 0.5", "factor: 1.5", 1)), corpus),
        "no destination selector": (with_gmail(re.sub(r"  mx_hosts: .*", "  mx_hosts: []", gmail, count=1)), corpus),
        "unknown field": (with_gmail(gmail.replace("pacing:\n", "pacing:\n  burst: 3   # [G1] x\n", 1)), corpus),
        "sample hits the wrong rule": (files, corpus.replace("| gmail-rate-4.7.28-dkim |", "| gmail-rate-4.7.28 |", 1)),
        "rule without a sample": (files, "\n".join(l for l in corpus.splitlines() if "gmail-ptr-4.7.23" not in l)),
    }
    failed = []
    for what, (fs, cp) in cases.items():
        if not run(fs, cp):
            failed.append(what)
    if run(files, corpus):
        failed.append("the unmodified presets must pass")
    for what in failed:
        print(f"self-test: not detected: {what}", file=sys.stderr)
    return not failed


def main():
    if "--doc-table" in sys.argv[1:]:
        print(doc_table(load()[0]))
        return 0
    if "--write-doc" in sys.argv[1:]:
        text = DOC.read_text(encoding="utf-8")
        head, _, rest = text.partition(DOC_BEGIN)
        _, _, tail = rest.partition(DOC_END)
        DOC.write_text(head + doc_table(load()[0]) + tail, encoding="utf-8")
        return 0
    if "--self-test" in sys.argv[1:]:
        ok = self_test()
        print("presets_check self-test:", "ok" if ok else "FAILED")
        return 0 if ok else 1
    files, corpus = load()
    errors = run(files, corpus)
    check_doc(files, errors)
    for e in errors:
        print(e, file=sys.stderr)
    n_rules = sum(len((yaml.safe_load(t) or {}).get("rules") or []) for _, t in files)
    print(f"presets_check: {len(files)} presets, {n_rules} rules, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
