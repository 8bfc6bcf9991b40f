//! The operators' dashboards and alerts in `deploy/`: the Grafana dashboard
//! (`deploy/grafana/atoll.json`) and the Prometheus alerting rules
//! (`deploy/prometheus/atoll-rules.yml`, unit-tested by `atoll-rules.test.yml`).
//!
//! Needs no root and no network. Checks:
//! - `promtool check rules` and `promtool test rules` pass (the rules' PromQL, their unit
//!   tests), and every query of the dashboard is valid PromQL too (`promtool check rules` on a
//!   file of recording rules made from them, Grafana's variables replaced);
//! - every metric the dashboard, the rules and the rules' tests use is exported: by the agent
//!   (`atoll_agent::metrics::render` of `Snapshot::example`, where every family has samples) or
//!   by the control plane (`atoll_control::metrics::render`). A name found in neither fails,
//!   naming it; so does a label that the metric does not have, or a literal label value
//!   (`reason=~"spoofed_source_ip|arp_spoofed"`, `route!~"Sync"`) that it never takes. `up`
//!   (Prometheus's own) is the only other name allowed, and `instance` and `job` (set by
//!   Prometheus) the only other labels;
//! - the dashboard's shape: schema version, the `${DS_PROMETHEUS}` input on every panel and
//!   query, its rows, unique panel ids; every alert has `for:`, a severity and both
//!   annotations.
//!
//! # Finding promtool
//!
//! `$PROMTOOL` if set, else `promtool` on `PATH`, else `/usr/bin/promtool` (Debian's
//! `prometheus` package, which `cargo xtask setup` installs). Missing, the test fails and says
//! so: it never skips.
//!
//! # Design decisions
//!
//! - **No YAML parser**: the rules are read with a small reader of the subset they are written
//!   in (`key: value` lines and `|` block scalars), and a test checks that it found one `expr`
//!   per rule, so nothing it cannot read goes unchecked. promtool parses the files for real.
//! - **A PromQL lexer, not a parser**: metric names are the identifiers that are neither
//!   functions (followed by `(`), aggregations, keywords, nor label lists (after `by`, `without`, `on`,
//!   `ignoring`, `group_left`, `group_right`, inside `{}`); strings, numbers, durations,
//!   ranges and Grafana's `$variables` are skipped. promtool has already checked the syntax.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana/atoll.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/atoll.json is not JSON: {e}"))
}

// ---------------------------------------------------------------------------------------------
// promtool

fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "PROMTOOL={} is no file: unset it to find promtool on PATH, or run `cargo xtask \
             setup`, which installs Debian's `prometheus` package (it ships promtool)",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("promtool"))
        .chain([PathBuf::from("/usr/bin/promtool")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found ($PROMTOOL, PATH, /usr/bin/promtool): run `cargo xtask setup`, \
                 which installs Debian's `prometheus` package (it ships promtool), or set PROMTOOL"
            )
        })
}

/// Runs promtool with `args` in `dir`; fails the test with its output unless it succeeds.
fn run_promtool(dir: &Path, args: &[&str]) -> String {
    let tool = promtool();
    let out = Command::new(&tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let dir = deploy().join("prometheus");
    let out = run_promtool(&dir, &["check", "rules", "atoll-rules.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_promtool(&dir, &["test", "rules", "atoll-rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every query of the dashboard, Grafana's variables replaced, as a recording rule.
#[test]
fn dashboard_queries_are_valid_promql() {
    let queries = dashboard_queries(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for (title, expr) in &queries {
        if expr.trim_start().starts_with("label_values(") {
            continue; // Grafana's, not PromQL (checked by `every_metric_used_is_exported`).
        }
        let promql = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "5m")
            .replace("$__range", "6h")
            .replace("$host", ".*");
        assert!(
            !promql.contains('$'),
            "{title}: an unknown variable in {expr}"
        );
        n += 1;
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&promql).unwrap()
        ));
    }
    assert!(n >= 20, "only {n} queries found in the dashboard");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), &rules).unwrap();
    run_promtool(dir.path(), &["check", "rules", "dashboard.yml"]);
}

