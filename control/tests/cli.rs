//! The `atoll` CLI against a real API server: resource commands print JSON, errors exit non-zero
//! with the server's message, completions are generated; `vm console` prints the text itself.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use atoll_control::{
    api,
    config::{ControlConfig, StoreConfig},
    core::{Command as Cmd, Principal},
    model::{StatusReport, VmReport, VmState, VmStatus, MAX_USER_DATA_BYTES},
};
use serde_json::Value;

fn atoll(url: &str, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atoll"))
        .args(["--url", url])
        .env("ATOLL_TOKEN", token)
        .args(args)
        .output()
        .expect("run atoll")
}

/// `atoll` with `input` on its stdin.
fn atoll_stdin(url: &str, token: &str, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_atoll"))
        .args(["--url", url])
        .env("ATOLL_TOKEN", token)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run atoll");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait for atoll")
}

/// A control plane's settings with its token and store in `dir`.
fn control_config(dir: &std::path::Path) -> ControlConfig {
    ControlConfig {
        operator_token_file: dir.join("operator.token"),
        store: StoreConfig {
            path: dir.join("control.db"),
            ..StoreConfig::default()
        },
        ..ControlConfig::default()
    }
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "atoll failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_drives_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = control_config(dir.path());
    let core = cfg.start().await.unwrap();
    core.execute(Principal::Operator, Cmd::RegisterHost { host: "h".into() })
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve(core.clone(), listener, std::future::pending()));
    let op = cfg.operator_token().unwrap();
    let rt = tokio::runtime::Handle::current();

    let url2 = url.clone();
    let op2 = op.clone();
    tokio::task::spawn_blocking(move || {
        let (url, op) = (url2, op2);
        let created = json(&atoll(
            &url,
            &op,
            &[
                "cloud",
                "create",
                "--name",
                "cli",
                "--cidr",
                "192.168.0.0/24",
            ],
        ));
        let id = created["cloud"]["id"].as_str().unwrap().to_string();
        let first_token = created["token"].as_str().unwrap().to_string();
        assert_eq!(created["cloud"]["gateway"], "192.168.0.1");
        // The cloud rotates its token: the new one is printed, the old one is refused.
        let rotated = json(&atoll(&url, &first_token, &["cloud", "token", &id]));
        assert_eq!(
            rotated["cloud"]["id"].as_str(),
            Some(id.as_str()),
            "{rotated}"
        );
        let token = rotated["token"].as_str().unwrap().to_string();
        assert!(token.starts_with(&format!("atl_{id}_")) && token != first_token);
        // Expiry: set with a duration, cleared; a cloud created with one shows it.
        let set = json(&atoll(&url, &token, &["cloud", "expire", &id, "--ttl", "2h"]));
        let at = set["expires_at"].as_u64().expect("an expiry");
        let got = json(&atoll(&url, &token, &["cloud", "get", &id]));
        assert_eq!(got["expires_at"].as_u64(), Some(at));
        let never = json(&atoll(&url, &token, &["cloud", "expire", &id, "--never"]));
        assert!(never.get("expires_at").is_none(), "{never}");
        let neither = atoll(&url, &token, &["cloud", "expire", &id]);
        assert_eq!(neither.status.code(), Some(2), "{neither:?}");
        let bad = atoll(&url, &token, &["cloud", "expire", &id, "--ttl", "1w"]);
        assert_eq!(bad.status.code(), Some(2), "{bad:?}");
        let short = json(&atoll(&url, &op, &["cloud", "create", "--ttl", "90m"]));
        let created_at = short["cloud"]["created_at"].as_u64().unwrap();
        let expires = short["cloud"]["expires_at"].as_u64().unwrap();
        assert!((5399..=5401).contains(&(expires - created_at)), "{short}");
        let old = atoll(&url, &first_token, &["cloud", "get", &id]);
        assert_eq!(old.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&old.stderr).contains("401"),
            "{old:?}"
        );
        // A host token, as an operator issues it for an agent: it lists nothing but works for
        // its host's routes (the API suite covers the rest).
        let host = json(&atoll(&url, &op, &["host", "token", "h"]));
        let host_token = host["token"].as_str().unwrap();
        assert!(host_token.starts_with("atl_host_h_"), "{host}");
        let refused = atoll(&url, host_token, &["host", "list"]);
        assert!(!refused.status.success(), "a host token lists no hosts");
        let vm = json(&atoll(
            &url,
            &token,
            &["vm", "create", &id, "web", "--vcpus", "2"],
        ));
        assert_eq!(vm["ipv4"], "192.168.0.2");
        let list = json(&atoll(&url, &token, &["vm", "list", &id]));
        assert_eq!(list.as_array().unwrap().len(), 1);
        json(&atoll(
            &url,
            &token,
            &["dns", "set", &id, "www", "CNAME", "web.cli.atoll.internal."],
        ));
        let recs = json(&atoll(&url, &token, &["dns", "list", &id]));
        assert_eq!(recs.as_array().unwrap().len(), 2, "{recs}");
        // Lifecycle: user data from a file or stdin, created stopped, started, stopped.
        let script = dir.path().join("user-data.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let script = script.to_str().unwrap();
        let app = json(&atoll(
            &url,
            &token,
            &[
                "vm",
                "create",
                &id,
                "app",
                "--user-data-file",
                script,
                "--stopped",
            ],
        ));
        assert_eq!(
            (&app["power"], &app["user_data"]),
            (
                &Value::from("stopped"),
                &Value::from("#!/bin/sh\necho hi\n")
            )
        );
        let piped = json(&atoll_stdin(
            &url,
            &token,
            &["vm", "create", &id, "piped", "--user-data-file", "-"],
            "echo piped\n".as_bytes(),
        ));
        assert_eq!(
            (&piped["power"], &piped["user_data"]),
            (&Value::from("running"), &Value::from("echo piped\n"))
        );
        let started = json(&atoll(&url, &token, &["vm", "start", &id, "app"]));
        assert_eq!(started["power"], "running");
        let stopped = json(&atoll(&url, &token, &["vm", "stop", &id, "app"]));
        assert_eq!(
            (&stopped["power"], &stopped["stopped_by"]),
            (&Value::from("stopped"), &Value::from("request"))
        );
        let lazy = json(&atoll(
            &url,
            &token,
            &["vm", "create", &id, "lazy", "--idle-timeout", "10m"],
        ));
        assert_eq!(lazy["idle_timeout_secs"], 600, "{lazy}");
        let got = json(&atoll(&url, &token, &["vm", "get", &id, "app"]));
        assert_eq!(
            (&got["power"], &got["status"]["state"]),
            (&Value::from("stopped"), &Value::from("pending"))
        );
        // Too much user data is refused before sending; a missing file is named.
        let big = dir.path().join("big.sh");
        std::fs::write(&big, vec![b'#'; MAX_USER_DATA_BYTES + 1]).unwrap();
        for file in [big.to_str().unwrap(), "/nonexistent/user-data"] {
            let out = atoll(
                &url,
                &token,
                &["vm", "create", &id, "nope", "--user-data-file", file],
            );
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("--user-data-file"), "{err}");
        }
        // The console is printed as it is (no JSON, no added newline): empty until reported.
        let empty = atoll(&url, &token, &["vm", "console", &id, "app"]);
        assert!(
            empty.status.success() && empty.stdout.is_empty(),
            "{empty:?}"
        );
        let tail = "boot ok\nλ \"quoted\"\n$ ";
        let report = StatusReport {
            services: Vec::new(),
            idle: Vec::new(),
            vms: vec![VmReport {
                cloud: id.parse().unwrap(),
                vm: "app".into(),
                status: VmStatus {
                    state: VmState::Running,
                    device: None,
                    message: None,
                    updated_at: 1,
                    restarts: 0,
                    boot_ms: Some(300),
                    accel: Some("kvm".into()),
                },
                console: Some(tail.into()),
            }],
            denied: Vec::new(),
        };
        rt.block_on(core.execute(
            Principal::Operator,
            Cmd::ReportStatus {
                host: "h".into(),
                report,
            },
        ))
        .unwrap();
        let console = atoll(&url, &token, &["vm", "console", &id, "app"]);
        assert!(console.status.success(), "{console:?}");
        assert_eq!(String::from_utf8(console.stdout).unwrap(), tail);
        let missing = atoll(&url, &token, &["vm", "console", &id, "ghost"]);
        assert_eq!(missing.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
        assert!(atoll(&url, &token, &["vm", "delete", &id, "piped"])
            .status
            .success());
        // Egress policies: rules in the CLI's form; a deny by name is refused by the server,
        // a malformed rule by the CLI, both naming what is wrong.
        assert_eq!(
            json(&atoll(&url, &token, &["egress", "show", &id]))["mode"],
            "deny"
        );
        let set = json(&atoll(
            &url,
            &token,
            &[
                "egress",
                "set",
                &id,
                "--mode",
                "allowlist",
                "--allow",
                "*.PyPI.org:tcp:443",
                "--allow",
                "198.18.0.9",
                "--deny",
                "198.18.5.0/24:udp:5000-5100",
                "--rate",
                "1000000",
                "--budget",
                "5000000/day",
            ],
        ));
        assert_eq!(
            set,
            serde_json::json!({
                "mode": "allowlist",
                "allow": [
                    {"domain": "*.pypi.org", "protocol": "tcp", "ports": {"first": 443, "last": 443}},
                    {"cidr": "198.18.0.9/32"}
                ],
                "deny": [{"cidr": "198.18.5.0/24", "protocol": "udp", "ports": {"first": 5000, "last": 5100}}],
                "limits": {"rate_bytes_per_sec": 1000000, "budget": {"bytes": 5000000, "period": "day"}}
            })
        );
        assert_eq!(json(&atoll(&url, &token, &["egress", "show", &id])), set);
        let by_name = atoll(
            &url,
            &token,
            &["egress", "set", &id, "--mode", "allow", "--deny", "evil.example"],
        );
        assert_eq!(by_name.status.code(), Some(1));
        let err = String::from_utf8_lossy(&by_name.stderr);
        assert!(err.contains("400") && err.contains("deny[0].domain"), "{err}");
        let malformed = atoll(
            &url,
            &token,
            &["egress", "set", &id, "--mode", "allowlist", "--allow", "1.2.3.0/24:sctp"],
        );
        assert_eq!(malformed.status.code(), Some(2));
        let err = String::from_utf8_lossy(&malformed.stderr);
        assert!(err.contains("--allow") && err.contains("sctp"), "{err}");
        assert_eq!(
            json(&atoll(&url, &token, &["egress", "denied", &id])),
            serde_json::json!([])
        );
        // Own egress addresses are the operator's to give: this control plane has none.
        let refused = atoll(&url, &op, &["egress", "assign", &id]);
        assert_eq!(refused.status.code(), Some(1));
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("409") && err.contains("clouds.egress_pool"), "{err}");
        // Errors: the server's message, naming the field, and exit status 1.
        let bad = atoll(&url, &token, &["vm", "create", &id, "Bad_Name"]);
        assert_eq!(bad.status.code(), Some(1));
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains("400") && err.contains("field name"), "{err}");
        let other = json(&atoll(&url, &op, &["cloud", "create"]));
        let other_id = other["cloud"]["id"].as_str().unwrap();
        let denied = atoll(&url, &token, &["vm", "list", other_id]);
        assert_eq!(denied.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&denied.stderr).contains("403"));
        // Deleting prints nothing and succeeds.
        let del = atoll(&url, &token, &["cloud", "delete", &id]);
        assert!(del.status.success() && del.stdout.is_empty());
        // Usage errors are clap's (exit 2); completions are generated.
        assert_eq!(atoll(&url, &op, &["vm", "create"]).status.code(), Some(2));
        let comp = atoll(&url, &op, &["completions", "bash"]);
        assert!(comp.status.success() && String::from_utf8_lossy(&comp.stdout).contains("atoll"));
        // No server (a port this test bound and released): a clear connection error.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let down_url = format!("http://{closed}");
        let down = atoll(&down_url, &op, &["cloud", "list"]);
        assert_eq!(down.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&down.stderr).contains(&format!("request to {down_url}")));
    })
    .await
    .unwrap();
}

