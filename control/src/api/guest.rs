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

use std::{collections::HashMap, sync::Mutex};

use atoll_api::{model::GuestTarget, Command};
use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

use super::ApiError;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The clients to hosts' guest access endpoints, by pinned fingerprint.
#[derive(Default)]
pub(super) struct Forwarder {
    clients: Mutex<HashMap<String, HttpsClient>>,
}

impl Forwarder {
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
        Ok(out
            .body(Body::new(body))
            .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()))
    }
}
