//! MCP (the Model Context Protocol) over the API (issue 19): the tools an agent's model calls
//! are the API's routes, generated from the route table ([`crate::routes::ROUTES`]) and the
//! model's schemas, never from a second hand-written list. [`Server`] answers MCP's JSON-RPC
//! messages (`initialize`, `ping`, `tools/list`, `tools/call`) and turns a tool call into the
//! route's HTTP request through a [`Client`], so it runs anywhere the CLI runs (`atoll mcp`,
//! over stdio) with the caller's token.
//!
//! Decisions:
//! - **A tool per route** that a cloud's or the operator's token may call (`Access::Cloud`,
//!   `Operator`, `Any`); the routes of hosts (sync, status reports) are the agents' and are left
//!   out. Its name is the route's ([`crate::routes::RouteId`] in snake case: `create_vm`), its
//!   description the route's summary with its method and path, its input an object with the
//!   path parameters (schemas as in the OpenAPI document), the query parameters and, for a
//!   route with a body, `body` (the body's schema; the model's schemas it refers to are in the
//!   tool's `$defs`).
//! - **The reply is the API's JSON** as the tool's text content (and, when it is an object,
//!   its `structuredContent`); an API error is a tool result with `isError` and the API's
//!   error body, so the model sees which field was wrong. Malformed calls (an unknown tool,
//!   a missing or non-string path parameter) are JSON-RPC errors.
//! - **Path parameters are checked** against the characters the API's names and ids use
//!   before they are put in a path, so a tool argument cannot reach another route.
//! - **Streamed routes become whole results.** Exec's NDJSON reply is collected into one
//!   object (`exit`, `stdout` and `stderr` as UTF-8 text, `truncated`); a downloaded file is
//!   `content` (UTF-8) or `content_base64`, at most [`MAX_TOOL_FILE_BYTES`]; an upload takes
//!   `content` or `content_base64` in place of a body. Query values are percent-encoded into
//!   the path (a file's path has slashes and spaces), control characters refused.
//! - **Protocol version**: the client's if this server knows it, else the newest it knows.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    pin::Pin,
};

use serde_json::{json, Map, Value};

use crate::{
    client::{Client, ClientError},
    openapi::{openapi, path_param_schema},
    routes::{encode_query, Access, QueryType, Route, Stream, ROUTES},
};

/// The largest file a tool reads or writes (its contents travel in the JSON-RPC message).
pub const MAX_TOOL_FILE_BYTES: usize = 8 << 20;

/// Protocol versions this server speaks, newest first.
pub const PROTOCOL_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// The tools: every route a cloud's or the operator's token may call.
pub fn tool_routes() -> impl Iterator<Item = &'static Route> {
    ROUTES.iter().copied().filter(|r| r.access != Access::Host)
}

/// A route's tool name: its id in snake case (`CreateVm` → `create_vm`).
pub fn tool_name(r: &Route) -> String {
    let id = format!("{:?}", r.id);
    let mut out = String::with_capacity(id.len() + 4);
    for (i, c) in id.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `#/components/schemas/X` → `#/$defs/X`, everywhere in `v`; collects the names.
fn rewrite_refs(v: &mut Value, names: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("$ref") {
                if let Some(name) = r.strip_prefix("#/components/schemas/") {
                    names.insert(name.to_string());
                    *r = format!("#/$defs/{name}");
                }
            }
            for (_, x) in m.iter_mut() {
                rewrite_refs(x, names);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_refs(x, names)),
        _ => {}
    }
}

/// The schema of a route's body or reply (`X` or `[X]`), refs rewritten.
fn schema_of(name: &str, names: &mut BTreeSet<String>) -> Value {
    let mut s = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(inner) => {
            json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{inner}")}})
        }
        None => json!({"$ref": format!("#/components/schemas/{name}")}),
    };
    rewrite_refs(&mut s, names);
    s
}

/// The `tools/list` result: every tool with its input schema (built once per process: it
/// depends only on the route table and the schemas).
pub fn tools() -> Value {
    static TOOLS: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    TOOLS.get_or_init(build_tools).clone()
}

