//! Cross-host forwarding (issue 18): atoll's overlay against the usual one, on the same
//! generator traffic, in interleaved rounds of one run.
//!
//! **Hosts.** Two network namespaces joined by an underlay veth, per system: atoll's pair
//! (`from_vm` encapsulating in eBPF to a VXLAN device in external mode, `from_overlay`
//! checking and delivering) and the baseline's pair (what operators build without atoll:
//! per cloud and host a Linux bridge, a VXLAN device with the cloud's VNI to the other host
//! (point to point, no learning, static FDB entries, so nothing floods) and the guest's tap on
//! the bridge, isolated by nftables in its best form: one `bridge` forward rule looking up
//! `iifname . ether saddr . ip saddr . oifname` in a set of the allowed tuples, policy drop).
//! Every cloud has a guest `a` (10.0.0.2) on the first host and `b` (10.0.0.3) on the second:
//! the address spaces overlap, as tenants' do. atoll also gets one more cloud with both guests
//! on the first host: its same-host forward, the reference for "cross-host at least 70% of
//! same-host".
//!
//! **Generator.** As in the forwarding comparison (`forward.rs`): one thread writes frames to
//! tap `a` (one `write` each), another reads tap `b` on the other host and counts the frames
//! carrying the bench's marker; rate = frames read per second of writing. The whole path
//! (tun receive, the programs or the bridge and nftables, VXLAN encapsulation, the underlay
//! veth, decapsulation, delivery) runs in the writer's system call and the softirqs it
//! raises. Frames of 64 bytes and 1,464 (a full frame at the guests' MTU of 1,450).
//!
//! **Sizes.** 1 and 1,000 clouds (the traffic in the first); each system is checked to
//! deliver to the right guest only (a frame to another cloud's address space is not counted
//! by the reader of `b`, which sees only its own tap).

use std::{fmt::Write as _, net::Ipv4Addr, os::fd::OwnedFd, time::Duration};

use anyhow::{anyhow, bail, Result};
use atoll_agent::{
    config::{DataplaneConfig, DeviceName, EgressConfig, OverlayConfig},
    device::{open_tap_queue, wait_until_up},
    endpoint::{DeviceSpec, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};
use atoll_testbed::PinRoot;

use super::{
    forward::{frame_to_port, pump_with, Pumped},
    median,
    netns::Ns,
};

pub const HEADING: &str =
    "## Cross-host forwarding: atoll's overlay against Linux VXLAN + bridges + nftables (issue 18)";

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const FRAMES: [usize; 2] = [64, 1464];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    CrossHost,
    SameHost,
    Linux,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::CrossHost => "atoll, across hosts",
            System::SameHost => "atoll, same host",
            System::Linux => "Linux VXLAN + bridge + nftables set, across hosts",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub clouds: u32,
    pub frame: usize,
    pub system: System,
    pub pps: f64,
    pub loss: f64,
    pub rounds: Vec<f64>,
}

#[derive(Debug)]
pub struct Results {
    pub rows: Vec<Row>,
    pub rounds: usize,
    pub pump: Duration,
}

impl Results {
    fn row(&self, clouds: u32, frame: usize, system: System) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.clouds == clouds && r.frame == frame && r.system == system)
    }

    /// `a`'s rate over `b`'s: the median of the per-round ratios.
    pub fn ratio(&self, clouds: u32, frame: usize, a: System, b: System) -> Option<f64> {
        let (a, b) = (self.row(clouds, frame, a)?, self.row(clouds, frame, b)?);
        let r: Vec<f64> = a.rounds.iter().zip(&b.rounds).map(|(x, y)| x / y).collect();
        (!r.is_empty()).then(|| median(r))
    }
}

fn mac(n: u32) -> MacAddr {
    MacAddr::local(0x00b0_0000 + n)
}

