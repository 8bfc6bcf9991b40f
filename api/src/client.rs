//! The typed HTTP client of the API, used by the CLI, by agents whose control plane runs
//! elsewhere, by the tests and the bench. [`Client::execute`] sends a
//! [`Command`] along its route in the table ([`crate::routes`]) and decodes the [`Reply`] the
//! route declares; [`Client::run`] returns the reply's payload as its own type. No endpoint
//! has a hand-written method here. [`Client::call`] sends raw requests (any method, path and
//! JSON) for tests that probe what the typed commands cannot express (bad ids, bad bodies,
//! wrong methods); their paths come from the table too ([`crate::routes::Route::at`]).
//! Errors keep the server's JSON error body.
//!
//! `https://` URLs need a [`ClientTls`] (a CA file or a pinned fingerprint, see
//! [`crate::tls`]); a failed verification names the setting that chose the trust.

use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Bytes, Incoming},
    Method, Request, StatusCode,
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HyperClient},
    rt::TokioExecutor,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    command::{Command, Reply},
    model::ErrorBody,
    tls::{ClientTls, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid API URL {0:?}: expected https://host:port (or http:// on loopback)")]
    InvalidUrl(String),
    #[error("{url}: plain http:// only to a loopback address (a token must not cross a network in clear text); use https://")]
    PlainHttp { url: String },
    #[error("{url} is https: give the server's CA file or fingerprint (--ca-file / --ca-fingerprint, ATOLL_CA_FILE / ATOLL_CA_FINGERPRINT, or control.ca_file / control.ca_fingerprint)")]
    NoTrust { url: String },
    #[error("TLS settings for {url}: {source}")]
    TlsConfig { url: String, source: TlsError },
    #[error("TLS with {url} failed: {cause}; the server is verified against {setting}")]
    Tls {
        url: String,
        cause: String,
        setting: String,
    },
    #[error("request to {url} failed: {source}")]
    Request {
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("reading the response from {url}: {source}")]
    ReadResponse { url: String, source: hyper::Error },
    #[error("{url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{status}: {}{}", body.error.message, body.error.field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Api { status: StatusCode, body: ErrorBody },
    #[error("{status} from {url}: {text}")]
    UnexpectedResponse {
        url: String,
        status: StatusCode,
        text: String,
    },
}

impl ClientError {
    /// The request never reached the control plane (no connection could be made, TLS
    /// included): sending it to another control plane cannot apply it twice.
    pub fn never_sent(&self) -> bool {
        matches!(self, ClientError::Request { source, .. } if source.is_connect())
            || matches!(self, ClientError::Tls { .. })
    }

    /// The control plane did not serve the request: it was never sent, the connection failed
    /// or timed out on the way, or the server failed (5xx) rather than refused it.
    pub fn unserved(&self) -> bool {
        match self {
            ClientError::Request { .. }
            | ClientError::ReadResponse { .. }
            | ClientError::Timeout { .. }
            | ClientError::Tls { .. } => true,
            ClientError::Api { status, .. } | ClientError::UnexpectedResponse { status, .. } => {
                status.is_server_error()
            }
            ClientError::InvalidUrl(_)
            | ClientError::PlainHttp { .. }
            | ClientError::NoTrust { .. }
            | ClientError::TlsConfig { .. } => false,
        }
    }
}

