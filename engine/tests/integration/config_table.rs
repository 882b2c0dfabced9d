//! The reference table of settings in docs/operations.md agrees with the
//! code: one row per `Config` field, the defaults of `Config::default()`,
//! and a flag and variable of the `herald` binary that really set the key.

use std::collections::BTreeMap;
use std::process::Command;

use herald::Config;
use serde_json::Value;

const OPERATIONS_MD: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md"));
const HEADING: &str = "## Configuration and limits";
/// Tables of the configuration file with no flag or variable, documented
/// below the table under their own heading.
const FILE_ONLY: [&str; 1] = ["namespaces"];

/// One row of the table: the key, flag and variable cells, and the
/// default as written (the cell's first code span).
#[derive(Debug)]
struct Row {
    key: String,
    flag: String,
    var: String,
    default: String,
}

/// The first code span of a table cell, without its backticks.
fn code(cell: &str) -> Option<String> {
    let rest = &cell[cell.find('`')? + 1..];
    Some(rest[..rest.find('`')?].to_string())
}

fn table() -> Vec<Row> {
    let section = &OPERATIONS_MD[OPERATIONS_MD.find(HEADING).expect("operations.md has the configuration section")..];
    let mut lines = section.lines().skip_while(|l| !l.starts_with("| key | flag | variable | default |"));
    assert!(lines.next().is_some(), "the section has the table");
    assert!(lines.next().is_some_and(|l| l.starts_with("|---")), "the header is followed by its rule");
    let rows: Vec<Row> = lines
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 6, "six cells in {l:?}");
            let get = |i: usize| code(cells[i]).unwrap_or_else(|| panic!("cell {i} of {l:?} has no `code`"));
            Row { key: get(0), flag: get(1), var: get(2), default: get(3) }
        })
        .collect();
    assert!(!rows.is_empty());
    rows
}

/// The defaults as serde sees them, keyed by field name.
fn defaults() -> BTreeMap<String, Value> {
    match serde_json::to_value(Config::default()).unwrap() {
        Value::Object(m) => m.into_iter().collect(),
        other => panic!("Config serializes as an object, not {other}"),
    }
}

/// A default as the table writes it.
fn written(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        Value::Array(a) if a.is_empty() => "none".into(),
        Value::Array(a) => a.iter().map(written).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

#[test]
fn every_config_field_is_one_row_with_its_default() {
    let rows = table();
    let defaults = defaults();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let mut unique = keys.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), keys.len(), "a key appears twice: {keys:?}");
    let fields: Vec<&str> = defaults.keys().map(String::as_str).filter(|k| !FILE_ONLY.contains(k)).collect();
    assert_eq!(unique, fields, "table rows (left) and Config fields (right) differ");
    let section = &OPERATIONS_MD[OPERATIONS_MD.find(HEADING).unwrap()..];
    for table in FILE_ONLY {
        assert!(section.contains(&format!("### `[{table}.")), "operations.md documents the [{table}.…] tables");
    }
    for r in &rows {
        assert_eq!(r.default, written(&defaults[&r.key]), "default of {} in the table", r.key);
    }
}