// ---------------------------------------------------------------------------------------------
// Reading the files

/// Every query of the dashboard (`expr` of each target, the templating variables' queries),
/// with the title of its panel or variable.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let title = m.get("title").and_then(Value::as_str).unwrap_or(title);
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", Value::String(e)) => out.push((title.to_string(), e.clone())),
                        _ => walk(x, title, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], "", &mut out);
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        let name = format!("variable {}", var["name"]);
        let query = match &var["query"] {
            Value::String(q) => Some(q.clone()),
            Value::Object(o) => o.get("query").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        out.extend(query.map(|q| (name.clone(), q)));
        out.extend(var["definition"].as_str().map(|q| (name, q.to_string())));
    }
    out
}

/// The values of every `key:` of a YAML file of the subset the rules are written in: plain,
/// single- or double-quoted scalars on the key's line, or `|` / `>` block scalars below it.
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let Some(rest) = body.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n"));
        } else if let Some(q) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
            out.push(q.replace("''", "'"));
        } else if let Some(q) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            out.push(q.replace("\\\"", "\"").replace("\\\\", "\\"));
        } else {
            out.push(rest.to_string());
        }
    }
    out
}

/// The rules file's alerts: each `- alert:` entry's lines.
fn alert_blocks(text: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("- alert:") || t.starts_with("- record:") || t.starts_with("- name:") {
            blocks.extend(current.take());
            if !t.starts_with("- name:") {
                current = Some(String::new());
            }
        }
        if let Some(c) = &mut current {
            c.push_str(line);
            c.push('\n');
        }
    }
    blocks.extend(current);
    blocks
}

// ---------------------------------------------------------------------------------------------
// PromQL

/// `(label, operator, value)` of a selector.
type Matcher = (String, String, String);

/// One metric selector in a query.
#[derive(Debug, Clone, PartialEq)]
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
}

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Aggregation operators: followed by `(` or by a grouping (`sum by (x) (...)`).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];

