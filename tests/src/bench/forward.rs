//! Forwarding against the usual microVM host (issue 8): atoll next to taps on a Linux bridge
//! isolated by nftables, on the same clouds, the same endpoints and the same traffic, measured
//! in interleaved rounds of one run.
//!
//! **Clouds.** Every cloud has two tap endpoints, `a` (10.0.0.2) and `b` (10.0.0.3): the
//! address spaces overlap, as tenants' do. Both setups get every cloud as real taps. Traffic
//! runs in the middle cloud (index n/2), so a linear rule list is walked half way, as it is
//! for an average tenant.
//!
//! **Generator.** One thread writes frames to tap `a` with one `write` per frame, as a VMM
//! without batching does (fd non-blocking, no vnet header); another reads tap `b` and counts
//! the frames that carry the bench's marker. The path runs in the writer's system call (tun
//! receive, TC or bridge, nftables, the destination tap's queue), so when the writer stops,
//! every forwarded frame is already queued at `b` and the reader drains it without waiting.
//! Writer and reader are pinned to different CPUs. The rate is frames read per second of
//! writing; frames written but not read (dropped on the path or at a full queue) are reported
//! as loss.
//!
//! **Baseline** (a namespace of its own, so its rules touch nothing else):
//! - *bridge*: the taps on a Linux bridge (STP off, a static FDB entry per guest MAC, so
//!   nothing floods), no isolation at all: the ceiling of the bridged design. A bridge takes at
//!   most 1,023 ports (the kernel's `BR_MAX_PORTS`; the 1,024th fails with `EXFULL`), so the
//!   clouds are spread over bridges of [`CLOUDS_PER_BRIDGE`] clouds, a cloud's taps on one
//!   bridge, as an operator past a thousand taps must do. nftables' `bridge` hooks see every
//!   bridge of the namespace, so the rules are the same either way.
//! - *per-tap rules*: the same bridge with an nftables `bridge` forward chain, policy drop, one
//!   rule per tap as operators write them: `iifname T ether saddr M ip saddr A oifname P
//!   accept` (anti-spoofing and the cloud in one rule), then one such rule per tap for ARP.
//!   All IPv4 rules come before the ARP rules, which is the order most favourable to it.
//! - *set lookup*: the best nftables form: one rule, `iifname . ether saddr . ip saddr .
//!   oifname @allowed accept`, one hash lookup in a set of every allowed (port, MAC, address,
//!   peer port) tuple, whatever the number of clouds (plus the same rule for ARP). It is
//!   O(k²) in a cloud's size; with two endpoints per cloud that costs nothing here.
//!
//! Both isolating baselines and atoll are checked to drop a spoofed frame, and the baselines a
//! frame to another cloud's port, which the plain bridge delivers (so the check can fail).
//!
//! **Per-packet cost as rules grow.** nftables has no BPF_PROG_TEST_RUN, so its per-packet
//! cost is measured with the generator: ns per frame with the rules loaded minus ns per frame
//! on the plain bridge, at growing numbers of clouds in the rules (rules can name taps that
//! do not exist; the measured pair is real and in the middle). atoll's is the kernel-measured
//! run time of `from_vm` plus `to_vm` (both run per forwarded frame) from BPF_PROG_TEST_RUN.
//!
//! **Adding a cloud.** atoll: two `Host::create_endpoint` calls (spare taps from the pool,
//! refilled outside the timed region, as the agent does). Baseline: the two taps on the
//! bridge with their FDB entries (one `ip -batch` and one `bridge -batch`), and applying the
//! cloud's rules with one `nft -f -` (rules appended, or set elements added), each timed,
//! with the tools run directly in the baseline's namespace (`setns` before exec).

use std::{
    fmt::Write as _,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use atoll_agent::{
    config::DataplaneConfig,
    device::{open_tap_queue, wait_until_up},
    endpoint::{pool_process_prefix, DeviceSpec, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};
use atoll_testbed::{frame::refresh_ipv4_checksum, unique_name, LinksWithPrefix, PinRoot};

use super::{median, netns::Ns};
use crate::plot::{Chart, Series};

pub const HEADING: &str = "## Forwarding: atoll against a Linux bridge with nftables";

/// Marks the bench's frames (the first bytes of the UDP payload).
const MAGIC: &[u8; 12] = b"atoll-bench\0";
const ETH_IP_UDP: usize = 14 + 20 + 8;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// The sweep's reference frames go to this UDP port, which the chain's first rule accepts.
const REFERENCE_PORT: u16 = 10;
/// Clouds per baseline bridge: 1,000 ports of the 1,023 a bridge can take.
pub const CLOUDS_PER_BRIDGE: u32 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Atoll,
    Bridge,
    PerTap,
    Sets,
}

impl System {
    pub const ALL: [System; 4] = [System::Atoll, System::Bridge, System::PerTap, System::Sets];

    pub fn label(self) -> &'static str {
        match self {
            System::Atoll => "atoll",
            System::Bridge => "bridge, no isolation",
            System::PerTap => "bridge + nftables, rules per tap",
            System::Sets => "bridge + nftables, set lookup",
        }
    }
}

/// Sizes of one run.
pub struct Plan {
    pub clouds: Vec<u32>,
    pub frames: Vec<usize>,
    pub rounds: usize,
    pub pump: Duration,
    /// Clouds in the rules for the per-packet sweep of each nftables form.
    pub per_tap_sweep: Vec<u32>,
    pub sets_sweep: Vec<u32>,
    /// Clouds added (and timed) at each size, per baseline form.
    pub adds: usize,
}

