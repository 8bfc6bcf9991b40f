//! Egress against what a host would otherwise run (issue 17): taps routed through the host's
//! IP stack with nftables masquerade, a conntrack zone per cloud and an allow set per cloud,
//! next to atoll's egress path, on the same generator traffic, in interleaved rounds.
//!
//! **Both hosts** live in network namespaces of their own, built alike: one tap per cloud (the
//! guest 10.0.0.2 in every cloud: the address spaces overlap), and an uplink that is a tap too
//! (`up0`, 198.18.0.2/24, the default route via 198.18.0.1 with a permanent neighbour entry),
//! whose queue the bench reads as "the internet". Nothing leaves the namespaces: the only
//! device a frame can leave by is that tap. Every cloud may reach 198.19.0.0/24 and nothing
//! else; the server is 198.19.0.10.
//!
//! - *atoll*: `Host` with egress enabled on `up0` (`egress::enable`), every cloud in
//!   `allowlist` mode with that CIDR.
//! - *nftables*: forwarding on, `rp_filter` off, the taps without addresses (a guest's
//!   gateway is its tap's MAC), and the rule set an operator writes for overlapping clouds
//!   behind one address: in `prerouting` at `raw` priority `ct original zone set iifname map
//!   @zones` (a zone per cloud for the original direction only, so the replies, which arrive
//!   on the uplink in zone 0, find their connection); at `mangle`, new connections get the
//!   cloud's number as `ct mark` and replies copy it to the packet mark; in `forward` (policy
//!   drop) `ct state established,related accept`, then `iifname vmap @clouds` jumps to the
//!   cloud's chain, which accepts `ip daddr @allow_<cloud>` (an interval set per cloud); in
//!   `postrouting`, `oifname "up0" masquerade`. A reply, its destination translated back to
//!   10.0.0.2 by conntrack, is routed by its mark: one `ip rule fwmark <cloud> lookup
//!   <table>` per cloud and, in the cloud's table, 10.0.0.0/24 on the cloud's tap (with a
//!   permanent neighbour entry for the guest), after a first rule sending unmarked packets
//!   (all but replies) to the main table. This is what Linux offers for overlapping tenants
//!   in one namespace; the rules are a list, so replies of the middle cloud walk half of
//!   them (without the first rule every packet out would walk all of them: 10× slower at
//!   1,000 clouds).
//!
//! **Generator**, as in `forward`: one thread writes frames into a tap with one `write` per
//! frame, another reads the receiving tap and counts the frames carrying the bench's marker.
//! Measured, in the middle cloud (index n/2), 64-byte UDP frames:
//! - *out*: an established flow (one frame out and its reply were seen first, so conntrack
//!   holds it as established), guest tap → uplink tap;
//! - *back*: replies of that flow, written into the uplink tap, read at the guest's tap;
//! - *new connections*: every frame a new flow (destination ports 1, 2, …: each one's NAT
//!   mapping is free on the first try in both systems), so each frame costs a connection
//!   entry (conntrack + NAT in the kernel; `EGRESS_OUT` + `EGRESS_IN` for atoll) and a policy
//!   decision; rate = NAT connections per second.
//!
//! **Checks** before measuring, for both hosts: the flow's reply reaches the guest; with more
//! than one cloud, the same flow from another cloud (same addresses, same ports) leaves with a
//! different NAT port and each reply reaches its own cloud's tap only; a frame to an address
//! outside the allow set does not leave.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use atoll_agent::{
    config::{DataplaneConfig, DeviceName, EgressConfig},
    device::{open_tap_queue, wait_until_up},
    dns::netns,
    egress,
    endpoint::{CloudEgressSpec, DeviceSpec, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};
use atoll_api::model::{EgressMode, EgressPolicy, EgressRule, Ipv4Net};
use atoll_testbed::{unique_name, NetNs, PinRoot};

use super::median;
use crate::forward::{frame_to_port, is_ours, pump_with, Pumped};

