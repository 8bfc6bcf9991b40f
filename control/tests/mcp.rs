//! `atoll mcp` driven by a real MCP client, the official Python SDK (`mcp`, pinned and
//! installed in `target/mcp-venv` by `cargo xtask setup`), against a real control plane: the
//! client starts `atoll mcp` over stdio, lists the tools the route table generates and walks
//! through what an agent does: create a cloud and a VM, read it back, name a service in DNS,
//! expose it, offer it to a second cloud, accept the offer there with that cloud's own token,
//! see the import, give the first cloud an expiry; an API error comes back as a tool error
//! naming what was wrong, and a cloud's token reaches no other cloud. The second cloud's part
//! runs over the API server's MCP endpoint (streamable HTTP) instead of `atoll mcp`.

use std::{path::PathBuf, process::Command};

use atoll_control::{
    api,
    config::{ControlConfig, StoreConfig},
    core::{Command as Cmd, Principal},
};

/// The client: what `cargo xtask setup` installs (it fails loudly without it).
fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/mcp-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (cargo xtask test does), which installs the \
         MCP Python SDK there",
        p.display()
    );
    p
}

const WALKTHROUGH: &str = r#"
import asyncio, json, sys
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

ATOLL, URL, OP = sys.argv[1], sys.argv[2], sys.argv[3]

def server(token):
    return StdioServerParameters(command=ATOLL, args=["--url", URL, "mcp"], env={"ATOLL_TOKEN": token})

def ok(res, what):
    assert not res.is_error, f"{what}: {res.content[0].text}"
    return json.loads(res.content[0].text)

def err(res, what):
    assert res.is_error, f"{what} succeeded: {res.content[0].text}"
    return json.loads(res.content[0].text)

async def with_session(token, fn, http=False):
    if http:
        client = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        transport = streamable_http_client(URL + "/mcp", http_client=client, terminate_on_close=False)
    else:
        transport = stdio_client(server(token))
    async with transport as streams:
        r, w = streams[0], streams[1]
        async with ClientSession(r, w) as s:
            init = await s.initialize()
            assert init.server_info.name == "atoll", init
            return await fn(s)

async def as_operator(s):
    tools = (await s.list_tools()).tools
    names = {t.name for t in tools}
    for n in ["create_cloud", "create_vm", "get_vm", "put_record_set", "create_exposure",
              "create_grant", "accept_offer", "list_imports", "set_cloud_expiry"]:
        assert n in names, (n, sorted(names))
    assert "sync" not in names and "report_status" not in names, "hosts' routes are not tools"
    vm_tool = next(t for t in tools if t.name == "create_vm")
    assert vm_tool.input_schema["required"] == ["cloud", "body"], vm_tool.input_schema
    a = ok(await s.call_tool("create_cloud", {"body": {"name": "alpha"}}), "create cloud alpha")
    b = ok(await s.call_tool("create_cloud", {"body": {"name": "beta"}}), "create cloud beta")
    bad = err(await s.call_tool("create_vm", {"cloud": a["cloud"]["id"], "body": {"name": "Bad_Name"}}), "a bad VM name")
    assert bad["status"] == 400 and bad["error"]["field"] == "name", bad
    return len(tools), a, b

async def as_alpha(a, b):
    cid = a["cloud"]["id"]
    async def go(s):
        vm = ok(await s.call_tool("create_vm", {"cloud": cid, "body": {"name": "web", "memory_mib": 64}}), "create vm")
        got = ok(await s.call_tool("get_vm", {"cloud": cid, "vm": "web"}), "get vm")
        assert got["ipv4"] == vm["ipv4"] and got["fqdn"] == "web.alpha.atoll.internal.", got
        ok(await s.call_tool("put_record_set", {"cloud": cid, "name": "www", "type": "CNAME",
                                                 "body": {"ttl": 60, "values": ["web.alpha.atoll.internal."]}}), "record set")
        ok(await s.call_tool("create_exposure", {"cloud": cid, "body": {
            "name": "http", "protocol": "tcp", "port": 80, "backends": [{"vm": "web", "port": 8080}]}}), "expose")
        ok(await s.call_tool("create_grant", {"cloud": cid, "exposure": "http", "body": {"consumer": b["cloud"]["id"]}}), "offer")
        exp = ok(await s.call_tool("set_cloud_expiry", {"cloud": cid, "body": {"ttl_secs": 3600}}), "expiry")
        assert exp["expires_at"] > exp["created_at"], exp
        missing = err(await s.call_tool("get_vm", {"cloud": cid, "vm": "nope"}), "a missing VM")
        assert missing["status"] == 404, missing
        other = err(await s.call_tool("get_cloud", {"cloud": b["cloud"]["id"]}), "another cloud")
        assert other["status"] == 403, other
        return vm
    return await with_session(a["token"], go)

