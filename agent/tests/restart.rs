//! Hitless restarts, program upgrades and layout migrations of `atoll-agent run`, under a
//! steady flow of traffic between two veth guests of one cloud; plus the map shape checks.
//!
//! The flows are numbered UDP datagrams, one every 2 ms each way, sent and received by sockets
//! that live in the guests' namespaces. Every test asserts that each direction received
//! exactly what was sent (no loss, no duplicate) and that the pinned per-endpoint counters grew
//! by exactly those packets and bytes on both endpoints. Needs root.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

mod support;

use atoll_agent::{
    common::{Direction, DropReason, EndpointCounters, TrafficClass, LAYOUT_VERSION},
    config::DataplaneConfig,
    dataplane::{self, Dataplane, DataplaneError},
    endpoint::{Host, POOL_PREFIX},
    types::MacAddr,
};
use atoll_testbed::frame::echo_frame;
use atoll_testbed::{unique_name, unique_prefix, LinksWithPrefix, PinRoot};
use support::{cfg, leaves_nothing, read_frame, require_root, tap, veth_guest, VethGuest};

const CLOUD: u32 = 7;
const PORT: u16 = 5000;
/// UDP payload: an 8-byte sequence number and padding.
const PAYLOAD: usize = 64;
/// The Ethernet frame of one datagram, as the counters see it (`skb->len`).
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;
const INTERVAL: Duration = Duration::from_millis(2);
/// Upper bound for events that normally take milliseconds (failure bound, not a wait).
const BOUND: Duration = Duration::from_secs(30);
/// Datagrams each direction must deliver between two steps of a scenario.
const STEP: u64 = 150;
const MAX_ENDPOINTS: u32 = 64;

// ---------------------------------------------------------------------------------------------
// The agent process.

/// `atoll-agent run` on `config`; killed on drop.
struct Agent {
    child: Child,
    /// Log lines (stderr) up to and including the "dataplane at" line.
    startup: Vec<String>,
}

impl Agent {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_atoll-agent"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning atoll-agent run");
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut agent = Agent {
            child,
            startup: Vec::new(),
        };
        loop {
            let line = rx
                .recv_timeout(BOUND)
                .unwrap_or_else(|_| panic!("the agent did not start: {:?}", agent.startup));
            let ready = line.contains("dataplane at");
            agent.startup.push(line);
            if ready {
                break;
            }
        }
        // Keep draining its output.
        std::thread::spawn(move || rx.iter().for_each(drop));
        agent
    }

    /// The first startup event whose message starts with `prefix`, from the prefix on.
    fn line(&self, prefix: &str) -> &str {
        self.startup
            .iter()
            .find_map(|l| l.find(prefix).map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {:?}", self.startup))
    }

    fn pool_guard(&self) -> LinksWithPrefix {
        LinksWithPrefix(format!("{POOL_PREFIX}{:06x}", self.child.id()))
    }

    fn stop(mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill only sends a signal to our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
        self.child.wait().expect("waiting for the agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, pins: &Path) -> PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\nbpffs_root = \"{}\"\nmax_endpoints = {MAX_ENDPOINTS}\n\
             max_routes = {MAX_ENDPOINTS}\ntap_pool = 2\n\
             [metrics]\nenabled = false\n\
             [usage]\nenabled = true\njournal_dir = \"{}\"\ninterval_secs = 1\n\
             [control]\nmode = \"off\"\n[vm]\ndriver = \"none\"\n",
            pins.display(),
            dir.join("usage").display()
        ),
    )
    .unwrap();
    config
}