pub const HEADING: &str = "## Egress: atoll against a host with nftables masquerade";

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// Outside the clouds' allow set (198.19.0.0/24), inside the bench's own range.
const NOT_ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
const UPLINK: &str = "up0";
const UPLINK_MAC: MacAddr = MacAddr([0x02, 0xa7, 0x11, 0, 0, 0x02]);
const ROUTER_MAC: MacAddr = MacAddr([0x02, 0xa7, 0x11, 0, 0, 0x01]);
/// The nftables host's taps' MAC (the guests' gateway there).
const TAP_MAC: MacAddr = MacAddr([0x02, 0xa7, 0x11, 0, 0, 0x03]);
const FLOW_PORT: u16 = 40_000;
const SERVER_PORT: u16 = 9;
const FRAME: usize = 64;
const ARRIVE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Atoll,
    Nftables,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Atoll => "atoll",
            System::Nftables => "nftables masquerade, zones and sets",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Out,
    Back,
    NewConnections,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Out, Metric::Back, Metric::NewConnections];

    pub fn label(self) -> &'static str {
        match self {
            Metric::Out => "established flow, out (frames/s)",
            Metric::Back => "established flow, replies back (frames/s)",
            Metric::NewConnections => "new connections (NAT connections/s)",
        }
    }
}

pub struct Plan {
    pub clouds: Vec<u32>,
    pub rounds: usize,
    pub pump: Duration,
    /// New connections per round and system (each a frame to a new destination port).
    pub new_flows: u64,
}

impl Plan {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Plan {
                clouds: vec![1, 3],
                rounds: 1,
                pump: Duration::from_millis(50),
                new_flows: 2_000,
            }
        } else {
            Plan {
                clouds: vec![1, 1_000],
                rounds: 5,
                pump: Duration::from_secs(1),
                // 5 rounds stay under the 262,144 entries of both systems' tables.
                new_flows: 40_000,
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub clouds: u32,
    pub metric: Metric,
    pub system: System,
    /// Per round, in round order: (rate, loss).
    pub rounds: Vec<(f64, f64)>,
}

impl Row {
    pub fn rate(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.0).collect())
    }

    pub fn loss(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.1).collect())
    }
}

pub struct Results {
    pub plan: Plan,
    pub rows: Vec<Row>,
    /// Seconds to apply each size's rules to the nftables host (`nft -f`, `ip -batch`).
    pub setup: Vec<(u32, Duration, Duration)>,
}

impl Results {
    pub fn row(&self, clouds: u32, metric: Metric, system: System) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.clouds == clouds && r.metric == metric && r.system == system)
    }

    /// atoll's rate over nftables': the median over the rounds of the two rates of one round.
    pub fn ratio(&self, clouds: u32, metric: Metric) -> Option<f64> {
        let a = self.row(clouds, metric, System::Atoll)?;
        let b = self.row(clouds, metric, System::Nftables)?;
        let r: Vec<f64> = a
            .rounds
            .iter()
            .zip(&b.rounds)
            .map(|(a, b)| a.0 / b.0)
            .collect();
        (!r.is_empty()).then(|| median(r))
    }
}

fn cloud_tap(prefix: &str, i: u32) -> String {
    format!("{prefix}{i:x}")
}

fn guest_mac(i: u32) -> MacAddr {
    MacAddr::local(0x00b0_0000 + i)
}

/// A guest's 64-byte UDP frame from `src_port` to `dst:dst_port` through its gateway `gw`.
fn guest_frame(gw: MacAddr, mac: MacAddr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut f = frame_to_port(FRAME, gw, mac, GUEST_IP, dst, dst_port);
    f[34..36].copy_from_slice(&src_port.to_be_bytes());
    f
}

/// The server's reply to a flow translated to `nat`.
fn reply_frame(nat: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut f = frame_to_port(FRAME, UPLINK_MAC, ROUTER_MAC, SERVER, nat.0, nat.1);
    f[34..36].copy_from_slice(&SERVER_PORT.to_be_bytes());
    f
}

