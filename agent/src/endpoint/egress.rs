//! Egress on this host: the uplink, each cloud's entry and rules (see
//! `dataplane-ebpf/src/egress.rs` for the packet path, `crate::egress` for the host side).
//!
//! **Generations.** Every change of what a cloud may reach gives its `EgressCloud` entry a new
//! generation, which makes the programs decide each live flow of the cloud again on its next
//! packet (and cut it if no longer allowed). Generations come from one counter per host,
//! starting above every generation pinned in `EGRESS_CLOUDS` (so a restarted agent never
//! reuses one while flows that recorded it may exist). A policy received again unchanged
//! keeps its generation: re-deciding costs little, but nothing changed. Changing the
//! always-denied set changes every cloud's generation.
//!
//! **Order.** A cloud's rules are written before its entry (a new mode finds its rules in
//! place) and its entry removed before its rules.

use std::{net::Ipv4Addr, sync::Arc};

use atoll_api::model::{EgressMode, EgressPolicy, Ipv4Net};
use atoll_dataplane_common::{
    EgressCloud, EgressHost, EGRESS_MODE_ALLOW, EGRESS_MODE_ALLOWLIST, EGRESS_MODE_DENY,
};

use super::{EndpointError, Host};
use crate::{
    config::{Ipv4Network, NatPorts},
    egress::{rules::EgressTables, Uplink},
    types::CloudId,
};

/// A cloud's egress as the host applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEgressSpec {
    pub policy: EgressPolicy,
    /// The cloud's range; `None`: the host does not know it, and nothing leaves the cloud.
    pub cidr: Option<Ipv4Net>,
    /// The cloud's own egress address, if it has one.
    pub address: Option<Ipv4Addr>,
}

fn program(name: &str) -> impl Fn(crate::dataplane::DataplaneError) -> EndpointError + '_ {
    move |source| EndpointError::Program {
        name: name.to_string(),
        source,
    }
}

fn map_ipv4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Egress generations (see module docs).
#[derive(Debug, Default)]
pub(super) struct Generations {
    /// The next one (0: not yet derived from the pinned map).
    next: u32,
}

impl Host {
    /// The rule tables, shared with the DNS server (which installs learnt addresses).
    pub fn egress_tables(&self) -> Arc<EgressTables> {
        self.egress.clone()
    }

    fn next_generation(&mut self) -> Result<u32, EndpointError> {
        if self.generations.next == 0 {
            let highest = self
                .dataplane
                .egress_clouds()
                .map_err(program("EGRESS_CLOUDS"))?
                .iter()
                .map(|(_, c)| c.generation)
                .max()
                .unwrap_or(0);
            self.generations.next = highest.wrapping_add(1).max(1);
        }
        let n = self.generations.next;
        self.generations.next = n.wrapping_add(1).max(1);
        Ok(n)
    }

    /// Turns egress on through `uplink`: NAT from `egress_ipv4` on `nat_ports`, never to
    /// `never`. Attaches `from_uplink` (kept if already attached to that device), writes the
    /// always-denied set, then the host entry. Every cloud's flows are decided again.
    pub fn enable_egress(
        &mut self,
        uplink: &Uplink,
        egress_ipv4: Ipv4Addr,
        nat_ports: NatPorts,
        never: &[Ipv4Network],
    ) -> Result<(), EndpointError> {
        let name = format!("uplink {}", uplink.name);
        let prefixes: Vec<(Ipv4Addr, u8)> = never.iter().map(|n| (n.addr, n.prefix)).collect();
        let changed = self.dataplane.never().map_err(program(&name))? != {
            let mut p: Vec<_> = prefixes
                .iter()
                .map(|(a, l)| {
                    let m = u32::MAX.checked_shl(32 - u32::from(*l)).unwrap_or(0);
                    (Ipv4Addr::from(u32::from(*a) & m), *l)
                })
                .collect();
            p.sort();
            p.dedup();
            p
        };
        self.dataplane
            .set_never(&prefixes)
            .map_err(program(&name))?;
        self.dataplane
            .attach_uplink(&uplink.name, uplink.ifindex)
            .map_err(program(&name))?;
        self.dataplane
            .set_egress_host(EgressHost {
                uplink_ifindex: uplink.ifindex,
                egress_ipv4: map_ipv4(egress_ipv4),
                nat_port_first: nat_ports.first,
                nat_port_count: nat_ports.count().min(u32::from(u16::MAX)) as u16,
                gateway_mac: self.gateway_mac.0,
                _pad: [0; 2],
            })
            .map_err(program(&name))?;
        if changed {
            for (cloud, mut entry) in self
                .dataplane
                .egress_clouds()
                .map_err(program("EGRESS_CLOUDS"))?
            {
                entry.generation = self.next_generation()?;
                self.dataplane
                    .set_egress_cloud(cloud, entry)
                    .map_err(program("EGRESS_CLOUDS"))?;
            }
        }
        Ok(())
    }

