//! Forwarding exec and file requests to the VM's host (kubelet-style; `atoll-agent`'s
//! `guest_access` module serves the other end).
//!
//! Decisions:
//! - **The core decides, this layer forwards.** An exec or file command is authorized, parsed
//!   and answered by the core like any other; its answer ([`GuestTarget`]) names the VM's
//!   host, the URL of its guest access, the certificate fingerprint to pin and the secret to
//!   present. Only the transfer happens here, with the request's own path and query.
//! - **Streams pass through.** The host's response (NDJSON of an exec, a file's bytes) is
//!   relayed as it arrives, and an upload's body is relayed as it is received (its
//!   `Content-Length` is required and capped before anything is sent); dropping the client's
//!   connection drops the forwarded request, which kills the command on the host.
//! - **One client per pinned fingerprint**, kept, so that consecutive execs on a host reuse
//!   a TLS connection (an exec's round trip is most of its cost).
//! - **At most [`MAX_GUEST_REQUESTS_PER_CLOUD`] exec and file requests in flight per cloud**
//!   through one control plane (`429 too_many_sessions` beyond): a host serves a bounded
//!   number of guest access connections, and one cloud must not hold them all.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use atoll_api::{
    model::{CloudId, GuestTarget},
    Command,
};
use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// Exec and file requests in flight per cloud through one control plane.
pub const MAX_GUEST_REQUESTS_PER_CLOUD: usize = 32;

/// The clients to hosts' guest access endpoints, by pinned fingerprint, and each cloud's
/// requests in flight.
#[derive(Default)]
pub(super) struct Forwarder {
    clients: Mutex<HashMap<String, HttpsClient>>,
    in_flight: Mutex<HashMap<CloudId, Arc<Semaphore>>>,
}

/// A relayed body that holds its cloud's in-flight permit until it is done or dropped.
struct Held {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl hyper::body::Body for Held {
    type Data = axum::body::Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Forwarder {
    /// A permit for one more request of `cloud`, if it has fewer than the cap in flight.
    fn permit(&self, cloud: CloudId) -> Result<OwnedSemaphorePermit, ApiError> {
        let sem = {
            let mut m = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() > 4096 {
                m.retain(|_, s| s.available_permits() < MAX_GUEST_REQUESTS_PER_CLOUD);
            }
            m.entry(cloud)
                .or_insert_with(|| Arc::new(Semaphore::new(MAX_GUEST_REQUESTS_PER_CLOUD)))
                .clone()
        };
        sem.try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sessions",
                format!(
                    "cloud {cloud} has {MAX_GUEST_REQUESTS_PER_CLOUD} exec and file requests in \
                     flight; wait for one to end"
                ),
                None,
            )
        })
    }

    fn client(&self, fingerprint: &str) -> Result<HttpsClient, ApiError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(fingerprint) {
            return Ok(c.clone());
        }
        let tls = atoll_api::tls::ClientTls {
            trust: atoll_api::tls::Trust::Fingerprint(fingerprint.to_string()),
            setting: "the host's registered guest access".into(),
            identity: None,
        }
        .config()
        .map_err(|e| ApiError::internal("guest_access", "the host's guest access", &e))?;
        let mut http = HttpConnector::new();
        // Streams of small writes (exec output): no Nagle delay on the way.
        http.set_nodelay(true);
        let c: HttpsClient =
            Client::builder(TokioExecutor::new()).build(atoll_api::tls::connector(http, Some(tls)));
        if clients.len() > 4096 {
            clients.clear();
        }
        clients.insert(fingerprint.to_string(), c.clone());
        Ok(c)
    }

    /// Sends `cmd` (an exec or file command the core answered with `target`) to the VM's host
    /// and relays the answer. `upload` is the request's body for a file upload.
    pub(super) async fn forward(
        &self,
        target: GuestTarget,
        cmd: &Command,
        headers: &HeaderMap,
        upload: Option<Body>,
    ) -> Result<Response, ApiError> {
        let permit = self.permit(target.cloud)?;
        let route = cmd.route();
        let uri = format!("{}{}", target.access.url, cmd.path());
        let mut req = axum::http::Request::builder()
            .method(route.method.http())
            .uri(&uri)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", target.access.secret),
            );
        let body = match (cmd, upload) {
            // A stream of stdin: chunked, or with the length the client gave.
            (Command::WriteExecStdin { .. }, Some(body)) => {
                if let Some(len) = headers.get(header::CONTENT_LENGTH) {
                    req = req.header(header::CONTENT_LENGTH, len.clone());
                }
                req = req.header(header::CONTENT_TYPE, "application/octet-stream");
                body
            }
            (Command::WriteFile { .. }, Some(body)) => {
                let length = headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::LENGTH_REQUIRED,
                            "length_required",
                            "an upload needs Content-Length",
                            None,
                        )
                    })?;
                if length > atoll_api::model::MAX_FILE_BYTES {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "file_too_large",
                        format!(
                            "uploads are limited to {} bytes",
                            atoll_api::model::MAX_FILE_BYTES
                        ),
                        Some("body".into()),
                    ));
                }
                req = req
                    .header(header::CONTENT_LENGTH, length)
                    .header(header::CONTENT_TYPE, "application/octet-stream");
                body
            }
            _ => match cmd.body() {
                Some(json) => {
                    req = req.header(header::CONTENT_TYPE, "application/json");
                    Body::from(serde_json::to_vec(&json).expect("JSON values serialize"))
                }
                None => Body::empty(),
            },
        };
        let req = req
            .body(body)
            .map_err(|e| ApiError::internal("guest_access", "building the request", &e))?;
        let client = self.client(&target.access.fingerprint)?;
        let resp = client.request(req).await.map_err(|e| {
            let cause = atoll_api::tls::tls_cause(&e).unwrap_or_else(|| format!("{e:?}"));
            tracing::warn!(host = %target.host, "guest access at {}: {cause}", target.access.url);
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "guest_unreachable",
                format!(
                    "the VM's host ({}) did not answer at its guest access",
                    target.host
                ),
                None,
            )
        })?;
        let (parts, body) = resp.into_parts();
        let mut out = Response::builder().status(parts.status);
        for name in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::HeaderName::from_static("x-atoll-mode"),
            header::HeaderName::from_static("x-atoll-uid"),
            header::HeaderName::from_static("x-atoll-gid"),
        ] {
            if let Some(v) = parts.headers.get(&name) {
                out = out.header(name, v.clone());
            }
        }
        if parts.headers.get(header::CONTENT_TYPE).is_none() && parts.status.is_success() {
            out = out.header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
        }
        let held = Held {
            inner: Body::new(body),
            _permit: permit,
        };
        Ok(out
            .body(Body::new(held))
            .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()))
    }
}