fn read_one(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `buf` is valid for writes of its length for the call.
    let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then_some(r as usize)
}

/// The next frame of ours on `fd` within `wait`, or `None`.
fn receive(fd: &OwnedFd, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(n) = read_one(fd, &mut buf) {
            if is_ours(&buf[..n], FRAME) {
                return Some(buf[..n].to_vec());
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 100) as i32) };
    }
}

fn write_frame(fd: &OwnedFd, f: &[u8]) -> Result<()> {
    // SAFETY: `f` is valid for reads of its length for the call.
    let r = unsafe { libc::write(fd.as_raw_fd(), f.as_ptr().cast(), f.len()) };
    ensure!(
        r == f.len() as isize,
        "writing a frame: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn discard(fd: &OwnedFd) {
    let mut buf = vec![0u8; 4096];
    while read_one(fd, &mut buf).is_some() {}
}

/// One host under test: its namespace, the uplink's queue and its clouds' taps.
struct Setup {
    system: System,
    ns: NetNs,
    prefix: String,
    clouds: u32,
    uplink: OwnedFd,
    /// The gateway MAC the guests send to.
    gateway: MacAddr,
    atoll: Option<AtollHost>,
    _pins: Option<PinRoot>,
}

struct AtollHost {
    rt: tokio::runtime::Runtime,
    host: Option<Host>,
}

fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> Result<T> {
    Ok(netns::run_in(&ns.path(), f)?)
}

fn allowlist() -> EgressPolicy {
    EgressPolicy {
        mode: EgressMode::Allowlist,
        allow: vec![EgressRule {
            cidr: Some(Ipv4Net {
                addr: Ipv4Addr::new(198, 19, 0, 0),
                len: 24,
            }),
            domain: None,
            protocol: None,
            ports: None,
        }],
        ..EgressPolicy::deny_all()
    }
}

impl Setup {
    fn new(system: System) -> Result<Self> {
        let tag = match system {
            System::Atoll => "ma",
            System::Nftables => "mn",
        };
        let ns = NetNs::new(&unique_name(tag))?;
        ns.sh(&format!(
            "ip tuntap add dev {UPLINK} mode tap && ip link set {UPLINK} address {UPLINK_MAC} && ip link set {UPLINK} up"
        ))?;
        let uplink = in_ns(&ns, || open_tap_queue(UPLINK, true))??;
        ns.sh(&format!(
            "ip addr add {HOST_IP}/24 dev {UPLINK} && ip neigh replace {ROUTER_IP} lladdr {ROUTER_MAC} dev {UPLINK} nud permanent && ip route add default via {ROUTER_IP} dev {UPLINK}"
        ))?;
        in_ns(&ns, || wait_until_up(UPLINK, Duration::from_secs(5)))??;
        let mut s = Setup {
            system,
            ns,
            prefix: "m".into(),
            clouds: 0,
            uplink,
            gateway: TAP_MAC,
            atoll: None,
            _pins: None,
        };
        match system {
            System::Atoll => s.open_atoll()?,
            System::Nftables => s.ns.sh(
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0",
            )
            .map(drop)?,
        }
        Ok(s)
    }

    fn open_atoll(&mut self) -> Result<()> {
        let pins = PinRoot::new("mp");
        let cfg = DataplaneConfig {
            bpffs_root: pins.path().into(),
            tap_pool: 2,
            ..DataplaneConfig::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let host = in_ns(&self.ns, || -> Result<Host> {
            let mut host = rt.block_on(async { Host::open(&cfg) })?;
            egress::enable(
                &mut host,
                &EgressConfig {
                    enabled: true,
                    uplink: Some(DeviceName::new(UPLINK).map_err(anyhow::Error::msg)?),
                    // The nftables host has no new-flow rate: neither has atoll here.
                    max_new_flows_per_sec: 0,
                    ..EgressConfig::default()
                },
            )?;
            Ok(host)
        })??;
        self.gateway = host.gateway_mac();
        self.atoll = Some(AtollHost {
            rt,
            host: Some(host),
        });
        self._pins = Some(pins);
        Ok(())
    }

    /// Grows the host to `n` clouds; returns the time the nftables host took to apply its
    /// devices and its rule set (zero for atoll).
    fn grow(&mut self, n: u32) -> Result<(Duration, Duration)> {
        let new = self.clouds..n.max(self.clouds);
        let mut times = (Duration::ZERO, Duration::ZERO);
        match self.system {
            System::Atoll => {
                let a = self.atoll.as_mut().expect("atoll");
                let (rt, host) = (&a.rt, a.host.as_mut().expect("open"));
                let prefix = &self.prefix;
                in_ns(&self.ns, || -> Result<()> {
                    for i in new.clone() {
                        let cloud = CloudId::new(i + 1).expect("non-zero");
                        rt.block_on(async {
                            host.refill_pool().await?;
                            host.create_endpoint(&EndpointSpec {
                                name: cloud_tap(prefix, i),
                                cloud,
                                ipv4: GUEST_IP,
                                mac: guest_mac(i),
                                gateway: GATEWAY,
                                device: DeviceSpec::Tap { owner_uid: None },
                            })
                            .await
                        })?;
                        host.set_cloud_egress(
                            cloud,
                            &CloudEgressSpec {
                                policy: allowlist(),
                                cidr: Some(Ipv4Net {
                                    addr: Ipv4Addr::new(10, 0, 0, 0),
                                    len: 24,
                                }),
                                address: None,
                            },
                        )?;
                    }
                    Ok(())
                })??;
            }
            System::Nftables => {
                let mut batch = String::new();
                if self.clouds == 0 {
                    // Unmarked packets (everything but replies) skip the clouds' rules.
                    batch.push_str("rule add fwmark 0/0xffffffff lookup main pref 100\n");
                }
                for i in new.clone() {
                    let t = cloud_tap(&self.prefix, i);
                    let table = 1000 + i;
                    writeln!(
                        batch,
                        "tuntap add dev {t} mode tap\nlink set dev {t} address {TAP_MAC}\nlink set dev {t} up\nneigh replace {GUEST_IP} lladdr {} dev {t} nud permanent\nroute add 10.0.0.0/24 dev {t} table {table}\nrule add fwmark {} lookup {table} pref {table}",
                        guest_mac(i),
                        i + 1
                    )?;
                }
                let started = Instant::now();
                self.batch("ip", &batch)?;
                times.0 = started.elapsed();
                let started = Instant::now();
                self.batch("nft", &ruleset(&self.prefix, n))?;
                times.1 = started.elapsed();
            }
        }
        self.clouds = n.max(self.clouds);
        Ok(times)
    }

    /// Runs `tool -batch` (ip) or `tool -f` (nft) on `text` in the namespace.
    fn batch(&self, tool: &str, text: &str) -> Result<()> {
        let file = std::env::temp_dir().join(format!("{}-{tool}", self.ns.name()));
        std::fs::write(&file, text)?;
        let path = file.to_str().context("temp path")?.to_string();
        let flag = if tool == "nft" { "-f" } else { "-batch" };
        let r = self.ns.exec(&[tool, flag, &path]);
        let _ = std::fs::remove_file(&file);
        r.with_context(|| format!("{tool} {flag} in {}", self.ns.name()))?;
        Ok(())
    }

    fn open_guest(&self, i: u32) -> Result<OwnedFd> {
        let name = cloud_tap(&self.prefix, i);
        let fd = in_ns(&self.ns, || open_tap_queue(&name, true))??;
        in_ns(&self.ns, || wait_until_up(&name, Duration::from_secs(5)))??;
        Ok(fd)
    }

    /// Sends cloud `i`'s flow out and its reply back; returns the flow's translation.
    fn establish(&self, i: u32, tap: &OwnedFd) -> Result<(Ipv4Addr, u16)> {
        let label = self.system.label();
        discard(&self.uplink);
        discard(tap);
        write_frame(
            tap,
            &guest_frame(self.gateway, guest_mac(i), SERVER, FLOW_PORT, SERVER_PORT),
        )?;
        let Some(out) = receive(&self.uplink, ARRIVE) else {
            bail!("{label}: cloud {i}'s frame to the server did not leave by the uplink");
        };
        let src = Ipv4Addr::new(out[26], out[27], out[28], out[29]);
        let port = u16::from_be_bytes([out[34], out[35]]);
        ensure!(
            src == HOST_IP && out[30..34] == SERVER.octets(),
            "{label}: the frame left as {src} → {}.{}.{}.{}",
            out[30],
            out[31],
            out[32],
            out[33]
        );
        write_frame(&self.uplink, &reply_frame((src, port)))?;
        let Some(back) = receive(tap, ARRIVE) else {
            bail!("{label}: the reply to cloud {i}'s flow did not reach its tap");
        };
        ensure!(
            back[30..34] == GUEST_IP.octets()
                && u16::from_be_bytes([back[36], back[37]]) == FLOW_PORT,
            "{label}: the reply reached cloud {i} with the wrong destination"
        );
        Ok((src, port))
    }

    /// A frame to an address outside the allow set must not leave.
    fn check_denied(&self, i: u32, tap: &OwnedFd) -> Result<()> {
        discard(&self.uplink);
        write_frame(
            tap,
            &guest_frame(
                self.gateway,
                guest_mac(i),
                NOT_ALLOWED,
                FLOW_PORT,
                SERVER_PORT,
            ),
        )?;
        ensure!(
            receive(&self.uplink, Duration::from_millis(300)).is_none(),
            "{}: a frame to {NOT_ALLOWED} (not allowed) left by the uplink",
            self.system.label()
        );
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        if let Some(mut a) = self.atoll.take() {
            if let Some(host) = a.host.take() {
                let rt = &a.rt;
                in_ns(&self.ns, || rt.block_on(host.destroy()))??;
            }
        }
        Ok(())
    }
}

/// The nftables host's rule set for `n` clouds (module docs), replacing the previous one.
fn ruleset(prefix: &str, n: u32) -> String {
    let mut zones = String::new();
    let mut clouds = String::new();
    let mut chains = String::new();
    for i in 0..n {
        let t = cloud_tap(prefix, i);
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(zones, "{sep}\"{t}\" : {}", i + 1);
        let _ = write!(clouds, "{sep}\"{t}\" : jump cloud_{i}");
        let _ = writeln!(
            chains,
            "  set allow_{i} {{ type ipv4_addr; flags interval; elements = {{ 198.19.0.0/24 }} }}\n  chain cloud_{i} {{\n    ip daddr @allow_{i} accept\n  }}"
        );
    }
    format!(
        "table ip masq\ndelete table ip masq\ntable ip masq {{
  map zones {{ typeof iifname : ct zone; elements = {{ {zones} }} }}
  map marks {{ typeof iifname : ct mark; elements = {{ {zones} }} }}
{chains}  map clouds {{ type ifname : verdict; elements = {{ {clouds} }} }}
  chain raw {{
    type filter hook prerouting priority raw; policy accept;
    iifname \"{UPLINK}\" return
    ct original zone set iifname map @zones
  }}
  chain mangle {{
    type filter hook prerouting priority mangle; policy accept;
    ct state new ct mark set iifname map @marks
    ct direction reply meta mark set ct mark
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname vmap @clouds
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{UPLINK}\" masquerade
  }}
}}
"
    )
}