/// The metric selectors of a PromQL expression (or of Grafana's `label_values(selector,
/// label)`, whose label comes back as a matcher `label` with operator `label_values`).
fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    if let Some(inner) = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (sel, label) = inner
            .rsplit_once(',')
            .ok_or_else(|| format!("label_values without a label: {expr}"))?;
        let mut found = selectors(sel)?;
        if let [one] = found.as_mut_slice() {
            one.matchers
                .push((label.trim().into(), "label_values".into(), String::new()));
        } else {
            return Err(format!("label_values of more than a selector: {expr}"));
        }
        return Ok(found);
    }
    let c: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let ident_char = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let skip_ws = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_string(&c, i)?.0;
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '$' {
            i += 1;
            if c.get(i) == Some(&'{') {
                while i < c.len() && c[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                i += 1;
            }
        } else if ch == '[' {
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch == '{' {
            return Err(format!("a selector without a metric name in {expr}"));
        } else if ident_start(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let ident: String = c[start..i].iter().collect();
            let next = skip_ws(i);
            if GROUPING.contains(&ident.as_str()) {
                if c.get(next) == Some(&'(') {
                    i = next;
                    while i < c.len() && c[i] != ')' {
                        i += 1;
                    }
                    i += 1;
                }
            } else if KEYWORDS.contains(&ident.as_str())
                || AGGREGATIONS.contains(&ident.as_str())
                || c.get(next) == Some(&'(')
            {
                // A keyword, an aggregation or a function.
            } else if c.get(next) == Some(&'{') {
                let (end, matchers) = parse_matchers(&c, next)?;
                i = end;
                out.push(Selector {
                    name: ident,
                    matchers,
                });
            } else {
                out.push(Selector {
                    name: ident,
                    matchers: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    Ok(out)
}

/// Skips the string literal at `c[i]`; returns the index after it and its value.
fn skip_string(c: &[char], i: usize) -> Result<(usize, String), String> {
    let quote = c[i];
    let mut j = i + 1;
    let mut value = String::new();
    while j < c.len() && c[j] != quote {
        if c[j] == '\\' && quote != '`' {
            j += 1;
        }
        if let Some(&ch) = c.get(j) {
            value.push(ch);
        }
        j += 1;
    }
    if j >= c.len() {
        return Err(format!(
            "an unterminated string in {}",
            c.iter().collect::<String>()
        ));
    }
    Ok((j + 1, value))
}

/// Parses `{label op "value", ...}` at `c[i] == '{'`.
fn parse_matchers(c: &[char], mut i: usize) -> Result<(usize, Vec<Matcher>), String> {
    let text = || c.iter().collect::<String>();
    let mut out = Vec::new();
    i += 1;
    loop {
        while i < c.len() && (c[i].is_whitespace() || c[i] == ',') {
            i += 1;
        }
        match c.get(i) {
            None => return Err(format!("an unterminated selector in {}", text())),
            Some('}') => return Ok((i + 1, out)),
            _ => {}
        }
        let start = i;
        while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
            i += 1;
        }
        let label: String = c[start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < c.len() && matches!(c[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = c[op_start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        if label.is_empty() || !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
            return Err(format!("a matcher I cannot read at {start} in {}", text()));
        }
        if !matches!(c.get(i), Some('"' | '\'' | '`')) {
            return Err(format!("a matcher without a string at {i} in {}", text()));
        }
        let (end, value) = skip_string(c, i)?;
        i = end;
        out.push((label, op, value));
    }
}

#[test]
fn the_lexer_finds_metrics_and_nothing_else() {
    let s = selectors(
        r#"histogram_quantile(0.99, sum by (route, le) (rate(atoll_api_request_seconds_bucket{route!~"Sync|ExecVm", x='a}b'}[$__rate_interval]))) > 2.5
           and on() max without (instance) (atoll_hosts{state="live"} offset 1h) == 0 or up
           # atoll_in_a_comment
           unless 8 * sum(rate(atoll_cloud_bytes_total[5m] @ end())) > 1e3"#,
    )
    .unwrap();
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "atoll_api_request_seconds_bucket",
            "atoll_hosts",
            "up",
            "atoll_cloud_bytes_total"
        ]
    );
    assert_eq!(
        s[0].matchers,
        [
            ("route".into(), "!~".into(), "Sync|ExecVm".into()),
            ("x".into(), "=".into(), "a}b".into())
        ]
    );
    let s = selectors("label_values(atoll_drops_total{job=\"a\"}, instance)").unwrap();
    assert_eq!(s[0].name, "atoll_drops_total");
    assert_eq!(s[0].matchers.len(), 2);
    assert!(selectors("{__name__=\"atoll_x\"}").is_err());
    assert!(selectors("atoll_x{a=\"b}").is_err());
}

// ---------------------------------------------------------------------------------------------
// What is exported

/// The metric names, labels and label values of an exposition (text format 0.0.4).
#[derive(Debug, Default)]
struct Exported {
    /// Names of `# TYPE` lines with their type.
    families: BTreeMap<String, String>,
    /// Sample name -> label -> values.
    samples: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exported {
    fn add(&mut self, text: &str, origin: &str) {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("the {origin}'s exposition does not parse: {e}"));
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, ty) = t.split_once(' ').expect("TYPE name type");
                self.families.insert(name.into(), ty.into());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let c: Vec<char> = line.chars().collect();
            let end = c
                .iter()
                .position(|ch| *ch == '{' || *ch == ' ')
                .unwrap_or(c.len());
            let name: String = c[..end].iter().collect();
            let labels = self.samples.entry(name).or_default();
            if c.get(end) == Some(&'{') {
                let (_, matchers) =
                    parse_matchers(&c, end).unwrap_or_else(|e| panic!("{origin}: {e}"));
                for (k, _, v) in matchers {
                    labels.entry(k).or_default().insert(v);
                }
            }
        }
    }

    /// Whether `name` is exported, as a family, a sample or a histogram's series.
    fn has(&self, name: &str) -> bool {
        self.samples.contains_key(name)
            || self.families.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|f| self.families.get(f).is_some_and(|t| t == "histogram"))
            })
    }
}