/// Opens tap `name`'s queue in `ns` and waits until it is up.
fn tap(ns: &Ns, name: &str) -> Result<OwnedFd> {
    ns.inside(|| {
        let fd = open_tap_queue(name, true)?;
        wait_until_up(name, Duration::from_secs(5))?;
        Ok(fd)
    })
}

/// Two namespaces on an underlay veth: `(first, second)` at `.1` and `.2` of `net`.
fn pair(tag: &str, net: [u8; 3]) -> Result<(Ns, Ns)> {
    let (a, b) = (Ns::new(tag)?, Ns::new(tag)?);
    let ip = |n: u8| Ipv4Addr::new(net[0], net[1], net[2], n);
    a.run(
        "ip",
        &["-batch", "-"],
        &format!(
            "link set lo up\nlink add under0 type veth peer name under0 netns {b}\n\
             addr add {}/24 dev under0\nlink set under0 up\n",
            ip(1),
            b = b.name()
        ),
    )?;
    b.run(
        "ip",
        &["-batch", "-"],
        &format!(
            "link set lo up\naddr add {}/24 dev under0\nlink set under0 up\n",
            ip(2)
        ),
    )?;
    Ok((a, b))
}

/// atoll on two hosts.
struct Atoll {
    rt: tokio::runtime::Runtime,
    hosts: Vec<Option<Host>>,
    ns: (Ns, Ns),
    clouds: u32,
    _pins: (PinRoot, PinRoot),
}

const ATOLL_NET: [u8; 3] = [10, 230, 0];

impl Atoll {
    fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ns = pair("bov", ATOLL_NET)?;
        let pins = (PinRoot::new("bop"), PinRoot::new("bop"));
        let mut hosts = Vec::new();
        for (i, (n, p)) in [(&ns.0, &pins.0), (&ns.1, &pins.1)].into_iter().enumerate() {
            let underlay = Ipv4Addr::new(ATOLL_NET[0], ATOLL_NET[1], ATOLL_NET[2], i as u8 + 1);
            let host = n.inside(|| {
                let mut host = {
                    let _entered = rt.enter();
                    Host::open(&DataplaneConfig {
                        bpffs_root: p.path().into(),
                        tap_pool: 0,
                        max_endpoints: 4096,
                        ..DataplaneConfig::default()
                    })?
                };
                rt.block_on(atoll_agent::overlay::enable(
                    &mut host,
                    &OverlayConfig {
                        enabled: true,
                        underlay: Some(underlay),
                        device: DeviceName::new("vx0").map_err(|e| anyhow!("{e}"))?,
                        ..OverlayConfig::default()
                    },
                    &EgressConfig::default(),
                ))?;
                let peer = Ipv4Addr::new(ATOLL_NET[0], ATOLL_NET[1], ATOLL_NET[2], 2 - i as u8);
                host.add_overlay_peer(peer)?;
                Ok(host)
            })?;
            hosts.push(Some(host));
        }
        let mut atoll = Atoll {
            rt,
            hosts,
            ns,
            clouds: 0,
            _pins: pins,
        };
        // The same-host reference: cloud 1, both guests on the first host.
        atoll.endpoint(0, 1, "sa", A_IP, mac(1))?;
        atoll.endpoint(0, 1, "sb", B_IP, mac(2))?;
        Ok(atoll)
    }

    fn endpoint(
        &mut self,
        host: usize,
        cloud: u32,
        name: &str,
        ip: Ipv4Addr,
        m: MacAddr,
    ) -> Result<()> {
        let ns = if host == 0 { &self.ns.0 } else { &self.ns.1 };
        let (rt, h) = (&self.rt, self.hosts[host].as_mut().expect("open"));
        ns.inside(|| {
            rt.block_on(h.create_endpoint(&EndpointSpec {
                name: name.into(),
                cloud: CloudId::new(cloud).expect("non-zero"),
                ipv4: ip,
                mac: m,
                gateway: GATEWAY,
                device: DeviceSpec::Tap { owner_uid: None },
            }))?;
            Ok(())
        })
    }

    /// Grows to `n` clouds across the hosts (clouds 2..): `a` on the first, `b` on the
    /// second, each routed on the other, with the cloud's VNI on both.
    fn grow(&mut self, n: u32) -> Result<()> {
        while self.clouds < n {
            let k = self.clouds;
            let cloud = k + 2;
            let (ma, mb) = (mac(16 + 2 * k), mac(17 + 2 * k));
            self.endpoint(0, cloud, &format!("a{k:x}"), A_IP, ma)?;
            self.endpoint(1, cloud, &format!("b{k:x}"), B_IP, mb)?;
            for (i, (ip, m)) in [(B_IP, mb), (A_IP, ma)].into_iter().enumerate() {
                let ns = if i == 0 { &self.ns.0 } else { &self.ns.1 };
                let h = self.hosts[i].as_mut().expect("open");
                let other = Ipv4Addr::new(ATOLL_NET[0], ATOLL_NET[1], ATOLL_NET[2], 2 - i as u8);
                ns.inside(|| {
                    let c = CloudId::new(cloud).expect("non-zero");
                    h.set_cloud_vni(c, cloud)?;
                    h.set_remote_endpoint(c, ip, m, other)?;
                    Ok(())
                })?;
            }
            self.clouds += 1;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        for (i, h) in self.hosts.iter_mut().enumerate() {
            if let Some(host) = h.take() {
                let ns = if i == 0 { &self.ns.0 } else { &self.ns.1 };
                let rt = &self.rt;
                ns.inside(|| Ok(rt.block_on(host.destroy())?))?;
            }
        }
        Ok(())
    }
}

