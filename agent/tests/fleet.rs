//! A fleet on one machine: three hosts (network namespaces, each with its own dataplane,
//! bpffs root, VXLAN device and converger), a three-member etcd cluster and two control
//! planes, all joined by one underlay (a bridge in the control namespace).
//!
//! - Two clouds with the same addresses spread over the three hosts; frames between one
//!   cloud's VMs cross between hosts (ARP answered for remote addresses, TTL one less) and the
//!   other cloud's VMs at the same addresses receive nothing.
//! - The etcd leader and the control plane every agent uses are killed: the agents move to
//!   the other control plane (`control.url` lists both), which moves to a live etcd member; a
//!   VM created then reaches its cloud's VMs on the other hosts; a VM deleted then leaves
//!   every host.
//!
//! A control plane here is the control plane's library serving its API on its own thread and
//! runtime (what `atoll serve` runs); killing it drops that runtime, which closes its
//! listener and every connection at once, as a killed process would. The agents are
//! convergers driven by the test (what `atoll-agent` runs), each in its host's namespace, so
//! their requests cross the underlay to the control planes.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use atoll_agent::{
    config::{ControlLinkConfig, ControlMode, ControlUrls, DataplaneConfig, DeviceName},
    config::{EgressConfig, OverlayConfig},
    converge::{ConvergeConfig, Converger, Remote, Source},
    dns::netns,
    endpoint::Host,
    types::CloudId,
};
use atoll_control::core::{Command as Cmd, Reply};
use atoll_control::model::{CreateCloud, CreateVm, Vm};
use atoll_testbed::{
    etcd::EtcdCluster,
    frame::{
        self,
        layers::{self, TcpHeader},
    },
    guest::{TapGuest, TAP_TTL},
    unique_name,
    wait::{assert_silent, Sink},
    NetNs, PinRoot,
};
use support::require_root;

const HOSTS: [&str; 3] = ["fa", "fb", "fc"];
const PLANES: [Ipv4Addr; 2] = [
    Ipv4Addr::new(10, 200, 0, 100),
    Ipv4Addr::new(10, 200, 0, 101),
];
const API_PORT: u16 = 7480;
/// How long the test waits for the fleet to converge before failing.
const CONVERGE: Duration = Duration::from_secs(30);

fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, u8::try_from(i + 1).unwrap())
}

fn on<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    netns::run_in(&ns.path(), f).expect("entering a namespace")
}

/// A control plane: the control plane's library on a thread and runtime of its own inside
/// the control namespace, serving HTTPS at `addr` until [`Plane::kill`] drops the runtime.
struct Plane {
    url: String,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Plane {
    fn start(ctl: &NetNs, addr: Ipv4Addr, etcd: Vec<String>, dir: &Path) -> Plane {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let ns = ctl.path();
        let dir = dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&ns).expect("the control namespace");
            // SAFETY: setns changes only this thread's network namespace (and that of the
            // runtime's threads, which it creates); the fd is open.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let served = async {
                    let mut cfg = atoll_control::config::ControlConfig {
                        operator_token_file: dir.join("operator.token"),
                        ..Default::default()
                    };
                    cfg.store.backend = atoll_control::config::StoreBackend::Etcd;
                    cfg.store.etcd_endpoints = etcd;
                    cfg.store.etcd_prefix = "/fleet/".into();
                    cfg.clouds.ingress_pool = vec!["198.18.1.16/28".parse().unwrap()];
                    let core = cfg.start().await.map_err(|e| e.to_string())?;
                    let names: Vec<String> = PLANES.iter().map(Ipv4Addr::to_string).collect();
                    let (paths, _, _) =
                        atoll_control::tls::ensure_generated(&dir.join("tls"), &names)
                            .map_err(|e| e.to_string())?;
                    let tls = atoll_control::tls::server_config(&paths.cert_file, &paths.key_file)
                        .map_err(|e| e.to_string())?;
                    let listener =
                        tokio::net::TcpListener::bind(SocketAddr::from((addr, API_PORT)))
                            .await
                            .map_err(|e| e.to_string())?;
                    Ok::<_, String>((core, listener, tls))
                };
                match served.await {
                    Ok((core, listener, tls)) => {
                        ready_tx.send(Ok(())).unwrap();
                        tokio::select! {
                            r = atoll_control::api::serve_tls(
                                core,
                                listener,
                                atoll_control::api::Limits::default(),
                                Some(tls),
                                std::future::pending(),
                            ) => panic!("the API server stopped: {r:?}"),
                            _ = killed => {}
                        }
                    }
                    Err(e) => ready_tx.send(Err(e)).unwrap(),
                }
            });
            // Dropping the runtime here drops every task: the listener, the connections, the
            // store's watch.
        });
        ready_rx
            .recv()
            .expect("the control plane's thread")
            .expect("starting a control plane");
        Plane {
            url: format!("https://{addr}:{API_PORT}"),
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("the control plane's thread");
        }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One host: its namespace, dataplane and converger (and the source it syncs through).
