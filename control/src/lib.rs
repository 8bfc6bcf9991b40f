//! atoll's control plane: the API ([`api`]) over the core ([`core`]) over the store
//! ([`store`]), the resource model ([`model`]), the control plane's config ([`config`]), an
//! HTTP client for the CLI and remote agents ([`client`]), and usage pricing ([`usage`]).

pub mod api;
pub mod client;
pub mod config;
pub mod core;
pub mod logging;
pub mod model;
pub mod private;
pub mod store;
pub mod tls;
pub mod usage;