/// A client of one control plane, with one bearer token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: HyperClient<HttpsConnector<HttpConnector>, ReqBody>,
    /// The setting that chose the server's trust (for errors).
    trust_setting: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    // Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of a plain `http://` control plane (loopback only, see [`crate::tls`]).
    pub fn new(base: &str, token: &str) -> Result<Self, ClientError> {
        Self::with_tls(base, token, None)
    }

    /// A client of `base`, which must be `https://` when `tls` is given; an `https://` URL
    /// without `tls` is refused.
    pub fn with_tls(base: &str, token: &str, tls: Option<&ClientTls>) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        let https = base.starts_with("https://");
        let Ok(uri) = base.parse::<hyper::Uri>() else {
            return Err(ClientError::InvalidUrl(base));
        };
        if !(https || base.starts_with("http://")) {
            return Err(ClientError::InvalidUrl(base));
        }
        if !https && !uri.host().is_some_and(is_loopback) {
            return Err(ClientError::PlainHttp { url: base });
        }
        let config = match (https, tls) {
            (true, None) => return Err(ClientError::NoTrust { url: base }),
            (true, Some(t)) => Some(t.config().map_err(|source| ClientError::TlsConfig {
                url: base.clone(),
                source,
            })?),
            (false, _) => None,
        };
        Ok(Client {
            // Pooled connections are dropped before the server's header-read timeout (15 s by
            // default) would close them under a request being sent.
            http: HyperClient::builder(TokioExecutor::new())
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(10))
                .build(crate::tls::connector(
                    {
                        // Small requests and streamed replies: no Nagle delay.
                        let mut http = HttpConnector::new();
                        http.set_nodelay(true);
                        http
                    },
                    config,
                )),
            trust_setting: tls.filter(|_| https).map(|t| t.setting.clone()),
            base,
            token: token.trim().to_string(),
            timeout: Duration::from_secs(30),
        })
    }

    /// The base URL this client sends to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token this client sends.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The same client with another token.
    pub fn with_token(&self, token: &str) -> Self {
        Client {
            token: token.trim().to_string(),
            ..self.clone()
        }
    }

    /// Sets the timeout of one request (long polls add their own wait to it).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends a request; `body` is JSON-encoded. Returns the raw status and body.
    pub async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        extra_wait: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let payload = body.map(|b| serde_json::to_vec(b).expect("request types serialize"));
        let (status, _, bytes) = self
            .send_bytes(method, path, payload, "application/json", extra_wait)
            .await?;
        Ok((status, bytes))
    }

    /// Sends a request with `payload` as its body of `content_type`; returns the raw status,
    /// headers and body.
    pub async fn send_bytes(
        &self,
        method: Method,
        path: &str,
        payload: Option<Vec<u8>>,
        content_type: &str,
        extra_wait: Duration,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        let url = format!("{}{}", self.base, path);
        let payload = Bytes::from(payload.unwrap_or_default());
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", content_type)
            .header("content-length", payload.len())
            .body(full(payload))
            .map_err(|_| ClientError::InvalidUrl(url.clone()))?;
        let timeout = self.timeout + extra_wait;
        let work = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|source| self.request_error(&url, source))?;
            let status = resp.status();
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|source| ClientError::ReadResponse {
                    url: url.clone(),
                    source,
                })?
                .to_bytes();
            Ok((status, parts.headers, bytes))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                timeout,
            })?
    }

    /// A failed request as an error: a TLS failure names the setting that chose the trust.
    fn request_error(&self, url: &str, source: hyper_util::client::legacy::Error) -> ClientError {
        match (crate::tls::tls_cause(&source), &self.trust_setting) {
            (Some(cause), Some(setting)) => ClientError::Tls {
                url: url.to_string(),
                cause,
                setting: setting.clone(),
            },
            _ => ClientError::Request {
                url: url.to_string(),
                source,
            },
        }
    }

    /// Sends a request and decodes a JSON reply (`()` for 204).
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let url = format!("{}{}", self.base, path);
        let (status, bytes) = self.send(method, path, body, Duration::ZERO).await?;
        if status.is_success() {
            let bytes = if status == StatusCode::NO_CONTENT || bytes.is_empty() {
                Bytes::from_static(b"null")
            } else {
                bytes
            };
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::UnexpectedResponse {
                url,
                status,
                text: format!("undecodable body: {e}"),
            });
        }
        Err(error_of(url, status, &bytes))
    }
}

/// A request body: whole, or streamed (an upload).
type ReqBody = BoxBody<Bytes, std::io::Error>;

fn full(b: Bytes) -> ReqBody {
    Full::new(b).map_err(|e| match e {}).boxed()
}

/// What an upload's body is read from.
pub type Chunks = tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>;

/// An upload's body: the chunks a channel delivers (an error aborts the request).
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(hyper::body::Frame::data)))
    }
}

/// An exec's reply: its events as they arrive ([`Client::exec`]).
#[derive(Debug)]
pub struct ExecStream {
    url: String,
    body: Incoming,
    buf: Vec<u8>,
}

impl ExecStream {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<crate::model::ExecEvent, ClientError>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line[..i]).map_err(|e| {
                    ClientError::UnexpectedResponse {
                        url: self.url.clone(),
                        status: StatusCode::OK,
                        text: format!("undecodable exec event: {e}"),
                    }
                }));
            }
            match self.body.frame().await {
                None if self.buf.is_empty() => return None,
                None => {
                    self.buf.clear();
                    return Some(Err(ClientError::UnexpectedResponse {
                        url: self.url.clone(),
                        status: StatusCode::OK,
                        text: "the stream ended within a line".into(),
                    }));
                }
                Some(Err(source)) => {
                    return Some(Err(ClientError::ReadResponse {
                        url: self.url.clone(),
                        source,
                    }))
                }
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }
}

/// A file being downloaded ([`Client::download`]): its metadata, then its bytes.
#[derive(Debug)]
pub struct Download {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    url: String,
    body: Incoming,
}

impl Download {
    /// The next chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        loop {
            match self.body.frame().await? {
                Err(source) => {
                    return Some(Err(ClientError::ReadResponse {
                        url: self.url.clone(),
                        source,
                    }))
                }
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        return Some(Ok(d));
                    }
                }
            }
        }
    }
}

