//! The exposure maps (see `dataplane-ebpf/src/exposure.rs`): `VIPS` with the routes that lead
//! to it, and the two flow tables.
//!
//! Order of writes: a VIP's service is written before its routes and removed after them, so a
//! packet that finds the route always finds the service (or, while it is being removed, is
//! dropped as `exposure_no_service`, which is what removal means).

use atoll_dataplane_common::{
    ipv4_from_map, FlowIn, FlowKey, FlowOut, NextHop, RouteKey, VipService, NEXTHOP_NAT_SOURCE,
    NEXTHOP_VIP,
};
use aya::maps::MapError;

use super::{
    error::{ignore_missing, insert_error, DataplaneError},
    Dataplane, MAP_EXPOSURE_FLOW_RATE, MAP_FLOWS_IN, MAP_FLOWS_OUT, MAP_ROUTES, MAP_VIPS,
};

const BPF_ANY: u64 = 0;

impl Dataplane {
    /// Sets every consumer cloud's new exposure flows per second on this host (0: no limit;
    /// see "New flows per consumer cloud" in `dataplane-ebpf/src/exposure.rs`).
    pub fn set_exposure_flow_rate(&mut self, per_sec: u32) -> Result<(), DataplaneError> {
        self.exposure_flow_rate
            .set(0, per_sec, 0)
            .map_err(|source| DataplaneError::UpdateMap {
                map: MAP_EXPOSURE_FLOW_RATE,
                source: Box::new(source),
            })
    }