/// `atoll-agent status`: (device, ifindex) of every endpoint.
fn status(config: &Path) -> Vec<(String, u32)> {
    let out = Command::new(env!("CARGO_BIN_EXE_atoll-agent"))
        .arg("--config")
        .arg(config)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next().unwrap().to_string();
            (name, f.next().unwrap().parse().unwrap())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Steady traffic.

/// Datagrams received so far, with a wakeup per datagram.
#[derive(Default)]
struct Progress {
    received: Mutex<u64>,
    cv: Condvar,
}

impl Progress {
    fn add(&self) {
        *self.received.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    fn get(&self) -> u64 {
        *self.received.lock().unwrap()
    }

    /// Blocks until at least `n` datagrams arrived (panics after [`BOUND`]).
    fn wait_for(&self, n: u64) {
        let got = self.received.lock().unwrap();
        let (got, timeout) = self.cv.wait_timeout_while(got, BOUND, |g| *g < n).unwrap();
        assert!(
            !timeout.timed_out(),
            "only {} of {n} datagrams arrived",
            *got
        );
    }
}

/// One direction of the flow.
struct Flow {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    sender: JoinHandle<u64>,
    receiver: JoinHandle<Vec<u64>>,
    /// Told how many to expect once the sender stopped.
    expect: mpsc::Sender<u64>,
}

impl Flow {
    fn start(from: &UdpSocket, to: &UdpSocket) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let tx = from.try_clone().unwrap();
        let rx = to.try_clone().unwrap();
        let s = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut buf = [0u8; PAYLOAD];
            while !s.load(Ordering::Relaxed) {
                buf[..8].copy_from_slice(&seq.to_be_bytes());
                let n = tx.send(&buf).unwrap_or_else(|e| panic!("send {seq}: {e}"));
                assert_eq!(n, PAYLOAD);
                seq += 1;
                // The rate, not a synchronisation.
                std::thread::sleep(INTERVAL);
            }
            seq
        });
        let (expect, expected) = mpsc::channel::<u64>();
        let p = progress.clone();
        let receiver = std::thread::spawn(move || {
            rx.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut seen = Vec::new();
            let mut want = None;
            let mut idle = Duration::ZERO;
            let mut buf = [0u8; 2048];
            loop {
                if want.is_none() {
                    want = expected.try_recv().ok();
                }
                if want.is_some_and(|w| seen.len() as u64 >= w) {
                    return seen;
                }
                match rx.recv(&mut buf) {
                    Ok(n) => {
                        assert_eq!(n, PAYLOAD, "datagram size");
                        seen.push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        p.add();
                        idle = Duration::ZERO;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        idle += Duration::from_millis(100);
                        // Nothing for this long after the sender stopped: the rest is lost.
                        if want.is_some() && idle >= Duration::from_secs(5) {
                            return seen;
                        }
                    }
                    Err(e) => panic!("recv: {e}"),
                }
            }
        });
        Flow {
            stop,
            progress,
            sender,
            receiver,
            expect,
        }
    }

    /// Stops sending and returns (sent, received sequence numbers).
    fn finish(self) -> (u64, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().expect("sender");
        let _ = self.expect.send(sent);
        (sent, self.receiver.join().expect("receiver"))
    }
}

/// A UDP socket bound in the guest's namespace to its address, connected to `peer`, with a
/// receive buffer big enough for seconds of the flow.
fn guest_socket(g: &VethGuest, peer: Ipv4Addr) -> UdpSocket {
    let ip = g.ep.ipv4;
    atoll_agent::dns::netns::run_in(&g.ns.path(), move || {
        let s = UdpSocket::bind((ip, PORT))?;
        s.connect((peer, PORT))?;
        let size: libc::c_int = 8 << 20;
        // SAFETY: SO_RCVBUFFORCE reads one c_int from the pointer we pass with its size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE");
        Ok::<_, std::io::Error>(s)
    })
    .expect("entering the guest namespace")
    .expect("guest socket")
}

/// Both guests' sockets exchange one datagram each way (ARP resolved, paths up) before
/// anything is measured.
///
/// A path that is not up yet (a veth whose carrier is still coming up) may lose the first
/// datagram, so each direction is tried every 500 ms until one arrives (within [`BOUND`]);
/// then any other warm-up datagram still on its way is drained, so the measured streams see
/// only their own.
fn warm_up(a: &UdpSocket, b: &UdpSocket) {
    let mut buf = [0u8; 16];
    for (from, to) in [(a, b), (b, a)] {
        let started = std::time::Instant::now();
        to.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        loop {
            from.send(b"warm").unwrap();
            match to.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!(n, 4, "warm-up datagram");
                    break;
                }
                Err(e) if started.elapsed() < BOUND => {
                    eprintln!("warm-up datagram not there yet ({e}); sending another");
                }
                Err(e) => panic!("no warm-up datagram within {BOUND:?}: {e}"),
            }
        }
    }
    for s in [a, b] {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while s.recv(&mut buf).is_ok() {}
    }
}