fn build_tools() -> Value {
    let doc = openapi();
    let components = &doc["components"]["schemas"];
    let tools: Vec<Value> = tool_routes()
        .map(|r| {
            let mut props = Map::new();
            let mut required = Vec::new();
            for p in r.params() {
                props.insert(p.to_string(), path_param_schema(p));
                required.push(Value::from(p));
            }
            for (q, t) in r.query {
                let schema = match t {
                    QueryType::Text => json!({"type": "string"}),
                    QueryType::Integer => json!({"type": "integer"}),
                    QueryType::Bounded(min, max) => {
                        json!({"type": "integer", "minimum": min, "maximum": max})
                    }
                };
                props.insert(q.to_string(), schema);
            }
            let mut names = BTreeSet::new();
            if let Some(b) = r.body {
                props.insert("body".into(), schema_of(b, &mut names));
                required.push("body".into());
            }
            if r.stream == Some(Stream::BytesBody) {
                props.insert(
                    "content".into(),
                    json!({"type": "string", "description": "The file's contents as text (UTF-8)."}),
                );
                props.insert(
                    "content_base64".into(),
                    json!({"type": "string", "description": "The file's contents, base64 (instead of `content`)."}),
                );
            }
            // The model's schemas the body refers to, and those they refer to.
            let mut defs = Map::new();
            let mut todo: Vec<String> = names.iter().cloned().collect();
            while let Some(n) = todo.pop() {
                if defs.contains_key(&n) {
                    continue;
                }
                let mut s = components[&n].clone();
                let mut more = BTreeSet::new();
                rewrite_refs(&mut s, &mut more);
                defs.insert(n, s);
                todo.extend(more.into_iter().filter(|m| !defs.contains_key(m)));
            }
            let mut input = json!({
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": false,
            });
            if !defs.is_empty() {
                input["$defs"] = defs.into();
            }
            let as_tool = match r.stream {
                Some(Stream::NdjsonReply) => {
                    " As a tool: waits for the end and returns `exit` (code, signal, timed_out), \
                     `stdout` and `stderr` (UTF-8 text, lossy) and `truncated`."
                }
                Some(Stream::BytesReply) => {
                    " As a tool: returns `content` (UTF-8 text) or `content_base64`, with `size`, \
                     `mode`, `uid`, `gid` (at most 8 MiB)."
                }
                Some(Stream::BytesBody) => {
                    " As a tool: the contents are `content` (text) or `content_base64` (at most 8 MiB)."
                }
                Some(Stream::JsonOrCsv) => " As a tool: a FOCUS export is returned as `content`.",
                None => "",
            };
            json!({
                "name": tool_name(r),
                "description": format!("{} ({} {}).{as_tool}", r.summary, r.method.as_str(), r.path),
                "inputSchema": input,
            })
        })
        .collect();
    json!({ "tools": tools })
}

/// A path parameter as it may go into a path: the characters of the API's ids, names and
/// record types (`@` for a zone's apex, `.` inside record names).
fn path_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
        && v != "."
        && v != ".."
}

/// A tool call as its route's request.
#[derive(Debug, Clone)]
pub struct ToolCall {
    pub route: &'static Route,
    /// The path with its query.
    pub path: String,
    pub params: HashMap<String, String>,
    pub query: HashMap<String, String>,
    pub body: Option<Value>,
    /// An upload's contents (`content` or `content_base64`).
    pub raw: Option<Vec<u8>>,
}