impl Plan {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Plan {
                clouds: vec![1, 3],
                frames: vec![64, 1500],
                rounds: 1,
                pump: Duration::from_millis(50),
                per_tap_sweep: vec![1, 10],
                sets_sweep: vec![1, 10],
                adds: 1,
            }
        } else {
            Plan {
                clouds: vec![1, 100, 1000],
                frames: vec![64, 1500],
                rounds: 5,
                pump: Duration::from_secs(1),
                per_tap_sweep: vec![1, 10, 100, 1_000, 10_000],
                sets_sweep: vec![1, 100, 10_000, 100_000, 500_000],
                adds: 5,
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateRow {
    pub clouds: u32,
    pub frame: usize,
    pub system: System,
    /// Median frames per second delivered.
    pub pps: f64,
    /// Median fraction of written frames not delivered.
    pub loss: f64,
    /// Frames per second of each round, in round order.
    pub rounds: Vec<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Adds {
    pub clouds: u32,
    pub atoll: Vec<Duration>,
    pub per_tap_devices: Vec<Duration>,
    pub per_tap_rules: Vec<Duration>,
    pub sets_devices: Vec<Duration>,
    pub sets_rules: Vec<Duration>,
}

/// One size of the per-packet sweep of an nftables form (64-byte frames).
#[derive(Debug, Clone)]
pub struct SweepRow {
    pub system: System,
    /// Endpoints named in the rules.
    pub endpoints: u32,
    /// ns per frame through the rules.
    pub ns: f64,
    /// ns per frame of the reference frames, accepted by the chain's first rule.
    pub reference_ns: f64,
    /// Median over the rounds of (through the rules − reference), each pair measured back to
    /// back.
    pub added_ns: f64,
}

impl SweepRow {
    pub fn added(&self) -> f64 {
        self.added_ns
    }
}

pub struct Results {
    pub plan: Plan,
    pub rates: Vec<RateRow>,
    pub sweep: Vec<SweepRow>,
    pub adds: Vec<Adds>,
    /// Load time of the largest set-lookup rule set.
    pub largest_load: (u32, Duration),
}

impl Results {
    pub fn rate(&self, clouds: u32, frame: usize, system: System) -> Option<&RateRow> {
        self.rates
            .iter()
            .find(|r| r.clouds == clouds && r.frame == frame && r.system == system)
    }

    /// atoll's rate over `system`'s: the median over the rounds of the two rates of the same
    /// round (measured seconds apart, so drift of the machine cancels).
    pub fn ratio(&self, clouds: u32, frame: usize, system: System) -> Option<f64> {
        let a = self.rate(clouds, frame, System::Atoll)?;
        let b = self.rate(clouds, frame, system)?;
        let ratios: Vec<f64> = a.rounds.iter().zip(&b.rounds).map(|(a, b)| a / b).collect();
        (!ratios.is_empty()).then(|| median(ratios))
    }

    /// [`Results::ratio`] at the largest number of clouds.
    pub fn ratio_at_max(&self, frame: usize, system: System) -> Option<f64> {
        self.ratio(*self.plan.clouds.last()?, frame, system)
    }
}

/// One endpoint's identity, the same in both setups.
#[derive(Debug, Clone)]
struct Guest {
    name: String,
    mac: MacAddr,
    ip: Ipv4Addr,
}

#[derive(Debug, Clone)]
struct Cloud {
    index: u32,
    a: Guest,
    b: Guest,
}

impl Cloud {
    /// Cloud `index` with device names `<prefix><index hex><a|b>` (at most 15 bytes for
    /// prefixes of up to 10).
    fn new(prefix: &str, index: u32) -> Self {
        let guest = |side: &str, n: u32, ip| Guest {
            name: format!("{prefix}{index:x}{side}"),
            mac: MacAddr::local(0x00a0_0000 + n),
            ip,
        };
        Cloud {
            index,
            a: guest("a", 2 * index, A_IP),
            b: guest("b", 2 * index + 1, B_IP),
        }
    }
}

/// A UDP frame to port 9 of `len` bytes (at least headers and marker) with a valid IPv4
/// checksum.
fn frame(len: usize, dst: MacAddr, src: MacAddr, sip: Ipv4Addr, dip: Ipv4Addr) -> Vec<u8> {
    frame_to_port(len, dst, src, sip, dip, 9)
}

pub(crate) fn frame_to_port(
    len: usize,
    dst: MacAddr,
    src: MacAddr,
    sip: Ipv4Addr,
    dip: Ipv4Addr,
    port: u16,
) -> Vec<u8> {
    let len = len.max(ETH_IP_UDP + MAGIC.len());
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&sip.octets());
        ip[16..20].copy_from_slice(&dip.octets());
    }
    refresh_ipv4_checksum(&mut f);
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((len - 34) as u16).to_be_bytes());
    f[ETH_IP_UDP..ETH_IP_UDP + MAGIC.len()].copy_from_slice(MAGIC);
    f
}