fn intra(c: &EndpointCounters, d: Direction) -> (u64, u64) {
    let t = c.traffic[d as usize][TrafficClass::IntraCloud as usize];
    (t.packets, t.bytes)
}

/// Asserts one direction: everything sent arrived once, in order of sequence numbers.
fn assert_exact(name: &str, sent: u64, mut seen: Vec<u64>) {
    let received = seen.len() as u64;
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len() as u64, received, "{name}: duplicates delivered");
    let missing: Vec<u64> = (0..sent)
        .filter(|s| seen.binary_search(s).is_err())
        .collect();
    assert!(
        missing.is_empty() && received == sent,
        "{name}: sent {sent}, received {received}, lost {} (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------------
// The scenario.

/// Two veth guests of one cloud on pins under `pins`, steady flows both ways, and `steps` run
/// one after another while the flows run (each gets the config and the guests, and returns
/// while traffic still flows). Then checks loss and counters exactly.
fn with_steady_flows(tag: &str, steps: impl FnOnce(&Path, &[VethGuest; 2], &Progress, &Progress)) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Host::open spawns its netlink connection on this runtime.
    let _enter = rt.enter();
    let pins = PinRoot::new(tag);
    let _links = LinksWithPrefix(unique_prefix(tag));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), pins.path());
    let dp_cfg = cfg(&pins, MAX_ENDPOINTS, 0);
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3));
    let gw = Ipv4Addr::new(10, 0, 0, 1);
    let guests = {
        let mut host = Host::open(&dp_cfg).unwrap();
        let a = veth_guest(
            &rt,
            &mut host,
            (tag, tag),
            CLOUD,
            ip_a,
            MacAddr::local(0x702),
            gw,
        );
        let b = veth_guest(
            &rt,
            &mut host,
            (tag, tag),
            CLOUD,
            ip_b,
            MacAddr::local(0x703),
            gw,
        );
        [a, b]
    };
    let (sa, sb) = (
        guest_socket(&guests[0], ip_b),
        guest_socket(&guests[1], ip_a),
    );
    warm_up(&sa, &sb);
    let counters = || {
        let dp = Dataplane::open(&dp_cfg).unwrap();
        (
            dp.counters(guests[0].ep.slot).unwrap(),
            dp.counters(guests[1].ep.slot).unwrap(),
        )
    };
    let before = counters();
    let ab = Flow::start(&sa, &sb);
    let ba = Flow::start(&sb, &sa);
    steps(&config, &guests, &ab.progress, &ba.progress);
    let (sent_ab, seen_ab) = ab.finish();
    let (sent_ba, seen_ba) = ba.finish();
    let after = counters();
    assert_exact("a → b", sent_ab, seen_ab);
    assert_exact("b → a", sent_ba, seen_ba);
    let delta = |after: (u64, u64), before: (u64, u64)| (after.0 - before.0, after.1 - before.1);
    let from_a = delta(
        intra(&after.0, Direction::FromGuest),
        intra(&before.0, Direction::FromGuest),
    );
    let to_b = delta(
        intra(&after.1, Direction::ToGuest),
        intra(&before.1, Direction::ToGuest),
    );
    let from_b = delta(
        intra(&after.1, Direction::FromGuest),
        intra(&before.1, Direction::FromGuest),
    );
    let to_a = delta(
        intra(&after.0, Direction::ToGuest),
        intra(&before.0, Direction::ToGuest),
    );
    assert_eq!(
        from_a,
        (sent_ab, sent_ab * FRAME),
        "a's from_guest counters"
    );
    assert_eq!(to_b, (sent_ab, sent_ab * FRAME), "b's to_guest counters");
    assert_eq!(
        from_b,
        (sent_ba, sent_ba * FRAME),
        "b's from_guest counters"
    );
    assert_eq!(to_a, (sent_ba, sent_ba * FRAME), "a's to_guest counters");
    for (c, b) in [(&after.0, &before.0), (&after.1, &before.1)] {
        assert_eq!(c.drops, b.drops, "no frame of the guests was dropped");
    }
    drop((sa, sb));
    let host = Host::open(&dp_cfg).unwrap();
    rt.block_on(host.destroy()).unwrap();
    drop(guests);
}

/// Waits until each direction delivered [`STEP`] more datagrams.
fn flowing(ab: &Progress, ba: &Progress) {
    for p in [ab, ba] {
        p.wait_for(p.get() + STEP);
    }
}

