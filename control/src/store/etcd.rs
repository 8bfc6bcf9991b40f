//! The etcd v3 backend, through etcd's HTTP/JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
//! `/v3/watch`, ...), with hyper's client: no gRPC stack and no protoc in the build.
//!
//! Decisions:
//! - **Namespace.** Every key is stored as `<prefix><key>`; results are stripped of the prefix
//!   and a returned key outside it is an error. Prefix ranges use etcd's own rule (range end =
//!   the prefix with its last byte incremented), so every key under a prefix is covered,
//!   whatever wrote it.
//! - **Compares.** `Absent` is `create_revision == 0`, `Present` is `create_revision > 0`,
//!   `ModRevision(k, r)` is `mod_revision == r` (and never holds for `r == 0`, which etcd would
//!   otherwise match against an absent key, so both backends agree). etcd does not say which
//!   compare failed, so the failure branch of every transaction reads the compared keys (in the
//!   same atomic step) and the first false compare is found from that snapshot.
//! - **Revisions** are etcd's: a new cluster starts at revision 1 before any write, a committed
//!   transaction reports the revision after it, and a transaction that changes nothing (no ops,
//!   or deletes of absent keys) does not bump it.
//! - **Watches** are one streaming `POST /v3/watch` each (newline-separated JSON objects; parsed
//!   as a stream of JSON values, so the delimiter does not matter). Events are grouped into one
//!   batch per revision (etcd never splits a revision without the `fragment` option). Whether
//!   the start revision is compacted is checked when the watch is created (a range read at that
//!   revision) so `watch()` itself returns `Compacted`; etcd then reports the compaction
//!   revision on the stream. A stream that ends is `WatchClosed`: the caller re-watches from its
//!   last revision, which picks a live endpoint.
//! - **TLS.** `https://` endpoints need a [`ClientTls`] (the cluster's CA and, for
//!   `--client-cert-auth`, this client's certificate); `http://` ones are for a loopback etcd.
//! - **etcd auth** (when the cluster has it enabled): a user name and password
//!   ([`EtcdAuth`]) get a token from `/v3/auth/authenticate`, sent as `Authorization` on every
//!   request; a request refused as unauthenticated (401: the token expired or auth was
//!   re-enabled) authenticates again once and is sent again. The client certificate cannot
//!   stand for the user here: etcd's HTTP gateway reaches etcd with its own certificate.
//! - **Endpoints** are tried in order, starting with the last one that answered, when
//!   connecting fails (including a 2 s connect timeout); any other error is returned, since a
//!   transaction may have been applied.
//! - JSON int64 fields arrive as strings and zero values are omitted; every field is decoded
//!   leniently (string or number, missing = 0), and bad base64 or non-UTF-8 keys are errors.
//! - **Transaction size.** The store refuses a transaction over its `max_txn_ops` before
//!   sending it (see [`super::Store::txn`]); it must be etcd's `--max-txn-ops` (default
//!   [`DEFAULT_MAX_TXN_OPS`]). etcd's own refusal ("too many operations in txn request", when
//!   its limit is lower) is [`StoreError::EtcdTooManyOps`].
//! - etcd's own history must be compacted by the operator (`--auto-compaction-retention`) or
//!   through [`EtcdStore::compact`].

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Bytes, Incoming},
    Request, Response,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use serde_json::{json, Value};

use super::{Compare, Event, EventKind, KeyValue, Op, StoreError, Txn, TxnOutcome, WatchBatch};
use crate::tls::ClientTls;
use hyper_rustls::HttpsConnector;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// What etcd's gateway answers (400) for a transaction over its `--max-txn-ops`.
const TOO_MANY_OPS: &str = "too many operations in txn request";
/// Longest etcd error body kept in [`StoreError::EtcdResponse`].
const MAX_ERROR_BODY: usize = 2000;

/// A handle to an etcd cluster; cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<EtcdInner>,
    /// The cluster's `--max-txn-ops`, as configured.
    max_txn_ops: usize,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .field("max_txn_ops", &self.max_txn_ops)
            .finish_non_exhaustive()
    }
}

struct EtcdInner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Base URLs without a trailing slash.
    endpoints: Vec<String>,
    /// Namespace prepended to every key.
    prefix: String,
    /// Index of the endpoint that answered last.
    preferred: AtomicUsize,
    auth: Option<EtcdAuth>,
    /// The current auth token, when `auth` is set.
    token: std::sync::Mutex<Option<String>>,
}

