//! Endpoints: a device plus its dataplane entries, created and deleted as one unit.
//!
//! Creation order (each step is undone if a later one fails):
//! 1. the device, administratively down;
//! 2. its `ENDPOINTS` entry, then its `ROUTES` entry (the identity exists before any frame can
//!    be seen, so no frame from the new device is ever judged without it);
//! 3. the TCX links, pinned;
//! 4. the device goes up.
//!
//! Deletion removes the route first (no new traffic is steered to the endpoint), then the
//! device, its link pins and its identity.
//!
//! **Tap pool.** Attaching a TCX program waits for an RCU grace period in the kernel (each
//! attach commits with `synchronize_rcu`), which costs 10-20 ms on a loaded or nested host and
//! dominates a cold tap endpoint. So the host keeps a pool of spare taps, created and attached
//! ahead of time ([`Host::refill_pool`]); a tap endpoint claims one by renaming it, writing its
//! map entries and setting it up, which takes well under a millisecond. A spare tap is a device
//! with pinned links and no `ENDPOINTS` entry, so every frame on it is dropped as
//! `unknown_endpoint` (it is down anyway), and the pool is rediscovered from the pins after a
//! restart with no other state.
//!
//! **Who owns what.** [`Host`] composes one owner per kernel object or allocation: the pinned
//! maps and links are the `Dataplane`'s (`crate::dataplane`), devices are `Devices`'
//! (`crate::device`), spare taps are the `pool` module's `TapPool`, counter slots the `slots`
//! module's `Slots`, exposure grant numbers the `exposure` module's `GrantNumbers`, usage
//! records the `Recorder`'s (`crate::usage`). `Host` sequences them for one endpoint (the
//! creation order above) and holds nothing else of its own. A placement arrives from the
//! converger, which decides the endpoint's name ([`Host::unused_name`]) and spec, and flows
//! down in one pass: `Host` → (`Devices`, `TapPool`, `Slots`, `Dataplane`); none of them
//! calls back up, and the converger touches no device or map itself.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use atoll_dataplane_common::{
    ipv4_from_map, ipv4_to_map, DnsService, EndpointCounters, EndpointInfo, NextHop, RouteKey,
};

mod egress;
mod exposure;
mod overlay;
mod pool;
mod slots;

pub use egress::{CloudEgressSpec, PublishSpec};
pub use exposure::{ServiceSpec, PROTOCOL_TCP, PROTOCOL_UDP};
pub use pool::pool_process_prefix;
use pool::TapPool;
use slots::Slots;

use crate::{
    config::DataplaneConfig,
    dataplane::{Dataplane, DataplaneError},
    device::{self, DeviceError, Devices},
    expedite::Expedite,
    types::{CloudId, MacAddr},
    usage::{Recorder, Snapshot, UsageError},
};

/// What kind of device backs an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A persistent tap for a VMM, optionally owned by a non-root uid.
    Tap { owner_uid: Option<u32> },
    /// A veth pair; the peer (the guest's interface) is created in the namespace at `netns`.
    Veth { peer_name: String, netns: PathBuf },
}

/// An endpoint to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Host-side device name.
    pub name: String,
    pub cloud: CloudId,
    /// The guest's address.
    pub ipv4: Ipv4Addr,
    /// The guest's MAC (for a veth, set on the peer).
    pub mac: MacAddr,
    /// The cloud's gateway address as the guest sees it.
    pub gateway: Ipv4Addr,
    pub device: DeviceSpec,
}