/// The restarted agent found the same endpoints, same devices, nothing stale.
fn resumed(agent: &Agent, config: &Path, guests: &[VethGuest; 2]) {
    let line = agent.line("dataplane at");
    assert!(
        line.contains("with 2 endpoints (0 stale removed or repaired)"),
        "{line}"
    );
    let listed = status(config);
    for g in guests {
        let name = g.ep.name.clone().unwrap();
        assert!(
            listed.contains(&(name.clone(), g.ep.ifindex)),
            "status lists {name} with ifindex {}: {listed:?}",
            g.ep.ifindex
        );
        assert_eq!(
            atoll_agent::device::ifindex(&name),
            Some(g.ep.ifindex),
            "{name} was not recreated"
        );
    }
}

#[test]
fn restarts_lose_no_packet_and_no_count() {
    require_root();
    leaves_nothing(&["rs"], || {
        let mut pools = Vec::new();
        with_steady_flows("rs", |config, guests, ab, ba| {
            let first = Agent::start(config);
            pools.push(first.pool_guard());
            assert!(first.line("pins:").contains("(current)"));
            flowing(ab, ba);
            let st = first.stop(libc::SIGTERM);
            assert!(st.success(), "SIGTERM: the agent exits cleanly ({st})");
            flowing(ab, ba);

            let second = Agent::start(config);
            pools.push(second.pool_guard());
            resumed(&second, config, guests);
            flowing(ab, ba);
            let st = second.stop(libc::SIGKILL);
            assert!(!st.success());
            flowing(ab, ba);

            let third = Agent::start(config);
            pools.push(third.pool_guard());
            resumed(&third, config, guests);
            assert!(third.line("pins:").contains("(current)"));
            flowing(ab, ba);
            third.stop(libc::SIGTERM);
        });
        drop(pools);
    });
}

