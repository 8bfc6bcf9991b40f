//! atoll's API as a library: the model (what clients send and the store keeps), the
//! [`Command`]s and their [`Reply`]s, the route table every endpoint is declared in once, the
//! OpenAPI document built from it, and the typed [`Client`](client::Client).
//!
//! Decisions:
//! - **The contract is its own crate** (bpfman's `-api` shape): the agent, the CLI, the tests
//!   and the bench depend on this crate; only the control plane's server and an agent running
//!   the control plane embedded link `atoll-control` (SQLite, etcd, axum).
//! - **One interface to a control plane**, [`ControlPlane`]: the converger speaks to the
//!   embedded core and to a remote control plane through it, with the same commands.
//! - TLS ([`tls`]) lives here because both ends of the wire need it: clients verify the server
//!   (a CA file or a pinned fingerprint), and the server's certificates are generated with the
//!   same code the clients pin against.

pub mod client;
pub mod command;
pub mod logging;
pub mod mcp;
pub mod metrics_text;
pub mod model;
pub mod openapi;
pub mod private;
pub mod routes;
pub mod tls;
pub mod usage;

pub use command::{Command, Issuer, Reply};
pub use openapi::openapi;

/// A control plane as the agent sees it: something that executes [`Command`]s with the
/// agent's authority (its host's token for a remote one, the operator's for one embedded in
/// the agent's process).
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + std::fmt::Debug {
    async fn execute(&self, cmd: Command) -> Result<Reply, ControlPlaneError>;
}

/// A failure of a [`ControlPlane`].
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    Remote(Box<client::ClientError>),
    #[error("the embedded control plane: {0}")]
    Embedded(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<client::ClientError> for ControlPlaneError {
    fn from(e: client::ClientError) -> Self {
        ControlPlaneError::Remote(Box::new(e))
    }
}
