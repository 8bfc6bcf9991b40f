//! atoll's control plane. Today: usage pricing and reports ([`usage`]); the API for clouds,
//! VMs, volumes, DNS and exposures is tracked as its own issue.

pub mod usage;
