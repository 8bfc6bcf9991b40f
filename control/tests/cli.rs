//! The `atoll` CLI against a real API server: resource commands print JSON, errors exit non-zero
//! with the server's message, completions are generated.

use std::process::{Command, Output};

use atoll_control::{
    api,
    config::{ControlConfig, StoreConfig},
    core::{Command as Cmd, Principal},
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
    let cfg = ControlConfig {
        operator_token_file: dir.path().join("operator.token"),
        store: StoreConfig {
            path: dir.path().join("control.db"),
            ..StoreConfig::default()
        },
        ..ControlConfig::default()
    };
    let core = cfg.start().await.unwrap();
    core.execute(Principal::Operator, Cmd::RegisterHost("h".into()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve(core, listener, std::future::pending()));
    let op = cfg.operator_token().unwrap();

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
        let token = created["token"].as_str().unwrap().to_string();
        assert_eq!(created["cloud"]["gateway"], "192.168.0.1");
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