/// The measured cloud's taps and flow in one host.
struct Measured {
    tap: OwnedFd,
    nat: (Ipv4Addr, u16),
    cloud: u32,
}

fn measure(s: &Setup, m: &Measured, metric: Metric, plan: &Plan, round: u64) -> Result<Pumped> {
    let gw = s.gateway;
    let mac = guest_mac(m.cloud);
    match metric {
        Metric::Out => pump_with(
            &m.tap,
            &s.uplink,
            &guest_frame(gw, mac, SERVER, FLOW_PORT, SERVER_PORT),
            plan.pump,
            None,
            |_, _| {},
        ),
        Metric::Back => pump_with(
            &s.uplink,
            &m.tap,
            &reply_frame(m.nat),
            plan.pump,
            None,
            |_, _| {},
        ),
        Metric::NewConnections => {
            // A source port per size and round, a destination port per frame: new flows.
            let src = 20_000 + round as u16;
            pump_with(
                &m.tap,
                &s.uplink,
                &guest_frame(gw, mac, SERVER, src, 1),
                Duration::MAX,
                Some(plan.new_flows),
                |f, n| f[36..38].copy_from_slice(&(1 + n as u16).to_be_bytes()),
            )
        }
    }
}

pub fn run(plan: Plan) -> Result<Results> {
    ensure!(
        plan.new_flows < 60_000,
        "new flows per round: one destination port each"
    );
    let mut setups = [Setup::new(System::Atoll)?, Setup::new(System::Nftables)?];
    let mut rows: Vec<Row> = Vec::new();
    let mut setup_times = Vec::new();
    let mut round_id = 0u64;
    for &n in &plan.clouds {
        let mut nft_times = (Duration::ZERO, Duration::ZERO);
        for s in setups.iter_mut() {
            let t = s.grow(n)?;
            if s.system == System::Nftables {
                nft_times = t;
            }
        }
        setup_times.push((n, nft_times.0, nft_times.1));
        let mid = n / 2;
        let mut measured = Vec::new();
        for s in &setups {
            let tap = s.open_guest(mid)?;
            let nat = s.establish(mid, &tap)?;
            if n > 1 {
                // The same flow from another cloud: another NAT port, its own reply.
                let other = (mid + 1) % n;
                let other_tap = s.open_guest(other)?;
                let other_nat = s.establish(other, &other_tap)?;
                ensure!(
                    other_nat != nat,
                    "{}: two clouds' identical flows share the translation {nat:?}",
                    s.system.label()
                );
                ensure!(
                    receive(&tap, Duration::from_millis(200)).is_none(),
                    "{}: cloud {other}'s reply reached cloud {mid}",
                    s.system.label()
                );
            }
            s.check_denied(mid, &tap)?;
            measured.push(Measured {
                tap,
                nat,
                cloud: mid,
            });
        }
        for round in 0..plan.rounds {
            round_id += 1;
            for metric in Metric::ALL {
                // Alternate which system goes first, so drift within a round evens out.
                let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let (s, m) = (&setups[i], &measured[i]);
                    let p = measure(s, m, metric, &plan, round_id)?;
                    println!(
                        "egress vs masquerade: {n} clouds, {:?}, {}: {:.1} k/s (loss {:.1}%)",
                        metric,
                        s.system.label(),
                        p.pps() / 1e3,
                        p.loss() * 100.0
                    );
                    match rows
                        .iter_mut()
                        .find(|r| r.clouds == n && r.metric == metric && r.system == s.system)
                    {
                        Some(r) => r.rounds.push((p.pps(), p.loss())),
                        None => rows.push(Row {
                            clouds: n,
                            metric,
                            system: s.system,
                            rounds: vec![(p.pps(), p.loss())],
                        }),
                    }
                }
            }
        }
    }
    let [a, b] = setups;
    a.finish()?;
    b.finish()?;
    Ok(Results {
        plan,
        rows,
        setup: setup_times,
    })
}

