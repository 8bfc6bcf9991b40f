//! The atoll agent: the per-host daemon that owns the eBPF dataplane and the endpoint devices.
//!
//! - [`dataplane`] loads the eBPF object once, pins its programs and maps under a versioned
//!   bpffs directory, and afterwards always works from those pins, so the dataplane keeps
//!   forwarding while the agent is down and a restarted agent resumes exactly where it was.
//! - [`device`] creates and deletes endpoint devices: persistent taps (tun ioctl) ready for a
//!   VMM to open, and veth pairs whose peer lives in a guest network namespace (rtnetlink).
//! - [`endpoint`] ties the two together: an endpoint is a device plus its map entries, created
//!   and deleted as one unit with rollback.
//! - [`dns`] is the per-host DNS server guests reach at their gateway address (split horizon
//!   by asking endpoint), with its namespace and devices.
//! - [`config`] is the agent's TOML configuration (unknown keys rejected).
//! - [`doctor`] checks a host for everything atoll needs (`atoll-agent doctor`).
//! - [`scratch`] holds the uniquely named, self-removing namespaces and pin directories of the
//!   demo and the doctor's probes (the tests' helpers are the `atoll-testbed` crate's).

pub mod config;
pub mod converge;
pub mod dataplane;
pub mod demo;
pub mod device;
pub mod dns;
pub mod doctor;
pub mod egress;
pub mod endpoint;
pub mod expedite;
pub mod guest_access;
pub mod metrics;
pub mod overlay;
pub mod scratch;
pub mod types;
pub mod usage;
pub mod vm;

pub use atoll_dataplane_common as common;
