//! The overlay on this host (see `dataplane-ebpf/src/overlay.rs` for the packet path): the
//! VXLAN device and its program, each cloud's network id, the other hosts, and where the
//! clouds' remote addresses live.
//!
//! What a host is told comes from the control plane's placement; this module only writes it
//! in the order the dataplane needs (see `dataplane::overlay`): a cloud's VNI and a peer before
//! the routes that use them, routes removed before them.

use std::net::Ipv4Addr;

use atoll_dataplane_common::{
    ipv4_from_map, ipv4_to_map, OverlayHost, NEXTHOP_REMOTE, NEXTHOP_REMOTE_NAT, VNI_MAX,
};

use super::{EndpointError, Host};
use crate::{device, types::CloudId, types::MacAddr};

fn program(name: String) -> impl Fn(crate::dataplane::DataplaneError) -> EndpointError {
    move |source| EndpointError::Program {
        name: name.clone(),
        source,
    }
}

/// The device holding `underlay` (name, ifindex, MTU), if one of this namespace's does and
/// it is neither the loopback nor the VXLAN device `vxlan`.
fn underlay_device(underlay: Ipv4Addr, vxlan: &str) -> Option<(String, u32, u32)> {
    let found = crate::egress::host_addresses()
        .map_err(|e| tracing::warn!("listing addresses for the underlay device: {e}"))
        .ok()?
        .into_iter()
        .find(|a| a.ipv4 == underlay && a.device != "lo" && a.device != vxlan);
    let Some(a) = found else {
        tracing::warn!(
            "no device holds the underlay address {underlay}: every frame takes the VXLAN device"
        );
        return None;
    };
    let ifindex = device::ifindex(&a.device)?;
    let mtu = device::mtu(&a.device)
        .map_err(|e| tracing::warn!("the MTU of underlay device {}: {e}", a.device))
        .ok()?;
    Some((a.device, ifindex, mtu))
}

impl Host {
    /// Turns the overlay on: the VXLAN device `name` (external mode, UDP `port`, outer
    /// source `underlay`; created if missing, reused if present) up with `from_overlay` on
    /// its ingress; `from_underlay` first on the ingress of the device holding `underlay`
    /// (if one does), then this host's end in `OVERLAY_HOST`, with the smaller of
    /// `underlay_mtu` and that device's MTU. Returns the VXLAN device's ifindex and the
    /// underlay device's name (`None`: no device holds the address, and every frame takes the
    /// VXLAN device).
    pub async fn enable_overlay(
        &mut self,
        name: &str,
        port: u16,
        underlay: Ipv4Addr,
        underlay_mtu: u32,
    ) -> Result<(u32, Option<String>), EndpointError> {
        let ifindex = match device::ifindex(name) {
            Some(i) => i,
            None => self
                .devices
                .create_vxlan(name, port, underlay)
                .await
                .map_err(EndpointError::CreateDevice)?,
        };
        self.devices
            .set_up(name, ifindex)
            .await
            .map_err(|source| EndpointError::Activate {
                name: name.into(),
                source,
            })?;
        let what = format!("overlay device {name}");
        self.dataplane
            .attach_overlay(name, ifindex)
            .map_err(program(what.clone()))?;
        let device = underlay_device(underlay, name);
        let (underlay_ifindex, mtu) = match &device {
            Some((dev, i, dev_mtu)) => {
                self.dataplane
                    .attach_underlay(dev, *i)
                    .map_err(program(format!("underlay device {dev}")))?;
                (*i, underlay_mtu.min(*dev_mtu))
            }
            None => {
                self.dataplane
                    .detach_underlay()
                    .map_err(program("the underlay device".into()))?;
                (0, underlay_mtu)
            }
        };
        self.dataplane
            .set_overlay_host(OverlayHost {
                vxlan_ifindex: ifindex,
                underlay_ipv4: ipv4_to_map(underlay.octets()),
                underlay_ifindex,
                port_be: port.to_be(),
                underlay_mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
            })
            .map_err(program(what))?;
        Ok((ifindex, device.map(|(dev, _, _)| dev)))
    }

    /// Turns the overlay off: remote routes are dropped (`overlay_off`) and `from_overlay` is
    /// detached. The device is left to the caller.
    pub fn disable_overlay(&mut self) -> Result<(), EndpointError> {
        let what = "the overlay".to_string();
        self.dataplane
            .set_overlay_host(OverlayHost::default())
            .map_err(program(what.clone()))?;
        self.dataplane
            .detach_overlay()
            .map_err(program(what.clone()))?;
        self.dataplane.detach_underlay().map_err(program(what))
    }

    /// Gives `cloud` its fleet-wide network id on this host.
    pub fn set_cloud_vni(&mut self, cloud: CloudId, vni: u32) -> Result<(), EndpointError> {
        let name = format!("VNI of cloud {cloud}");
        if vni == 0 || vni > VNI_MAX {
            return Err(EndpointError::InvalidSpec {
                name,
                message: format!("VNI {vni} is not in 1..={VNI_MAX}"),
            });
        }
        self.dataplane
            .set_cloud_vni(cloud.get(), vni)
            .map_err(program(name))
    }

    /// The routes to remote endpoints: `(cloud, address, guest MAC, host underlay address)`.
    pub fn remote_endpoints(
        &self,
    ) -> Result<Vec<(CloudId, Ipv4Addr, MacAddr, Ipv4Addr)>, EndpointError> {
        Ok(self
            .dataplane
            .routes()
            .map_err(program("the remote routes".into()))?
            .into_iter()
            .filter(|(_, hop)| hop.flags == NEXTHOP_REMOTE)
            .filter_map(|(key, hop)| {
                Some((
                    CloudId::new(key.cloud)?,
                    Ipv4Addr::from(ipv4_from_map(key.ipv4)),
                    MacAddr(hop.mac),
                    Ipv4Addr::from(ipv4_from_map(hop.ifindex)),
                ))
            })
            .collect())
    }