/// The CLI over HTTPS: it verifies the API against `--ca-file` or `--ca-fingerprint`, refuses
/// another CA or fingerprint with an error naming the flag, and never sends a token in clear
/// text off the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_verifies_the_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = control_config(dir.path());
    let core = cfg.start().await.unwrap();
    let (paths, fingerprint, _) =
        atoll_control::tls::ensure_generated(&dir.path().join("tls"), &["127.0.0.1".to_string()])
            .unwrap();
    let tls = atoll_control::tls::server_config(&paths.cert_file, &paths.key_file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve_tls(
        core,
        listener,
        api::Limits::default(),
        Some(tls),
        std::future::pending(),
    ));
    let op = cfg.operator_token().unwrap();
    let other = atoll_control::tls::Ca::new("not the API's").unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.cert_pem()).unwrap();
    let ca = paths.ca_file.display().to_string();
    let other_ca = other_file.display().to_string();
    tokio::task::spawn_blocking(move || {
        let run = |extra: &[&str]| {
            let mut args = extra.to_vec();
            args.extend(["cloud", "list"]);
            atoll(&url, &op, &args)
        };
        json(&run(&["--ca-file", &ca]));
        json(&run(&["--ca-fingerprint", &fingerprint]));
        for (flag, value) in [
            ("--ca-file", other_ca.as_str()),
            ("--ca-fingerprint", other.fingerprint().as_str()),
        ] {
            let out = run(&[flag, value]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("TLS") && err.contains(flag), "{err}");
        }
        // Plain http to another machine is refused before any connection is made
        // (192.0.2.1 is TEST-NET-1: nothing is sent anywhere).
        let out = atoll("http://192.0.2.1:7480", &op, &["cloud", "list"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("loopback"), "{err}");
    })
    .await
    .unwrap();
}