/// The usual overlay on two hosts (module docs).
struct Linux {
    ns: (Ns, Ns),
    clouds: u32,
}

const LINUX_NET: [u8; 3] = [10, 231, 0];

impl Linux {
    fn new() -> Result<Self> {
        let ns = pair("bol", LINUX_NET)?;
        for n in [&ns.0, &ns.1] {
            n.run(
                "nft",
                &["-f", "-"],
                "table bridge atoll {\n  set allowed { type ifname . ether_addr . ipv4_addr . ifname; }\n  chain forward {\n    type filter hook forward priority 0; policy drop;\n    iifname . ether saddr . ip saddr . oifname @allowed accept\n  }\n}\n",
            )?;
        }
        Ok(Linux { ns, clouds: 0 })
    }

    fn grow(&mut self, n: u32) -> Result<()> {
        let (mut la, mut lb) = (String::new(), String::new());
        let (mut fa, mut fb) = (String::new(), String::new());
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        let ip = |n: u8| Ipv4Addr::new(LINUX_NET[0], LINUX_NET[1], LINUX_NET[2], n);
        for k in self.clouds..n {
            let vni = k + 2;
            let (ma, mb) = (mac(16 + 2 * k), mac(17 + 2 * k));
            for (links, fdb, local, remote, tap, here, there) in [
                (&mut la, &mut fa, ip(1), ip(2), format!("ta{k}"), ma, mb),
                (&mut lb, &mut fb, ip(2), ip(1), format!("tb{k}"), mb, ma),
            ] {
                writeln!(
                    links,
                    "link add bg{k} type bridge stp_state 0 mcast_snooping 0\n\
                     link add vx{k} type vxlan id {vni} local {local} remote {remote} dstport 4789 nolearning\n\
                     link set vx{k} master bg{k}\n\
                     tuntap add dev {tap} mode tap\n\
                     link set {tap} master bg{k}\n\
                     link set vx{k} up\nlink set {tap} up\nlink set bg{k} up"
                )?;
                writeln!(fdb, "fdb add {here} dev {tap} master static")?;
                writeln!(fdb, "fdb add {there} dev vx{k} master static")?;
            }
            sa.push(format!("\"ta{k}\" . {ma} . {A_IP} . \"vx{k}\""));
            sb.push(format!("\"vx{k}\" . {ma} . {A_IP} . \"tb{k}\""));
        }
        for (ns, links, fdb, set) in [(&self.ns.0, la, fa, sa), (&self.ns.1, lb, fb, sb)] {
            ns.run("ip", &["-batch", "-"], &links)?;
            ns.run("bridge", &["-batch", "-"], &fdb)?;
            for chunk in set.chunks(500) {
                ns.run(
                    "nft",
                    &["-f", "-"],
                    &format!(
                        "add element bridge atoll allowed {{ {} }}\n",
                        chunk.join(", ")
                    ),
                )?;
            }
        }
        self.clouds = n;
        Ok(())
    }
}

