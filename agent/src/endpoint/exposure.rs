//! Exposure services on this host: what a grant becomes in the dataplane (see
//! `dataplane-ebpf/src/exposure.rs` for the packet path).
//!
//! A [`ServiceSpec`] is one grant as the control plane resolves it: the consumer's VIP, the
//! provider's NAT source address, protocol, port and backends. [`Host::apply_service`] installs
//! or updates it; [`Host::remove_service`] revokes it.
//!
//! **Grant numbers.** The dataplane cuts the flows of a revoked grant by comparing the grant
//! number each flow recorded with the VIP's current one. Numbers are assigned here, per host,
//! from a counter that starts above the highest number in the pinned `VIPS` map (so a
//! restarted agent never reuses one) and skips 0. Updating a grant in place (backends changed)
//! keeps its number, so its flows continue; anything else about a VIP changing (another
//! provider, NAT address, protocol or port) is a new grant and gets a new number.

use std::net::Ipv4Addr;

use atoll_dataplane_common::{ipv4_from_map, ipv4_to_map, Backend, VipService, MAX_BACKENDS};

use super::{EndpointError, Host};
use crate::types::CloudId;

/// Transport protocols an exposure can carry.
pub const PROTOCOL_TCP: u8 = 6;
pub const PROTOCOL_UDP: u8 = 17;

/// One grant as the dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub consumer: CloudId,
    /// In the consumer's range.
    pub vip: Ipv4Addr,
    pub provider: CloudId,
    /// In the provider's range: where the consumer's flows come from.
    pub nat: Ipv4Addr,
    /// [`PROTOCOL_TCP`] or [`PROTOCOL_UDP`].
    pub protocol: u8,
    pub port: u16,
    /// Provider addresses and ports; at most `MAX_BACKENDS` (16). Empty: new flows are
    /// dropped as `exposure_no_backend` until one exists.
    pub backends: Vec<(Ipv4Addr, u16)>,
}

impl ServiceSpec {
    fn validate(&self) -> Result<(), String> {
        if self.protocol != PROTOCOL_TCP && self.protocol != PROTOCOL_UDP {
            return Err(format!("protocol {} is neither TCP nor UDP", self.protocol));
        }
        if self.port == 0 || self.backends.iter().any(|b| b.1 == 0) {
            return Err("ports must be non-zero".into());
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(format!(
                "{} backends; the dataplane takes at most {MAX_BACKENDS}",
                self.backends.len()
            ));
        }
        if self.consumer == self.provider {
            return Err("a cloud cannot be granted its own exposure".into());
        }
        Ok(())
    }
}

impl Host {
    /// Installs or updates the service of `(spec.consumer, spec.vip)`; returns its grant
    /// number.
    pub fn apply_service(&mut self, spec: &ServiceSpec) -> Result<u32, EndpointError> {
        let name = format!("VIP {} of cloud {}", spec.vip, spec.consumer);
        spec.validate()
            .map_err(|message| EndpointError::InvalidSpec {
                name: name.clone(),
                message,
            })?;
        let program = |source| EndpointError::Program {
            name: name.clone(),
            source,
        };
        let consumer = spec.consumer.get();
        let vip = ipv4_to_map(spec.vip.octets());
        let mut svc = VipService {
            grant: 0,
            provider: spec.provider.get(),
            nat_ipv4: ipv4_to_map(spec.nat.octets()),
            port: spec.port.to_be(),
            protocol: spec.protocol,
            count: spec.backends.len() as u8,
            backends: [Backend::default(); MAX_BACKENDS],
        };
        for (slot, (ip, port)) in svc.backends.iter_mut().zip(&spec.backends) {
            *slot = Backend {
                ipv4: ipv4_to_map(ip.octets()),
                port: port.to_be(),
                _pad: 0,
            };
        }
        let current = self.dataplane.vip(consumer, vip).map_err(program)?;
        svc.grant = match current {
            Some(c)
                if (c.provider, c.nat_ipv4, c.port, c.protocol)
                    == (svc.provider, svc.nat_ipv4, svc.port, svc.protocol) =>
            {
                if c.count == svc.count
                    && c.backends == svc.backends
                    && self
                        .dataplane
                        .vip_routes_current(consumer, vip, &c)
                        .map_err(program)?
                {
                    return Ok(c.grant);
                }
                c.grant
            }
            Some(c) => {
                // Another grant now holds this VIP: the old one's routes go first.
                self.dataplane.remove_vip(consumer, vip).map_err(program)?;
                let _ = c;
                self.take_grant_number()?
            }
            None => self.take_grant_number()?,
        };
        self.dataplane
            .set_vip(consumer, vip, svc)
            .map_err(program)?;
        Ok(svc.grant)
    }

