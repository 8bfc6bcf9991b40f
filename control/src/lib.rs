//! atoll's control plane: the API server ([`api`]) over the core ([`core`]) over the store
//! ([`store`]), the control plane's config ([`config`]) and usage pricing ([`usage`]). The
//! contract (the model, the commands, the route table and the typed client) is the
//! `atoll-api` crate, re-exported here under its old module names.

pub mod api;
pub mod config;
pub mod core;
pub mod focus;
pub mod metrics;
pub mod store;
pub mod usage;

pub use atoll_api::{client, logging, model, private, routes, tls};