async def as_beta(a, b):
    cid, pid = b["cloud"]["id"], a["cloud"]["id"]
    async def go(s):
        offers = ok(await s.call_tool("list_offers", {"cloud": cid}), "offers")
        assert [o["exposure"] for o in offers] == ["http"], offers
        ok(await s.call_tool("accept_offer", {"cloud": cid, "provider": pid, "exposure": "http"}), "accept")
        imports = ok(await s.call_tool("list_imports", {"cloud": cid}), "imports")
        assert len(imports) == 1 and imports[0]["provider"] == pid, imports
        other = err(await s.call_tool("get_vm", {"cloud": pid, "vm": "web"}), "another cloud's VM")
        assert other["status"] == 403, other
        return imports[0]
    # Over the API server's own endpoint (streamable HTTP), with beta's token.
    return await with_session(b["token"], go, http=True)

async def main():
    n, a, b = await with_session(OP, as_operator)
    vm = await as_alpha(a, b)
    imp = await as_beta(a, b)
    print(json.dumps({"tools": n, "vm": vm["name"], "vip": imp["vip"]}))
    print("WALKTHROUGH OK")

asyncio.run(main())
"#;

/// A control plane on SQLite in `dir`, serving its API on loopback: its config, core and URL.
async fn control_plane(
    dir: &std::path::Path,
) -> (
    ControlConfig,
    std::sync::Arc<atoll_control::core::Core>,
    String,
) {
    let cfg = ControlConfig {
        operator_token_file: dir.join("operator.token"),
        store: StoreConfig {
            path: dir.join("control.db"),
            ..StoreConfig::default()
        },
        ..ControlConfig::default()
    };
    let core = cfg.start().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve(core.clone(), listener, std::future::pending()));
    (cfg, core, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_walks_through_an_agents_first_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, core, url) = control_plane(dir.path()).await;
    core.execute(Principal::Operator, Cmd::RegisterHost { host: "h".into() })
        .await
        .unwrap();
    let op = cfg.operator_token().unwrap();
    let script = dir.path().join("walkthrough.py");
    std::fs::write(&script, WALKTHROUGH).unwrap();
    let python = python();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(&script)
            .args([env!("CARGO_BIN_EXE_atoll"), url.as_str(), op.as_str()])
            .output()
            .expect("running the MCP client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("WALKTHROUGH OK"),
        "the MCP walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().next().unwrap_or_default()).unwrap();
    assert!(summary["tools"].as_u64().unwrap() > 40, "{summary}");
}

/// The API server's MCP endpoint at the HTTP level: a token is required (401) and must be a
/// cloud's or the operator's (a host's: 403); there is no stream to open (`GET`: 405); a
/// notification gets 202 without a body; a request gets its JSON-RPC reply; garbage gets a
/// parse error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_endpoint_takes_one_message_per_post() {
    use atoll_control::{client::Client, core::Reply};
    use hyper::{Method, StatusCode};
    use serde_json::{json, Value};
    let dir = tempfile::tempdir().unwrap();
    let (cfg, core, url) = control_plane(dir.path()).await;
    let Reply::HostToken(host) = core
        .execute(
            Principal::Operator,
            Cmd::IssueHostToken { host: "h".into() },
        )
        .await
        .unwrap()
    else {
        panic!("a host token")
    };
    let op = Client::new(&url, &cfg.operator_token().unwrap()).unwrap();
    let post = |c: &Client, v: Value| {
        let c = c.clone();
        async move {
            let (status, bytes) = c
                .send(Method::POST, "/mcp", Some(&v), std::time::Duration::ZERO)
                .await
                .unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (status, body)
        }
    };
    let ping = json!({"jsonrpc": "2.0", "id": 7, "method": "ping"});
    assert_eq!(
        post(&op, ping.clone()).await,
        (
            StatusCode::OK,
            json!({"jsonrpc": "2.0", "id": 7, "result": {}})
        )
    );
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(post(&op, note).await, (StatusCode::ACCEPTED, Value::Null));
    let (status, body) = post(&op, json!("not a message")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["error"]["code"].is_i64(), "{body}");
    let unknown = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                         "params": {"name": "sync", "arguments": {"host": "h"}}});
    let (_, body) = post(&op, unknown).await;
    assert_eq!(
        body["error"]["code"], -32602,
        "hosts' routes are no tools: {body}"
    );
    let anonymous = Client::new(&url, "").unwrap();
    assert_eq!(
        post(&anonymous, ping.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    let host = Client::new(&url, &host.token).unwrap();
    assert_eq!(post(&host, ping).await.0, StatusCode::FORBIDDEN);
    let (status, _) = op
        .send(
            Method::GET,
            "/mcp",
            None::<&Value>,
            std::time::Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