fn exported() -> Exported {
    let mut e = Exported::default();
    let agent = atoll_agent::metrics::render(
        &atoll_agent::metrics::Snapshot::example(),
        atoll_agent::metrics::Format::Text,
    );
    e.add(&agent, "agent");
    // Some requests and hosts, so that every family of the control plane has samples.
    atoll_control::metrics::api_request("CreateVm", 201, 0.05);
    atoll_control::metrics::api_request("CreateVm", 500, 0.2);
    atoll_control::metrics::set_hosts(1, 1);
    e.add(&atoll_control::metrics::render(), "control plane");
    for family in e.families.keys() {
        assert!(
            e.samples.keys().any(|s| s == family
                || s.strip_prefix(family.as_str())
                    .is_some_and(|r| r.starts_with('_'))),
            "{family} has no samples: the label checks would check nothing"
        );
    }
    e
}

/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Checks one selector used by `whence`; `values`: also its literal label values.
fn check(e: &Exported, whence: &str, s: &Selector, values: bool, errors: &mut Vec<String>) {
    if s.name == "up" {
        return;
    }
    if !s.name.starts_with("atoll_") || !e.has(&s.name) {
        errors.push(format!(
            "{whence}: {} is exported neither by the agent nor by the control plane",
            s.name
        ));
        return;
    }
    let Some(labels) = e.samples.get(&s.name) else {
        return;
    };
    for (label, op, value) in &s.matchers {
        if TARGET_LABELS.contains(&label.as_str()) || label == "__name__" {
            continue;
        }
        let Some(known) = labels.get(label) else {
            errors.push(format!(
                "{whence}: {} has no label {label} (it has {:?})",
                s.name,
                labels.keys().collect::<Vec<_>>()
            ));
            continue;
        };
        let literal = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|');
        if values && op != "label_values" && literal {
            for v in value.split('|') {
                if !known.contains(v) {
                    errors.push(format!(
                        "{whence}: {}{{{label}{op}\"{value}\"}}: {label} is never {v:?}",
                        s.name
                    ));
                }
            }
        }
    }
}

#[test]
fn every_metric_used_is_exported() {
    let e = exported();
    let mut errors = Vec::new();
    let mut used = BTreeSet::new();
    let mut check_expr = |whence: String, expr: &str, values: bool, errors: &mut Vec<String>| {
        match selectors(expr) {
            Ok(sels) => {
                for s in sels {
                    check(&e, &whence, &s, values, errors);
                    used.insert(s.name);
                }
            }
            Err(err) => errors.push(format!("{whence}: {err}")),
        }
    };
    for (title, expr) in dashboard_queries(&dashboard()) {
        check_expr(format!("dashboard, {title}"), &expr, true, &mut errors);
    }
    let rules = read("prometheus/atoll-rules.yml");
    let exprs = yaml_values(&rules, "expr");
    let alerts = yaml_values(&rules, "alert");
    assert_eq!(
        exprs.len(),
        alert_blocks(&rules).len(),
        "one expr per rule (or the reader missed some)"
    );
    for (alert, expr) in alerts.iter().zip(&exprs) {
        check_expr(format!("rule {alert}"), expr, true, &mut errors);
    }
    // The rules' tests feed series as the exporters name them (values are the test's own).
    let tests = read("prometheus/atoll-rules.test.yml");
    let series = yaml_values(&tests, "series");
    assert!(series.len() >= 10, "{series:?}");
    for s in &series {
        check_expr(format!("rule tests, series {s}"), s, false, &mut errors);
    }
    for expr in yaml_values(&tests, "expr") {
        check_expr(format!("rule tests, {expr}"), &expr, true, &mut errors);
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // Both exporters are covered, and the dataplane's new map fill is used.
    for name in [
        "atoll_drops_total",
        "atoll_map_entries",
        "atoll_map_capacity",
        "atoll_api_requests_total",
        "atoll_api_request_seconds_bucket",
        "atoll_usage_records_total",
        "atoll_budget_clouds",
        "atoll_store_txn_conflicts_total",
        "atoll_hosts",
        "up",
    ] {
        assert!(used.contains(name), "{name} is used nowhere: {used:?}");
    }
}

#[test]
fn a_metric_that_is_not_exported_fails_naming_it() {
    let e = exported();
    let mut errors = Vec::new();
    for expr in [
        "rate(atoll_drops_totl[5m])",
        "atoll_map_entries{mapp=\"ROUTES\"}",
        "atoll_drops_total{reason=\"spoofed_source_ipv9\"}",
        "node_load1",
    ] {
        for s in selectors(expr).unwrap() {
            check(&e, expr, &s, true, &mut errors);
        }
    }
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors[0].contains("atoll_drops_totl is exported neither"));
    assert!(errors[1].contains("has no label mapp"));
    assert!(errors[2].contains("is never \"spoofed_source_ipv9\""));
    assert!(errors[3].contains("node_load1"));
}

