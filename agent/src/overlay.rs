//! The host's side of the overlay (issue 18): which address is this host's on the underlay,
//! and turning the VXLAN device and `from_overlay` on or off ([`enable`], called at start when
//! `overlay.enabled`). The packet path is `dataplane-ebpf/src/overlay.rs`; what each cloud's
//! remote endpoints are comes from the control plane through the converger.
//!
//! Decisions:
//! - **The underlay address** is `overlay.underlay`, or else the first IPv4 address of the
//!   uplink (`egress.uplink`, else the default route's device): on most hosts the network
//!   other hosts are reached by. A host with a separate underlay network names its address.
//! - **Encryption is the underlay's**: atoll sends VXLAN in the clear, for a trusted
//!   underlay. Where the kernel has WireGuard, run the underlay over it (give `overlay.
//!   underlay` the host's WireGuard address, and each peer's address as its allowed IP);
//!   `atoll-agent doctor` reports whether the underlay address sits on a WireGuard device.

use std::net::Ipv4Addr;

use crate::{
    config::{EgressConfig, OverlayConfig},
    egress::{self, EgressError},
    endpoint::{EndpointError, Host},
};

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("finding the underlay address: {0}")]
    FindUnderlay(#[source] EgressError),
    #[error(
        "the uplink {0} has no IPv4 address to use as the underlay address (set overlay.underlay)"
    )]
    NoUnderlayAddress(String),
    #[error("turning the overlay on: {0}")]
    Enable(#[source] EndpointError),
    #[error("removing the overlay device {name}: {source}")]
    RemoveDevice {
        name: String,
        source: crate::device::DeviceError,
    },
}

/// What [`enable`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    pub underlay: Ipv4Addr,
    pub device: String,
    pub ifindex: u32,
    /// The device holding the underlay address, where `from_underlay` decapsulates (`None`:
    /// every frame takes the VXLAN device).
    pub underlay_device: Option<String>,
}

/// This host's underlay address (module docs).
pub fn underlay(cfg: &OverlayConfig, egress_cfg: &EgressConfig) -> Result<Ipv4Addr, OverlayError> {
    if let Some(a) = cfg.underlay {
        return Ok(a);
    }
    let uplink = egress::uplink(egress_cfg).map_err(OverlayError::FindUnderlay)?;
    uplink
        .addresses
        .first()
        .map(|(a, _)| *a)
        .ok_or(OverlayError::NoUnderlayAddress(uplink.name))
}

/// Deletes the overlay's VXLAN device (`atoll-agent cleanup`); true if there was one.
pub async fn remove_device(cfg: &OverlayConfig) -> Result<bool, OverlayError> {
    let name = cfg.device.to_string();
    let Some(ifindex) = crate::device::ifindex(&name) else {
        return Ok(false);
    };
    let err = |source| OverlayError::RemoveDevice {
        name: name.clone(),
        source,
    };
    let devices = crate::device::Devices::new().map_err(err)?;
    devices.delete(&name, ifindex).await.map_err(err)?;
    Ok(true)
}

/// Turns the overlay on as configured: the VXLAN device, `from_overlay`, this host's end.
pub async fn enable(
    host: &mut Host,
    cfg: &OverlayConfig,
    egress_cfg: &EgressConfig,
) -> Result<Enabled, OverlayError> {
    let underlay = underlay(cfg, egress_cfg)?;
    let (ifindex, underlay_device) = host
        .enable_overlay(&cfg.device, cfg.port, underlay, cfg.underlay_mtu)
        .await
        .map_err(OverlayError::Enable)?;
    Ok(Enabled {
        underlay,
        device: cfg.device.to_string(),
        ifindex,
        underlay_device,
    })
}