    /// Turns egress off: no packet leaves any cloud, `from_uplink` is detached.
    pub fn disable_egress(&mut self) -> Result<(), EndpointError> {
        self.dataplane
            .set_egress_host(EgressHost::default())
            .map_err(program("EGRESS_HOST"))?;
        self.dataplane
            .detach_uplink()
            .map_err(program("from_uplink"))
    }

    /// Applies `cloud`'s egress (see module docs for the order).
    pub fn set_cloud_egress(
        &mut self,
        cloud: CloudId,
        spec: &CloudEgressSpec,
    ) -> Result<(), EndpointError> {
        let name = format!("egress of cloud {cloud}");
        let Some(cidr) = spec.cidr else {
            return self.remove_cloud_egress(cloud);
        };
        let id = cloud.get();
        let unchanged_rules = self.egress.policy(id).as_ref() == Some(&spec.policy);
        self.egress
            .set_policy(id, &spec.policy)
            .map_err(program(&name))?;
        let mut entry = EgressCloud {
            range_ipv4: map_ipv4(Ipv4Addr::from(cidr.network())),
            range_mask: u32::from_ne_bytes(cidr.mask().to_be_bytes()),
            egress_ipv4: spec.address.map(map_ipv4).unwrap_or(0),
            generation: 0,
            mode: match spec.policy.mode {
                EgressMode::Deny => EGRESS_MODE_DENY,
                EgressMode::Allow => EGRESS_MODE_ALLOW,
                EgressMode::Allowlist => EGRESS_MODE_ALLOWLIST,
            },
        };
        let current = self
            .dataplane
            .egress_clouds()
            .map_err(program(&name))?
            .into_iter()
            .find(|(c, _)| *c == id)
            .map(|(_, e)| e);
        entry.generation = match current {
            Some(c) if unchanged_rules && EgressCloud { generation: 0, ..c } == entry => {
                return Ok(());
            }
            _ => self.next_generation()?,
        };
        self.dataplane
            .set_egress_cloud(id, entry)
            .map_err(program(&name))
    }

    /// Clouds with egress state on this host (an entry or rules).
    pub fn egress_clouds(&self) -> Result<Vec<u32>, EndpointError> {
        let mut ids: Vec<u32> = self
            .dataplane
            .egress_clouds()
            .map_err(program("EGRESS_CLOUDS"))?
            .into_iter()
            .map(|(c, _)| c)
            .chain(self.egress.clouds())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// `cloud`'s entry as the programs see it.
    pub fn cloud_egress_entry(&self, cloud: CloudId) -> Result<Option<EgressCloud>, EndpointError> {
        Ok(self
            .dataplane
            .egress_clouds()
            .map_err(program("EGRESS_CLOUDS"))?
            .into_iter()
            .find(|(c, _)| *c == cloud.get())
            .map(|(_, e)| e))
    }

    /// Removes `cloud`'s egress: nothing of it leaves this host any more.
    pub fn remove_cloud_egress(&mut self, cloud: CloudId) -> Result<(), EndpointError> {
        let name = format!("egress of cloud {cloud}");
        self.dataplane
            .remove_egress_cloud(cloud.get())
            .map_err(program(&name))?;
        self.egress.remove(cloud.get()).map_err(program(&name))
    }
}
