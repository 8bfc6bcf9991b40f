//! `atoll mcp` driven by a real MCP client, the official Python SDK (`mcp`, pinned and
//! installed in `target/mcp-venv` by `cargo xtask setup`), against a real control plane: the
//! client starts `atoll mcp` over stdio, lists the tools the route table generates and walks
//! through what an agent does: create a cloud and a VM, read it back, name a service in DNS,
//! expose it, offer it to a second cloud, accept the offer there with that cloud's own token,
//! see the import, give the first cloud an expiry; an API error comes back as a tool error
//! naming what was wrong, and a cloud's token reaches no other cloud.

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

ATOLL, URL, OP = sys.argv[1], sys.argv[2], sys.argv[3]

def server(token):
    return StdioServerParameters(command=ATOLL, args=["--url", URL, "mcp"], env={"ATOLL_TOKEN": token})

def ok(res, what):
    assert not res.is_error, f"{what}: {res.content[0].text}"
    return json.loads(res.content[0].text)

def err(res, what):
    assert res.is_error, f"{what} succeeded: {res.content[0].text}"
    return json.loads(res.content[0].text)

async def with_session(token, fn):
    async with stdio_client(server(token)) as (r, w):
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
        return imports[0]
    return await with_session(b["token"], go)

async def main():
    n, a, b = await with_session(OP, as_operator)
    vm = await as_alpha(a, b)
    imp = await as_beta(a, b)
    print(json.dumps({"tools": n, "vm": vm["name"], "vip": imp["vip"]}))
    print("WALKTHROUGH OK")

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_walks_through_an_agents_first_minutes() {
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
    core.execute(Principal::Operator, Cmd::RegisterHost { host: "h".into() })
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve(core.clone(), listener, std::future::pending()));
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