    /// Sets every consumer cloud's new exposure flows per second on this host
    /// (`dataplane.max_new_exposure_flows_per_sec`, which [`Host::open`] applies; 0 = no
    /// limit).
    pub fn set_exposure_flow_rate(&mut self, per_sec: u32) -> Result<(), EndpointError> {
        self.dataplane
            .set_exposure_flow_rate(per_sec)
            .map_err(|source| EndpointError::Program {
                name: "the exposure flow rate".into(),
                source,
            })
    }

    /// Revokes the service of `(consumer, vip)`; `false` if there was none.
    pub fn remove_service(
        &mut self,
        consumer: CloudId,
        vip: Ipv4Addr,
    ) -> Result<bool, EndpointError> {
        self.dataplane
            .remove_vip(consumer.get(), ipv4_to_map(vip.octets()))
            .map(|old| old.is_some())
            .map_err(|source| EndpointError::Unprogram {
                name: format!("VIP {vip} of cloud {consumer}"),
                source,
            })
    }

    /// The services installed on this host, with their grant numbers.
    pub fn services(&self) -> Result<Vec<(u32, ServiceSpec)>, EndpointError> {
        let vips = self
            .dataplane
            .vips()
            .map_err(|source| EndpointError::Unprogram {
                name: "VIPS".into(),
                source,
            })?;
        let mut out: Vec<(u32, ServiceSpec)> = vips
            .into_iter()
            .filter_map(|(k, s)| {
                let count = usize::from(s.count).min(MAX_BACKENDS);
                Some((
                    s.grant,
                    ServiceSpec {
                        consumer: CloudId::new(k.cloud)?,
                        vip: Ipv4Addr::from(ipv4_from_map(k.ipv4)),
                        provider: CloudId::new(s.provider)?,
                        nat: Ipv4Addr::from(ipv4_from_map(s.nat_ipv4)),
                        protocol: s.protocol,
                        port: u16::from_be(s.port),
                        backends: s.backends[..count]
                            .iter()
                            .map(|b| (Ipv4Addr::from(ipv4_from_map(b.ipv4)), u16::from_be(b.port)))
                            .collect(),
                    },
                ))
            })
            .collect();
        out.sort_by_key(|(g, _)| *g);
        Ok(out)
    }

    fn take_grant_number(&mut self) -> Result<u32, EndpointError> {
        self.grants.take(&self.dataplane)
    }
}

/// Exposure grant numbers (the `grant` of `VipService`, which keys its flows): unique among
/// the live grants of this dataplane, never 0.
#[derive(Debug, Default)]
pub(super) struct GrantNumbers {
    /// The next number (0: not yet derived from the pinned maps).
    next: u32,
}

impl GrantNumbers {
    /// A new number; the first since open starts above every number in the pinned `VIPS`.
    pub(super) fn take(
        &mut self,
        dataplane: &crate::dataplane::Dataplane,
    ) -> Result<u32, EndpointError> {
        if self.next == 0 {
            let highest = dataplane
                .vips()
                .map_err(|source| EndpointError::Unprogram {
                    name: "VIPS".into(),
                    source,
                })?
                .iter()
                .map(|(_, s)| s.grant)
                .max()
                .unwrap_or(0);
            self.next = highest.wrapping_add(1).max(1);
        }
        let n = self.next;
        self.next = n.wrapping_add(1).max(1);
        Ok(n)
    }
}