pub struct Plan {
    pub clouds: Vec<u32>,
    pub rounds: usize,
    pub pump: Duration,
}

impl Plan {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Plan {
                clouds: vec![1, 3],
                rounds: 1,
                pump: Duration::from_millis(50),
            }
        } else {
            Plan {
                clouds: vec![1, 1000],
                rounds: 5,
                pump: Duration::from_secs(1),
            }
        }
    }
}

pub fn run(plan: Plan) -> Result<Results> {
    let mut atoll = Atoll::new()?;
    let mut linux = Linux::new()?;
    let mut rows: Vec<Row> = Vec::new();
    let mut samples: Vec<(u32, usize, System, Vec<Pumped>)> = Vec::new();
    for &n in &plan.clouds {
        atoll.grow(n)?;
        linux.grow(n)?;
        // The traffic runs in the first cloud (atoll: cloud 2; the same-host one is cloud 1).
        let fds = [
            (
                System::CrossHost,
                tap(&atoll.ns.0, "a0")?,
                tap(&atoll.ns.1, "b0")?,
            ),
            (
                System::SameHost,
                tap(&atoll.ns.0, "sa")?,
                tap(&atoll.ns.0, "sb")?,
            ),
            (
                System::Linux,
                tap(&linux.ns.0, "ta0")?,
                tap(&linux.ns.1, "tb0")?,
            ),
        ];
        let gw = DataplaneConfig::default().gateway_mac;
        for _ in 0..plan.rounds {
            for &len in &FRAMES {
                for (system, tx, rx) in &fds {
                    let (dst, src) = match system {
                        System::CrossHost => (gw, mac(16)),
                        System::SameHost => (gw, mac(1)),
                        System::Linux => (mac(17), mac(16)),
                    };
                    let f = frame_to_port(len, dst, src, A_IP, B_IP, 9);
                    let p = pump_with(tx, rx, &f, plan.pump, None, |_, _| {})?;
                    match samples
                        .iter_mut()
                        .find(|s| s.0 == n && s.1 == len && s.2 == *system)
                    {
                        Some(s) => s.3.push(p),
                        None => samples.push((n, len, *system, vec![p])),
                    }
                }
            }
        }
    }
    for (clouds, frame, system, ps) in samples {
        let rounds: Vec<f64> = ps.iter().map(Pumped::pps).collect();
        if rounds.iter().all(|r| *r == 0.0) {
            bail!(
                "{} delivered nothing at {clouds} clouds, {frame}-byte frames",
                system.label()
            );
        }
        rows.push(Row {
            clouds,
            frame,
            system,
            pps: median(rounds.clone()),
            loss: median(ps.iter().map(Pumped::loss).collect()),
            rounds,
        });
    }
    // Every frame took the programs' path: the receiving host's VXLAN device got none.
    let out = atoll
        .ns
        .1
        .run("ip", &["-s", "-j", "link", "show", "dev", "vx0"], "")?;
    let stats: serde_json::Value = serde_json::from_str(&out)?;
    let through_device = stats[0]["stats64"]["rx"]["packets"].as_u64();
    if through_device != Some(0) {
        bail!("{through_device:?} frames took the receiving host's VXLAN device");
    }
    atoll.finish()?;
    drop(linux);
    Ok(Results {
        rows,
        rounds: plan.rounds,
        pump: plan.pump,
    })
}