impl Client {
    /// Sends `cmd` (a route with a streamed reply or body) and returns the response once its
    /// head is in (within the client's timeout); an error status is an error with its body.
    async fn open(
        &self,
        cmd: &Command,
        upload: Option<(Option<u64>, Chunks)>,
    ) -> Result<(String, hyper::Response<Incoming>), ClientError> {
        let path = cmd.path();
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder()
            .method(cmd.route().method.http())
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token));
        let body = match (upload, cmd.body()) {
            (Some((len, rx)), _) => {
                req = req.header("content-type", "application/octet-stream");
                // Without a length the body goes chunked (a stream of stdin).
                if let Some(len) = len {
                    req = req.header("content-length", len);
                }
                ChannelBody(rx).boxed()
            }
            (None, Some(json)) => {
                req = req.header("content-type", "application/json");
                full(Bytes::from(
                    serde_json::to_vec(&json).expect("request types serialize"),
                ))
            }
            (None, None) => full(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|_| ClientError::InvalidUrl(url.clone()))?;
        // An upload's response comes after its last byte: no timeout but the connection's.
        let timeout = match cmd {
            Command::WriteFile { .. } | Command::WriteExecStdin { .. } => {
                Duration::from_secs(7 * 86_400)
            }
            _ => self.timeout,
        };
        let resp = tokio::time::timeout(timeout, self.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                timeout,
            })?
            .map_err(|source| self.request_error(&url, source))?;
        let status = resp.status();
        if status.is_success() {
            return Ok((url, resp));
        }
        let bytes = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })?
            .map_err(|source| ClientError::ReadResponse {
                url: url.clone(),
                source,
            })?
            .to_bytes();
        Err(error_of(url, status, &bytes))
    }

    /// Runs an exec command ([`Command::ExecVm`]); its events stream from the result.
    /// Dropping the stream closes the connection, which kills the command.
    pub async fn exec(&self, cmd: &Command) -> Result<ExecStream, ClientError> {
        let (url, resp) = self.open(cmd, None).await?;
        Ok(ExecStream {
            url,
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// Starts a download ([`Command::ReadFile`]).
    pub async fn download(&self, cmd: &Command) -> Result<Download, ClientError> {
        let (url, resp) = self.open(cmd, None).await?;
        let header = |name: &str, radix: u32| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| u64::from_str_radix(v, radix).ok())
                .unwrap_or(0)
        };
        Ok(Download {
            size: header("content-length", 10),
            mode: header("x-atoll-mode", 8) as u32,
            uid: header("x-atoll-uid", 10) as u32,
            gid: header("x-atoll-gid", 10) as u32,
            url,
            body: resp.into_body(),
        })
    }

    /// Uploads `length` bytes that `chunks` delivers ([`Command::WriteFile`]).
    pub async fn upload(
        &self,
        cmd: &Command,
        length: u64,
        chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> Result<(), ClientError> {
        let (url, resp) = self.open(cmd, Some((Some(length), chunks))).await?;
        let _ = (url, resp.into_body().collect().await);
        Ok(())
    }

    /// Streams an exec's stdin ([`Command::WriteExecStdin`], the `exec_id` of its `started`
    /// event) from what `chunks` delivers, chunked; the channel's end closes the command's
    /// stdin.
    pub async fn exec_stdin(
        &self,
        cmd: &Command,
        chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> Result<(), ClientError> {
        let (_, resp) = self.open(cmd, Some((None, chunks))).await?;
        let _ = resp.into_body().collect().await;
        Ok(())
    }

    /// Sends `cmd` along its route (the route table's method, path, query and body) and
    /// decodes the reply the route declares.
    pub async fn execute(&self, cmd: &Command) -> Result<Reply, ClientError> {
        let route = cmd.route();
        let path = cmd.path();
        let body = cmd.body();
        let (status, bytes) = self
            .send(route.method.http(), &path, body.as_ref(), cmd.wait())
            .await?;
        let url = format!("{}{}", self.base, path);
        if status.is_success() {
            let schema = route.response.filter(|_| status != StatusCode::NO_CONTENT);
            return Reply::from_json(schema, &bytes).map_err(|e| ClientError::UnexpectedResponse {
                url,
                status,
                text: format!("undecodable body: {e}"),
            });
        }
        Err(error_of(url, status, &bytes))
    }

    /// [`Client::execute`], with the reply's payload as its own type (`Vm`, `Vec<Cloud>`,
    /// `()` for no content).
    pub async fn run<T: TryFrom<Reply, Error = Reply>>(
        &self,
        cmd: &Command,
    ) -> Result<T, ClientError> {
        let reply = self.execute(cmd).await?;
        T::try_from(reply).map_err(|other| ClientError::UnexpectedResponse {
            url: format!("{}{}", self.base, cmd.path()),
            status: StatusCode::from_u16(cmd.route().status).unwrap_or(StatusCode::OK),
            text: format!("a reply of another kind: {other:?}"),
        })
    }
}

#[async_trait::async_trait]
impl crate::ControlPlane for Client {
    async fn execute(&self, cmd: Command) -> Result<Reply, crate::ControlPlaneError> {
        Ok(Client::execute(self, &cmd).await?)
    }
}

/// The error of a failed request: the server's JSON error, or the raw text.
fn error_of(url: String, status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api { status, body },
        Err(_) => ClientError::UnexpectedResponse {
            url,
            status,
            text: String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}

/// Whether a URL's host is this machine (`localhost`, 127.0.0.0/8, ::1).
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