// ---------------------------------------------------------------------------------------------
// Shapes

#[test]
fn the_dashboard_is_importable() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    assert!(d["id"].is_null(), "an exported dashboard has no id");
    assert_eq!(d["uid"], "atoll-overview");
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let panels = d["panels"].as_array().expect("panels");
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(
        rows,
        ["Host dataplane", "Control plane", "Spend", "Budgets"]
    );
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id repeats"
        );
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}: no description"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}");
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        assert_eq!(v["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", v["name"]);
    }
}

#[test]
fn every_alert_has_for_severity_and_annotations() {
    let rules = read("prometheus/atoll-rules.yml");
    let blocks = alert_blocks(&rules);
    assert!(blocks.len() >= 12, "{} rules", blocks.len());
    let mut names = BTreeSet::new();
    for b in &blocks {
        let name = yaml_values(b, "alert")
            .pop()
            .unwrap_or_else(|| panic!("not an alert: {b}"));
        assert!(names.insert(name.clone()), "{name} twice");
        assert_eq!(yaml_values(b, "for").len(), 1, "{name}: for");
        let severity = yaml_values(b, "severity");
        assert!(
            matches!(
                severity.as_slice(),
                [s] if ["critical", "warning", "info"].contains(&s.as_str())
            ),
            "{name}: severity {severity:?}"
        );
        for a in ["summary", "description"] {
            assert!(
                yaml_values(b, a).first().is_some_and(|s| !s.is_empty()),
                "{name}: {a}"
            );
        }
    }
    // What the brief of the rules asks for, by name.
    for alert in [
        "AtollAgentDown",
        "AtollDataplaneMapNearlyFull",
        "AtollSpoofingDrops",
        "AtollDropRateSpike",
        "AtollUsageJournalGrowing",
        "AtollUsageRecordsQuarantined",
        "AtollUsageRecordsRefused",
        "AtollApiErrors",
        "AtollApiSlow",
        "AtollCloudsOverBudget",
    ] {
        assert!(names.contains(alert), "{alert} is missing: {names:?}");
    }
    // The rules' unit tests cover some of each group.
    let tests = read("prometheus/atoll-rules.test.yml");
    let tested: BTreeSet<String> = yaml_values(&tests, "alertname").into_iter().collect();
    for alert in &tested {
        assert!(
            names.contains(alert),
            "the tests test {alert}, which is no rule"
        );
    }
    for alert in [
        "AtollAgentDown",
        "AtollDataplaneMapNearlyFull",
        "AtollSpoofingDrops",
        "AtollApiErrors",
        "AtollApiSlow",
        "AtollUsageRecordsRefused",
        "AtollCloudsOverBudget",
    ] {
        assert!(tested.contains(alert), "{alert} has no unit test");
    }
}