pub fn summary(r: &Results) -> String {
    let mut s = String::from("cross-host forwarding:");
    for row in &r.rows {
        let _ = write!(
            s,
            " [{} clouds, {} B, {}: {:.0} pps, loss {:.1}%]",
            row.clouds,
            row.frame,
            row.system.label(),
            row.pps,
            row.loss * 100.0
        );
    }
    s
}

pub fn section(r: &Results) -> Result<String> {
    let mut s = String::new();
    writeln!(s, "\n{HEADING}\n")?;
    writeln!(s, "Two hosts per system as network namespaces on an underlay veth; one writer thread on the sending guest's tap, one reader on the receiving guest's (CPUs pinned). Median of {} interleaved rounds of {:?} per system and size. Method: `tests/src/bench/overlay.rs`.\n", r.rounds, r.pump)?;
    writeln!(s, "| clouds | frame | system | frames/s | loss |")?;
    writeln!(s, "|---:|---:|---|---:|---:|")?;
    for row in &r.rows {
        writeln!(
            s,
            "| {} | {} B | {} | {:.0} | {:.1}% |",
            row.clouds,
            row.frame,
            row.system.label(),
            row.pps,
            row.loss * 100.0
        )?;
    }
    let max = r.rows.iter().map(|x| x.clouds).max().unwrap_or(0);
    writeln!(s, "\n| target | frame | measured | |\n|---|---:|---|---|")?;
    for &frame in &FRAMES {
        let linux = r.ratio(max, frame, System::CrossHost, System::Linux);
        let same = r.ratio(max, frame, System::CrossHost, System::SameHost);
        let v = |x: Option<f64>, t: f64| match x {
            Some(x) if x >= t => "**met**",
            Some(_) => "**missed**",
            None => "n/a",
        };
        writeln!(
            s,
            "| across hosts ≥ 1.5× the usual overlay at {max} clouds | {frame} B | {:.2}× | {} |",
            linux.unwrap_or(0.0),
            v(linux, 1.5)
        )?;
        writeln!(
            s,
            "| across hosts ≥ 70% of same host at {max} clouds | {frame} B | {:.0}% | {} |",
            same.unwrap_or(0.0) * 100.0,
            v(same, 0.7)
        )?;
    }
    writeln!(s, "\natoll's path across hosts: `from_vm` encapsulates the frame in place (`bpf_skb_adjust_room`, the outer IPv4, UDP and VXLAN headers) and hands it to the underlay device with `bpf_redirect_neigh`; `from_underlay`, first on the receiving host's underlay device, checks and decapsulates it and redirects it to the guest's tap. Neither VXLAN device nor either host's IP and UDP stack sees the frame (GSO aggregates and frames too big for the underlay still take the VXLAN device, which segments and fragments; none in these rounds). The usual overlay passes every frame through a bridge, nftables and a VXLAN device at each end and the UDP socket path of the receiving host, hence the first target.")?;
    writeln!(s, "\nWhy across hosts stays near half of the same host (profiled once with `perf record -a -g` during the 64-byte rounds of atoll across hosts, 2026-12-06, not by this run): the writer's CPU is busy throughout and a third of its time is the wakeup of the reader (the destination tap's `sock_def_readable`, an interrupt to the reader's CPU), as in every system. Both hosts of a pair run on that one CPU here, so a frame across hosts costs it the sending host's work and also the receiving host's: the underlay veth, a backlog softirq, a second `__netif_receive_skb`, `from_underlay` (decapsulation and delivery) and the route lookup of `bpf_redirect_neigh` (about 3.5% of the CPU); the same-host forward has one receive. On two machines the receiving half runs on the other machine's CPU; that split is not measured here, and the second target is reported as measured. The programs' own part is their ns/packet in the section above (encapsulation in place and decapsulation with delivery together about a seventh of the time a frame across hosts takes here).")?;
    writeln!(s, "\n(`target/release/bench --overlay-only` prints this section's figures and writes it here.)")?;
    Ok(s)
}