/// Runs the built `herald` with `args` and `env`, and returns its stdout;
/// panics with its stderr if it fails.
fn herald(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args).env("HERALD_LOG", "error");
    // Settings from the caller's environment would make the test lie.
    for (k, _) in std::env::vars() {
        if k.starts_with("HERALD_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.envs(env.iter().copied()).output().unwrap();
    assert!(out.status.success(), "herald {args:?} {env:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_row_names_a_flag_and_variable_of_herald_help() {
    let help = herald(&["--help"], &[]);
    let flags: Vec<&str> = help.lines().filter_map(|l| l.trim_start().strip_prefix("--")).filter_map(|l| l.split(' ').next()).collect();
    for r in table() {
        assert!(flags.iter().any(|f| Some(*f) == r.flag.strip_prefix("--")), "{} is not a flag of herald --help:\n{help}", r.flag);
        // Secrets' variables are shown without their values.
        let shown = help.contains(&format!("[env: {}=", r.var)) || help.contains(&format!("[env: {}]", r.var));
        assert!(shown, "{} is not in herald --help:\n{help}", r.var);
    }
}

/// The configuration `herald --print-config` reports, as serde values.
fn printed(args: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, Value> {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let config: Config = toml::from_str(&herald(&all, env)).unwrap();
    match serde_json::to_value(config).unwrap() {
        Value::Object(m) => m.into_iter().collect(),
        _ => unreachable!(),
    }
}

/// A value other than the default for `key`, as a flag argument (None for
/// a boolean flag, which flips the default by its presence), and what the
/// key should then hold.
fn other_value(key: &str, default: &Value) -> (Option<String>, Value) {
    match default {
        Value::Number(n) => {
            let v = n.as_u64().unwrap() + 1;
            (Some(v.to_string()), Value::from(v))
        }
        Value::Bool(b) => (None, Value::Bool(!b)),
        _ => {
            let (arg, want) = match key {
                "listen" => ("127.0.0.1:9", Value::from("127.0.0.1:9")),
                "slow_consumer" => ("drop", Value::from("drop")),
                "redis" => ("redis://127.0.0.1:1", Value::from("redis://127.0.0.1:1")),
                "redis_cluster" => ("redis://a:1,redis://b:2", serde_json::json!(["redis://a:1", "redis://b:2"])),
                "redis_prefix" => ("other:", Value::from("other:")),
                "redis_tls_ca" => ("/etc/ca.pem", Value::from("/etc/ca.pem")),
                "tls_cert" => ("/etc/cert.pem", Value::from("/etc/cert.pem")),
                "tls_key" => ("/etc/key.pem", Value::from("/etc/key.pem")),
                "api_key" => ("an-api-key-of-some-length", Value::from("<redacted>")),
                "auth" => (
                    "a-secret-of-at-least-16",
                    serde_json::json!({"hmac_secret": "<redacted>", "public_key_file": null, "audience": null, "issuer": null, "leeway_s": 30, "max_token_bytes": 8192}),
                ),
                "proxy" => (
                    "http://127.0.0.1:9/publish",
                    serde_json::json!({"connect_url": null, "subscribe_url": null, "publish_url": "http://127.0.0.1:9/publish", "timeout_ms": 1000, "max_in_flight": 1000}),
                ),
                "allowed_origins" => ("https://a.example,http://b:3000", serde_json::json!(["https://a.example", "http://b:3000"])),
                _ => panic!("no test value for {key}: add one"),
            };
            (Some(arg.to_string()), want)
        }
    }
}

#[test]
fn each_flag_and_each_variable_sets_its_key() {
    let defaults = defaults();
    assert_eq!(printed(&[], &[]), defaults, "--print-config with nothing set prints the defaults");
    for r in table() {
        let (arg, want) = other_value(&r.key, &defaults[&r.key]);
        // tls_cert and tls_key are set together or not at all.
        let partner = match r.key.as_str() {
            "tls_cert" => Some(("--tls-key", "/etc/key.pem", "tls_key")),
            "tls_key" => Some(("--tls-cert", "/etc/cert.pem", "tls_cert")),
            _ => None,
        };
        let extra: Vec<&str> = partner.iter().flat_map(|(f, v, _)| [*f, *v]).collect();
        let by_flag = match &arg {
            Some(v) => printed(&[&[r.flag.as_str(), v.as_str()][..], &extra].concat(), &[]),
            None => printed(&[&[r.flag.as_str()][..], &extra].concat(), &[]),
        };
        let by_var = printed(&extra, &[(&r.var, arg.as_deref().unwrap_or("true"))]);
        for (how, got) in [("flag", by_flag), ("variable", by_var)] {
            assert_eq!(got[&r.key], want, "{} set by its {how}", r.key);
            let changed: Vec<&String> = got.keys().filter(|k| got[*k] != defaults[*k]).collect();
            let mut expected = vec![r.key.as_str()];
            expected.extend(partner.map(|(_, _, k)| k));
            expected.sort_unstable();
            assert_eq!(changed, expected, "{} by its {how} changed only its key", r.key);
        }
    }
}