/// A tool call as the route's request. `Err`: a JSON-RPC error message (unknown tool, bad
/// arguments).
pub fn request(name: &str, args: &Value) -> Result<ToolCall, String> {
    let route = tool_routes()
        .find(|r| tool_name(r) == name)
        .ok_or_else(|| format!("unknown tool {name:?}"))?;
    let args = match args {
        Value::Null => Map::new(),
        Value::Object(m) => m.clone(),
        _ => return Err("arguments must be an object".into()),
    };
    let allowed: BTreeSet<&str> = route
        .params()
        .chain(route.query.iter().map(|(q, _)| *q))
        .chain(route.body.map(|_| "body"))
        .chain(
            (route.stream == Some(Stream::BytesBody))
                .then_some(["content", "content_base64"])
                .into_iter()
                .flatten(),
        )
        .collect();
    if let Some(k) = args.keys().find(|k| !allowed.contains(k.as_str())) {
        return Err(format!("{name} takes no argument {k:?}"));
    }
    let mut path = String::new();
    let mut params = HashMap::new();
    let mut query = HashMap::new();
    for seg in route.path.split('/').skip(1) {
        path.push('/');
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(p) => {
                let v = args
                    .get(p)
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{name} needs {p:?}, a string"))?;
                if !path_value(v) {
                    return Err(format!("{p:?} is not a valid {p}: {v:?}"));
                }
                path.push_str(v);
                params.insert(p.to_string(), v.to_string());
            }
            None => path.push_str(seg),
        }
    }
    let mut sep = '?';
    for (q, t) in route.query {
        let Some(v) = args.get(*q) else { continue };
        let text = match (t, v) {
            (QueryType::Text, Value::String(s))
                if s.len() <= 4096 && !s.chars().any(char::is_control) =>
            {
                s.clone()
            }
            (QueryType::Integer | QueryType::Bounded(..), Value::Number(n)) if n.is_u64() => {
                n.to_string()
            }
            _ => return Err(format!("{q:?} has the wrong type")),
        };
        path.push(sep);
        path.push_str(q);
        path.push('=');
        path.push_str(&encode_query(&text));
        sep = '&';
        query.insert(q.to_string(), text);
    }
    let body = match route.body {
        Some(_) => Some(
            args.get("body")
                .cloned()
                .ok_or_else(|| format!("{name} needs \"body\""))?,
        ),
        None => None,
    };
    // A tool call is one request: a stream of stdin would need a second one.
    if route.stream == Some(Stream::NdjsonReply)
        && body.as_ref().and_then(|b| b.get("stdin_stream")) == Some(&Value::Bool(true))
    {
        return Err("stdin_stream is not for tools: give stdin_base64".into());
    }
    let raw = match (
        route.stream,
        args.get("content"),
        args.get("content_base64"),
    ) {
        (Some(Stream::BytesBody), Some(Value::String(t)), None) => Some(t.clone().into_bytes()),
        (Some(Stream::BytesBody), None, Some(Value::String(b))) => {
            use base64::Engine;
            Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("content_base64: {e}"))?,
            )
        }
        (Some(Stream::BytesBody), _, _) => {
            return Err(format!(
                "{name} needs \"content\" or \"content_base64\", a string"
            ))
        }
        _ => None,
    };
    if raw.as_ref().is_some_and(|r| r.len() > MAX_TOOL_FILE_BYTES) {
        return Err(format!(
            "a file through a tool is at most {MAX_TOOL_FILE_BYTES} bytes"
        ));
    }
    Ok(ToolCall {
        route,
        path,
        params,
        query,
        body,
        raw,
    })
}

/// A successful reply's bytes as the tool's result (see the module docs for streamed routes);
/// `headers` gives a download's metadata.
pub fn reply_value(route: &Route, bytes: &[u8], header: impl Fn(&str) -> Option<String>) -> Value {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    match route.stream {
        Some(Stream::NdjsonReply) => {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (mut exit, mut truncated, mut errors) = (Value::Null, Vec::new(), Vec::new());
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<crate::model::ExecEvent>(line) {
                    Ok(crate::model::ExecEvent::Stdout { data }) => {
                        out.extend(b64.decode(data).unwrap_or_default())
                    }
                    Ok(crate::model::ExecEvent::Stderr { data }) => {
                        err.extend(b64.decode(data).unwrap_or_default())
                    }
                    Ok(crate::model::ExecEvent::Truncated { stream, .. }) => truncated.push(stream),
                    Ok(e @ crate::model::ExecEvent::Exit { .. }) => {
                        exit = serde_json::to_value(e).unwrap_or_default();
                        exit.as_object_mut().map(|m| m.remove("type"));
                    }
                    Ok(crate::model::ExecEvent::Error { message }) => errors.push(message),
                    Ok(crate::model::ExecEvent::Started { .. }) => {}
                    Err(e) => errors.push(format!("undecodable event: {e}")),
                }
            }
            let mut v = json!({
                "exit": exit,
                "stdout": String::from_utf8_lossy(&out),
                "stderr": String::from_utf8_lossy(&err),
                "truncated": truncated,
            });
            if !errors.is_empty() {
                v["error"] = errors.join("; ").into();
            }
            v
        }
        Some(Stream::BytesReply) => {
            let mut v = match std::str::from_utf8(bytes) {
                Ok(t) => json!({"content": t}),
                Err(_) => json!({"content_base64": b64.encode(bytes)}),
            };
            v["size"] = bytes.len().into();
            for (k, radix) in [("mode", 8), ("uid", 10), ("gid", 10)] {
                if let Some(n) = header(&format!("x-atoll-{k}"))
                    .and_then(|h| u64::from_str_radix(&h, radix).ok())
                {
                    v[k] = if k == "mode" {
                        format!("{n:o}").into()
                    } else {
                        n.into()
                    };
                }
            }
            v
        }
        Some(Stream::JsonOrCsv) if !bytes.starts_with(b"{") => {
            json!({"content": String::from_utf8_lossy(bytes)})
        }
        _ if bytes.is_empty() => json!({}),
        _ => serde_json::from_slice(bytes)
            .unwrap_or_else(|_| json!({"text": String::from_utf8_lossy(bytes)})),
    }
}