    /// The new-flow rate the programs apply to every consumer cloud (0: no limit).
    pub fn exposure_flow_rate(&self) -> Result<u32, DataplaneError> {
        self.exposure_flow_rate
            .get(&0, 0)
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_EXPOSURE_FLOW_RATE,
                source: Box::new(source),
            })
    }

    /// Installs (or replaces in place) the service of `(consumer, vip)`, its route and the
    /// provider's NAT source route, both carrying the grant; a replaced service's NAT route of
    /// another address goes. Fails if either address is an endpoint's or another kind of
    /// route, or if the grant number is the current service's but the service (provider, NAT
    /// address, protocol, port) is not.
    pub fn set_vip(
        &mut self,
        consumer: u32,
        vip: u32,
        svc: VipService,
    ) -> Result<(), DataplaneError> {
        let routes = service_routes(consumer, vip, &svc);
        let key = routes[0].0;
        // Refuse before writing anything. A grant number names one service: the programs
        // take an exposure address's route naming a flow's grant as proof the flow is still
        // granted (see `dataplane-ebpf/src/exposure.rs`), so a number is never given to
        // another service (provider, NAT address, protocol or port) in place.
        let current = self.vip(consumer, vip)?;
        if let Some(current) = current {
            let service = |s: &VipService| (s.provider, s.nat_ipv4, s.port, s.protocol);
            if current.grant == svc.grant && service(&current) != service(&svc) {
                return Err(DataplaneError::EntryExists {
                    map: MAP_VIPS,
                    what: format!(
                        "grant {} for another service of VIP {} in cloud {consumer}",
                        svc.grant,
                        std::net::Ipv4Addr::from(ipv4_from_map(vip)),
                    ),
                });
            }
        }
        for (k, flags) in routes {
            if let Some(hop) = self.route(k)? {
                if hop.flags != flags {
                    return Err(DataplaneError::EntryExists {
                        map: MAP_ROUTES,
                        what: format!(
                            "route {} in cloud {} (not an exposure address)",
                            std::net::Ipv4Addr::from(ipv4_from_map(k.ipv4)),
                            k.cloud
                        ),
                    });
                }
            }
        }
        let max_vips = self.max_vips;
        self.vips.insert(key, svc, BPF_ANY).map_err(|e| {
            insert_error(
                e,
                MAP_VIPS,
                format!("VIP in cloud {consumer}"),
                max_vips,
                "max_vips",
            )
        })?;
        // Both routes carry the grant (`NextHop::ifindex` of an exposure address): an
        // established flow is checked against it without a look at `VIPS`.
        for (k, flags) in routes {
            let hop = NextHop {
                ifindex: svc.grant,
                slot: 0,
                mac: [0; 6],
                flags,
            };
            match self.route(k)? {
                None => self.insert_route(k, hop)?,
                Some(current) if current != hop => {
                    self.routes.insert(k, hop, BPF_ANY).map_err(|source| {
                        DataplaneError::UpdateMap {
                            map: MAP_ROUTES,
                            source: Box::new(source),
                        }
                    })?
                }
                Some(_) => {}
            }
        }
        // The replaced service's NAT address, if it had another, goes with it: its route
        // names the old grant.
        if let Some(old) =
            current.filter(|c| (c.provider, c.nat_ipv4) != (svc.provider, svc.nat_ipv4))
        {
            let old_nat = service_routes(consumer, vip, &old)[1].0;
            if self
                .route(old_nat)?
                .is_some_and(|h| h.flags == NEXTHOP_NAT_SOURCE && h.ifindex == old.grant)
            {
                self.remove_route(old_nat)?;
            }
        }
        Ok(())
    }

    /// True if both routes of the service `svc` of `(consumer, vip)` exist and carry its
    /// grant (routes written by layout 6 carry 0: `set_vip` rewrites them).
    pub fn vip_routes_current(
        &self,
        consumer: u32,
        vip: u32,
        svc: &VipService,
    ) -> Result<bool, DataplaneError> {
        for (k, flags) in service_routes(consumer, vip, svc) {
            if !self
                .route(k)?
                .is_some_and(|h| h.flags == flags && h.ifindex == svc.grant)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes the service of `(consumer, vip)` and its routes; returns what it held. Existing
    /// flows of it are cut by the programs (their grant no longer matches).
    pub fn remove_vip(
        &mut self,
        consumer: u32,
        vip: u32,
    ) -> Result<Option<VipService>, DataplaneError> {
        let Some(svc) = self.vip(consumer, vip)? else {
            return Ok(None);
        };
        let routes = service_routes(consumer, vip, &svc);
        let key = routes[0].0;
        for (k, flags) in routes {
            if self.route(k)?.is_some_and(|h| h.flags == flags) {
                self.remove_route(k)?;
            }
        }
        ignore_missing(self.vips.remove(&key), MAP_VIPS)?;
        Ok(Some(svc))
    }

    pub fn vip(&self, consumer: u32, vip: u32) -> Result<Option<VipService>, DataplaneError> {
        let key = RouteKey {
            cloud: consumer,
            ipv4: vip,
        };
        match self.vips.get(&key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::ReadMap {
                map: MAP_VIPS,
                source: Box::new(source),
            }),
        }
    }

    /// Every VIP service: `((consumer, VIP), service)`.
    pub fn vips(&self) -> Result<Vec<(RouteKey, VipService)>, DataplaneError> {
        self.vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_VIPS,
                source: Box::new(source),
            })
    }

    /// Tracked flows, consumer's view.
    pub fn flows_out(&self) -> Result<Vec<(FlowKey, FlowOut)>, DataplaneError> {
        self.flows_out
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_FLOWS_OUT,
                source: Box::new(source),
            })
    }

    /// Tracked flows, provider's view of their replies.
    pub fn flows_in(&self) -> Result<Vec<(FlowKey, FlowIn)>, DataplaneError> {
        self.flows_in
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_FLOWS_IN,
                source: Box::new(source),
            })
    }
}

/// The two routes of the service `svc` of `(consumer, vip)`, with their kinds: the VIP in the
/// consumer's cloud and the NAT address in the provider's.
fn service_routes(consumer: u32, vip: u32, svc: &VipService) -> [(RouteKey, u16); 2] {
    [
        (
            RouteKey {
                cloud: consumer,
                ipv4: vip,
            },
            NEXTHOP_VIP,
        ),
        (
            RouteKey {
                cloud: svc.provider,
                ipv4: svc.nat_ipv4,
            },
            NEXTHOP_NAT_SOURCE,
        ),
    ]
}
