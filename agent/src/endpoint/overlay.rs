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

impl Host {
    /// Turns the overlay on: the VXLAN device `name` (external mode, UDP `port`, outer
    /// source `underlay`; created if missing, reused if present) up with `from_overlay` on
    /// its ingress, then this host's end in `OVERLAY_HOST`. Returns the device's ifindex.
    pub async fn enable_overlay(
        &mut self,
        name: &str,
        port: u16,
        underlay: Ipv4Addr,
    ) -> Result<u32, EndpointError> {
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
        self.dataplane
            .set_overlay_host(OverlayHost {
                vxlan_ifindex: ifindex,
                underlay_ipv4: ipv4_to_map(underlay.octets()),
            })
            .map_err(program(what))?;
        Ok(ifindex)
    }

    /// Turns the overlay off: remote routes are dropped (`overlay_off`) and `from_overlay` is
    /// detached. The device is left to the caller.
    pub fn disable_overlay(&mut self) -> Result<(), EndpointError> {
        let what = "the overlay".to_string();
        self.dataplane
            .set_overlay_host(OverlayHost::default())
            .map_err(program(what.clone()))?;
        self.dataplane.detach_overlay().map_err(program(what))
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