/// The reply to a tool call: the HTTP status the API answers with and its JSON (the error
/// body for an error; `{}` when it has none).
pub type ToolReply = (u16, Value);

/// A boxed future of a [`Backend`]'s reply.
pub type Pending<'a> = Pin<Box<dyn Future<Output = ToolReply> + Send + 'a>>;

/// What carries tool calls to the API: a [`Client`] over HTTP (`atoll mcp`), or the API
/// server itself for its own MCP endpoint.
pub trait Backend: Send + Sync {
    fn call<'a>(&'a self, call: &'a ToolCall) -> Pending<'a>;
}

impl Backend for Client {
    fn call<'a>(&'a self, call: &'a ToolCall) -> Pending<'a> {
        Box::pin(async move {
            let (method, wait) = (call.route.method.http(), route_wait(call));
            let (payload, kind) = match (&call.raw, &call.body) {
                (Some(raw), _) => (Some(raw.clone()), "application/octet-stream"),
                (None, Some(b)) => (
                    Some(serde_json::to_vec(b).expect("JSON values serialize")),
                    "application/json",
                ),
                (None, None) => (None, "application/json"),
            };
            match self
                .send_bytes(method, &call.path, payload, kind, wait)
                .await
            {
                Ok((status, headers, bytes)) if status.is_success() => {
                    let header = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    (status.as_u16(), reply_value(call.route, &bytes, header))
                }
                Ok((status, _, bytes)) => (
                    status.as_u16(),
                    serde_json::from_slice(&bytes)
                        .unwrap_or_else(|_| json!({"text": String::from_utf8_lossy(&bytes)})),
                ),
                Err(ClientError::Api { status, body }) => {
                    (status.as_u16(), json!({"error": body.error}))
                }
                Err(e) => (
                    502,
                    json!({"error": {"code": "unreachable", "message": e.to_string()}}),
                ),
            }
        })
    }
}

/// An MCP server answering over a [`Backend`].
#[derive(Debug)]
pub struct Server<B> {
    backend: B,
    version: String,
}

impl<B: Backend> Server<B> {
    pub fn new(backend: B, version: &str) -> Self {
        Server {
            backend,
            version: version.to_string(),
        }
    }

    /// The reply to one JSON-RPC message (a line of the stdio transport), if it needs one
    /// (notifications do not).
    pub async fn handle(&self, line: &str) -> Option<Value> {
        let msg: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return Some(error(Value::Null, PARSE_ERROR, &format!("not JSON: {e}"))),
        };
        if !msg.is_object() {
            return Some(error(
                Value::Null,
                INVALID_REQUEST,
                "a message is a JSON object",
            ));
        }
        let id = msg.get("id").cloned();
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            // A response to a request of ours (we send none) or garbage.
            return id.map(|id| error(id, INVALID_REQUEST, "not a request"));
        };
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let id = id?; // notifications (`notifications/initialized`, …) get no reply
        Some(match self.call(method, &params).await {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => error(id, code, &message),
        })
    }

    async fn call(&self, method: &str, params: &Value) -> Result<Value, (i64, String)> {
        match method {
            "initialize" => {
                let asked = params
                    .get("protocolVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let version = PROTOCOL_VERSIONS
                    .iter()
                    .find(|v| **v == asked)
                    .unwrap_or(&PROTOCOL_VERSIONS[0]);
                Ok(json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "atoll", "version": self.version},
                    "instructions": "atoll: clouds an agent owns (VMs, volumes, a private network, DNS, \
                                     exposures between clouds). Each tool is one API route; its \
                                     result is the API's JSON reply.",
                }))
            }
            "ping" => Ok(json!({})),
            "tools/list" => Ok(tools()),
            "tools/call" => {
                let name = params
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or((INVALID_PARAMS, "tools/call needs a tool name".to_string()))?;
                let args = params.get("arguments").cloned().unwrap_or(Value::Null);
                let call = request(name, &args).map_err(|m| (INVALID_PARAMS, m))?;
                Ok(self.run(&call).await)
            }
            other => Err((METHOD_NOT_FOUND, format!("no method {other:?}"))),
        }
    }

    /// Sends the request; the API's reply (or error) as a tool result.
    async fn run(&self, call: &ToolCall) -> Value {
        let (status, mut reply) = self.backend.call(call).await;
        let is_error = !(200..300).contains(&status);
        // An error carries its status beside the API's error body.
        if is_error {
            if let Some(m) = reply.as_object_mut() {
                m.insert("status".into(), status.into());
            }
        }
        let text = serde_json::to_string_pretty(&reply).unwrap_or_default();
        let mut result = json!({
            "content": [{"type": "text", "text": text}],
            "isError": is_error,
        });
        if reply.is_object() {
            result["structuredContent"] = reply;
        }
        result
    }
}