    /// The clouds with a network id here: `(cloud, VNI)`.
    pub fn cloud_vnis(&self) -> Result<Vec<(CloudId, u32)>, EndpointError> {
        Ok(self
            .dataplane
            .cloud_vnis()
            .map_err(program("the clouds' network ids".into()))?
            .into_iter()
            .filter_map(|(c, v)| Some((CloudId::new(c)?, v)))
            .collect())
    }

    /// The known peers' underlay addresses.
    pub fn overlay_peers(&self) -> Result<Vec<Ipv4Addr>, EndpointError> {
        Ok(self
            .dataplane
            .overlay_peers()
            .map_err(program("the overlay peers".into()))?
            .into_iter()
            .map(|a| Ipv4Addr::from(ipv4_from_map(a)))
            .collect())
    }

    /// This host's underlay address, if the overlay is on.
    pub fn overlay_underlay(&self) -> Result<Option<Ipv4Addr>, EndpointError> {
        let h = self
            .dataplane
            .overlay_host()
            .map_err(program("the overlay".into()))?;
        Ok((h.vxlan_ifindex != 0).then(|| Ipv4Addr::from(ipv4_from_map(h.underlay_ipv4))))
    }

    /// Removes `cloud`'s network id here (after its remote routes).
    pub fn remove_cloud_vni(&mut self, cloud: CloudId) -> Result<(), EndpointError> {
        self.dataplane
            .remove_cloud_vni(cloud.get())
            .map_err(program(format!("VNI of cloud {cloud}")))
    }

    /// Makes the host at `underlay` a known peer.
    pub fn add_overlay_peer(&mut self, underlay: Ipv4Addr) -> Result<(), EndpointError> {
        self.dataplane
            .set_overlay_peer(ipv4_to_map(underlay.octets()))
            .map_err(program(format!("overlay peer {underlay}")))
    }

    /// Forgets the host at `underlay` (after the routes through it).
    pub fn remove_overlay_peer(&mut self, underlay: Ipv4Addr) -> Result<(), EndpointError> {
        self.dataplane
            .remove_overlay_peer(ipv4_to_map(underlay.octets()))
            .map_err(program(format!("overlay peer {underlay}")))
    }

    /// Routes `ipv4` of `cloud` to the guest with `mac` on the host at `underlay`.
    pub fn set_remote_endpoint(
        &mut self,
        cloud: CloudId,
        ipv4: Ipv4Addr,
        mac: MacAddr,
        underlay: Ipv4Addr,
    ) -> Result<(), EndpointError> {
        self.dataplane
            .set_remote_route(
                cloud.get(),
                ipv4_to_map(ipv4.octets()),
                mac.0,
                ipv4_to_map(underlay.octets()),
            )
            .map_err(program(format!("remote endpoint {ipv4} of cloud {cloud}")))
    }

    /// Routes `nat`, a grant's NAT address for the consumer host at `underlay`, in `provider`'s
    /// space: backends here reply to it there (see "Exposures across hosts" in
    /// `dataplane-ebpf/src/exposure.rs`).
    pub fn set_remote_nat(
        &mut self,
        provider: CloudId,
        nat: Ipv4Addr,
        underlay: Ipv4Addr,
    ) -> Result<(), EndpointError> {
        self.dataplane
            .set_remote_nat_route(
                provider.get(),
                ipv4_to_map(nat.octets()),
                ipv4_to_map(underlay.octets()),
            )
            .map_err(program(format!(
                "remote NAT address {nat} of cloud {provider}"
            )))
    }

    /// Removes the route to the remote NAT address `nat` of `provider`.
    pub fn remove_remote_nat(
        &mut self,
        provider: CloudId,
        nat: Ipv4Addr,
    ) -> Result<(), EndpointError> {
        self.dataplane
            .remove_remote_nat_route(provider.get(), ipv4_to_map(nat.octets()))
            .map_err(program(format!(
                "remote NAT address {nat} of cloud {provider}"
            )))
    }

    /// The routes to remote NAT addresses: `(provider, NAT address, consumer host's underlay
    /// address)`.
    pub fn remote_nats(&self) -> Result<Vec<(CloudId, Ipv4Addr, Ipv4Addr)>, EndpointError> {
        Ok(self
            .dataplane
            .routes()
            .map_err(program("the remote NAT routes".into()))?
            .into_iter()
            .filter(|(_, hop)| hop.flags == NEXTHOP_REMOTE_NAT)
            .filter_map(|(key, hop)| {
                Some((
                    CloudId::new(key.cloud)?,
                    Ipv4Addr::from(ipv4_from_map(key.ipv4)),
                    Ipv4Addr::from(ipv4_from_map(hop.ifindex)),
                ))
            })
            .collect())
    }

    /// Removes the route to the remote endpoint `ipv4` of `cloud`.
    pub fn remove_remote_endpoint(
        &mut self,
        cloud: CloudId,
        ipv4: Ipv4Addr,
    ) -> Result<(), EndpointError> {
        self.dataplane
            .remove_remote_route(cloud.get(), ipv4_to_map(ipv4.octets()))
            .map_err(program(format!("remote endpoint {ipv4} of cloud {cloud}")))
    }
}