/// An existing endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: Option<String>,
    pub ifindex: u32,
    /// Index of the endpoint's counters.
    pub slot: u32,
    pub cloud: CloudId,
    pub ipv4: Ipv4Addr,
    pub mac: MacAddr,
    pub gateway: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid endpoint {name}: {message}")]
    InvalidSpec { name: String, message: String },
    #[error("creating device for endpoint: {0}")]
    CreateDevice(#[source] DeviceError),
    #[error("programming the dataplane for endpoint {name}: {source}")]
    Program {
        name: String,
        source: DataplaneError,
    },
    #[error("bringing endpoint {name} up: {source}")]
    Activate { name: String, source: DeviceError },
    #[error("endpoint {0} not found")]
    NotFound(String),
    #[error("deleting device of endpoint {name}: {source}")]
    DeleteDevice { name: String, source: DeviceError },
    #[error("removing endpoint {name} from the dataplane: {source}")]
    Unprogram {
        name: String,
        source: DataplaneError,
    },
    #[error("opening the dataplane: {0}")]
    OpenDataplane(#[source] DataplaneError),
    #[error("recording usage: {0}")]
    Usage(#[source] UsageError),
    #[error("opening netlink: {0}")]
    OpenNetlink(#[source] DeviceError),
    #[error("removing the DNS namespace {name}: {source}")]
    RemoveDnsNamespace {
        name: String,
        source: crate::dns::netns::NetnsError,
    },
}

/// The endpoints of this host: dataplane and devices.
pub struct Host {
    dataplane: Dataplane,
    devices: Devices,
    gateway_mac: MacAddr,
    /// Spare taps (the `pool` module).
    pool: TapPool,
    /// Held around TCX link and device changes (see the `expedite` module).
    expedite: Expedite,
    /// Counter slots no endpoint holds (the `slots` module).
    slots: Slots,
    /// Where usage records go; `None` disables them (tests, tools). Shared with the
    /// [`UsageCollector`] that journals the periodic records off the agent's event loop.
    usage: Option<Arc<Mutex<Recorder>>>,
    /// The DNS namespace `DnsPlane::ensure` set up for this dataplane, removed by `destroy`.
    dns_namespace: Option<String>,
    /// Exposure grant numbers (the `exposure` module).
    grants: exposure::GrantNumbers,
    /// The egress rule tries (the `egress` module), shared with the DNS server.
    egress: std::sync::Arc<crate::egress::rules::EgressTables>,
    /// Egress generations and publication serials (the `egress` module).
    generations: egress::Generations,
    /// Each cloud's new egress flows per second (`egress.max_new_flows_per_sec`, set by
    /// [`Host::set_egress_flow_rate`]); 0 = no limit.
    new_flows_per_sec: u32,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

/// Name prefix of spare taps.
pub use crate::config::POOL_PREFIX;

impl Host {
    /// Opens (or first creates) the pinned dataplane and a netlink connection. Must be called
    /// inside a tokio runtime.
    pub fn open(cfg: &DataplaneConfig) -> Result<Self, EndpointError> {
        let dataplane = Dataplane::open(cfg).map_err(EndpointError::OpenDataplane)?;
        let devices = Devices::new().map_err(EndpointError::OpenNetlink)?;
        let pool = TapPool::find(&dataplane, cfg.tap_pool)?;
        let slots = Slots::find(&dataplane).map_err(|source| EndpointError::Unprogram {
            name: "*".into(),
            source,
        })?;
        let egress = dataplane
            .rule_tries()
            .and_then(crate::egress::rules::EgressTables::new)
            .map_err(EndpointError::OpenDataplane)?;
        let mut dataplane = dataplane;
        dataplane
            .set_exposure_flow_rate(cfg.max_new_exposure_flows_per_sec)
            .map_err(EndpointError::OpenDataplane)?;
        Ok(Host {
            dataplane,
            devices,
            gateway_mac: cfg.gateway_mac,
            pool,
            expedite: Expedite::host(cfg.expedite_rcu),
            slots,
            usage: None,
            dns_namespace: None,
            grants: exposure::GrantNumbers::default(),
            egress: std::sync::Arc::new(egress),
            generations: egress::Generations::default(),
            new_flows_per_sec: 0,
        })
    }

    /// Spare taps ready to be claimed.
    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }

    /// Creates spare taps until the pool holds `dataplane.tap_pool` of them. Each takes two TCX
    /// attaches (see module docs); the agent calls it off the request path.
    pub async fn refill_pool(&mut self) -> Result<(), EndpointError> {
        self.pool
            .refill(&mut self.dataplane, &self.devices, &self.expedite, None)
            .await
            .map(|_| ())
    }

    /// Creates spare taps until the pool is full or `budget` has passed (at least one tap if
    /// the pool is short), so a busy agent refills between other work without delaying it for
    /// long. Returns how many it created.
    pub async fn refill_some(&mut self, budget: Duration) -> Result<usize, EndpointError> {
        self.pool
            .refill(
                &mut self.dataplane,
                &self.devices,
                &self.expedite,
                Some(budget),
            )
            .await
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    pub fn gateway_mac(&self) -> MacAddr {
        self.gateway_mac
    }

    /// Records the DNS namespace serving this dataplane (see `dns::DnsPlane::ensure`), so
    /// [`Host::destroy`] removes it too.
    pub(crate) fn set_dns_namespace(&mut self, name: Option<String>) {
        self.dns_namespace = name;
    }

    /// A device name with `prefix` that no device has now ([`Devices::unused_name`]).
    pub fn unused_name(&self, prefix: &str) -> String {
        self.devices.unused_name(prefix)
    }

    /// Creates an endpoint: device, identity, route, programs; rolls back on failure.
    pub async fn create_endpoint(
        &mut self,
        spec: &EndpointSpec,
    ) -> Result<Endpoint, EndpointError> {
        validate(spec)?;
        let slot = self.slots.take().ok_or_else(|| EndpointError::Program {
            name: spec.name.clone(),
            source: DataplaneError::MapFull {
                map: "COUNTERS",
                capacity: self.dataplane.max_endpoints(),
                setting: "max_endpoints",
            },
        })?;
        let result = match self.dataplane.reset_counters(slot) {
            Ok(()) => self.create_with_slot(spec, slot).await,
            Err(source) => Err(EndpointError::Program {
                name: spec.name.clone(),
                source,
            }),
        };
        if result.is_err() {
            // Never used by a device: it may be the next one again.
            self.slots.untake(slot);
        }
        result
    }

    async fn create_with_slot(
        &mut self,
        spec: &EndpointSpec,
        slot: u32,
    ) -> Result<Endpoint, EndpointError> {
        let name = spec.name.clone();
        if device::ifindex(&name).is_some() {
            return Err(EndpointError::CreateDevice(DeviceError::Exists(name)));
        }
        // Checked up front so a duplicate does not consume a spare tap; the insert below still
        // refuses duplicates atomically.
        let route_key = RouteKey {
            cloud: spec.cloud.get(),
            ipv4: ipv4_to_map(spec.ipv4.octets()),
        };
        let taken = self
            .dataplane
            .route(route_key)
            .map_err(|source| EndpointError::Program {
                name: name.clone(),
                source,
            })?;
        if taken.is_some() {
            return Err(EndpointError::Program {
                name,
                source: DataplaneError::EntryExists {
                    map: "ROUTES",
                    what: format!("route {} in cloud {}", spec.ipv4, spec.cloud),
                },
            });
        }
        let mut attached = false;
        // Only a cold device (no spare, or a veth) attaches links here.
        let _expedited = (self.pool.is_empty() || !matches!(spec.device, DeviceSpec::Tap { .. }))
            .then(|| self.expedite.hold());
        // A cold tap is held (not persistent) until it is programmed, so a crash in between
        // leaves no device behind (see `reconcile` for the other half-made states).
        let mut held = None;
        let ifindex = match &spec.device {
            DeviceSpec::Tap { owner_uid } => match self
                .pool
                .claim(&mut self.dataplane, &self.devices, &name, *owner_uid)
                .await?
            {
                Some(ifindex) => {
                    attached = true;
                    ifindex
                }
                None => {
                    let (ifindex, tap) = self
                        .devices
                        .create_tap_held(&name, *owner_uid)
                        .map_err(EndpointError::CreateDevice)?;
                    held = Some(tap);
                    ifindex
                }
            },
            DeviceSpec::Veth { peer_name, netns } => self
                .devices
                .create_veth(&name, peer_name, spec.mac, netns)
                .await
                .map_err(EndpointError::CreateDevice)?,
        };
        let info = EndpointInfo {
            cloud: spec.cloud.get(),
            ipv4: ipv4_to_map(spec.ipv4.octets()),
            gateway_ipv4: ipv4_to_map(spec.gateway.octets()),
            mac: spec.mac.0,
            gateway_mac: self.gateway_mac.0,
            slot,
        };
        let key = RouteKey {
            cloud: info.cloud,
            ipv4: info.ipv4,
        };
        let program = |dp: &mut Dataplane| -> Result<(), DataplaneError> {
            dp.insert_endpoint(ifindex, info)?;
            dp.insert_route(
                key,
                NextHop {
                    ifindex,
                    slot,
                    mac: info.mac,
                    flags: 0,
                },
            )?;
            if attached {
                Ok(())
            } else {
                dp.attach(&name, ifindex)
            }
        };
        if let Err(source) = program(&mut self.dataplane) {
            drop(held);
            self.rollback(&name, ifindex, key, &source).await;
            return Err(EndpointError::Program { name, source });
        }
        // A tap that fails to persist is gone with its held queue; the delete below then
        // finds nothing, which is not an error.
        let activated = match held.map_or(Ok(()), device::HeldTap::persist) {
            Err(e) => Err(EndpointError::CreateDevice(e)),
            Ok(()) => self.devices.set_up(&name, ifindex).await.map_err(|source| {
                EndpointError::Activate {
                    name: name.clone(),
                    source,
                }
            }),
        };
        if let Err(e) = activated {
            let _ = self.dataplane.remove_route(key);
            let _ = self.dataplane.detach(ifindex);
            let _ = self.devices.delete(&name, ifindex).await;
            let _ = self.dataplane.remove_endpoint(ifindex);
            return Err(e);
        }
        Ok(Endpoint {
            name: Some(name),
            ifindex,
            slot,
            cloud: spec.cloud,
            ipv4: spec.ipv4,
            mac: spec.mac,
            gateway: spec.gateway,
        })
    }

    async fn rollback(&mut self, name: &str, ifindex: u32, key: RouteKey, cause: &DataplaneError) {
        // Only remove the route if this call inserted it: a duplicate route belongs to another
        // endpoint.
        if !matches!(cause, DataplaneError::EntryExists { map: "ROUTES", .. }) {
            let _ = self.dataplane.remove_route(key);
        }
        let _ = self.dataplane.detach(ifindex);
        let _ = self.devices.delete(name, ifindex).await;
        if !matches!(
            cause,
            DataplaneError::EntryExists {
                map: "ENDPOINTS",
                ..
            }
        ) {
            let _ = self.dataplane.remove_endpoint(ifindex);
        }
    }

    /// Deletes the endpoint whose host device is `name`.
    pub async fn delete_endpoint(&mut self, name: &str) -> Result<(), EndpointError> {
        let ifindex = device::ifindex(name).ok_or_else(|| EndpointError::NotFound(name.into()))?;
        let info = self
            .dataplane
            .endpoint(ifindex)
            .map_err(|source| EndpointError::Unprogram {
                name: name.into(),
                source,
            })?
            .ok_or_else(|| EndpointError::NotFound(name.into()))?;
        self.delete_by_index(name, ifindex, &info).await
    }

    async fn delete_by_index(
        &mut self,
        name: &str,
        ifindex: u32,
        info: &EndpointInfo,
    ) -> Result<(), EndpointError> {
        let unprogram = |source| EndpointError::Unprogram {
            name: name.into(),
            source,
        };
        let _expedited = self.expedite.hold();
        let key = RouteKey {
            cloud: info.cloud,
            ipv4: info.ipv4,
        };
        // Only remove the route if it still points at this endpoint.
        let ours = self.dataplane.route(key).map_err(unprogram)?;
        if ours.is_some_and(|h| h.ifindex == ifindex) {
            self.dataplane.remove_route(key).map_err(unprogram)?;
        }
        self.devices
            .delete(name, ifindex)
            .await
            .map_err(|source| EndpointError::DeleteDevice {
                name: name.into(),
                source,
            })?;
        self.dataplane.detach(ifindex).map_err(unprogram)?;
        // The device is gone, so its counters are final: journal them before the identity and
        // the slot are released. If that fails the endpoint stays (without device) and a later
        // delete or reconcile retries, so nothing is lost.
        self.record_final(ifindex, info, Some(name))?;
        self.dataplane.remove_endpoint(ifindex).map_err(unprogram)?;
        self.slots.release(info.slot);
        Ok(())
    }

    /// Records usage from now on into `recorder` (see [`crate::usage`]).
    pub fn set_usage(&mut self, recorder: Recorder) {
        self.usage = Some(Arc::new(Mutex::new(recorder)));
    }

    /// The usage recorder, locked.
    pub fn usage(&self) -> Option<MutexGuard<'_, Recorder>> {
        self.usage.as_ref().map(|r| lock(r))
    }

    /// A collector of the periodic usage records that runs on its own handle of the pinned
    /// dataplane (see [`UsageCollector`]).
    pub fn usage_collector(
        &self,
        cfg: &DataplaneConfig,
    ) -> Option<Result<UsageCollector, EndpointError>> {
        let recorder = self.usage.clone()?;
        Some(
            Dataplane::open(cfg)
                .map_err(EndpointError::OpenDataplane)
                .map(|dataplane| UsageCollector {
                    dataplane,
                    recorder,
                }),
        )
    }

    fn record_final(
        &mut self,
        ifindex: u32,
        info: &EndpointInfo,
        name: Option<&str>,
    ) -> Result<(), EndpointError> {
        let Some(recorder) = self.usage.as_ref() else {
            return Ok(());
        };
        let counters = read_counters(&self.dataplane, ifindex, info, name)?;
        let mut recorder = lock(recorder);
        let snap = snapshot(&recorder, ifindex, info, name.map(str::to_string), counters);
        recorder
            .record(&[snap], true)
            .map_err(EndpointError::Usage)?;
        Ok(())
    }

    /// Journals one usage record per endpoint (the periodic collection) on this thread.
    /// Returns how many.
    pub fn collect_usage(&mut self) -> Result<usize, EndpointError> {
        let Some(recorder) = self.usage.as_ref() else {
            return Ok(0);
        };
        collect(&self.dataplane, recorder)
    }

    /// All endpoints in the dataplane, with their device names when the device exists.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, EndpointError> {
        let mut out: Vec<Endpoint> = self
            .dataplane
            .endpoints()
            .map_err(|source| EndpointError::Unprogram {
                name: "*".into(),
                source,
            })?
            .into_iter()
            .filter_map(|(ifindex, i)| {
                Some(Endpoint {
                    name: device::ifname(ifindex),
                    ifindex,
                    slot: i.slot,
                    cloud: CloudId::new(i.cloud)?,
                    ipv4: Ipv4Addr::from(ipv4_from_map(i.ipv4)),
                    mac: MacAddr(i.mac),
                    gateway: Ipv4Addr::from(ipv4_from_map(i.gateway_ipv4)),
                })
            })
            .collect();
        out.sort_by_key(|e| e.ifindex);
        Ok(out)
    }

    /// Removes dataplane state of endpoints whose device disappeared while the agent was down
    /// (e.g. a VMM deleted its tap) and devices a crash left half-made, and finishes endpoints
    /// a crash left without their route or down. Returns how many things it removed or
    /// repaired.
    pub fn reconcile(&mut self) -> Result<usize, EndpointError> {
        let err = |source| EndpointError::Unprogram {
            name: "*".into(),
            source,
        };
        let mut removed = 0;
        let _expedited = self.expedite.hold();
        let routes = self.dataplane.routes().map_err(err)?;
        for (ifindex, info) in self.dataplane.endpoints().map_err(err)? {
            if let Some(name) = device::ifname(ifindex) {
                // Created up to its identity, then the agent died: the links, the route and the
                // link-up steps are repeated (what `create_endpoint` would have done next).
                let attached = self
                    .dataplane
                    .attach_missing(&name, ifindex)
                    .map_err(|source| EndpointError::Program {
                        name: name.clone(),
                        source,
                    })?;
                removed += attached.min(1);
                let key = RouteKey {
                    cloud: info.cloud,
                    ipv4: info.ipv4,
                };
                if !routes.iter().any(|(k, _)| *k == key) {
                    let hop = NextHop {
                        ifindex,
                        slot: info.slot,
                        mac: info.mac,
                        flags: 0,
                    };
                    self.dataplane.insert_route(key, hop).map_err(err)?;
                    removed += 1;
                }
                if !device::is_up(&name) {
                    device::set_up_now(&name).map_err(EndpointError::CreateDevice)?;
                    removed += 1;
                }
                continue;
            }
            for (k, h) in &routes {
                if h.ifindex == ifindex {
                    self.dataplane.remove_route(*k).map_err(err)?;
                }
            }
            self.dataplane.detach(ifindex).map_err(err)?;
            self.record_final(ifindex, &info, None)?;
            self.dataplane.remove_endpoint(ifindex).map_err(err)?;
            self.slots.release(info.slot);
            removed += 1;
        }
        for ifindex in self.dataplane.attached().map_err(err)? {
            let Some(name) = device::ifname(ifindex) else {
                self.dataplane.detach(ifindex).map_err(err)?;
                continue;
            };
            // A device with this dataplane's links and no identity is a spare (both links, a
            // pool name) or was left half-made by a crash: a spare killed between its two
            // attaches, or one claimed (renamed) but not yet programmed. Nothing can use the
            // latter; it goes. (The agent is the only writer of its pins.) Only taps are
            // made that way; anything else merely loses the links.
            let spare = self.pool.holds(ifindex);
            if !spare && self.dataplane.endpoint(ifindex).map_err(err)?.is_none() {
                self.dataplane.detach(ifindex).map_err(err)?;
                if device::is_tap(&name) {
                    device::delete_tap_now(&name).map_err(|source| {
                        EndpointError::DeleteDevice {
                            name: name.clone(),
                            source,
                        }
                    })?;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes every endpoint and device of this dataplane, then all its pins.
    pub async fn destroy(mut self) -> Result<(), EndpointError> {
        let expedite = self.expedite.clone();
        let _expedited = expedite.hold();
        for ep in self.endpoints()? {
            let info =
                self.dataplane
                    .endpoint(ep.ifindex)
                    .map_err(|source| EndpointError::Unprogram {
                        name: "*".into(),
                        source,
                    })?;
            if let (Some(name), Some(info)) = (ep.name, info) {
                self.delete_by_index(&name, ep.ifindex, &info).await?;
            }
        }
        for (name, ifindex) in self.pool.drain() {
            self.devices
                .delete(&name, ifindex)
                .await
                .map_err(|source| EndpointError::DeleteDevice {
                    name: name.clone(),
                    source,
                })?;
        }
        self.destroy_dns().await?;
        self.dataplane
            .destroy()
            .map_err(|source| EndpointError::Unprogram {
                name: "*".into(),
                source,
            })
    }
}

impl Host {
    /// Stops DNS in the dataplane, deletes the DNS device pair (found through `DNS_SERVICE` and
    /// its pinned link) and the DNS namespace this host set up.
    async fn destroy_dns(&mut self) -> Result<(), EndpointError> {
        let err = |source| EndpointError::Unprogram {
            name: "DNS".into(),
            source,
        };
        let service = self.dataplane.dns_service().map_err(err)?;
        let linked = self.dataplane.dns_links().map_err(err)?;
        self.dataplane
            .set_dns_service(DnsService::OFF)
            .map_err(err)?;
        if service.ifindex != 0 && linked.contains(&service.ifindex) {
            if let Some(name) = device::ifname(service.ifindex) {
                self.devices
                    .delete(&name, service.ifindex)
                    .await
                    .map_err(|source| EndpointError::DeleteDevice { name, source })?;
            }
        }
        self.dataplane.detach_dns().map_err(err)?;
        if let Some(name) = self.dns_namespace.take() {
            crate::dns::netns::remove(&name)
                .map_err(|source| EndpointError::RemoveDnsNamespace { name, source })?;
        }
        Ok(())
    }
}

fn validate(spec: &EndpointSpec) -> Result<(), EndpointError> {
    let invalid = |message: &str| EndpointError::InvalidSpec {
        name: spec.name.clone(),
        message: message.into(),
    };
    device::validate_name(&spec.name).map_err(|e| invalid(&e.to_string()))?;
    if !spec.mac.is_valid_unicast() {
        return Err(invalid("guest MAC must be unicast and non-zero"));
    }
    let usable = |a: Ipv4Addr| {
        !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
    };
    if !usable(spec.ipv4) || !usable(spec.gateway) {
        return Err(invalid(
            "guest and gateway addresses must be unicast, non-loopback IPv4",
        ));
    }
    if spec.ipv4 == spec.gateway {
        return Err(invalid("guest address equals the gateway address"));
    }
    if let DeviceSpec::Veth { peer_name, .. } = &spec.device {
        device::validate_name(peer_name).map_err(|e| invalid(&e.to_string()))?;
    }
    Ok(())
}

/// Journals the periodic usage records from its own handle of the pinned dataplane, so a
/// collection (a counter read per endpoint, then JSON and an fsync) runs on a blocking thread
/// and never on the agent's event loop: with 100k endpoints it takes long, and sync, VM events
/// and DNS go on meanwhile. The recorder is locked only to build and append the records; an
/// endpoint deleted meanwhile journals its final record under the same lock, and a periodic
/// record never follows a final one (see [`crate::usage::build_records`]).
pub struct UsageCollector {
    dataplane: Dataplane,
    recorder: Arc<Mutex<Recorder>>,
}

impl std::fmt::Debug for UsageCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageCollector").finish_non_exhaustive()
    }
}

impl UsageCollector {
    /// One collection; returns how many records were journaled.
    pub fn collect(&self) -> Result<usize, EndpointError> {
        collect(&self.dataplane, &self.recorder)
    }

    /// The time of the last periodic collection (see [`Recorder::last_collected_ms`]).
    pub fn last_collected_ms(&self) -> u64 {
        lock(&self.recorder).last_collected_ms()
    }

    /// The journal's directory.
    pub fn journal_dir(&self) -> PathBuf {
        lock(&self.recorder).journal().dir().to_path_buf()
    }
}

/// A poisoned lock only means another thread panicked while journaling; the journal on disk
/// is consistent (appends are cut back on failure), so the recorder is used as it is.
fn lock(r: &Mutex<Recorder>) -> MutexGuard<'_, Recorder> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_counters(
    dataplane: &Dataplane,
    ifindex: u32,
    info: &EndpointInfo,
    name: Option<&str>,
) -> Result<EndpointCounters, EndpointError> {
    dataplane
        .counters(info.slot)
        .map_err(|source| EndpointError::Unprogram {
            name: name
                .map(str::to_string)
                .unwrap_or_else(|| format!("ifindex-{ifindex}")),
            source,
        })
}

fn snapshot(
    recorder: &Recorder,
    ifindex: u32,
    info: &EndpointInfo,
    name: Option<String>,
    counters: EndpointCounters,
) -> Snapshot {
    let incarnation = recorder.incarnation(ifindex);
    let endpoint = name
        .or_else(|| recorder.last_name(&incarnation).map(str::to_string))
        .unwrap_or_else(|| format!("ifindex-{ifindex}"));
    Snapshot {
        incarnation,
        cloud: info.cloud,
        endpoint,
        counters,
    }
}

/// Reads every endpoint's counters (without the recorder's lock), then journals one record
/// each.
fn collect(dataplane: &Dataplane, recorder: &Mutex<Recorder>) -> Result<usize, EndpointError> {
    let endpoints = dataplane
        .endpoints()
        .map_err(|source| EndpointError::Unprogram {
            name: "*".into(),
            source,
        })?;
    let mut read = Vec::with_capacity(endpoints.len());
    for (ifindex, info) in endpoints {
        let name = device::ifname(ifindex);
        let counters = read_counters(dataplane, ifindex, &info, name.as_deref())?;
        read.push((ifindex, info, name, counters));
    }
    let mut recorder = lock(recorder);
    let snaps: Vec<Snapshot> = read
        .into_iter()
        .map(|(ifindex, info, name, counters)| snapshot(&recorder, ifindex, &info, name, counters))
        .collect();
    recorder.record(&snaps, false).map_err(EndpointError::Usage)
}