pub(crate) fn is_ours(buf: &[u8], len: usize) -> bool {
    buf.len() == len && buf.get(ETH_IP_UDP..ETH_IP_UDP + MAGIC.len()) == Some(&MAGIC[..])
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Pumped {
    sent: u64,
    received: u64,
    elapsed: Duration,
}

impl Pumped {
    pub(crate) fn pps(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it, and
    // sched_setaffinity(0, ..) only changes the calling thread. A failure (one CPU) is harmless.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Reads every frame queued on `fd` (non-blocking) and returns how many were ours.
fn drain(fd: &OwnedFd, buf: &mut [u8], len: usize) -> io::Result<u64> {
    let mut ours = 0;
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            ours += u64::from(is_ours(&buf[..r as usize], len));
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(ours),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Writes `frame` to `tx` for `duration` (or `count` times) and counts it arriving on `rx`.
fn pump(
    tx: &OwnedFd,
    rx: &OwnedFd,
    frame: &[u8],
    duration: Duration,
    count: Option<u64>,
) -> Result<Pumped> {
    pump_with(tx, rx, frame, duration, count, |_, _| {})
}

/// As [`pump`], `vary(frame, n)` changing the frame before its `n`th write (e.g. a port, so
/// that every frame is a new flow; bytes the receiver's marker check reads stay as they are).
pub(crate) fn pump_with(
    tx: &OwnedFd,
    rx: &OwnedFd,
    frame: &[u8],
    duration: Duration,
    count: Option<u64>,
    vary: impl Fn(&mut [u8], u64) + Send + Sync,
) -> Result<Pumped> {
    let mut buf = vec![0u8; 4096];
    drain(rx, &mut buf, frame.len()).context("draining the receiving tap")?;
    let done = AtomicBool::new(false);
    let two_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    std::thread::scope(|s| {
        let reader = s.spawn(|| -> io::Result<u64> {
            if two_cpus {
                pin_to_cpu(1);
            }
            let mut buf = vec![0u8; 4096];
            let mut received = 0;
            loop {
                received += drain(rx, &mut buf, frame.len())?;
                if done.load(Ordering::Acquire) {
                    // Everything the writer's last call forwarded is queued by now.
                    return Ok(received + drain(rx, &mut buf, frame.len())?);
                }
                let mut pfd = libc::pollfd {
                    fd: rx.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the call; the timeout bounds the wait so the
                // reader notices `done` when nothing more arrives.
                unsafe { libc::poll(&mut pfd, 1, 20) };
            }
        });
        let writer = s.spawn(|| -> Result<(u64, Duration)> {
            pin_to_cpu(0);
            let mut frame = frame.to_vec();
            let started = Instant::now();
            let mut sent = 0u64;
            let mut failed = 0u64;
            'outer: loop {
                for _ in 0..64 {
                    if count.is_some_and(|c| sent + failed >= c) {
                        break 'outer;
                    }
                    vary(&mut frame, sent + failed);
                    // SAFETY: `frame` is valid for reads of its length for the call.
                    let r =
                        unsafe { libc::write(tx.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                    if r == frame.len() as isize {
                        sent += 1;
                    } else {
                        failed += 1;
                    }
                }
                if count.is_none() && started.elapsed() >= duration {
                    break;
                }
            }
            let elapsed = started.elapsed();
            if failed > 0 && sent == 0 {
                bail!(
                    "every write to the sending tap failed: {}",
                    io::Error::last_os_error()
                );
            }
            Ok((sent, elapsed))
        });
        let written = writer.join().expect("writer thread panicked");
        done.store(true, Ordering::Release);
        let received = reader
            .join()
            .expect("reader thread panicked")
            .context("reading the receiving tap")?;
        let (sent, elapsed) = written?;
        Ok(Pumped {
            sent,
            received,
            elapsed,
        })
    })
}

/// atoll on this host: a pinned dataplane of its own and real tap endpoints.
struct Atoll {
    rt: tokio::runtime::Runtime,
    host: Option<Host>,
    _pins: PinRoot,
    _links: LinksWithPrefix,
    _pool: LinksWithPrefix,
}

impl Atoll {
    fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let pins = PinRoot::new("fp");
        let cfg = DataplaneConfig {
            bpffs_root: pins.path().into(),
            tap_pool: 2,
            ..DataplaneConfig::default()
        };
        let host = rt.block_on(async { Host::open(&cfg) })?;
        Ok(Atoll {
            rt,
            host: Some(host),
            _pins: pins,
            // Cloud devices are named by `Baseline`'s prefix + "a"/"b" (see `Cloud::new`).
            _links: LinksWithPrefix(String::new()),
            _pool: LinksWithPrefix(pool_process_prefix()),
        })
    }

    fn host(&mut self) -> &mut Host {
        self.host.as_mut().expect("open until finish")
    }

    /// Creates the cloud's two endpoints from a full pool; returns the time of the two creates.
    fn add_cloud(&mut self, cloud: &Cloud) -> Result<Duration> {
        let rt = &self.rt;
        let host = self.host.as_mut().expect("open until finish");
        rt.block_on(async {
            host.refill_pool().await?;
            let started = Instant::now();
            for g in [&cloud.a, &cloud.b] {
                host.create_endpoint(&EndpointSpec {
                    name: g.name.clone(),
                    cloud: CloudId::new(cloud.index + 1).expect("non-zero"),
                    ipv4: g.ip,
                    mac: g.mac,
                    gateway: GATEWAY,
                    device: DeviceSpec::Tap { owner_uid: None },
                })
                .await?;
            }
            Ok(started.elapsed())
        })
    }

    fn open(&self, name: &str) -> Result<OwnedFd> {
        Ok(open_tap_queue(name, true)?)
    }

    fn wait_up(&self, name: &str) -> Result<()> {
        Ok(wait_until_up(name, Duration::from_secs(5))?)
    }

    fn finish(mut self) -> Result<()> {
        if let Some(host) = self.host.take() {
            self.rt.block_on(host.destroy())?;
        }
        Ok(())
    }
}

/// The bridge + nftables host in a namespace of its own.
struct Baseline {
    ns: Ns,
    loaded: Option<System>,
    bridges: u32,
}

impl Baseline {
    fn new() -> Result<Self> {
        Ok(Baseline {
            ns: Ns::new("fb")?,
            loaded: None,
            bridges: 0,
        })
    }

    fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<String> {
        self.ns.run(program, args, stdin)
    }

    /// Puts the clouds' taps on the bridge with static FDB entries; returns the time taken.
    /// (New bridges are created as needed; see the module docs.)
    fn add_devices(&mut self, clouds: &[Cloud]) -> Result<Duration> {
        let (mut links, mut fdb) = (String::new(), String::new());
        for c in clouds {
            let bridge = c.index / CLOUDS_PER_BRIDGE;
            while self.bridges <= bridge {
                writeln!(
                    links,
                    "link add br{b} type bridge stp_state 0 mcast_snooping 0\nlink set br{b} up",
                    b = self.bridges
                )?;
                self.bridges += 1;
            }
            for g in [&c.a, &c.b] {
                writeln!(
                    links,
                    "tuntap add dev {n} mode tap\nlink set {n} master br{bridge}\nlink set {n} up",
                    n = g.name
                )?;
                writeln!(fdb, "fdb add {} dev {} master static", g.mac, g.name)?;
            }
        }
        let started = Instant::now();
        self.run("ip", &["-batch", "-"], &links)?;
        self.run("bridge", &["-batch", "-"], &fdb)?;
        Ok(started.elapsed())
    }

    /// Replaces the rule set with `system`'s for `clouds` (no rules for the plain bridge).
    fn load(&mut self, system: System, clouds: &[Cloud]) -> Result<Duration> {
        self.load_text(system, &ruleset(system, clouds, false))
    }

    /// As `load`, with a first rule accepting the sweep's reference frames (module docs).
    fn load_with_reference(&mut self, system: System, clouds: &[Cloud]) -> Result<Duration> {
        self.load_text(system, &ruleset(system, clouds, true))
    }

    fn load_text(&mut self, system: System, text: &str) -> Result<Duration> {
        let started = Instant::now();
        self.run("nft", &["-f", "-"], text)?;
        self.loaded = Some(system);
        Ok(started.elapsed())
    }

    /// Applies one more cloud's rules to the loaded rule set.
    fn add_rules(&self, cloud: &Cloud) -> Result<Duration> {
        let text = match self.loaded {
            Some(System::PerTap) => {
                let mut t = String::new();
                for rule in per_tap_rules(std::slice::from_ref(cloud)) {
                    writeln!(t, "add rule bridge atoll forward {rule}")?;
                }
                t
            }
            Some(System::Sets) => format!(
                "add element bridge atoll allowed {{ {} }}\n",
                set_elements(std::slice::from_ref(cloud))
            ),
            other => bail!("no isolating rule set loaded ({other:?})"),
        };
        let started = Instant::now();
        self.run("nft", &["-f", "-"], &text)?;
        Ok(started.elapsed())
    }

    /// Opens a queue of tap `name` in the namespace (the tun fd's device lookup happens in the
    /// opening thread's namespace).
    fn open(&self, name: &str) -> Result<OwnedFd> {
        self.ns.open_tap(name)
    }

    /// Waits until `name` is operationally up (its queue attached and the kernel's link watch
    /// done: until then the bridge port does not forward). Polls, bounded by 5 s.
    fn wait_up(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.run("ip", &["-o", "link", "show", "dev", name], "")?;
            if out.contains("state UP") {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{name} in {} not up after 5 s: {out}",
                self.ns.name()
            );
        }
    }
}

fn per_tap_rules(clouds: &[Cloud]) -> Vec<String> {
    let mut ip = Vec::new();
    let mut arp = Vec::new();
    for c in clouds {
        for (g, peer) in [(&c.a, &c.b), (&c.b, &c.a)] {
            ip.push(format!(
                "iifname \"{}\" ether saddr {} ip saddr {} oifname \"{}\" accept",
                g.name, g.mac, g.ip, peer.name
            ));
            arp.push(format!(
                "iifname \"{}\" ether saddr {} arp saddr ip {} oifname \"{}\" accept",
                g.name, g.mac, g.ip, peer.name
            ));
        }
    }
    ip.extend(arp);
    ip
}

fn set_elements(clouds: &[Cloud]) -> String {
    let mut s = String::new();
    for c in clouds {
        for (g, peer) in [(&c.a, &c.b), (&c.b, &c.a)] {
            if !s.is_empty() {
                s.push_str(",\n");
            }
            let _ = write!(
                s,
                "\"{}\" . {} . {} . \"{}\"",
                g.name, g.mac, g.ip, peer.name
            );
        }
    }
    s
}

/// The complete rule set of one baseline form (replacing whatever was loaded); with
/// `reference`, the chain first accepts UDP to [`REFERENCE_PORT`].
fn ruleset(system: System, clouds: &[Cloud], reference: bool) -> String {
    let mut t = String::from("flush ruleset\n");
    let first = if reference {
        format!("  udp dport {REFERENCE_PORT} accept\n")
    } else {
        String::new()
    };
    match system {
        System::Atoll | System::Bridge => {}
        System::PerTap => {
            t.push_str("table bridge atoll {\n chain forward {\n  type filter hook forward priority 0; policy drop;\n");
            t.push_str(&first);
            for r in per_tap_rules(clouds) {
                t.push_str("  ");
                t.push_str(&r);
                t.push('\n');
            }
            t.push_str(" }\n}\n");
        }
        System::Sets => {
            let _ = write!(
                t,
                "table bridge atoll {{\n set allowed {{\n  type ifname . ether_addr . ipv4_addr . ifname\n  elements = {{ {} }}\n }}\n chain forward {{\n  type filter hook forward priority 0; policy drop;\n{first}  iifname . ether saddr . ip saddr . oifname @allowed accept\n  iifname . ether saddr . arp saddr ip . oifname @allowed accept\n }}\n}}\n",
                set_elements(clouds),
            );
        }
    }
    t
}

/// The measured pair of one setup: queues on `a` and `b`, and (baseline) on another cloud's
/// `b`, for the isolation checks.
struct Pair {
    a: OwnedFd,
    b: OwnedFd,
    foreign: Option<(OwnedFd, MacAddr)>,
    cloud: Cloud,
}

/// Runs the whole comparison.
pub fn run(plan: Plan) -> Result<Results> {
    let prefix = unique_name("f");
    let mut atoll = Atoll::new()?;
    atoll._links = LinksWithPrefix(prefix.clone());
    let mut baseline = Baseline::new()?;
    let gateway = atoll.host().gateway_mac();
    let mut clouds: Vec<Cloud> = Vec::new();
    let mut rates = Vec::new();
    let mut adds = Vec::new();
    let mut last_pair: Option<(Pair, Pair)> = None;
    for &n in &plan.clouds {
        // Grow both setups to n clouds.
        let new: Vec<Cloud> = (clouds.len() as u32..n.max(clouds.len() as u32))
            .map(|i| Cloud::new(&prefix, i))
            .collect();
        for c in &new {
            atoll.add_cloud(c)?;
        }
        baseline.add_devices(&new)?;
        clouds.extend(new);
        let mid = clouds[clouds.len() / 2].clone();
        let foreign =
            (clouds.len() > 1).then(|| clouds[(clouds.len() / 2 + 1) % clouds.len()].clone());
        drop(last_pair.take());
        let at = Pair {
            a: atoll.open(&mid.a.name)?,
            b: atoll.open(&mid.b.name)?,
            foreign: None,
            cloud: mid.clone(),
        };
        atoll.wait_up(&mid.a.name)?;
        atoll.wait_up(&mid.b.name)?;
        let bl = Pair {
            a: baseline.open(&mid.a.name)?,
            b: baseline.open(&mid.b.name)?,
            foreign: match &foreign {
                Some(f) => Some((baseline.open(&f.b.name)?, f.b.mac)),
                None => None,
            },
            cloud: mid.clone(),
        };
        for name in [
            Some(&mid.a.name),
            Some(&mid.b.name),
            foreign.as_ref().map(|f| &f.b.name),
        ]
        .into_iter()
        .flatten()
        {
            baseline.wait_up(name)?;
        }
        let mut samples: Vec<(usize, System, Vec<f64>, Vec<f64>)> = Vec::new();
        for round in 0..plan.rounds {
            for system in System::ALL {
                if system != System::Atoll && baseline.loaded != Some(system) {
                    baseline.load(system, &clouds)?;
                }
                if round == 0 {
                    check_isolation(system, &at, &bl, gateway)
                        .with_context(|| format!("{} with {n} clouds", system.label()))?;
                }
                for &len in &plan.frames {
                    let (pair, dst) = match system {
                        System::Atoll => (&at, gateway),
                        _ => (&bl, mid.b.mac),
                    };
                    let f = frame(len, dst, mid.a.mac, A_IP, B_IP);
                    // Warm up (caches, the receiving queue), then measure.
                    pump(&pair.a, &pair.b, &f, plan.pump / 10, None)?;
                    let p = pump(&pair.a, &pair.b, &f, plan.pump, None)?;
                    ensure!(
                        p.received > 0,
                        "{}: no {len}-byte frame arrived with {n} clouds ({} sent)",
                        system.label(),
                        p.sent
                    );
                    match samples.iter_mut().find(|s| s.0 == len && s.1 == system) {
                        Some(s) => {
                            s.2.push(p.pps());
                            s.3.push(p.loss());
                        }
                        None => samples.push((len, system, vec![p.pps()], vec![p.loss()])),
                    }
                }
            }
        }
        for (frame, system, pps, loss) in samples {
            let row = RateRow {
                clouds: n,
                frame,
                system,
                pps: median(pps.clone()),
                loss: median(loss),
                rounds: pps,
            };
            println!(
                "forwarding, {n:>5} clouds, {frame:>4} B, {:<34} {:>10.0} frames/s (loss {:.1}%)",
                system.label(),
                row.pps,
                row.loss * 100.0
            );
            rates.push(row);
        }
        // Adding clouds to the running setups: atoll, then each isolating baseline form.
        let mut a = Adds {
            clouds: n,
            ..Adds::default()
        };
        for system in [System::PerTap, System::Sets] {
            baseline.load(system, &clouds)?;
            for _ in 0..plan.adds {
                let c = Cloud::new(&prefix, clouds.len() as u32);
                a.atoll.push(atoll.add_cloud(&c)?);
                let devices = baseline.add_devices(std::slice::from_ref(&c))?;
                let rules = baseline.add_rules(&c)?;
                if system == System::PerTap {
                    a.per_tap_devices.push(devices);
                    a.per_tap_rules.push(rules);
                } else {
                    a.sets_devices.push(devices);
                    a.sets_rules.push(rules);
                }
                clouds.push(c);
            }
        }
        println!(
            "adding a cloud with {n} clouds: atoll p50 {:?}; per-tap rules: devices p50 {:?}, nft p50 {:?}; set lookup: devices p50 {:?}, nft p50 {:?}",
            p50(&a.atoll),
            p50(&a.per_tap_devices),
            p50(&a.per_tap_rules),
            p50(&a.sets_devices),
            p50(&a.sets_rules)
        );
        adds.push(a);
        last_pair = Some((at, bl));
    }

    // Per-packet cost of the nftables forms as their rules grow (64-byte frames).
    let (_, bl) = last_pair.as_ref().expect("at least one size");
    let mid = &bl.cloud;
    let through = frame(64, mid.b.mac, mid.a.mac, A_IP, B_IP);
    let reference = frame_to_port(64, mid.b.mac, mid.a.mac, A_IP, B_IP, REFERENCE_PORT);
    let ns_per_frame = |f: &[u8]| -> Result<f64> {
        pump(&bl.a, &bl.b, f, plan.pump / 10, None)?;
        let p = pump(&bl.a, &bl.b, f, plan.pump, None)?;
        ensure!(p.received > 0, "no frame arrived in the sweep");
        Ok(1e9 / p.pps())
    };
    let mut sweep = Vec::new();
    let mut largest_load = (0, Duration::ZERO);
    for (system, sizes) in [
        (System::PerTap, &plan.per_tap_sweep),
        (System::Sets, &plan.sets_sweep),
    ] {
        for &v in sizes {
            let rules = sweep_clouds(mid, v);
            let took = baseline.load_with_reference(system, &rules)?;
            if system == System::Sets {
                largest_load = (2 * v, took);
            }
            let (mut ns, mut refs, mut added) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..plan.rounds {
                let r = ns_per_frame(&reference)?;
                let t = ns_per_frame(&through)?;
                refs.push(r);
                ns.push(t);
                added.push(t - r);
            }
            let row = SweepRow {
                system,
                endpoints: 2 * v,
                ns: median(ns),
                reference_ns: median(refs),
                added_ns: median(added),
            };
            println!(
                "{}: {:>8} endpoints in the rules: {:.0} ns/frame, reference {:.0} ns/frame, added {:.0} ns (rules loaded in {took:?})",
                system.label(),
                row.endpoints,
                row.ns,
                row.reference_ns,
                row.added_ns
            );
            sweep.push(row);
        }
    }
    drop(last_pair);
    drop(baseline);
    atoll.finish()?;
    Ok(Results {
        plan,
        rates,
        sweep,
        adds,
        largest_load,
    })
}

/// `v` clouds for the rules: virtual ones (named `v<i>a`/`v<i>b`, no devices) with the real
/// measured cloud in the middle.
fn sweep_clouds(real: &Cloud, v: u32) -> Vec<Cloud> {
    let mut clouds: Vec<Cloud> = (1..v).map(|i| Cloud::new("v", i)).collect();
    clouds.insert(clouds.len() / 2, real.clone());
    clouds
}

/// A spoofed frame must not arrive in any isolating setup, and (baseline) a frame addressed
/// to another cloud's port only on the plain bridge.
fn check_isolation(system: System, atoll: &Pair, baseline: &Pair, gateway: MacAddr) -> Result<()> {
    const N: u64 = 200;
    let (pair, dst) = match system {
        System::Atoll => (atoll, gateway),
        _ => (baseline, baseline.cloud.b.mac),
    };
    let c = &pair.cloud;
    let spoofed = frame(64, dst, c.a.mac, Ipv4Addr::new(10, 0, 0, 9), B_IP);
    let got = pump(&pair.a, &pair.b, &spoofed, Duration::ZERO, Some(N))?.received;
    let isolating = system != System::Bridge;
    ensure!(
        !isolating || got == 0,
        "{got} of {N} spoofed frames were delivered"
    );
    if let (false, Some((foreign, mac))) = (system == System::Atoll, &pair.foreign) {
        let across = frame(64, *mac, c.a.mac, A_IP, B_IP);
        let got = pump(&pair.a, foreign, &across, Duration::ZERO, Some(N))?.received;
        if isolating {
            ensure!(got == 0, "{got} of {N} frames crossed into another cloud");
        } else {
            ensure!(
                got > 0,
                "the plain bridge delivered no frame across clouds: the check cannot fail"
            );
        }
    }
    Ok(())
}

fn p50(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The two plots: rate against clouds, and per-packet cost against endpoints. `atoll_ns`:
/// (endpoints, ns of `from_vm` + `to_vm`) from BPF_PROG_TEST_RUN.
pub fn charts(r: &Results, atoll_ns: &[(u32, f64)]) -> Vec<(&'static str, Chart)> {
    let mut rate = Chart {
        title: "Forwarding rate, one flow, tap to tap (higher is better)".into(),
        x_label: "clouds on the host (2 endpoints each)".into(),
        y_label: "frames per second delivered".into(),
        log_x: true,
        log_y: true,
        series: Vec::new(),
    };
    for &len in &r.plan.frames {
        for (color, system) in System::ALL.into_iter().enumerate() {
            let points = r
                .rates
                .iter()
                .filter(|x| x.frame == len && x.system == system)
                .map(|x| (f64::from(x.clouds), x.pps))
                .collect();
            rate.series.push(Series {
                name: format!("{}, {len} B", system.label()),
                points,
                dashed: len != r.plan.frames[0],
                color: Some(color),
            });
        }
    }
    let mut cost = Chart {
        title: "Per-packet cost of isolation (lower is better)".into(),
        x_label: "endpoints in the maps / rules".into(),
        y_label: "ns per packet".into(),
        log_x: true,
        log_y: true,
        series: vec![Series {
            name: "atoll: from_vm + to_vm (BPF_PROG_TEST_RUN)".into(),
            points: atoll_ns
                .iter()
                .map(|&(n, ns)| (f64::from(n), ns.max(1.0)))
                .collect(),
            dashed: false,
            color: Some(0),
        }],
    };
    for (color, system) in [(2, System::PerTap), (3, System::Sets)] {
        cost.series.push(Series {
            name: format!("{}: added per packet", system.label()),
            points: r
                .sweep
                .iter()
                .filter(|x| x.system == system)
                .map(|x| (f64::from(x.endpoints), x.added().max(1.0)))
                .collect(),
            dashed: false,
            color: Some(color),
        });
    }
    vec![("forwarding-rate.svg", rate), ("per-packet-cost.svg", cost)]
}

/// The report section; `plots` are the SVG files' paths relative to the report.
pub fn section(r: &Results, atoll_ns: &[(u32, f64)], plots: &[String]) -> String {
    let mut s = String::new();
    let _ = write_section(&mut s, r, atoll_ns, plots);
    s
}

fn write_section(
    s: &mut String,
    r: &Results,
    atoll_ns: &[(u32, f64)],
    plots: &[String],
) -> std::fmt::Result {
    let p = &r.plan;
    writeln!(s, "\n{HEADING}\n")?;
    writeln!(s, "Method: `tests/src/bench/forward.rs` (its module docs give the details). Every cloud has two tap endpoints with overlapping addresses (10.0.0.2 and .3 in every cloud), all as real taps in both setups. One flow in the middle cloud: a thread writes frames into tap `a` with one `write` per frame, as a VMM does, and another reads tap `b`; rate = frames read per second of writing, median of {} interleaved rounds of {:?} each; a ratio is the median over the rounds of the two rates of the same round. The baseline is the common Firecracker-style host: the taps on a Linux bridge (static FDB entries, STP off) in a namespace of its own, isolated by an nftables `bridge` forward chain with policy drop, written as operators write it (one anti-spoofing-and-cloud rule per tap, then one per tap for ARP), and in its best form (one rule, one hash-set lookup of (in port, MAC, address, out port)). The plain bridge without rules is the ceiling of the bridged design. Every isolating setup was checked to drop a spoofed frame, and the baselines a frame sent to another cloud's port (which the plain bridge delivers).\n", p.rounds, p.pump)?;
    writeln!(s, "| clouds | frame | atoll | bridge, no isolation | bridge + nftables, rules per tap | bridge + nftables, set lookup | atoll ÷ rules per tap | atoll ÷ set lookup |")?;
    writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for &n in &p.clouds {
        for &len in &p.frames {
            let ratio = |system| r.ratio(n, len, system).unwrap_or(f64::NAN);
            let cell = |system| {
                r.rate(n, len, system).map_or("–".to_string(), |x| {
                    if x.loss >= 0.001 {
                        format!("{} (loss {:.1}%)", fmt_rate(x.pps), x.loss * 100.0)
                    } else {
                        fmt_rate(x.pps)
                    }
                })
            };
            writeln!(
                s,
                "| {n} | {len} B | {} | {} | {} | {} | {:.2}× | {:.2}× |",
                cell(System::Atoll),
                cell(System::Bridge),
                cell(System::PerTap),
                cell(System::Sets),
                ratio(System::PerTap),
                ratio(System::Sets)
            )?;
        }
    }
    writeln!(s)?;
    writeln!(s, "Loss is frames written but never read: dropped on the path or at the receiving tap's full queue (the reader is one thread; 1500-byte frames cost it more).\n")?;
    let n = p.clouds.last().copied().unwrap_or(0);
    writeln!(s, "| target (issue 8) | measured | |")?;
    writeln!(s, "|---|---|---|")?;
    for &len in &p.frames {
        for system in [System::PerTap, System::Sets] {
            let ratio = r.ratio_at_max(len, system).unwrap_or(f64::NAN);
            writeln!(
                s,
                "| atoll ≥ 1.5× {} at {n} clouds, {len}-byte frames | {ratio:.2}× | {} |",
                system.label(),
                if ratio >= 1.5 {
                    "**met**"
                } else {
                    "**not met**"
                }
            )?;
        }
    }
    for plot in plots {
        writeln!(s, "\n![{plot}]({plot})")?;
    }
    writeln!(s, "\n### Per-packet cost as the rules grow\n")?;
    writeln!(s, "atoll: kernel-measured run time of `from_vm` plus `to_vm` per forwarded frame (BPF_PROG_TEST_RUN, 64-byte frame; the per-packet section's figures). nftables has no such facility, so its cost is measured through the generator as an A/B pair with the rules loaded: the chain's first rule accepts UDP to port {REFERENCE_PORT}, so *reference* frames to that port skip the isolation rules while the measured frames (port 9) go through them; *added* is the median over {} rounds of (measured − reference), each pair back to back. The measured pair is real and in the middle of the rules; the other clouds are named in the rules only. The difference therefore excludes the nftables hook's entry and its first rule, which both frames pay: it is the cost of the isolation rules alone, a lower bound of what nftables adds. The largest set-lookup rule set ({} endpoints) took {:.1} s to load with `nft -f`.\n", p.rounds, r.largest_load.0, r.largest_load.1.as_secs_f64())?;
    writeln!(s, "| endpoints | atoll `from_vm` + `to_vm` | nftables rules per tap: added (through / reference) | nftables set lookup: added (through / reference) |")?;
    writeln!(s, "|---:|---:|---:|---:|")?;
    let mut sizes: Vec<u32> = atoll_ns
        .iter()
        .map(|x| x.0)
        .chain(r.sweep.iter().map(|x| x.endpoints))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for e in sizes {
        let atoll = atoll_ns
            .iter()
            .find(|x| x.0 == e)
            .map_or("".into(), |x| format!("{:.1} ns", x.1));
        let nft = |system| {
            r.sweep
                .iter()
                .find(|x| x.system == system && x.endpoints == e)
                .map_or("".into(), |x| {
                    format!(
                        "{:.0} ns ({:.0} / {:.0} ns)",
                        x.added_ns, x.ns, x.reference_ns
                    )
                })
        };
        writeln!(
            s,
            "| {e} | {atoll} | {} | {} |",
            nft(System::PerTap),
            nft(System::Sets)
        )?;
    }
    writeln!(
        s,
        "\nIn the plot, added costs under 1 ns (within this machine's noise) are drawn at 1 ns."
    )?;
    writeln!(
        s,
        "\n### Adding a cloud with two endpoints to a running host\n"
    )?;
    writeln!(s, "{} clouds added at each size and for each nftables form. atoll: two `Host::create_endpoint` calls (spare taps from the pool, refilled outside the timed region, as the agent does). Baseline: the two taps on the bridge with their FDB entries (`ip -batch`, `bridge -batch`), and the cloud's rules applied with one `nft -f -`, timed apart.\n", p.adds)?;
    writeln!(s, "| clouds on the host | atoll p50 / max | per tap: devices p50 | per tap: `nft` p50 / max | set lookup: devices p50 | set lookup: `nft` p50 / max |")?;
    writeln!(s, "|---:|---:|---:|---:|---:|---:|")?;
    for a in &r.adds {
        writeln!(
            s,
            "| {} | {:.2} / {:.2} ms | {:.2} ms | {:.2} / {:.2} ms | {:.2} ms | {:.2} / {:.2} ms |",
            a.clouds,
            ms(p50(&a.atoll)),
            ms(max(&a.atoll)),
            ms(p50(&a.per_tap_devices)),
            ms(p50(&a.per_tap_rules)),
            ms(max(&a.per_tap_rules)),
            ms(p50(&a.sets_devices)),
            ms(p50(&a.sets_rules)),
            ms(max(&a.sets_rules))
        )?;
    }
    Ok(())
}

fn fmt_rate(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.2} Mpps", pps / 1e6)
    } else if pps >= 1e3 {
        format!("{:.1} kpps", pps / 1e3)
    } else {
        format!("{pps:.0} pps")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_marker_and_a_valid_checksum() {
        let f = frame(64, MacAddr::local(1), MacAddr::local(2), A_IP, B_IP);
        assert_eq!(f.len(), 64);
        assert!(is_ours(&f, 64));
        assert!(!is_ours(&f[..63], 64));
        assert_eq!(atoll_testbed::frame::checksum(&f[14..34]), 0);
        assert_eq!(
            frame(1500, MacAddr::local(1), MacAddr::local(2), A_IP, B_IP).len(),
            1500
        );
    }

    #[test]
    fn rule_sets_name_every_tap() {
        let clouds: Vec<Cloud> = (0..3).map(|i| Cloud::new("atlfx", i)).collect();
        let per_tap = ruleset(System::PerTap, &clouds, false);
        assert_eq!(per_tap.matches(" accept").count(), 12);
        assert!(per_tap.contains("iifname \"atlfx2b\" ether saddr"));
        let sets = ruleset(System::Sets, &clouds, false);
        assert_eq!(sets.matches("\" . ").count(), 6);
        assert_eq!(ruleset(System::Bridge, &clouds, false), "flush ruleset\n");
        for system in [System::PerTap, System::Sets] {
            let with = ruleset(system, &clouds, true);
            let chain = &with[with.find("policy drop;").expect("chain")..];
            let first_rule = chain.lines().nth(1).expect("a rule").trim();
            assert_eq!(first_rule, "udp dport 10 accept");
        }
        let sweep = sweep_clouds(&clouds[1], 5);
        assert_eq!(sweep.len(), 5);
        assert_eq!(sweep[2].a.name, "atlfx1a");
        assert!(clouds.iter().all(|c| c.a.name.len() <= 15));
    }
}
