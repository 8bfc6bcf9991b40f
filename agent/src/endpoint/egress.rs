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

use atoll_api::model::{
    BudgetPeriod, DeniedDestination, DenyReason, EgressMode, EgressPolicy, Ipv4Net, Protocol,
};
use atoll_dataplane_common::{
    DropReason, EgressCloud, EgressHost, IngressKey, IngressTarget, EGRESS_MODE_ALLOW,
    EGRESS_MODE_ALLOWLIST, EGRESS_MODE_DENY, NO_BUDGET,
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The burst a rate allows: 100 ms of it, at least 64 KiB (one GSO frame must be able to
/// pass), as nanoseconds of the rate. 0 for no rate.
pub fn burst_ns(rate_bytes_per_sec: u64) -> u64 {
    if rate_bytes_per_sec == 0 {
        return 0;
    }
    let bytes = (rate_bytes_per_sec / 10).max(64 * 1024);
    (u128::from(bytes) * 1_000_000_000 / u128::from(rate_bytes_per_sec)) as u64
}

/// The number of the UTC period `unix_secs` falls in: hours or days since the epoch, or
/// `year * 12 + month - 1` (civil calendar, H. Hinnant's algorithm).
pub fn budget_period(period: BudgetPeriod, unix_secs: u64) -> u64 {
    match period {
        BudgetPeriod::Hour => unix_secs / 3600,
        BudgetPeriod::Day => unix_secs / 86_400,
        BudgetPeriod::Month => {
            let z = (unix_secs / 86_400) as i64 + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let month = if mp < 10 { mp + 3 } else { mp - 9 };
            let year = yoe + era * 400 + i64::from(month <= 2);
            (year * 12 + month - 1) as u64
        }
    }
}

/// Egress generations (see module docs).
#[derive(Debug, Default)]
pub(super) struct Generations {
    /// The next one (0: not yet derived from the pinned map).
    next: u32,
    /// The next publication serial (0: not yet derived from the pinned `INGRESS`).
    next_serial: u32,
}

/// A VM port published on the uplink (public ingress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishSpec {
    pub cloud: CloudId,
    /// The VM's address and port.
    pub guest: (Ipv4Addr, u16),
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    /// The address and port on the uplink (routed to this host by the operator's network).
    pub public: (Ipv4Addr, u16),
    /// Sources that may connect; empty: anyone.
    pub allow_from: Vec<Ipv4Net>,
}

fn ingress_key(public: (Ipv4Addr, u16), protocol: u8) -> IngressKey {
    IngressKey {
        ipv4: map_ipv4(public.0),
        port: public.1.to_be(),
        protocol,
        _pad: 0,
    }
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

    /// Sets every cloud's new-flow rate on this host (`egress.max_new_flows_per_sec`; 0 = no
    /// limit), for the clouds applied since and, rewritten in place, those applied before
    /// (their generations are kept: what they may reach is unchanged).
    pub fn set_egress_flow_rate(&mut self, per_sec: u32) -> Result<(), EndpointError> {
        self.new_flows_per_sec = per_sec;
        for (cloud, mut entry) in self
            .dataplane
            .egress_clouds()
            .map_err(program("EGRESS_CLOUDS"))?
        {
            if entry.new_flows_per_sec != per_sec {
                entry.new_flows_per_sec = per_sec;
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
        let limits = &spec.policy.limits;
        let rate = limits.rate_bytes_per_sec.unwrap_or(0);
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
            new_flows_per_sec: self.new_flows_per_sec,
            rate_bytes_per_sec: rate,
            burst_ns: burst_ns(rate),
            budget_bytes: limits.budget.map(|b| b.bytes).unwrap_or(NO_BUDGET),
            budget_period: limits
                .budget
                .map(|b| budget_period(b.period, unix_now()))
                .unwrap_or(0),
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

    /// Moves every cloud with a budget to the current UTC period (its usage starts again from
    /// 0); call periodically. Generations are kept: nothing about what a cloud may reach
    /// changed.
    pub fn refresh_budget_periods(&mut self) -> Result<(), EndpointError> {
        let now = unix_now();
        for (cloud, mut entry) in self
            .dataplane
            .egress_clouds()
            .map_err(program("EGRESS_CLOUDS"))?
        {
            let Some(cloud_id) = CloudId::new(cloud) else {
                continue;
            };
            let Some(budget) = self.egress.policy(cloud).and_then(|p| p.limits.budget) else {
                continue;
            };
            let period = budget_period(budget.period, now);
            if entry.budget_period != period {
                entry.budget_period = period;
                self.dataplane
                    .set_egress_cloud(cloud, entry)
                    .map_err(program(&format!("egress of cloud {cloud_id}")))?;
            }
        }
        Ok(())
    }

    /// Bytes `cloud` sent out in its current budget period, as the programs counted them.
    pub fn egress_budget_used(&self, cloud: CloudId) -> Result<u64, EndpointError> {
        Ok(self
            .dataplane
            .egress_meter(cloud.get())
            .map_err(program("EGRESS_METERS"))?
            .map(|m| m.used_bytes)
            .unwrap_or(0))
    }

    /// Publishes a VM port (see `dataplane-ebpf/src/ingress.rs`); returns its serial. Replacing
    /// a publication at the same address and port gives it a new serial, so connections of
    /// the old one are cut.
    pub fn publish(&mut self, spec: &PublishSpec) -> Result<u32, EndpointError> {
        let name = format!(
            "published port {}:{} of cloud {}",
            spec.public.0, spec.public.1, spec.cloud
        );
        if spec.protocol != super::PROTOCOL_TCP && spec.protocol != super::PROTOCOL_UDP {
            return Err(EndpointError::InvalidSpec {
                name,
                message: format!("protocol {} is neither TCP nor UDP", spec.protocol),
            });
        }
        if spec.guest.1 == 0 || spec.public.1 == 0 {
            return Err(EndpointError::InvalidSpec {
                name,
                message: "ports must be non-zero".into(),
            });
        }
        let key = ingress_key(spec.public, spec.protocol);
        let allow: Vec<(Ipv4Addr, u8)> = spec.allow_from.iter().map(|n| (n.addr, n.len)).collect();
        // Connections of a publication replaced here must be cut: drop the old one first.
        self.dataplane.remove_ingress(key).map_err(program(&name))?;
        let serial = self.next_serial()?;
        self.dataplane
            .set_ingress(
                key,
                IngressTarget {
                    cloud: spec.cloud.get(),
                    guest_ipv4: map_ipv4(spec.guest.0),
                    serial,
                    guest_port: spec.guest.1.to_be(),
                    restricted: u8::from(!allow.is_empty()),
                    _pad: 0,
                },
                &allow,
            )
            .map_err(program(&name))?;
        Ok(serial)
    }

    /// Unpublishes the port at `public`: new connections pass to the host (which does not own
    /// the address), live ones are cut at the VM's next packet.
    pub fn unpublish(
        &mut self,
        public: (Ipv4Addr, u16),
        protocol: u8,
    ) -> Result<(), EndpointError> {
        let name = format!("published port {}:{}", public.0, public.1);
        self.dataplane
            .remove_ingress(ingress_key(public, protocol))
            .map_err(program(&name))?;
        Ok(())
    }

    /// What is published on this host: each publication as it was given.
    pub fn published(&self) -> Result<Vec<PublishSpec>, EndpointError> {
        let mut out = Vec::new();
        for (k, t) in self
            .dataplane
            .ingress_entries()
            .map_err(program("INGRESS"))?
        {
            let Some(cloud) = CloudId::new(t.cloud) else {
                continue;
            };
            let allow = self
                .dataplane
                .ingress_allowed(t.serial)
                .map_err(program("INGRESS_ALLOW"))?;
            out.push(PublishSpec {
                cloud,
                guest: (
                    Ipv4Addr::from(t.guest_ipv4.to_ne_bytes()),
                    u16::from_be(t.guest_port),
                ),
                protocol: k.protocol,
                public: (Ipv4Addr::from(k.ipv4.to_ne_bytes()), u16::from_be(k.port)),
                allow_from: allow
                    .into_iter()
                    .map(|(addr, len)| Ipv4Net { addr, len })
                    .collect(),
            });
        }
        Ok(out)
    }

    fn next_serial(&mut self) -> Result<u32, EndpointError> {
        if self.generations.next_serial == 0 {
            let highest = self
                .dataplane
                .ingress_entries()
                .map_err(program("INGRESS"))?
                .iter()
                .map(|(_, t)| t.serial)
                .max()
                .unwrap_or(0);
            self.generations.next_serial = highest.wrapping_add(1).max(1);
        }
        let n = self.generations.next_serial;
        self.generations.next_serial = n.wrapping_add(1).max(1);
        Ok(n)
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

    /// The destinations the programs refused, per cloud, as the API reports them (the name
    /// an address was learnt as, if any; times converted to Unix seconds).
    pub fn refused_destinations(&self) -> Result<Vec<(CloudId, DeniedDestination)>, EndpointError> {
        let refused = self
            .dataplane
            .egress_refused()
            .map_err(program("EGRESS_REFUSED"))?;
        let boot_now = crate::egress::rules::boottime_ns();
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(refused
            .into_iter()
            .filter_map(|(k, v)| {
                let cloud = CloudId::new(k.cloud)?;
                let address = Ipv4Addr::from(k.ipv4.to_ne_bytes());
                let reason = match DropReason::from_u32(u32::from(k.reason))? {
                    DropReason::EgressNever => DenyReason::AlwaysDenied,
                    DropReason::EgressRevoked => DenyReason::FlowRevoked,
                    DropReason::EgressBudgetSpent => DenyReason::BudgetSpent,
                    _ => DenyReason::AddressNotAllowed,
                };
                let protocol = match k.protocol {
                    6 => Some(Protocol::Tcp),
                    17 => Some(Protocol::Udp),
                    _ => None,
                };
                Some((
                    cloud,
                    DeniedDestination {
                        name: self.egress.name_of(k.cloud, address),
                        address: Some(address),
                        port: protocol.map(|_| u16::from_be(k.port)),
                        protocol,
                        reason,
                        count: v.count,
                        last_seen: unix_now
                            .saturating_sub(boot_now.saturating_sub(v.last_ns) / 1_000_000_000),
                        host: String::new(),
                    },
                ))
            })
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_periods_follow_the_utc_calendar() {
        // 2026-12-05T12:00:00Z and neighbours.
        let t = 1_796_472_000;
        assert_eq!(budget_period(BudgetPeriod::Hour, t), t / 3600);
        assert_eq!(budget_period(BudgetPeriod::Day, t), t / 86_400);
        let dec_2026 = 2026 * 12 + 11;
        assert_eq!(budget_period(BudgetPeriod::Month, t), dec_2026);
        // 2026-12-31T23:59:59Z, then 2027-01-01T00:00:00Z.
        assert_eq!(budget_period(BudgetPeriod::Month, 1_798_761_599), dec_2026);
        assert_eq!(
            budget_period(BudgetPeriod::Month, 1_798_761_600),
            dec_2026 + 1
        );
        // 2024-02-29 (a leap day) is in February.
        assert_eq!(
            budget_period(BudgetPeriod::Month, 1_709_164_800),
            2024 * 12 + 1
        );
    }

    #[test]
    fn bursts_are_100_ms_or_64_kib() {
        assert_eq!(burst_ns(0), 0);
        assert_eq!(burst_ns(1_000_000_000), 100_000_000);
        assert_eq!(burst_ns(1_000_000), 100_000_000);
        // 64 KiB at 100 kB/s.
        assert_eq!(burst_ns(100_000), 655_360_000);
    }
}