struct Agent {
    name: &'static str,
    ns: NetNs,
    host: Host,
    conv: Converger,
    cfg: ConvergeConfig,
    remote: Remote,
}

/// Host `i`'s dataplane, opened on its pins (adopting what they hold), with the overlay on,
/// as the agent does at start.
fn open_host(rt: &tokio::runtime::Runtime, ns: &NetNs, pins: &PinRoot, i: usize) -> Host {
    on(ns, || {
        let mut host = {
            let _entered = rt.enter();
            Host::open(&support::cfg(pins, 64, 0)).expect("opening a dataplane")
        };
        let cfg = OverlayConfig {
            enabled: true,
            underlay: Some(underlay(i)),
            device: DeviceName::new("vx0").unwrap(),
            ..OverlayConfig::default()
        };
        rt.block_on(atoll_agent::overlay::enable(
            &mut host,
            &cfg,
            &EgressConfig::default(),
        ))
        .expect("enabling the overlay");
        host
    })
}

/// The agent's own settings for the control planes: both URLs, the generated CA.
fn link(urls: &[String], dir: &Path) -> ControlLinkConfig {
    ControlLinkConfig {
        mode: ControlMode::Remote,
        url: ControlUrls(urls.to_vec()),
        ca_file: Some(dir.join("tls").join("ca.pem")),
        ..Default::default()
    }
}

/// Runs `cmd` as the operator from the control namespace, as the CLI would: a new client for
/// each command, trying the control planes in order.
fn api(rt: &tokio::runtime::Runtime, ctl: &NetNs, urls: &[String], dir: &Path, cmd: Cmd) -> Reply {
    let token = std::fs::read_to_string(dir.join("operator.token")).unwrap();
    let op = Remote::new(link(urls, dir).clients(&token).unwrap(), None);
    on(ctl, || {
        rt.block_on(atoll_api::ControlPlane::execute(&op, cmd))
            .expect("an operator command")
    })
}

/// Syncs and applies on every host until `done` holds (bounded by [`CONVERGE`]).
fn converge_until(
    rt: &tokio::runtime::Runtime,
    agents: &mut [Agent],
    what: &str,
    done: impl Fn(&[Agent]) -> bool,
) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        for a in agents.iter_mut() {
            let (conv, host) = (&mut a.conv, &mut a.host);
            on(&a.ns, || {
                rt.block_on(async {
                    let delta = conv
                        .next_delta(Duration::from_millis(200))
                        .await
                        .expect("a sync");
                    conv.apply(host, delta).await.expect("applying a sync");
                })
            });
        }
        if done(agents) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet did not converge: {what}"
        );
    }
}

/// Whether every host other than `vm`'s routes `vm`'s address in its cloud to `vm`'s host.
fn routed_everywhere(agents: &[Agent], vm: &Vm) -> bool {
    let at = underlay(HOSTS.iter().position(|h| *h == vm.host).unwrap());
    agents.iter().filter(|a| a.name != vm.host).all(|a| {
        on(&a.ns, || a.host.remote_endpoints())
            .unwrap()
            .iter()
            .any(|&(c, ip, _, via)| c == vm.cloud && ip == vm.ipv4 && via == at)
    })
}