/// (pin name, program id) of every pinned link of the layout.
fn link_programs(layout: &Path) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = std::fs::read_dir(layout.join("links"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let link = aya::programs::links::PinnedLink::from_pin(&path).unwrap();
            let info = aya::programs::links::FdLink::from(link).info().unwrap();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                info.program_id(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pinned_program_ids(layout: &Path) -> [u32; 4] {
    ["from_vm", "to_vm", "from_dns", "kfree_skb"].map(|p| {
        aya::programs::ProgramInfo::from_pin(layout.join("progs").join(p))
            .unwrap()
            .id()
    })
}

/// Every link runs the pinned program of its kind.
fn links_run_pinned_programs(layout: &Path) {
    let [from_vm, to_vm, _, kfree_skb] = pinned_program_ids(layout);
    for (name, prog) in link_programs(layout) {
        let want = if name == dataplane::KFREE_SKB_LINK {
            kfree_skb
        } else if name.ends_with("-in") {
            from_vm
        } else {
            to_vm
        };
        assert_eq!(prog, want, "link {name} runs the pinned program");
    }
}

#[test]
fn program_upgrade_swaps_every_link_without_loss() {
    require_root();
    leaves_nothing(&["ug"], || {
        let mut pools = Vec::new();
        with_steady_flows("ug", |config, _guests, ab, ba| {
            let first = Agent::start(config);
            pools.push(first.pool_guard());
            flowing(ab, ba);
            first.stop(libc::SIGTERM);
            let root = config_root(config);
            let layout = dataplane::layout_dir(&root);
            let old_links = link_programs(&layout);
            let old_progs = pinned_program_ids(&layout);
            // 2 endpoints and 2 spare taps, two links each, and kfree_skb's.
            assert_eq!(old_links.len(), 9, "{old_links:?}");
            // Pretend the pinned programs came from another build.
            let marker = |id: &str| layout.join(format!("{}{id}", dataplane::BUILD_MARKER_PREFIX));
            std::fs::rename(marker(&dataplane::build_id()), marker("00000000deadbeef")).unwrap();
            flowing(ab, ba);

            let second = Agent::start(config);
            pools.push(second.pool_guard());
            let pins = second.line("pins:");
            assert!(
                pins.contains("upgraded programs from build 00000000deadbeef")
                    && pins.contains("8 links switched atomically (0 stale)"),
                "{pins}"
            );
            let new_progs = pinned_program_ids(&layout);
            for (old, new) in old_progs.iter().zip(new_progs.iter()) {
                assert_ne!(old, new, "programs were reloaded and re-pinned");
            }
            let new_links = link_programs(&layout);
            assert_eq!(
                new_links.iter().map(|l| &l.0).collect::<Vec<_>>(),
                old_links.iter().map(|l| &l.0).collect::<Vec<_>>(),
                "the same link pins (TCX links updated in place, kfree_skb's replaced)"
            );
            links_run_pinned_programs(&layout);
            assert_eq!(
                dataplane::pinned_builds(&layout).unwrap(),
                vec![dataplane::build_id()]
            );
            assert!(!layout.join("progs").join("from_vm-new").exists());
            flowing(ab, ba);
            second.stop(libc::SIGTERM);

            // The next start finds the current build: nothing to do.
            let third = Agent::start(config);
            pools.push(third.pool_guard());
            assert!(third.line("pins:").contains("(current)"));
            flowing(ab, ba);
            third.stop(libc::SIGTERM);
        });
        drop(pools);
    });
}

fn config_root(config: &Path) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    atoll_agent::config::AgentConfig::parse(&text, config)
        .unwrap()
        .dataplane
        .bpffs_root
}

#[test]
fn layout_migration_keeps_traffic_and_counters() {
    require_root();
    leaves_nothing(&["mg"], || {
        let mut pools = Vec::new();
        with_steady_flows("mg", |config, guests, ab, ba| {
            let first = Agent::start(config);
            pools.push(first.pool_guard());
            flowing(ab, ba);
            first.stop(libc::SIGTERM);
            let root = config_root(config);
            let current = dataplane::layout_dir(&root);
            let endpoints_map = map_id(&current.join("maps/ENDPOINTS"));
            // The pins of the previous layout version, as an older agent left them.
            let old = root.join(format!("v{}", LAYOUT_VERSION - 1));
            std::fs::rename(&current, &old).unwrap();
            flowing(ab, ba);

            // Other commands refuse and name the migration command.
            let out = Command::new(env!("CARGO_BIN_EXE_atoll-agent"))
                .arg("--config")
                .arg(config)
                .arg("status")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("atoll-agent migrate"), "{stderr}");

            let second = Agent::start(config);
            pools.push(second.pool_guard());
            let pins = second.line("pins:");
            assert!(
                pins.contains(&format!(
                    "migrated layout v{} to v{LAYOUT_VERSION}",
                    LAYOUT_VERSION - 1
                )) && pins.contains("8 links switched atomically (0 stale)"),
                "{pins}"
            );
            assert!(!old.exists(), "the old layout is removed");
            assert_eq!(
                map_id(&current.join("maps/ENDPOINTS")),
                endpoints_map,
                "identities stay in the very same kernel map"
            );
            assert_eq!(link_programs(&current).len(), 9);
            links_run_pinned_programs(&current);
            resumed(&second, config, guests);
            flowing(ab, ba);
            second.stop(libc::SIGKILL);
            let third = Agent::start(config);
            pools.push(third.pool_guard());
            resumed(&third, config, guests);
            flowing(ab, ba);
            third.stop(libc::SIGTERM);
        });
        drop(pools);
    });
}

fn map_id(path: &Path) -> u32 {
    aya::maps::MapInfo::from_pin(path).unwrap().id()
}

// ---------------------------------------------------------------------------------------------
// Migrating counters of another shape, and shape checks.

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

/// Creates a map with the bpf syscall (any shape, unlike an object's) and pins it at `path`.
fn create_map(path: &Path, kind: u32, key: u32, value: u32, entries: u32) -> aya::maps::MapData {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u32; 28],
    }
    let attr = CreateAttr {
        map_type: kind,
        key_size: key,
        value_size: value,
        max_entries: entries,
        rest: [0; 28],
    };
    // SAFETY: BPF_MAP_CREATE (0) reads the attribute struct we pass with its size; the fields
    // after max_entries are zero (no flags, no BTF, no name).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &attr as *const CreateAttr,
            std::mem::size_of::<CreateAttr>() as u32,
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let map = aya::maps::MapData::from_fd(fd).unwrap();
    let _ = std::fs::remove_file(path);
    map.pin(path).unwrap();
    map
}

