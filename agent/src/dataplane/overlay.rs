//! The overlay maps (see `dataplane-ebpf/src/overlay.rs`): this host's end of the overlay,
//! the clouds' network ids both ways, the other hosts, and the routes to remote endpoints.
//!
//! Order of writes: a cloud's VNI (both directions) and a peer are written before any route
//! that needs them and removed after them, so a packet that finds a remote route finds its
//! VNI; a remote route never replaces a local endpoint's or a service's route (a host is told
//! where the cloud's other addresses live, never to move one of its own).

use atoll_dataplane_common::{
    ipv4_from_map, NextHop, OverlayHost, RouteKey, NEXTHOP_ENDPOINT, NEXTHOP_REMOTE,
    NEXTHOP_REMOTE_NAT,
};
use aya::maps::MapError;

use super::{
    error::{ignore_missing, insert_error, DataplaneError},
    pins::{OVERLAY_LINK_PREFIX, UNDERLAY_LINK_PREFIX},
    Dataplane, HostHook, MAP_CLOUD_VNIS, MAP_OVERLAY_HOST, MAP_OVERLAY_PEERS, MAP_ROUTES,
    MAP_VNI_CLOUDS,
};

const BPF_ANY: u64 = 0;

fn update_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::UpdateMap {
        map,
        source: Box::new(source),
    }
}

fn read_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::ReadMap {
        map,
        source: Box::new(source),
    }
}

fn ip(v: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(ipv4_from_map(v))
}

impl Dataplane {
    /// This host's end of the overlay as the programs see it (all zero: none).
    pub fn overlay_host(&self) -> Result<OverlayHost, DataplaneError> {
        self.overlay_host
            .get(&0, 0)
            .map_err(read_err(MAP_OVERLAY_HOST))
    }

    /// Sets this host's end of the overlay (all zero: none).
    pub fn set_overlay_host(&mut self, host: OverlayHost) -> Result<(), DataplaneError> {
        self.overlay_host
            .set(0, host, 0)
            .map_err(update_err(MAP_OVERLAY_HOST))
    }

    /// Gives `cloud` the network id `vni` on this host (both directions). Refuses a VNI
    /// another cloud holds here; a cloud that had another VNI loses it.
    pub fn set_cloud_vni(&mut self, cloud: u32, vni: u32) -> Result<(), DataplaneError> {
        match self.vni_clouds.get(&vni, 0) {
            Ok(c) if c != cloud => {
                return Err(DataplaneError::EntryExists {
                    map: MAP_VNI_CLOUDS,
                    what: format!("VNI {vni} (cloud {c})"),
                })
            }
            Ok(_) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(read_err(MAP_VNI_CLOUDS)(e)),
        }
        if let Some(old) = self.cloud_vni(cloud)? {
            if old != vni {
                ignore_missing(self.vni_clouds.remove(&old), MAP_VNI_CLOUDS)?;
            }
        }
        let capacity = self.max_endpoints;
        self.vni_clouds.insert(vni, cloud, BPF_ANY).map_err(|e| {
            insert_error(
                e,
                MAP_VNI_CLOUDS,
                format!("VNI {vni}"),
                capacity,
                "max_endpoints",
            )
        })?;
        self.cloud_vnis.insert(cloud, vni, BPF_ANY).map_err(|e| {
            insert_error(
                e,
                MAP_CLOUD_VNIS,
                format!("cloud {cloud}"),
                capacity,
                "max_endpoints",
            )
        })
    }

    /// `cloud`'s network id here, if it has one.
    pub fn cloud_vni(&self, cloud: u32) -> Result<Option<u32>, DataplaneError> {
        match self.cloud_vnis.get(&cloud, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(read_err(MAP_CLOUD_VNIS)(e)),
        }
    }

    /// Removes `cloud`'s network id (both directions); absent is not an error.
    pub fn remove_cloud_vni(&mut self, cloud: u32) -> Result<(), DataplaneError> {
        if let Some(vni) = self.cloud_vni(cloud)? {
            ignore_missing(self.cloud_vnis.remove(&cloud), MAP_CLOUD_VNIS)?;
            if self.vni_clouds.get(&vni, 0).ok() == Some(cloud) {
                ignore_missing(self.vni_clouds.remove(&vni), MAP_VNI_CLOUDS)?;
            }
        }
        Ok(())
    }

