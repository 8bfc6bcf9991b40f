//! Usage records under failure, against the real kernel and the real agent binary:
//! - kill -9 of `atoll-agent run` in the middle of traffic and of exports, several times: the
//!   journaled records sum exactly to the traffic sent, no id repeats, and both sinks end up
//!   with exactly the journal's records (at least once, deduplicated by id); the HTTP sink is
//!   unreachable at first and catches up; the priced summary (`atoll usage`) matches.
//! - a full disk under the journal: a clear error, and nothing lost once space is back.
//!
//! Needs root; fails loudly otherwise.

mod support;

use std::{
    collections::{BTreeMap, HashSet},
    io::{Read, Write},
    net::TcpListener,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use atoll_agent::{
    device,
    endpoint::{EndpointError, Host},
    usage::{deliver_pending, FileSink, Recorder, UsageError, UsageEvent},
};
use atoll_testbed::frame::echo_frame;
use atoll_testbed::{run, unique_name, unique_prefix, LinksWithPrefix, PinRoot};
use support::{cfg, read_frame, require_root, tap};

/// The complete records of a journal. It may be read while the agent appends to it: a last
/// line without its newline is a record being written, not yet one.
fn events(path: &Path) -> Vec<UsageEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// Waits (bounded) until `f` holds, re-checking; panics with `what` otherwise.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `atoll-agent run`, killed on drop.
struct Agent(Child);

impl Agent {
    fn start(config: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_atoll-agent"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting atoll-agent run");
        Agent(child)
    }

    fn kill9(mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
        let _ = self.0.wait();
    }

    fn terminate(mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let st = self.0.wait().expect("waiting for the agent");
        assert!(st.success(), "agent exited with {st}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback HTTP collector that stores every POSTed body and answers 200.
fn collector(listener: TcpListener, bodies: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut s, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let body = loop {
            let Ok(n) = s.read(&mut buf) else { break None };
            if n == 0 {
                break None;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    break Some(body[..len].to_string());
                }
            }
        };
        if let Some(body) = body {
            bodies.lock().unwrap().push(body);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_traffic_and_export_loses_nothing_and_duplicates_nothing() {
    require_root();
    let pins = PinRoot::new("k9");
    let _links = LinksWithPrefix(unique_prefix("k9"));
    let work = std::env::temp_dir().join(unique_name("k9"));
    std::fs::create_dir_all(&work).unwrap();
    let journal_dir = work.join("journal");
    let file_sink = work.join("records.jsonl");
    // A port with nobody listening yet: the HTTP sink starts unreachable.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = work.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\nbpffs_root = \"{}\"\ntap_pool = 0\n[metrics]\nenabled = false\n\
             [usage]\njournal_dir = \"{}\"\ninterval_secs = 1\nfile_sink = \"{}\"\n\
             http_sink = \"http://127.0.0.1:{port}/usage\"\nhttp_timeout_secs = 2\n\
             [control]\nmode = \"off\"\n",
            pins.path().display(),
            journal_dir.display(),
            file_sink.display()
        ),
    )
    .unwrap();

    // Endpoints are made by this process before the agent runs (one journal writer at a time).
    let mut host = Host::open(&cfg(&pins, 64, 0)).unwrap();
    let (a_name, b_name, c_name) = (unique_name("k9"), unique_name("k9"), unique_name("k9"));
    let a = host.create_endpoint(&tap(&a_name, 21, 2)).await.unwrap();
    let b = host.create_endpoint(&tap(&b_name, 21, 3)).await.unwrap();
    host.create_endpoint(&tap(&c_name, 22, 2)).await.unwrap();
    let gw = host.gateway_mac();
    let qa = device::open_tap_queue(&a_name, true).unwrap();
    let qb = device::open_tap_queue(&b_name, true).unwrap();
    for n in [&a_name, &b_name] {
        device::wait_until_up(n, Duration::from_secs(2)).unwrap();
    }

    // Traffic: lock-step A -> B, each frame confirmed at B, sizes cycling through 60..1514.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (sent, stop) = (sent.clone(), stop.clone());
        let (amac, aip, bip) = (a.mac, a.ipv4, b.ipv4);
        std::thread::spawn(move || {
            let sizes = [60usize, 128, 512, 1000, 1514];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let size = sizes[i % sizes.len()];
                i += 1;
                let f = echo_frame(amac, gw, aip, bip, size);
                // SAFETY: `f` is a valid buffer.
                let n = unsafe { libc::write(qa.as_raw_fd(), f.as_ptr().cast(), f.len()) };
                assert_eq!(n, f.len() as isize, "write to tap a");
                let got = read_frame(&qb).expect("frame delivered to b");
                assert_eq!(got.len(), size);
                sent.fetch_add(size as u64, Ordering::SeqCst);
            }
        })
    };

    let journal = journal_dir.join("usage.jsonl");
    let records = || events(&journal).len();
    let mut agent = Agent::start(&config);
    // Three kill -9s at different points: mid-traffic, and while exports are being attempted
    // (the HTTP sink is down, so every tick is retrying a delivery).
    for round in 0..3 {
        let before = records();
        wait_for("a collection", Duration::from_secs(10), || {
            records() >= before + 3
        });
        std::thread::sleep(Duration::from_millis(150 * round));
        agent.kill9();
        agent = Agent::start(&config);
    }
    // The collector comes up: the HTTP sink catches up with everything.
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let stop_collector = Arc::new(AtomicBool::new(false));
    let http = {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("rebinding the sink port");
        let (b, s) = (bodies.clone(), stop_collector.clone());
        std::thread::spawn(move || collector(listener, b, s))
    };
    let before = records();
    wait_for("more collections", Duration::from_secs(10), || {
        records() >= before + 3
    });
    agent.kill9();
    agent = Agent::start(&config);
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let total = sent.load(Ordering::SeqCst);
    assert!(total > 0);
    // A clean stop journals a last periodic record and delivers.
    let before = records();
    wait_for(
        "a collection after the traffic",
        Duration::from_secs(10),
        || records() >= before + 3,
    );
    agent.terminate();

    // Deleting the endpoints journals their final records.
    host.set_usage(Recorder::open(&journal_dir, "atoll/test").unwrap());
    for n in [&a_name, &b_name, &c_name] {
        host.delete_endpoint(n).await.unwrap();
    }
    let all = events(&journal);
    let mut ids = HashSet::new();
    for e in &all {
        assert!(
            ids.insert(e.id.clone()),
            "duplicate id {} in the journal",
            e.id
        );
    }
    let sum = |ep: &str, dir: &str, class: &str| -> u64 {
        all.iter()
            .filter(|e| e.data.endpoint == ep)
            .map(|e| e.data.usage.bytes(dir, class))
            .sum()
    };
    assert_eq!(sum(&a_name, "from_guest", "intra_cloud"), total, "a sent");
    assert_eq!(sum(&b_name, "to_guest", "intra_cloud"), total, "b received");
    assert_eq!(sum(&a_name, "to_guest", "intra_cloud"), 0);
    assert_eq!(sum(&c_name, "from_guest", "intra_cloud"), 0);
    for ep in [&a_name, &b_name, &c_name] {
        let finals = all
            .iter()
            .filter(|e| &e.data.endpoint == ep && e.data.is_final)
            .count();
        assert_eq!(finals, 1, "{ep}: one final record");
        let mut seqs: Vec<u64> = all
            .iter()
            .filter(|e| &e.data.endpoint == ep)
            .map(|e| e.data.seq)
            .collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{ep}: gap-free sequence"
        );
    }

    // Both sinks: flush what the agent had not delivered yet, then compare as sets.
    let mut file = FileSink::new(file_sink.clone(), 1 << 30, 1);
    deliver_pending(&journal_dir, &mut file, 1 << 20).unwrap();
    let delivered: HashSet<String> = events(&file_sink).into_iter().map(|e| e.id).collect();
    assert_eq!(
        delivered, ids,
        "file sink has exactly the journal's records"
    );
    let mut http_sink = atoll_agent::usage::HttpSink::new(
        &format!("http://127.0.0.1:{port}/usage"),
        Duration::from_secs(2),
    )
    .unwrap();
    deliver_pending(&journal_dir, &mut http_sink, 1 << 20).unwrap();
    stop_collector.store(true, Ordering::Relaxed);
    http.join().unwrap();
    let mut http_ids = HashSet::new();
    for body in bodies.lock().unwrap().iter() {
        let batch: Vec<UsageEvent> = serde_json::from_str(body).expect("a CloudEvents JSON batch");
        http_ids.extend(batch.into_iter().map(|e| e.id));
    }
    assert_eq!(http_ids, ids, "HTTP sink has exactly the journal's records");

    // The priced summary agrees with the traffic.
    let prices_path = work.join("prices.toml");
    std::fs::write(
        &prices_path,
        "currency = \"USD\"\n[from_guest]\nintra_cloud = 2.0\n",
    )
    .unwrap();
    let prices = atoll_control::usage::Prices::load(&prices_path).unwrap();
    let report =
        atoll_control::usage::report(std::slice::from_ref(&file_sink), &prices, 0, u64::MAX)
            .unwrap();
    let line = report
        .lines
        .iter()
        .find(|l| l.cloud == 21 && l.direction == "from_guest" && l.class == "intra_cloud")
        .expect("a priced line for cloud 21");
    assert_eq!(line.bytes, total);
    let want = (total as u128 * 2_000_000 / 1_000_000_000) as f64 / 1e6;
    assert!(
        (line.cost - want).abs() < 1e-9,
        "cost {} want {want}",
        line.cost
    );
    let totals: BTreeMap<u32, f64> = report.cloud_totals();
    assert!(totals.get(&22).is_none_or(|c| *c == 0.0));

    host.destroy().await.unwrap();
    std::fs::remove_dir_all(&work).unwrap();
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name("fd"));
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir))
        .expect("mounting a tmpfs");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg(&self.0));
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test]
async fn full_disk_is_a_clear_error_and_loses_nothing() {
    require_root();
    let pins = PinRoot::new("fd");
    let _links = LinksWithPrefix(unique_prefix("fd"));
    let disk = Tmpfs::mount("64k");
    let journal_dir = disk.0.join("journal");
    let mut host = Host::open(&cfg(&pins, 16, 0)).unwrap();
    host.set_usage(Recorder::open(&journal_dir, "atoll/test").unwrap());
    let (a_name, b_name) = (unique_name("fd"), unique_name("fd"));
    let a = host.create_endpoint(&tap(&a_name, 31, 2)).await.unwrap();
    let b = host.create_endpoint(&tap(&b_name, 31, 3)).await.unwrap();
    let qa = device::open_tap_queue(&a_name, true).unwrap();
    let qb = device::open_tap_queue(&b_name, true).unwrap();
    for n in [&a_name, &b_name] {
        device::wait_until_up(n, Duration::from_secs(2)).unwrap();
    }
    let gw = host.gateway_mac();
    let mut total = 0u64;
    let mut send = |size: usize| {
        let f = echo_frame(a.mac, gw, a.ipv4, b.ipv4, size);
        // SAFETY: `f` is a valid buffer.
        let n = unsafe { libc::write(qa.as_raw_fd(), f.as_ptr().cast(), f.len()) };
        assert_eq!(n, f.len() as isize);
        assert_eq!(read_frame(&qb).expect("delivered").len(), size);
        total += size as u64;
    };
    send(100);
    host.collect_usage().unwrap();
    // Fill the disk.
    let filler = disk.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    send(700);
    let err = host.collect_usage().unwrap_err();
    assert!(
        matches!(&err, EndpointError::Usage(UsageError::AppendJournal { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("No space left"), "{err}");
    send(300);
    // Space is back: the next record covers everything since the last journaled one.
    std::fs::remove_file(&filler).unwrap();
    host.collect_usage().unwrap();
    drop((qa, qb));
    host.delete_endpoint(&a_name).await.unwrap();
    host.delete_endpoint(&b_name).await.unwrap();
    let all = events(&journal_dir.join("usage.jsonl"));
    let sum: u64 = all
        .iter()
        .filter(|e| e.data.endpoint == a_name)
        .map(|e| e.data.usage.bytes("from_guest", "intra_cloud"))
        .sum();
    assert_eq!(sum, total, "nothing lost across the full disk");
    let mut ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "no duplicate ids");
    host.destroy().await.unwrap();
}