/// The tap of `vm` on its host, attached as its VMM would.
fn tap(agents: &[Agent], vm: &Vm) -> TapGuest {
    let a = agents.iter().find(|a| a.name == vm.host).unwrap();
    let ep = on(&a.ns, || a.host.endpoints())
        .unwrap()
        .into_iter()
        .find(|e| e.cloud == vm.cloud && e.ipv4 == vm.ipv4)
        .unwrap_or_else(|| panic!("{}'s endpoint on {}", vm.name, vm.host));
    let name = ep.name.clone().expect("a named tap");
    let gw = DataplaneConfig::default().gateway_mac.0;
    on(&a.ns, || {
        TapGuest::attach(
            &format!("{}@{}", vm.name, vm.host),
            &name,
            ep.mac.0,
            vm.ipv4,
            gw,
        )
    })
}

/// `from` resolves `to`'s address (answered on its own host) and sends it a datagram, an
/// echo request and a TCP connection's first segment, which `to` answers (its SYN-ACK goes
/// back across); all arrive, one hop on.
fn reaches(from: &TapGuest, to: &TapGuest, what: &str) {
    from.send(&from.arp_request(to.ip));
    from.expect_arp_reply(to.ip);
    from.send(&from.udp(to.ip, 5000, 6000, what.as_bytes()));
    let packet = to.expect_ipv4(what, from.ip, TAP_TTL - 1);
    assert!(atoll_testbed::frame::layers::contains(
        &packet,
        what.as_bytes()
    ));
    from.send(&from.icmp_echo(to.ip, 7, 1, what.as_bytes()));
    to.expect_ipv4(what, from.ip, TAP_TTL - 1);
    let segment = |g: &TapGuest, dst: Ipv4Addr, (sport, dport): (u16, u16), flags, ack| {
        let tcp = TcpHeader {
            sport,
            dport,
            seq: 1000,
            ack,
            flags,
            options: vec![],
        }
        .segment(g.ip, dst, &[]);
        g.eth_ipv4(&layers::ipv4(g.ip, dst, TAP_TTL, layers::PROTO_TCP, &tcp))
    };
    from.send(&segment(from, to.ip, (40000, 80), frame::TCP_SYN, 0));
    let syn = to.expect_ipv4(what, from.ip, TAP_TTL - 1);
    assert_eq!(syn[9], layers::PROTO_TCP, "{what}: a TCP SYN");
    to.send(&segment(
        to,
        from.ip,
        (80, 40000),
        frame::TCP_SYN | frame::TCP_ACK,
        1001,
    ));
    let syn_ack = from.expect_ipv4(what, to.ip, TAP_TTL - 1);
    assert_eq!(syn_ack[9], layers::PROTO_TCP, "{what}: a TCP SYN-ACK");
}

fn create_vm(
    rt: &tokio::runtime::Runtime,
    ctl: &NetNs,
    urls: &[String],
    dir: &Path,
    cloud: CloudId,
    name: &str,
) -> Vm {
    let Reply::Vm(vm) = api(
        rt,
        ctl,
        urls,
        dir,
        Cmd::CreateVm {
            cloud,
            spec: CreateVm::named(name),
        },
    ) else {
        panic!("creating a VM")
    };
    *vm
}