/// A user of etcd's own authentication.
#[derive(Clone)]
pub struct EtcdAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A failed request; a TLS failure says what TLS said and which settings verify the server.
/// Over `https://`, a connection the server closes before any response is taken for TLS's too:
/// under TLS 1.3 a server that refuses the client's certificate does so after the client's
/// side of the handshake is done, and its alert may lose the race with the close.
fn request_error(url: String, source: hyper_util::client::legacy::Error) -> StoreError {
    if let Some(cause) = crate::tls::tls_cause(&source) {
        return StoreError::EtcdTls { url, cause };
    }
    let closed = std::iter::successors(Some(&source as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .filter_map(|e| e.downcast_ref::<hyper::Error>())
    .any(|e| e.is_canceled() || e.is_closed() || e.is_incomplete_message());
    if closed && url.starts_with("https://") {
        return StoreError::EtcdTls {
            url,
            cause: "the server closed the connection during or right after the handshake \
                    (does it want a client certificate it did not get?)"
                .into(),
        };
    }
    StoreError::EtcdRequest { url, source }
}

impl EtcdStore {
    /// Checks the endpoints (`http://host:port`) and that one of them answers. The store assumes
    /// etcd's default `--max-txn-ops` ([`DEFAULT_MAX_TXN_OPS`]) unless told otherwise
    /// ([`EtcdStore::with_max_txn_ops`]).
    pub async fn connect(endpoints: Vec<String>, prefix: String) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, prefix, None, None).await
    }

    /// [`EtcdStore::connect`] with TLS for `https://` endpoints and etcd's own authentication.
    pub async fn connect_with(
        endpoints: Vec<String>,
        prefix: String,
        tls: Option<&ClientTls>,
        auth: Option<EtcdAuth>,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::NoEndpoints);
        }
        let mut bases = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let uri: hyper::Uri = endpoint
                .parse()
                .map_err(
                    |e: hyper::http::uri::InvalidUri| StoreError::InvalidEndpoint {
                        endpoint: endpoint.clone(),
                        reason: e.to_string(),
                    },
                )?;
            let invalid = |reason: &str| StoreError::InvalidEndpoint {
                endpoint: endpoint.clone(),
                reason: reason.to_owned(),
            };
            match (uri.scheme_str(), tls) {
                (Some("http"), _) | (Some("https"), Some(_)) => {}
                (Some("https"), None) => {
                    return Err(invalid(
                        "https:// needs store.etcd_ca_file (and for client certificate authentication store.etcd_cert_file and store.etcd_key_file)",
                    ))
                }
                _ => return Err(invalid("only http:// and https:// endpoints are supported")),
            }
            if uri.authority().is_none() {
                return Err(invalid("no host"));
            }
            if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                return Err(invalid("expected https://host:port without a path"));
            }
            bases.push(endpoint.trim_end_matches('/').to_owned());
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let config = match tls {
            Some(t) => Some(t.config().map_err(|e| StoreError::InvalidEndpoint {
                endpoint: bases.join(","),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let client =
            Client::builder(TokioExecutor::new()).build(crate::tls::connector(connector, config));
        let store = EtcdStore {
            inner: Arc::new(EtcdInner {
                client,
                endpoints: bases,
                prefix,
                preferred: AtomicUsize::new(0),
                auth,
                token: std::sync::Mutex::new(None),
            }),
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
        };
        store.revision().await?;
        Ok(store)
    }

    /// The same store, for a cluster whose `--max-txn-ops` is `limit`.
    pub fn with_max_txn_ops(mut self, limit: usize) -> Self {
        self.max_txn_ops = limit;
        self
    }

    /// The largest transaction (compares, or ops) this store sends.
    pub fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let response: RangeResponse = self
            .post(
                "/v3/kv/range",
                &json!({ "key": B64.encode(self.full_key(key)) }),
            )
            .await?;
        match response.kvs.into_iter().next() {
            Some(raw) => Ok(Some(self.decode_kv(raw)?)),
            None => Ok(None),
        }
    }

    pub async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let (mut lower, end) = self.prefix_range(prefix);
        if let Some(after) = start_after {
            // The smallest key greater than `after`.
            let mut next = self.full_key(after);
            next.push(0);
            if next > lower {
                lower = next;
            }
        }
        if end != [0] && lower >= end {
            return Ok(Vec::new());
        }
        let response: RangeResponse = self
            .post(
                "/v3/kv/range",
                &json!({
                    "key": B64.encode(&lower),
                    "range_end": B64.encode(&end),
                    "limit": limit,
                }),
            )
            .await?;
        response
            .kvs
            .into_iter()
            .map(|raw| self.decode_kv(raw))
            .collect()
    }

    pub async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        let (key, end) = self.prefix_range(prefix);
        let response: RangeResponse = self
            .post(
                "/v3/kv/range",
                &json!({
                    "key": B64.encode(&key),
                    "range_end": B64.encode(&end),
                    "count_only": true,
                }),
            )
            .await?;
        Ok(response.count)
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<Value> = txn.compares.iter().map(|c| self.compare_json(c)).collect();
        let success: Vec<Value> = txn.success.iter().map(|op| self.op_json(op)).collect();
        // On failure, read every compared key in the same atomic step, to find the first false
        // compare.
        let failure: Vec<Value> = txn
            .compares
            .iter()
            .map(|c| json!({ "request_range": { "key": B64.encode(self.full_key(compare_key(c))) } }))
            .collect();
        let response: TxnResponse = match self
            .post(
                "/v3/kv/txn",
                &json!({ "compare": compares, "success": success, "failure": failure }),
            )
            .await
        {
            Err(StoreError::EtcdResponse { body, .. }) if body.contains(TOO_MANY_OPS) => {
                return Err(StoreError::EtcdTooManyOps {
                    size: txn.size(),
                    limit: self.max_txn_ops,
                })
            }
            other => other?,
        };
        if response.succeeded {
            return Ok(TxnOutcome::Committed {
                revision: response.header.revision,
            });
        }
        if response.responses.len() != txn.compares.len() {
            return Err(StoreError::EtcdInvalid(format!(
                "failed txn with {} compares returned {} responses",
                txn.compares.len(),
                response.responses.len()
            )));
        }
        for (i, (compare, op)) in txn.compares.iter().zip(response.responses).enumerate() {
            let Some(range) = op.response_range else {
                return Err(StoreError::EtcdInvalid(
                    "failure branch answered without a range response".into(),
                ));
            };
            let found = range.kvs.first();
            let holds = match compare {
                Compare::Absent(_) => found.is_none(),
                Compare::Present(_) => found.is_some(),
                Compare::ModRevision(_, want) => {
                    *want != 0 && found.is_some_and(|kv| kv.mod_revision == *want)
                }
            };
            if !holds {
                return Ok(TxnOutcome::Failed { failed_compare: i });
            }
        }
        Err(StoreError::EtcdInvalid(
            "txn failed although every compare holds in its snapshot".into(),
        ))
    }

    pub async fn revision(&self) -> Result<u64, StoreError> {
        let response: RangeResponse = self
            .post(
                "/v3/kv/range",
                &json!({ "key": B64.encode(self.full_key_nonempty("")), "count_only": true }),
            )
            .await?;
        Ok(response.header.revision)
    }

    pub async fn watch(&self, prefix: &str, after_revision: u64) -> Result<EtcdWatch, StoreError> {
        let (key, end) = self.prefix_range(prefix);
        let start = after_revision.saturating_add(1);
        let (url, response) = self
            .send(
                "/v3/watch",
                &json!({ "create_request": {
                    "key": B64.encode(&key),
                    "range_end": B64.encode(&end),
                    "start_revision": start,
                }}),
            )
            .await?;
        let response = check_status(&url, response).await?;
        let mut watch = EtcdWatch {
            store: self.clone(),
            url,
            body: response.into_body(),
            buf: Vec::new(),
            pending: VecDeque::new(),
            after: after_revision,
        };
        let current = loop {
            let message = watch.message().await?;
            if message.created {
                break message.header.revision;
            }
            watch.check_canceled(&message)?;
        };
        if start <= current {
            // A range read at the start revision fails exactly when the watch's start is
            // compacted; then etcd cancels the watch with the compaction revision.
            let probe = self
                .post::<RangeResponse>(
                    "/v3/kv/range",
                    &json!({ "key": B64.encode(&key), "count_only": true, "revision": start }),
                )
                .await;
            match probe {
                Ok(_) => {}
                Err(StoreError::EtcdResponse { body, .. })
                    if body.contains("required revision has been compacted") =>
                {
                    loop {
                        let message = watch.message().await?;
                        watch.check_canceled(&message)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(watch)
    }

    /// Compacts etcd's history up to `revision` (physically): watches and reads at earlier
    /// revisions then fail with `Compacted`.
    pub async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let _: Value = self
            .post(
                "/v3/kv/compaction",
                &json!({ "revision": revision, "physical": true }),
            )
            .await?;
        Ok(())
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.inner.prefix.len() + key.len());
        full.extend_from_slice(self.inner.prefix.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// etcd rejects an empty key; "\0" is the smallest non-empty one.
    fn full_key_nonempty(&self, key: &str) -> Vec<u8> {
        let full = self.full_key(key);
        if full.is_empty() {
            vec![0]
        } else {
            full
        }
    }

    /// `[key, range_end)` of every key starting with `prefix` in the namespace.
    fn prefix_range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let key = self.full_key(prefix);
        let end = etcd_prefix_end(&key);
        (if key.is_empty() { vec![0] } else { key }, end)
    }

    fn compare_json(&self, compare: &Compare) -> Value {
        let key = B64.encode(self.full_key(compare_key(compare)));
        match compare {
            Compare::Absent(_) => {
                json!({ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0 })
            }
            Compare::Present(_) => {
                json!({ "key": key, "target": "CREATE", "result": "GREATER", "create_revision": 0 })
            }
            // Never true, like in the SQLite backend (etcd would match an absent key).
            Compare::ModRevision(_, 0) => {
                json!({ "key": key, "target": "CREATE", "result": "LESS", "create_revision": 0 })
            }
            Compare::ModRevision(_, revision) => {
                json!({ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": revision })
            }
        }
    }

    fn op_json(&self, op: &Op) -> Value {
        match op {
            Op::Put { key, value } => json!({ "request_put": {
                "key": B64.encode(self.full_key(key)),
                "value": B64.encode(value),
            }}),
            Op::Delete { key } => json!({ "request_delete_range": {
                "key": B64.encode(self.full_key_nonempty(key)),
            }}),
            Op::DeletePrefix { prefix } => {
                let (key, end) = self.prefix_range(prefix);
                json!({ "request_delete_range": {
                    "key": B64.encode(key),
                    "range_end": B64.encode(end),
                }})
            }
        }
    }

    fn decode_kv(&self, raw: RawKv) -> Result<KeyValue, StoreError> {
        let key = B64
            .decode(raw.key.as_bytes())
            .map_err(|source| StoreError::EtcdBase64 {
                field: "key",
                source,
            })?;
        let key = String::from_utf8(key).map_err(StoreError::EtcdKeyNotUtf8)?;
        let Some(stripped) = key.strip_prefix(self.inner.prefix.as_str()) else {
            return Err(StoreError::EtcdKeyOutsideNamespace {
                key,
                prefix: self.inner.prefix.clone(),
            });
        };
        let value = B64
            .decode(raw.value.as_bytes())
            .map_err(|source| StoreError::EtcdBase64 {
                field: "value",
                source,
            })?;
        Ok(KeyValue {
            key: stripped.to_owned(),
            value,
            create_revision: raw.create_revision,
            mod_revision: raw.mod_revision,
        })
    }

    /// POSTs `body` to `path` (authenticated when etcd auth is configured, see the module
    /// docs).
    async fn send(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(String, Response<Incoming>), StoreError> {
        if self.inner.auth.is_none() {
            return self.send_once(path, body, None).await;
        }
        let token = self.auth_token(false).await?;
        let (url, response) = self.send_once(path, body, Some(&token)).await?;
        if response.status() != hyper::StatusCode::UNAUTHORIZED {
            return Ok((url, response));
        }
        let token = self.auth_token(true).await?;
        self.send_once(path, body, Some(&token)).await
    }

    /// The auth token: the current one, or (with `renew`, or none yet) a new one.
    async fn auth_token(&self, renew: bool) -> Result<String, StoreError> {
        if !renew {
            if let Some(t) = self.inner.token.lock().expect("token lock").clone() {
                return Ok(t);
            }
        }
        let Some(auth) = &self.inner.auth else {
            return Ok(String::new());
        };
        let (url, response) = self
            .send_once(
                "/v3/auth/authenticate",
                &json!({ "name": auth.user, "password": auth.password }),
                None,
            )
            .await?;
        let response = check_status(&url, response)
            .await
            .map_err(|e| StoreError::EtcdAuth {
                user: auth.user.clone(),
                reason: e.to_string(),
            })?;
        #[derive(Deserialize)]
        struct Authenticated {
            token: String,
        }
        let token = read_json::<Authenticated>(url, response).await?.token;
        *self.inner.token.lock().expect("token lock") = Some(token.clone());
        Ok(token)
    }

    /// POSTs `body` to `path` on the first endpoint that accepts a connection.
    async fn send_once(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<(String, Response<Incoming>), StoreError> {
        let body = Bytes::from(body.to_string());
        let endpoints = &self.inner.endpoints;
        let first = self.inner.preferred.load(Ordering::Relaxed) % endpoints.len().max(1);
        let mut last_error = None;
        for i in 0..endpoints.len() {
            let index = (first + i) % endpoints.len();
            let url = format!("{}{path}", endpoints[index]);
            let mut request =
                Request::post(url.as_str()).header(hyper::header::CONTENT_TYPE, "application/json");
            if let Some(t) = token {
                request = request.header(hyper::header::AUTHORIZATION, t);
            }
            let request =
                request
                    .body(Full::new(body.clone()))
                    .map_err(|e| StoreError::InvalidEndpoint {
                        endpoint: endpoints[index].clone(),
                        reason: e.to_string(),
                    })?;
            match self.inner.client.request(request).await {
                Ok(response) => {
                    if index != first {
                        self.inner.preferred.store(index, Ordering::Relaxed);
                    }
                    return Ok((url, response));
                }
                Err(source) if source.is_connect() => {
                    last_error = Some(request_error(url, source));
                }
                Err(source) => return Err(request_error(url, source)),
            }
        }
        Err(last_error.unwrap_or(StoreError::NoEndpoints))
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, StoreError> {
        let (url, response) = self.send(path, body).await?;
        let response = check_status(&url, response).await?;
        read_json(url, response).await
    }
}

/// A response's whole body.
async fn body_bytes(url: &str, response: Response<Incoming>) -> Result<Bytes, StoreError> {
    Ok(response
        .into_body()
        .collect()
        .await
        .map_err(|source| StoreError::EtcdBody {
            url: url.to_owned(),
            source,
        })?
        .to_bytes())
}

/// A successful response's JSON body.
async fn read_json<T: DeserializeOwned>(
    url: String,
    response: Response<Incoming>,
) -> Result<T, StoreError> {
    let bytes = body_bytes(&url, response).await?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::EtcdJson { url, source })
}

/// Returns the response if it is a success, else its body as [`StoreError::EtcdResponse`].
async fn check_status(
    url: &str,
    response: Response<Incoming>,
) -> Result<Response<Incoming>, StoreError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let bytes = body_bytes(url, response).await?;
    let mut body = String::from_utf8_lossy(&bytes).into_owned();
    if body.len() > MAX_ERROR_BODY {
        let mut cut = MAX_ERROR_BODY;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    Err(StoreError::EtcdResponse {
        status: status.as_u16(),
        body,
    })
}

fn compare_key(compare: &Compare) -> &str {
    match compare {
        Compare::Absent(key) | Compare::Present(key) | Compare::ModRevision(key, _) => key,
    }
}

/// etcd's prefix rule: the prefix with its last byte below 0xFF incremented (trailing 0xFF
/// bytes dropped); "\0" (= to the end of the keyspace) for an empty or all-0xFF prefix.
fn etcd_prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Batches from one etcd watch stream.
pub struct EtcdWatch {
    store: EtcdStore,
    url: String,
    body: Incoming,
    /// Bytes received and not yet parsed.
    buf: Vec<u8>,
    pending: VecDeque<WatchBatch>,
    /// Revision of the last batch returned (or the revision the watch started after).
    after: u64,
}

impl std::fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWatch")
            .field("url", &self.url)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl EtcdWatch {
    pub async fn next(&mut self) -> Result<WatchBatch, StoreError> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                self.after = batch.revision;
                return Ok(batch);
            }
            let message = self.message().await?;
            self.check_canceled(&message)?;
            for raw in message.events {
                let kind = match raw.kind.as_deref() {
                    None | Some("PUT") => EventKind::Put,
                    Some("DELETE") => EventKind::Delete,
                    Some(other) => {
                        return Err(StoreError::EtcdInvalid(format!(
                            "watch event type {other:?}"
                        )))
                    }
                };
                let mut kv = self.store.decode_kv(raw.kv.unwrap_or_default())?;
                if kind == EventKind::Delete {
                    kv.value.clear();
                    kv.create_revision = 0;
                }
                let revision = kv.mod_revision;
                if revision <= self.after {
                    return Err(StoreError::EtcdInvalid(format!(
                        "watch event at revision {revision}, after {}",
                        self.after
                    )));
                }
                let event = Event { kind, kv };
                match self.pending.back_mut() {
                    Some(batch) if batch.revision == revision => batch.events.push(event),
                    Some(batch) if batch.revision > revision => {
                        return Err(StoreError::EtcdInvalid(format!(
                            "watch event at revision {revision} after one at {}",
                            batch.revision
                        )))
                    }
                    _ => self.pending.push_back(WatchBatch {
                        revision,
                        events: vec![event],
                    }),
                }
            }
        }
    }

    /// `Compacted` / `WatchCanceled` if etcd canceled the watch.
    fn check_canceled(&self, message: &WatchResponse) -> Result<(), StoreError> {
        if message.compact_revision > 0 {
            return Err(StoreError::Compacted {
                requested: self.after,
                compacted: message.compact_revision - 1,
            });
        }
        if message.canceled {
            return Err(StoreError::WatchCanceled {
                reason: message.cancel_reason.clone(),
            });
        }
        Ok(())
    }

    /// The next JSON object of the stream.
    async fn message(&mut self) -> Result<WatchResponse, StoreError> {
        loop {
            let mut stream =
                serde_json::Deserializer::from_slice(&self.buf).into_iter::<WatchEnvelope>();
            match stream.next() {
                Some(Ok(envelope)) => {
                    let used = stream.byte_offset();
                    self.buf.drain(..used);
                    if let Some(error) = envelope.error {
                        return Err(StoreError::EtcdResponse {
                            status: 0,
                            body: error.to_string(),
                        });
                    }
                    return Ok(envelope.result.unwrap_or_default());
                }
                Some(Err(e)) if e.is_eof() => {}
                Some(Err(source)) => {
                    return Err(StoreError::EtcdJson {
                        url: self.url.clone(),
                        source,
                    })
                }
                None => self.buf.clear(),
            }
            match self.body.frame().await {
                None => return Err(StoreError::WatchClosed),
                Some(Err(source)) => {
                    return Err(StoreError::EtcdBody {
                        url: self.url.clone(),
                        source,
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// int64 fields: a JSON string (etcd's gateway) or number; missing or null = 0.
fn de_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Text(String),
        Int(u64),
    }
    match Option::<Number>::deserialize(d)? {
        None => Ok(0),
        Some(Number::Int(n)) => Ok(n),
        Some(Number::Text(s)) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
struct Header {
    #[serde(default, deserialize_with = "de_u64")]
    revision: u64,
}

#[derive(Debug, Default, Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "de_u64")]
    create_revision: u64,
    #[serde(default, deserialize_with = "de_u64")]
    mod_revision: u64,
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<RawKv>,
    #[serde(default, deserialize_with = "de_u64")]
    count: u64,
}

#[derive(Debug, Deserialize)]
struct TxnResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<ResponseOp>,
}

#[derive(Debug, Deserialize)]
struct ResponseOp {
    #[serde(default)]
    response_range: Option<RangeResponse>,
}

#[derive(Debug, Deserialize)]
struct WatchEnvelope {
    #[serde(default)]
    result: Option<WatchResponse>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct WatchResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "de_u64")]
    compact_revision: u64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Debug, Deserialize)]
struct RawEvent {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    kv: Option<RawKv>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(etcd_prefix_end(b"a/"), b"a0");
        assert_eq!(etcd_prefix_end(b"a\xff"), b"b");
        assert_eq!(etcd_prefix_end(b""), b"\0");
        assert_eq!(etcd_prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn decodes_gateway_json() {
        let r: RangeResponse = serde_json::from_str(
            r#"{"header":{"revision":"7"},"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":7,"value":"Yg=="}],"count":"1"}"#,
        )
        .unwrap();
        assert_eq!(r.header.revision, 7);
        assert_eq!(r.count, 1);
        assert_eq!(r.kvs[0].mod_revision, 7);
        let r: RangeResponse = serde_json::from_str(r#"{"header":{}}"#).unwrap();
        assert_eq!((r.header.revision, r.count, r.kvs.len()), (0, 0, 0));
        assert!(serde_json::from_str::<RangeResponse>(r#"{"count":"x"}"#).is_err());
    }
}