/// Sends `n` echo frames from tap `a` to tap `b` and checks each arrives.
fn send_frames(host: &Host, a: &str, b: &str, n: usize) {
    use std::os::fd::AsRawFd;
    let (ea, eb) = {
        let eps = host.endpoints().unwrap();
        let find = |n: &str| {
            eps.iter()
                .find(|e| e.name.as_deref() == Some(n))
                .unwrap()
                .clone()
        };
        (find(a), find(b))
    };
    let qa = atoll_agent::device::open_tap_queue(a, true).unwrap();
    let qb = atoll_agent::device::open_tap_queue(b, true).unwrap();
    for name in [a, b] {
        atoll_agent::device::wait_until_up(name, Duration::from_secs(5)).unwrap();
    }
    for _ in 0..n {
        let f = echo_frame(ea.mac, host.gateway_mac(), ea.ipv4, eb.ipv4, 100);
        // SAFETY: `f` is a valid buffer of its length.
        let w = unsafe { libc::write(qa.as_raw_fd(), f.as_ptr().cast(), f.len()) };
        assert_eq!(w, f.len() as isize);
        assert_eq!(read_frame(&qb).expect("frame delivered").len(), 100);
    }
}

/// Counters of layouts 3 and 4 (before the counters kept room for new classes and reasons)
/// are carried into the current layout, each by its own migration rows.
#[tokio::test]
async fn migration_carries_counters_of_an_older_shape() {
    require_root();
    // v3: counters with 29 drop slots (360-byte values), 29 host-wide drop slots.
    carries_counters_of::<45>(3, 29).await;
    // v4: 37 drop slots (424-byte values).
    carries_counters_of::<53>(4, 37).await;
}

/// Migrates a dataplane whose `COUNTERS` and `DROPS` have layout `version`'s shape (`N`
/// words: 16 traffic words then `drop_slots`) and checks what they counted carries over.
async fn carries_counters_of<const N: usize>(version: u32, drop_slots: u32) {
    let pins = PinRoot::new("cy");
    let _links = LinksWithPrefix(unique_prefix("cy"));
    let c = cfg(&pins, 16, 0);
    let (a, b) = (unique_name("cy"), unique_name("cy"));
    let slot = {
        let mut host = Host::open(&c).unwrap();
        let ea = host.create_endpoint(&tap(&a, CLOUD, 2)).await.unwrap();
        host.create_endpoint(&tap(&b, CLOUD, 3)).await.unwrap();
        ea.slot
    };
    let old = pins.path().join(format!("v{version}"));
    std::fs::rename(dataplane::layout_dir(pins.path()), &old).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let counters = create_map(
        &old.join("maps/COUNTERS"),
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        N as u32 * 8,
        16,
    );
    let mut counters: aya::maps::PerCpuArray<_, [u64; N]> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::from_map_data(counters).unwrap()).unwrap();
    let mut words = vec![[0u64; N]; cpus];
    words[0][0] = 100; // [from_guest][intra_cloud] packets
    words[cpus - 1][1] = 9_000; // [from_guest][intra_cloud] bytes
    words[0][16 + DropReason::NoRouteInCloud as usize] = 4;
    counters
        .set(slot, aya::maps::PerCpuValues::try_from(words).unwrap(), 0)
        .unwrap();
    let drops = create_map(
        &old.join("maps/DROPS"),
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        8,
        drop_slots,
    );
    let mut drops: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::from_map_data(drops).unwrap()).unwrap();
    let mut per_cpu = vec![0u64; cpus];
    per_cpu[0] = 7;
    drops
        .set(
            DropReason::NoRouteInCloud as u32,
            aya::maps::PerCpuValues::try_from(per_cpu).unwrap(),
            0,
        )
        .unwrap();

    let prepared = dataplane::prepare(&c).unwrap();
    assert_eq!(prepared.migrated_from, Some(version));
    assert_eq!(prepared.carried, vec!["DROPS", "COUNTERS"]);
    assert_eq!(prepared.links_switched, 4);
    assert!(!old.exists());
    let carry = dataplane::layout_dir(pins.path()).join("carry");
    assert!(
        carry.join(format!("COUNTERS-v{version}")).exists()
            && carry.join(format!("DROPS-v{version}")).exists()
    );

    let mut host = Host::open(&c).unwrap();
    let read = |host: &Host| {
        let t = host.dataplane().counters(slot).unwrap();
        let from = t.traffic[Direction::FromGuest as usize][TrafficClass::IntraCloud as usize];
        (
            from.packets,
            from.bytes,
            t.drops[DropReason::NoRouteInCloud as usize],
        )
    };
    assert_eq!(read(&host), (100, 9_000, 4), "the old counters carry over");
    let host_drops = |host: &Host| {
        host.dataplane()
            .drop_counters()
            .unwrap()
            .into_iter()
            .find(|(r, _)| *r == DropReason::NoRouteInCloud)
            .unwrap()
            .1
    };
    assert_eq!(host_drops(&host), 7);
    send_frames(&host, &a, &b, 3);
    assert_eq!(read(&host), (103, 9_300, 4), "new traffic adds to them");
    host.dataplane_mut().reset_counters(slot).unwrap();
    assert_eq!(read(&host), (0, 0, 0), "a reused slot starts at zero");
    host.destroy().await.unwrap();
}