#[test]
fn a_fleet_keeps_working_without_an_etcd_member_and_a_control_plane() {
    require_root();
    support::leaves_nothing(&["fxh", "fxp", "fxt"], || {
        let dir = tempfile::tempdir().unwrap();
        // The control namespace: the underlay's bridge, the control planes' addresses, etcd.
        let ctl = NetNs::new(&unique_name("fxh")).unwrap();
        let mut script =
            String::from("ip link set lo up && ip link add sw0 type bridge && ip link set sw0 up");
        for p in PLANES {
            script += &format!(" && ip addr add {p}/24 dev sw0");
        }
        ctl.sh(&script).unwrap();
        let hosts: Vec<NetNs> = (0..HOSTS.len())
            .map(|i| {
                let ns = NetNs::new(&unique_name("fxh")).unwrap();
                ns.sh(&format!(
                    "ip link set lo up && ip link add under0 type veth peer name h{i} netns {ctl} \
                     && ip addr add {}/24 dev under0 && ip link set under0 up",
                    underlay(i),
                    ctl = ctl.name()
                ))
                .unwrap();
                ctl.sh(&format!(
                    "ip link set h{i} master sw0 && ip link set h{i} up"
                ))
                .unwrap();
                ns
            })
            .collect();

        let cluster = EtcdCluster::start(ctl.name(), 3);
        let leader = cluster.wait_for_leader();
        // Both control planes try the leader first, so killing it makes them move on.
        let mut endpoints = cluster.endpoints();
        endpoints.rotate_left(leader);
        let mut planes: Vec<Plane> = PLANES
            .iter()
            .map(|&p| Plane::start(&ctl, p, endpoints.clone(), dir.path()))
            .collect();
        let urls: Vec<String> = planes.iter().map(|p| p.url.clone()).collect();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pins: Vec<PinRoot> = HOSTS.iter().map(|_| PinRoot::new("fxp")).collect();
        let mut agents: Vec<Agent> = Vec::new();
        for (i, (name, ns)) in HOSTS.into_iter().zip(hosts).enumerate() {
            let Reply::HostToken(t) = api(
                &rt,
                &ctl,
                &urls,
                dir.path(),
                Cmd::IssueHostToken { host: name.into() },
            ) else {
                panic!("a host token")
            };
            let token_file: PathBuf = dir.path().join(format!("{name}.token"));
            std::fs::write(&token_file, &t.token).unwrap();
            let remote = Remote::new(
                link(&urls, dir.path()).clients(&t.token).unwrap(),
                Some(token_file),
            );
            let source = Source::new(remote.clone());
            let host = open_host(&rt, &ns, &pins[i], i);
            on(&ns, || {
                rt.block_on(async {
                    source.register(name).await.unwrap();
                    source.register_underlay(name, underlay(i)).await.unwrap();
                })
            });
            let cfg = ConvergeConfig {
                host: name.into(),
                tap_prefix: unique_name("fxt"),
                volumes_dir: dir.path().join(name),
            };
            let conv = Converger::new(cfg.clone(), source, None);
            agents.push(Agent {
                name,
                ns,
                host,
                cfg,
                conv,
                remote,
            });
        }

        // Two clouds with the same addresses, each spread over the three hosts.
        let mut clouds = Vec::new();
        for _ in 0..2 {
            let Reply::CreatedCloud(c) = api(
                &rt,
                &ctl,
                &urls,
                dir.path(),
                Cmd::CreateCloud {
                    spec: CreateCloud::default(),
                },
            ) else {
                panic!("creating a cloud")
            };
            let vms: Vec<Vm> = ["one", "two", "three"]
                .iter()
                .map(|n| create_vm(&rt, &ctl, &urls, dir.path(), c.cloud.id, n))
                .collect();
            let mut on_hosts: Vec<&str> = vms.iter().map(|v| v.host.as_str()).collect();
            on_hosts.sort_unstable();
            assert_eq!(on_hosts, HOSTS, "one VM of each cloud per host: {vms:?}");
            clouds.push(vms);
        }
        let (x, y) = (&clouds[0], &clouds[1]);
        assert_eq!(
            x.iter().map(|v| v.ipv4).collect::<Vec<_>>(),
            y.iter().map(|v| v.ipv4).collect::<Vec<_>>(),
            "the clouds' address spaces overlap"
        );
        converge_until(
            &rt,
            &mut agents,
            "every VM routed on every other host",
            |a| clouds.iter().flatten().all(|vm| routed_everywhere(a, vm)),
        );
        let x_taps: Vec<TapGuest> = x.iter().map(|vm| tap(&agents, vm)).collect();
        let y_taps: Vec<TapGuest> = y.iter().map(|vm| tap(&agents, vm)).collect();
        for (i, from) in x_taps.iter().enumerate() {
            for (j, to) in x_taps.iter().enumerate() {
                if i != j {
                    reaches(from, to, &format!("{} to {}", from.label, to.label));
                }
            }
        }
        let y_sinks: Vec<Sink> = y_taps.iter().map(Sink::Tap).collect();
        assert_silent(&y_sinks, "the other cloud, at the same addresses");

        // Host fa's agent restarts (its dataplane dropped, then opened again from its pins,
        // and a new converger starting from a full sync) while the VM on fb sends to the VM
        // on fc: every frame arrives, in order.
        let on_host = |h: &str| x.iter().position(|v| v.host == h).unwrap();
        let (from, to) = (&x_taps[on_host("fb")], &x_taps[on_host("fc")]);
        const STREAM: u16 = 200;
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                for n in 0..STREAM {
                    from.send(&from.udp(to.ip, 5000, 6000, &n.to_be_bytes()));
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let i = agents.iter().position(|a| a.name == "fa").unwrap();
            let Agent {
                name,
                ns,
                host,
                conv,
                cfg,
                remote,
            } = agents.remove(i);
            drop((host, conv));
            let host = open_host(&rt, &ns, &pins[i], i);
            let conv = Converger::new(cfg.clone(), Source::new(remote.clone()), None);
            agents.insert(
                i,
                Agent {
                    name,
                    ns,
                    host,
                    conv,
                    cfg,
                    remote,
                },
            );
            sender.join().unwrap();
        });
        for n in 0..STREAM {
            use atoll_testbed::frame::layers;
            let packet = to.expect_ipv4("the stream across the restart", from.ip, TAP_TTL - 1);
            let ip = layers::parse_ipv4(&packet).expect("IPv4");
            let udp = layers::parse_udp(&ip).expect("UDP");
            assert_eq!(
                udp.payload,
                n.to_be_bytes(),
                "frame {n} of the stream, in order"
            );
        }
        converge_until(&rt, &mut agents, "the restarted agent caught up", |a| {
            x.iter().all(|vm| routed_everywhere(a, vm))
        });
        // And host fa's own VM still reaches the others, and is reached.
        let fa = &x_taps[on_host("fa")];
        reaches(fa, to, "fa to fc after the restart");
        reaches(from, fa, "fb to fa after the restart");

        // The etcd leader and the control plane the agents use go.
        assert!(agents.iter().all(|a| a.remote.current() == urls[0]));
        cluster.kill(leader);
        planes[0].kill();
        let new_leader = cluster.wait_for_leader();
        assert_ne!(new_leader, leader);

        let four = create_vm(&rt, &ctl, &urls, dir.path(), x[0].cloud, "four");
        converge_until(
            &rt,
            &mut agents,
            "the new VM routed on every other host",
            |a| routed_everywhere(a, &four),
        );
        assert!(
            agents.iter().all(|a| a.remote.current() == urls[1]),
            "every agent moved to the live control plane"
        );
        let four_tap = tap(&agents, &four);
        for (vm, t) in x.iter().zip(&x_taps) {
            if vm.host != four.host {
                reaches(&four_tap, t, &format!("four to {}", t.label));
                reaches(t, &four_tap, &format!("{} to four", t.label));
            }
        }
        assert_silent(&y_sinks, "the other cloud, after the failover");

        // A VM deleted now leaves every host.
        let two = x[1].clone();
        api(
            &rt,
            &ctl,
            &urls,
            dir.path(),
            Cmd::DeleteVm {
                cloud: two.cloud,
                vm: two.name.clone(),
            },
        );
        converge_until(&rt, &mut agents, "the deleted VM gone everywhere", |a| {
            a.iter().all(|ag| {
                let (remote, local) = on(&ag.ns, || {
                    (
                        ag.host.remote_endpoints().unwrap(),
                        ag.host.endpoints().unwrap(),
                    )
                });
                !remote
                    .iter()
                    .any(|&(c, ip, _, _)| c == two.cloud && ip == two.ipv4)
                    && !local
                        .iter()
                        .any(|e| e.cloud == two.cloud && e.ipv4 == two.ipv4)
            })
        });
        drop((x_taps, y_taps, four_tap));
        drop(agents);
        drop(planes);
        drop(cluster);
        drop(pins);
    });
}