    /// Every cloud with a network id here: `(cloud, VNI)`.
    pub fn cloud_vnis(&self) -> Result<Vec<(u32, u32)>, DataplaneError> {
        self.cloud_vnis
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_CLOUD_VNIS))
    }

    /// Makes the host at underlay address `underlay` (map order) a known peer.
    pub fn set_overlay_peer(&mut self, underlay: u32) -> Result<(), DataplaneError> {
        // A fixed capacity (`OVERLAY_PEERS_CAPACITY` hosts), no setting to raise.
        self.overlay_peers
            .insert(underlay, 1, BPF_ANY)
            .map_err(update_err(MAP_OVERLAY_PEERS))
    }

    /// Forgets a peer; absent is not an error.
    pub fn remove_overlay_peer(&mut self, underlay: u32) -> Result<(), DataplaneError> {
        ignore_missing(self.overlay_peers.remove(&underlay), MAP_OVERLAY_PEERS)
    }

    /// The known peers' underlay addresses (map order).
    pub fn overlay_peers(&self) -> Result<Vec<u32>, DataplaneError> {
        self.overlay_peers
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_OVERLAY_PEERS))
    }

    /// Routes `(cloud, ipv4)` to the guest with `mac` on the host at `underlay` (addresses in
    /// map order), replacing a remote route there; refuses to replace a local endpoint's or a
    /// service's route.
    pub fn set_remote_route(
        &mut self,
        cloud: u32,
        ipv4: u32,
        mac: [u8; 6],
        underlay: u32,
    ) -> Result<(), DataplaneError> {
        self.set_remote_hop(
            RouteKey { cloud, ipv4 },
            NextHop {
                ifindex: underlay,
                slot: 0,
                mac,
                flags: NEXTHOP_REMOTE,
            },
        )
    }

    /// Routes the NAT address `(provider, ipv4)` of a grant to its consumer host at
    /// `underlay` ([`NEXTHOP_REMOTE_NAT`]: backends here reply to it there), replacing such a
    /// route; refuses to replace any other route.
    pub fn set_remote_nat_route(
        &mut self,
        provider: u32,
        ipv4: u32,
        underlay: u32,
    ) -> Result<(), DataplaneError> {
        self.set_remote_hop(
            RouteKey {
                cloud: provider,
                ipv4,
            },
            NextHop {
                ifindex: underlay,
                slot: 0,
                mac: [0; 6],
                flags: NEXTHOP_REMOTE_NAT,
            },
        )
    }

    fn set_remote_hop(&mut self, key: RouteKey, hop: NextHop) -> Result<(), DataplaneError> {
        let (cloud, ipv4) = (key.cloud, key.ipv4);
        if let Some(current) = self.route(key)? {
            if current.flags != hop.flags {
                let kind = match current.flags {
                    NEXTHOP_REMOTE => "a remote endpoint's route",
                    NEXTHOP_REMOTE_NAT => "a remote NAT address's route",
                    NEXTHOP_ENDPOINT => "a local route",
                    _ => "a local service's route",
                };
                return Err(DataplaneError::EntryExists {
                    map: MAP_ROUTES,
                    what: format!("{kind} to {} in cloud {cloud}", ip(ipv4)),
                });
            }
        }
        let capacity = self.max_routes;
        self.routes.insert(key, hop, BPF_ANY).map_err(|e| {
            insert_error(
                e,
                MAP_ROUTES,
                format!("remote route {} in cloud {cloud}", ip(ipv4)),
                capacity,
                "max_routes",
            )
        })
    }

    /// Removes the remote route `(cloud, ipv4)`; absent, or another kind of route there, is
    /// left.
    pub fn remove_remote_route(&mut self, cloud: u32, ipv4: u32) -> Result<(), DataplaneError> {
        self.remove_hop_of(RouteKey { cloud, ipv4 }, NEXTHOP_REMOTE)
    }

    /// Removes the remote NAT route `(provider, ipv4)`; absent, or another kind of route
    /// there, is left.
    pub fn remove_remote_nat_route(
        &mut self,
        provider: u32,
        ipv4: u32,
    ) -> Result<(), DataplaneError> {
        self.remove_hop_of(
            RouteKey {
                cloud: provider,
                ipv4,
            },
            NEXTHOP_REMOTE_NAT,
        )
    }

    fn remove_hop_of(&mut self, key: RouteKey, flags: u16) -> Result<(), DataplaneError> {
        match self.route(key)? {
            Some(hop) if hop.flags == flags => self.remove_route(key),
            _ => Ok(()),
        }
    }

    /// Attaches `from_overlay` to the ingress of the VXLAN device and pins the link as
    /// `links/overlay-<ifindex>` (kept if pinned already; pins on other devices go).
    pub fn attach_overlay(&mut self, ifname: &str, ifindex: u32) -> Result<(), DataplaneError> {
        self.attach_host_hook(HostHook::Overlay, ifname, ifindex)
    }

    /// Removes every pinned `from_overlay` link.
    pub fn detach_overlay(&mut self) -> Result<(), DataplaneError> {
        self.detach_host_hook(HostHook::Overlay)
    }

    /// Attaches `from_underlay` first on the ingress of the device holding the underlay
    /// address and pins the link as `links/underlay-<ifindex>` (kept if pinned already; pins
    /// on other devices go).
    pub fn attach_underlay(&mut self, ifname: &str, ifindex: u32) -> Result<(), DataplaneError> {
        self.attach_host_hook(HostHook::Underlay, ifname, ifindex)
    }

    /// Removes every pinned `from_underlay` link.
    pub fn detach_underlay(&mut self) -> Result<(), DataplaneError> {
        self.detach_host_hook(HostHook::Underlay)
    }

    /// ifindexes with a pinned `from_underlay` link.
    pub fn underlay_links(&self) -> Result<Vec<u32>, DataplaneError> {
        self.links_named(UNDERLAY_LINK_PREFIX)
    }

    /// ifindexes with a pinned `from_overlay` link.
    pub fn overlay_links(&self) -> Result<Vec<u32>, DataplaneError> {
        self.links_named(OVERLAY_LINK_PREFIX)
    }
}