#[tokio::test]
async fn pinned_maps_of_another_shape_or_size_are_refused() {
    require_root();
    let pins = PinRoot::new("sh");
    let c = cfg(&pins, 16, 0);
    drop(Dataplane::open(&c).unwrap());
    // A configured size other than the pinned one is not applied (sizes are fixed when the
    // dataplane is created) and reported, not an error.
    let bigger = DataplaneConfig {
        max_endpoints: 32,
        ..c.clone()
    };
    let dp = Dataplane::open(&bigger).unwrap();
    assert_eq!(dp.max_endpoints(), 16, "the pinned size is used");
    drop(dp);
    assert_eq!(
        dataplane::unapplied_sizes(pins.path(), &bigger),
        vec![("max_endpoints", 32, 16)]
    );
    assert!(dataplane::unapplied_sizes(pins.path(), &c).is_empty());
    // Maps sized by one setting must agree.
    let slots = dataplane::layout_dir(pins.path()).join("maps/SLOT_ENDPOINTS");
    drop(create_map(&slots, BPF_MAP_TYPE_ARRAY, 4, 4, 8));
    let err = Dataplane::open(&c).expect_err("must refuse");
    assert!(
        matches!(
            err,
            DataplaneError::MapCapacity {
                pinned: 8,
                expected: 16,
                setting: "max_endpoints",
                ..
            }
        ),
        "{err}"
    );
    drop(create_map(&slots, BPF_MAP_TYPE_ARRAY, 4, 4, 16));
    Dataplane::open(&c).unwrap();
    // A value size this build does not expect (aya would reuse the pin without looking).
    let routes = dataplane::layout_dir(pins.path()).join("maps/ROUTES");
    drop(create_map(&routes, BPF_MAP_TYPE_HASH, 8, 12, 16));
    let err = Dataplane::open(&c).expect_err("must refuse");
    assert!(matches!(err, DataplaneError::MapMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("value size is 12 bytes, expected 16"),
        "{err}"
    );
    let err = dataplane::prepare(&c).expect_err("an upgrade refuses too");
    assert!(matches!(err, DataplaneError::MapMismatch { .. }), "{err}");
    // max_entries of a fixed-size map.
    drop(create_map(&routes, BPF_MAP_TYPE_HASH, 8, 16, 16));
    Dataplane::open(&c).unwrap();
    let drops = dataplane::layout_dir(pins.path()).join("maps/DROPS");
    drop(create_map(&drops, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 29));
    let err = Dataplane::open(&c).expect_err("must refuse");
    assert!(
        err.to_string().contains(&format!(
            "max_entries is 29, expected {}",
            atoll_dataplane_common::DROP_SLOTS
        )),
        "{err}"
    );
}

#[test]
fn older_unsupported_and_newer_layouts_are_refused() {
    require_root();
    for (version, expect) in [
        (1, "migrates only from v3"),
        (LAYOUT_VERSION + 1, "newer than this agent"),
    ] {
        let pins = PinRoot::new("ol");
        std::fs::create_dir_all(pins.path().join(format!("v{version}"))).unwrap();
        let c = cfg(&pins, 16, 0);
        let open = Dataplane::open(&c).expect_err("open refuses");
        assert!(open.to_string().contains(expect), "{open}");
        let prepare = dataplane::prepare(&c).expect_err("prepare refuses");
        assert!(prepare.to_string().contains(expect), "{prepare}");
        assert!(
            !dataplane::layout_dir(pins.path()).exists(),
            "nothing was created beside them"
        );
    }
}