/// How long past the client's usual time-out a call's reply may take: an exec's own timeout
/// (the tool waits for its end); nothing else long-polls (the sync is the hosts').
fn route_wait(call: &ToolCall) -> std::time::Duration {
    if call.route.stream != Some(Stream::NdjsonReply) {
        return std::time::Duration::ZERO;
    }
    let secs = call
        .body
        .as_ref()
        .and_then(|b| b.get("timeout_secs"))
        .and_then(Value::as_u64)
        .unwrap_or(crate::model::DEFAULT_EXEC_TIMEOUT_SECS as u64)
        .min(crate::model::MAX_EXEC_TIMEOUT_SECS as u64);
    std::time::Duration::from_secs(secs)
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_is_a_route_with_a_unique_name_and_a_closed_schema() {
        let t = tools();
        let list = t["tools"].as_array().unwrap();
        assert_eq!(list.len(), tool_routes().count());
        let names: BTreeSet<&str> = list.iter().map(|x| x["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), list.len());
        assert!(names.contains("create_cloud") && names.contains("create_vm"));
        assert!(!names.contains("sync"), "hosts' routes are not tools");
        let vm = list.iter().find(|x| x["name"] == "create_vm").unwrap();
        let schema = &vm["inputSchema"];
        assert_eq!(schema["required"], json!(["cloud", "body"]));
        assert_eq!(schema["properties"]["body"]["$ref"], "#/$defs/CreateVm");
        assert!(schema["$defs"]["CreateVm"]["properties"]["name"].is_object());
        // Every reference resolves inside the tool.
        for tool in list {
            let mut refs = BTreeSet::new();
            let mut s = tool["inputSchema"].clone();
            rewrite_refs(&mut s, &mut refs);
            let text = s.to_string();
            for r in text.split("\"#/$defs/").skip(1) {
                let name = r.split('"').next().unwrap();
                assert!(
                    tool["inputSchema"]["$defs"][name].is_object(),
                    "{}: {name}",
                    tool["name"]
                );
            }
        }
    }

    #[test]
    fn calls_become_the_routes_requests_and_bad_arguments_are_refused() {
        let c = request(
            "create_vm",
            &json!({"cloud": "c0000002a", "body": {"name": "web"}}),
        )
        .unwrap();
        assert_eq!(
            (c.route.path, c.path.as_str()),
            ("/v1/clouds/{cloud}/vms", "/v1/clouds/c0000002a/vms")
        );
        assert_eq!(c.params["cloud"], "c0000002a");
        assert_eq!(c.body, Some(json!({"name": "web"})));
        let c = request("list_clouds", &json!({"limit": 5})).unwrap();
        assert_eq!(
            (c.path.as_str(), c.query["limit"].as_str()),
            ("/v1/clouds?limit=5", "5")
        );
        for (tool, args) in [
            ("nope", json!({})),
            ("create_vm", json!({"cloud": "c0000002a"})),
            ("get_vm", json!({"cloud": "c0000002a", "vm": "../../hosts"})),
            ("get_vm", json!({"cloud": "c0000002a", "vm": "a/b"})),
            ("get_vm", json!({"cloud": 5, "vm": "web"})),
            ("get_cloud", json!({"cloud": "c0000002a", "extra": 1})),
            ("list_clouds", json!({"limit": "5&x=1"})),
            ("get_cloud", json!([1])),
        ] {
            assert!(request(tool, &args).is_err(), "{tool} {args}");
        }
    }

    #[test]
    fn tool_names_are_snake_case_route_ids() {
        let names: Vec<String> = tool_routes().map(tool_name).collect();
        assert!(names.iter().all(|n| n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())));
        assert!(names.contains(&"set_cloud_expiry".to_string()));
    }
}