/// One line per size and metric for the console.
pub fn summary(r: &Results) -> String {
    let mut s = String::new();
    for &n in &r.plan.clouds {
        for metric in Metric::ALL {
            if let (Some(a), Some(b), Some(x)) = (
                r.row(n, metric, System::Atoll),
                r.row(n, metric, System::Nftables),
                r.ratio(n, metric),
            ) {
                let _ = writeln!(
                    s,
                    "egress vs masquerade, {n} clouds, {}: atoll {:.1} k/s, nftables {:.1} k/s, {x:.2}x",
                    metric.label(),
                    a.rate() / 1e3,
                    b.rate() / 1e3
                );
            }
        }
    }
    s
}

fn fmt_rate(v: f64, loss: f64) -> String {
    let mut s = if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else {
        format!("{:.1} k/s", v / 1e3)
    };
    if loss >= 0.001 {
        let _ = write!(s, " (loss {:.1}%)", loss * 100.0);
    }
    s
}

pub fn section(r: &Results) -> String {
    let mut s = format!(
        "\n{HEADING}\n\nMethod: `tests/src/bench/masquerade.rs` (its module docs give the rule set; reproduce with `cargo xtask bench`, or only the egress sections with `target/release/bench --egress-only`). Both hosts in namespaces of their own, one tap per cloud (10.0.0.2 in every cloud), an uplink tap read as the internet, every cloud allowed 198.19.0.0/24 only. The nftables host routes the taps through its IP stack: a conntrack zone per cloud (original direction), `ct state established,related accept`, a verdict map from the tap to the cloud's chain with an allow set per cloud, `masquerade` on the uplink, and replies routed back by conntrack mark with one `ip rule` per cloud (after a first rule that sends unmarked packets, everything but replies, to the main table). One writer thread, one reader thread, 64-byte UDP frames of the middle cloud, median of {} interleaved rounds ({} s of writing for the established flow; {} new connections per round, each a frame to a new destination port). Checked first in both hosts: the reply reaches the guest, two clouds' identical flows get different NAT ports and each reply reaches its own cloud only, and a frame outside the allow set does not leave.\n\n",
        r.plan.rounds,
        r.plan.pump.as_secs_f64(),
        r.plan.new_flows
    );
    s.push_str("| clouds | traffic | atoll | nftables masquerade | atoll ÷ nftables |\n|---:|---|---:|---:|---:|\n");
    for &n in &r.plan.clouds {
        for metric in Metric::ALL {
            let (Some(a), Some(b), Some(x)) = (
                r.row(n, metric, System::Atoll),
                r.row(n, metric, System::Nftables),
                r.ratio(n, metric),
            ) else {
                continue;
            };
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {x:.2}× |",
                metric.label(),
                fmt_rate(a.rate(), a.loss()),
                fmt_rate(b.rate(), b.loss())
            );
        }
    }
    s.push_str(
        "\nLoss is frames written but never read (dropped on the path or at a full queue).\n\n",
    );
    if let Some(&max) = r.plan.clouds.last() {
        s.push_str("| target (issue 17) | measured | |\n|---|---|---|\n");
        for metric in Metric::ALL {
            if let Some(x) = r.ratio(max, metric) {
                let _ = writeln!(
                    s,
                    "| atoll ≥ 1.5× the nftables host at {max} clouds, {} | {x:.2}× | **{}** |",
                    metric.label(),
                    if x >= 1.5 { "met" } else { "missed" }
                );
            }
        }
    }
    s.push_str("\nGrowing the nftables host to that many clouds: `ip -batch` for the new clouds' taps, neighbours, tables and rules, and `nft -f` replacing the whole rule set:\n\n| clouds | `ip -batch` | `nft -f` |\n|---:|---:|---:|\n");
    for (n, ip, nft) in &r.setup {
        let _ = writeln!(
            s,
            "| {n} | {:.0} ms | {:.0} ms |",
            ip.as_secs_f64() * 1e3,
            nft.as_secs_f64() * 1e3
        );
    }
    s
}
