//! A host converging to the control plane: VMs created through the core become live endpoints
//! (real taps, real maps), volumes become sparse files, deletes and cloud deletion remove
//! everything, and a restarted agent adopts what it has instead of recreating it. Also the
//! whole agent binary with its embedded control plane, driven over HTTP, with a guest on an
//! API-created VM's tap resolving names through the host's DNS server. Needs root.

use atoll_api::routes;
use atoll_api::Command;
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

mod support;

use atoll_agent::{
    config::VmConfig,
    converge::{ConvergeConfig, Converger, Remote, Source},
    endpoint::{Host, ServiceSpec, PROTOCOL_TCP},
    types::MacAddr,
    vm::{qemu::Accel, Driver, VmError, VmManager, VmPlan, VmmCommand},
};
use atoll_control::{
    core::{Command as Cmd, Core, Embedded, Principal, Reply},
    model::*,
};
use atoll_testbed::{
    frame::{self, Udp},
    unique_prefix, LinksWithPrefix, PinRoot,
};
use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use hyper::Method;
use serde_json::{json, Value};
use support::{cfg, control_plane, require_root, serve_api};

async fn exec(core: &Core, cmd: Cmd) -> Reply {
    core.execute(Principal::Operator, cmd)
        .await
        .expect("command")
}

fn vm(name: &str) -> CreateVm {
    CreateVm::named(name)
}

/// Syncs and applies until the host has applied everything the store holds now.
async fn step(
    core: &Core,
    c: &mut Converger,
    host: &mut Host,
) -> atoll_agent::converge::ApplyStats {
    let target = core.store().revision().await.unwrap();
    let mut total = atoll_agent::converge::ApplyStats::default();
    loop {
        let delta = c.next_delta(Duration::from_secs(5)).await.expect("sync");
        let s = c.apply(host, delta).await.expect("apply");
        total.created += s.created;
        total.deleted += s.deleted;
        total.failed += s.failed;
        if c.revision() >= target {
            return total;
        }
    }
}

fn sparse_size(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.len(), m.blocks() * 512)
}

#[tokio::test]
async fn vms_volumes_and_clouds_converge_onto_the_host() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pins = PinRoot::new("cv");
    let prefix = unique_prefix("v");
    let _links = LinksWithPrefix(prefix.clone());
    let core = control_plane(dir.path()).await;
    let conv_cfg = ConvergeConfig {
        host: "h1".into(),
        tap_prefix: prefix.clone(),
        volumes_dir: dir.path().join("volumes"),
    };
    let source = Source::new(Embedded(core.clone()));
    source.register("h1").await.unwrap();
    let mut host = Host::open(&cfg(&pins, 64, 2)).unwrap();
    let mut conv = Converger::new(conv_cfg.clone(), source.clone(), None);
    assert_eq!(
        step(&core, &mut conv, &mut host).await.created,
        0,
        "nothing yet"
    );

    let Reply::CreatedCloud(a) = exec(
        &core,
        Cmd::CreateCloud {
            spec: CreateCloud::default(),
        },
    )
    .await
    else {
        panic!()
    };
    let Reply::CreatedCloud(b) = exec(
        &core,
        Cmd::CreateCloud {
            spec: CreateCloud::default(),
        },
    )
    .await
    else {
        panic!()
    };
    let (a, b) = (a.cloud.id, b.cloud.id);
    exec(
        &core,
        Cmd::CreateVm {
            cloud: a,
            spec: vm("web"),
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateVm {
            cloud: a,
            spec: vm("db"),
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateVm {
            cloud: b,
            spec: vm("web"),
        },
    )
    .await;
    let raw = CreateVolume {
        name: "data".into(),
        size_gib: 2,
        format: VolumeFormat::Raw,
    };
    let qcow = CreateVolume {
        name: "img".into(),
        size_gib: 1,
        format: VolumeFormat::Qcow2,
    };
    exec(
        &core,
        Cmd::CreateVolume {
            cloud: a,
            spec: raw,
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateVolume {
            cloud: a,
            spec: qcow,
        },
    )
    .await;

    let stats = step(&core, &mut conv, &mut host).await;
    assert_eq!((stats.created, stats.failed), (3, 0), "{stats:?}");
    let eps = host.endpoints().unwrap();
    let mut idents: Vec<(u32, Ipv4Addr)> = eps.iter().map(|e| (e.cloud.get(), e.ipv4)).collect();
    idents.sort();
    let mut want = vec![
        (a.get(), Ipv4Addr::new(10, 0, 0, 2)),
        (a.get(), Ipv4Addr::new(10, 0, 0, 3)),
        (b.get(), Ipv4Addr::new(10, 0, 0, 2)),
    ];
    want.sort();
    assert_eq!(
        idents, want,
        "overlapping addresses in two clouds, each live"
    );
    for e in &eps {
        assert!(e.name.as_deref().unwrap().starts_with(&prefix));
        assert_eq!(e.gateway, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(e.mac.to_string(), guest_mac(e.ipv4));
    }
    // The host reported them; the API shows them ready, with their device.
    let Reply::Vm(web) = exec(
        &core,
        Cmd::GetVm {
            cloud: a,
            vm: "web".into(),
        },
    )
    .await
    else {
        panic!()
    };
    let status = web.status.unwrap();
    assert_eq!(status.state, VmState::NetworkReady);
    assert!(eps.iter().any(|e| e.name == status.device));
    // Volumes: sparse files of the right size; qcow2 with its magic.
    let vdir = dir.path().join("volumes").join(a.to_string());
    let (len, used) = sparse_size(&vdir.join("data.raw"));
    assert_eq!(len, 2 << 30);
    assert!(
        used < 1 << 20,
        "raw volume is sparse ({used} bytes allocated)"
    );
    let head = std::fs::read(vdir.join("img.qcow2")).unwrap();
    assert_eq!(&head[..4], b"QFI\xfb", "qcow2 magic");

    // A published port reaches the VM's host.
    let Reply::Publication(published) = exec(
        &core,
        Cmd::Publish {
            cloud: b,
            spec: atoll_api::model::Publish {
                vm: "web".into(),
                protocol: atoll_api::model::Protocol::Tcp,
                port: 80,
                allow_from: vec!["198.19.0.0/16".parse().unwrap()],
            },
        },
    )
    .await
    else {
        panic!()
    };
    step(&core, &mut conv, &mut host).await;
    let on_host = host.published().unwrap();
    assert_eq!(on_host.len(), 1, "{on_host:?}");
    assert_eq!(
        (on_host[0].cloud, on_host[0].guest, on_host[0].public),
        (b, (Ipv4Addr::new(10, 0, 0, 2), 80), (published.address, 80))
    );
    assert_eq!(on_host[0].allow_from.len(), 1);
    let serial = host.dataplane().ingress_entries().unwrap()[0].1.serial;

    // A restarted agent (no local state) adopts the endpoints: nothing is recreated or lost.
    drop(conv);
    drop(host);
    let mut host = Host::open(&cfg(&pins, 64, 2)).unwrap();
    let mut conv = Converger::new(conv_cfg.clone(), source.clone(), None);
    let stats = step(&core, &mut conv, &mut host).await;
    assert_eq!((stats.created, stats.deleted), (0, 0), "{stats:?}");
    assert_eq!(host.endpoints().unwrap().len(), 3);
    assert_eq!(
        host.dataplane().ingress_entries().unwrap()[0].1.serial,
        serial,
        "an unchanged publication is kept (its connections go on)"
    );
    // Unpublished: it goes from the host.
    exec(
        &core,
        Cmd::Unpublish {
            cloud: b,
            publication: published.name.clone(),
        },
    )
    .await;
    step(&core, &mut conv, &mut host).await;
    assert!(host.published().unwrap().is_empty());

    // Delete one VM: its endpoint goes with the next delta.
    exec(
        &core,
        Cmd::DeleteVm {
            cloud: a,
            vm: "db".into(),
        },
    )
    .await;
    let stats = step(&core, &mut conv, &mut host).await;
    assert_eq!(stats.deleted, 1);
    assert_eq!(host.endpoints().unwrap().len(), 2);

    // Delete cloud A: its endpoint and volume files go; B is untouched.
    exec(&core, Cmd::DeleteCloud { cloud: a }).await;
    let stats = step(&core, &mut conv, &mut host).await;
    assert_eq!(stats.deleted, 1);
    let eps = host.endpoints().unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].cloud.get(), b.get());
    assert!(!vdir.exists(), "cloud A's volume directory is gone");

    exec(&core, Cmd::DeleteCloud { cloud: b }).await;
    step(&core, &mut conv, &mut host).await;
    assert!(host.endpoints().unwrap().is_empty());
    host.destroy().await.unwrap();
}

/// The agent binary with its embedded control plane (the single-host default): a VM created
/// over HTTP is live on the host, and deleting its cloud removes it. All of it happens while
/// 50 idle and 50 slowloris connections are held open against the agent's API: the agent that
/// embeds the API keeps serving and converging.
#[tokio::test]
async fn agent_with_embedded_control_plane_serves_the_api() {
    require_root();
    let mut guard = support::EmbeddedAgent::start("ce", "");
    let prefix = guard.prefix.clone();
    let _abuse = support::HeldConnections::open(
        guard.url.trim_start_matches("https://").parse().unwrap(),
        50,
        50,
    );
    let op = guard.client(&guard.token);
    let hosts: Vec<HostInfo> = op.run(&Command::ListHosts).await.unwrap();
    assert_eq!(
        hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
        ["solo"]
    );
    // Another cloud with a VM of its own (same address range): its name must not resolve
    // from the first cloud.
    let other: CreatedCloud = op
        .run(&Command::CreateCloud {
            spec: serde_json::from_value(json!({"name": "other"})).unwrap(),
        })
        .await
        .unwrap();
    let oc = guard.client(&other.token);
    let other_vm: Vm = oc
        .run(&Command::CreateVm {
            cloud: other.cloud.id,
            spec: serde_json::from_value(json!({"name": "b1"})).unwrap(),
        })
        .await
        .unwrap();
    let created: CreatedCloud = op
        .run(&Command::CreateCloud {
            spec: serde_json::from_value(json!({"name": "e2e"})).unwrap(),
        })
        .await
        .unwrap();
    let cc = guard.client(&created.token);
    let id = created.cloud.id;
    // A user record, committed before the VM: once the VM is reported ready, the host has
    // applied every earlier change, this record included.
    let _: Value = cc
        .call(
            Method::PUT,
            &routes::PUT_RECORD_SET.at(&[&id, &"api", &"A"]),
            Some(&json!({"values": ["10.0.7.7"]})),
        )
        .await
        .unwrap();
    let vm: Vm = cc
        .run(&Command::CreateVm {
            cloud: id,
            spec: serde_json::from_value(json!({"name": "a1"})).unwrap(),
        })
        .await
        .unwrap();
    // The agent reports the VM ready once its endpoint is live; observe it via the API.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let device = loop {
        let v: Vm = cc
            .run(&Command::GetVm {
                cloud: id,
                vm: "a1".to_string(),
            })
            .await
            .unwrap();
        let st = v.status.unwrap();
        match st.state {
            VmState::NetworkReady => break st.device.unwrap(),
            VmState::Failed => panic!("VM failed: {:?}", st.message),
            VmState::Pending => {}
            other => panic!("unexpected state {other:?} without a VMM"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VM never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(device.starts_with(&prefix));
    assert!(
        atoll_agent::device::ifindex(&device).is_some(),
        "tap {device} exists"
    );
    // Play the VM on its tap, as its VMM would, and ask the gateway.
    let guest = Guest::attach(&device, &vm, created.cloud.gateway);
    let zone = vm.fqdn.strip_prefix("a1.").expect("fqdn is <vm>.<zone>");
    let (rcode, a) = guest.ask(&vm.fqdn);
    assert_eq!((rcode, a), (ResponseCode::NoError, vec![vm.ipv4]), "own VM");
    let (rcode, a) = guest.ask(&format!("api.{zone}"));
    assert_eq!(
        (rcode, a),
        (ResponseCode::NoError, vec![Ipv4Addr::new(10, 0, 7, 7)]),
        "user record"
    );
    let (rcode, a) = guest.ask(&other_vm.fqdn);
    assert_eq!(
        (rcode, a),
        (ResponseCode::NXDomain, vec![]),
        "another cloud's VM"
    );
    let (rcode, _) = guest.ask(&format!("nope.{zone}"));
    assert_eq!(
        rcode,
        ResponseCode::NXDomain,
        "unknown name in the own zone"
    );
    drop(guest);
    let _: () = cc.run(&Command::DeleteCloud { cloud: id }).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while atoll_agent::device::ifindex(&device).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "tap {device} not removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Leave nothing: the pinned dataplane (and its spare taps) go with cleanup.
    let out = guard.cleanup();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An agent apart from its control plane (`mode = "remote"`): the same convergence over the
/// HTTPS API (the control plane's generated CA in `control.ca_file`), long-polling
/// `/v1/hosts/<host>/sync` with its host's token (which reaches nothing but that host's
/// routes). Trusting another CA, or pinning another fingerprint, is refused with an error
/// naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_agent_converges_over_https() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pins = PinRoot::new("cr");
    let prefix = unique_prefix("r");
    let _links = LinksWithPrefix(prefix.clone());
    let core = control_plane(dir.path()).await;
    let api = serve_api(core.clone()).await;
    let Reply::HostToken(issued) = exec(
        &core,
        Cmd::IssueHostToken {
            host: "remote1".into(),
        },
    )
    .await
    else {
        panic!()
    };
    let token_file = dir.path().join("host.token");
    std::fs::write(&token_file, &issued.token).unwrap();
    // The agent's own configuration builds its client.
    let mut link = atoll_agent::config::ControlLinkConfig {
        mode: atoll_agent::config::ControlMode::Remote,
        url: api.url.clone().into(),
        ca_file: Some(api.ca_file.clone()),
        ..Default::default()
    };
    // Wrong trust first: another CA, another fingerprint, and no trust at all.
    let other = atoll_control::tls::Ca::new("not the control plane's").unwrap();
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, other.cert_pem()).unwrap();
    for (ca_file, fingerprint, setting) in [
        (Some(other_file.clone()), None, "control.ca_file"),
        (None, Some(other.fingerprint()), "control.ca_fingerprint"),
    ] {
        let wrong = atoll_agent::config::ControlLinkConfig {
            ca_file,
            ca_fingerprint: fingerprint,
            ..link.clone()
        };
        let err = Source::new(Remote::new(wrong.clients(&issued.token).unwrap(), None))
            .register("remote1")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(setting) && err.contains("TLS"), "{err}");
    }
    let untrusting = atoll_agent::config::ControlLinkConfig {
        ca_file: None,
        ..link.clone()
    };
    let err = untrusting.clients(&issued.token).err().unwrap().to_string();
    assert!(err.contains("control.ca_file"), "{err}");
    // Pinning the generated CA's fingerprint works as well as its file.
    link.ca_fingerprint = Some(api.ca_fingerprint.clone());
    Source::new(Remote::new(link.clients(&issued.token).unwrap(), None))
        .register("remote1")
        .await
        .expect("a pinned fingerprint is trusted");
    link.ca_fingerprint = None;
    // Two control planes listed, the first of which does not answer (nothing listens on its
    // port): the agent moves on to the second and stays with it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    link.url = atoll_agent::config::ControlUrls(vec![format!("https://{closed}"), api.url.clone()]);
    let remote = Remote::new(
        link.clients(&issued.token).unwrap(),
        Some(token_file.clone()),
    );
    let source = Source::new(remote.clone());
    source.register("remote1").await.unwrap();
    assert_eq!(remote.current(), api.url, "the control plane that answered");
    let mut host = Host::open(&cfg(&pins, 16, 0)).unwrap();
    let mut conv = Converger::new(
        ConvergeConfig {
            host: "remote1".into(),
            tap_prefix: prefix.clone(),
            volumes_dir: dir.path().join("volumes"),
        },
        source,
        None,
    );
    let first = conv.next_delta(Duration::from_secs(5)).await.unwrap();
    assert!(first.full);
    conv.apply(&mut host, first).await.unwrap();
    // A long poll in flight is woken by the VM create.
    let poll = conv.next_delta(Duration::from_secs(20));
    let Reply::CreatedCloud(c) = exec(
        &core,
        Cmd::CreateCloud {
            spec: CreateCloud::default(),
        },
    )
    .await
    else {
        panic!()
    };
    exec(
        &core,
        Cmd::CreateVm {
            cloud: c.cloud.id,
            spec: vm("r1"),
        },
    )
    .await;
    let mut delta = poll.await.unwrap();
    while delta.vms.is_empty() {
        conv.apply(&mut host, delta).await.unwrap();
        delta = conv.next_delta(Duration::from_secs(20)).await.unwrap();
    }
    let stats = conv.apply(&mut host, delta).await.unwrap();
    assert_eq!(stats.created, 1);
    let eps = host.endpoints().unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(
        (eps[0].cloud.get(), eps[0].ipv4),
        (c.cloud.id.get(), Ipv4Addr::new(10, 0, 0, 2))
    );
    let Reply::Vm(v) = exec(
        &core,
        Cmd::GetVm {
            cloud: c.cloud.id,
            vm: "r1".into(),
        },
    )
    .await
    else {
        panic!()
    };
    assert_eq!(
        v.status.unwrap().state,
        VmState::NetworkReady,
        "reported over HTTP"
    );
    // The operator rotates the host's token and writes the new one to the agent's file: the
    // next sync is refused with the old one, and the agent carries on with the new one.
    let Reply::HostToken(rotated) = exec(
        &core,
        Cmd::IssueHostToken {
            host: "remote1".into(),
        },
    )
    .await
    else {
        panic!()
    };
    std::fs::write(&token_file, &rotated.token).unwrap();
    exec(
        &core,
        Cmd::CreateVm {
            cloud: c.cloud.id,
            spec: vm("r2"),
        },
    )
    .await;
    let mut delta = conv.next_delta(Duration::from_secs(20)).await.unwrap();
    while delta.vms.is_empty() {
        conv.apply(&mut host, delta).await.unwrap();
        delta = conv.next_delta(Duration::from_secs(20)).await.unwrap();
    }
    assert_eq!(conv.apply(&mut host, delta).await.unwrap().created, 1);
    host.destroy().await.unwrap();
}

/// A test playing an API-created VM on its tap: raw UDP DNS queries to the gateway.
struct Guest {
    fd: std::os::fd::OwnedFd,
    addr: Udp,
    next_id: std::cell::Cell<u16>,
}

impl Guest {
    fn attach(device: &str, vm: &Vm, gateway: Ipv4Addr) -> Self {
        let fd = atoll_agent::device::open_tap_queue(device, true).expect("attaching to the tap");
        atoll_agent::device::wait_until_up(device, Duration::from_secs(3)).expect("tap up");
        let o = vm.ipv4.octets();
        Guest {
            fd,
            addr: Udp {
                // The MAC the control plane assigns (`guest_mac`) and the agent's default
                // gateway MAC.
                src_mac: [0x02, 0xa8, o[0], o[1], o[2], o[3]],
                dst_mac: atoll_agent::config::DataplaneConfig::default()
                    .gateway_mac
                    .0,
                src: vm.ipv4,
                dst: gateway,
                sport: 40053,
                dport: 53,
            },
            next_id: std::cell::Cell::new(1),
        }
    }

    /// Asks `name` A; returns the response code and the A records.
    fn ask(&self, name: &str) -> (ResponseCode, Vec<Ipv4Addr>) {
        let mut q = Message::query();
        let id = self.next_id.replace(self.next_id.get() + 1);
        q.metadata.id = id;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            Name::from_ascii(name).expect("a DNS name"),
            RecordType::A,
        ));
        frame::write_frame(&self.fd, &self.addr.frame(&q.to_vec().expect("encoding")));
        let answer = frame::read_frame(&self.fd, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("no answer to {name} on the tap"));
        let parsed = frame::parse_udp(&answer).unwrap_or_else(|e| panic!("answer frame: {e}"));
        assert_eq!(
            (
                parsed.addr.src,
                parsed.addr.sport,
                parsed.addr.dst,
                parsed.addr.dport
            ),
            (self.addr.dst, 53, self.addr.src, self.addr.sport),
            "the answer comes from the gateway to the asker"
        );
        assert!(parsed.ip_checksum_ok && parsed.udp_checksum_ok, "checksums");
        let msg = Message::from_vec(parsed.payload).expect("a DNS message");
        assert_eq!(
            (msg.metadata.id, msg.metadata.message_type),
            (id, MessageType::Response)
        );
        let a = msg
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        (msg.metadata.response_code, a)
    }
}

/// Grants become exposure services on the host of the provider's VMs: VIP, NAT address and
/// backends from the control plane; an offered grant waits for acceptance; deleting a backend
/// VM, revoking a grant and deleting the provider take effect; a restarted agent's full sync
/// removes services the control plane no longer has.
#[tokio::test]
async fn exposures_converge_onto_the_host() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pins = PinRoot::new("cx");
    let prefix = unique_prefix("x");
    let _links = LinksWithPrefix(prefix.clone());
    let core = control_plane(dir.path()).await;
    let source = Source::new(Embedded(core.clone()));
    source.register("h1").await.unwrap();
    let conv_cfg = ConvergeConfig {
        host: "h1".into(),
        tap_prefix: prefix.clone(),
        volumes_dir: dir.path().join("volumes"),
    };
    // Room for one grant's VIP: the second one a host cannot install shows as failed.
    let mut host = Host::open(&atoll_agent::config::DataplaneConfig {
        max_vips: 1,
        ..cfg(&pins, 64, 0)
    })
    .unwrap();
    let mut conv = Converger::new(conv_cfg.clone(), source.clone(), None);
    let cloud = |r: Reply| match r {
        Reply::CreatedCloud(c) => c.cloud.id,
        other => panic!("{other:?}"),
    };
    let p = cloud(
        exec(
            &core,
            Cmd::CreateCloud {
                spec: CreateCloud::default(),
            },
        )
        .await,
    );
    let c1 = cloud(
        exec(
            &core,
            Cmd::CreateCloud {
                spec: CreateCloud::default(),
            },
        )
        .await,
    );
    let c2 = cloud(
        exec(
            &core,
            Cmd::CreateCloud {
                spec: CreateCloud::default(),
            },
        )
        .await,
    );
    let ip = |r: Reply| match r {
        Reply::Vm(v) => v.ipv4,
        other => panic!("{other:?}"),
    };
    let b1 = ip(exec(
        &core,
        Cmd::CreateVm {
            cloud: p,
            spec: vm("b1"),
        },
    )
    .await);
    let b2 = ip(exec(
        &core,
        Cmd::CreateVm {
            cloud: p,
            spec: vm("b2"),
        },
    )
    .await);
    // Services are installed where their consumers run: both consumers have a VM here.
    for c in [c1, c2] {
        exec(
            &core,
            Cmd::CreateVm {
                cloud: c,
                spec: vm("app"),
            },
        )
        .await;
    }
    let exposure = |name: &str| CreateExposure {
        name: name.into(),
        protocol: Protocol::Tcp,
        port: 80,
        backends: vec![
            Backend {
                vm: "b1".into(),
                port: 8080,
            },
            Backend {
                vm: "b2".into(),
                port: 8080,
            },
        ],
    };
    exec(
        &core,
        Cmd::CreateExposure {
            cloud: p,
            spec: exposure("web"),
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateExposure {
            cloud: p,
            spec: exposure("admin"),
        },
    )
    .await;
    let grant = |r: Reply| match r {
        Reply::Grant(g) => g,
        other => panic!("{other:?}"),
    };
    // c1 accepts p's offers without being asked; c2 is asked.
    exec(
        &core,
        Cmd::PutOfferPolicy {
            cloud: c1,
            policy: OfferPolicy {
                accept_from: vec![p],
            },
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateGrant {
            cloud: p,
            exposure: "web".into(),
            spec: CreateGrant { consumer: c1 },
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateGrant {
            cloud: p,
            exposure: "admin".into(),
            spec: CreateGrant { consumer: c2 },
        },
    )
    .await;
    let g1 = match exec(&core, Cmd::ListImports { cloud: c1 }).await {
        Reply::Grants(g) => g.into_iter().next().expect("c1's grant is active"),
        other => panic!("{other:?}"),
    };
    assert!(
        ![b1, b2].contains(&g1.nat_ipv4),
        "NAT address is the provider's own"
    );
    step(&core, &mut conv, &mut host).await;
    let installed = |host: &Host| -> Vec<ServiceSpec> {
        host.services()
            .unwrap()
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    };
    let want = ServiceSpec {
        consumer: c1,
        vip: g1.vip,
        provider: p,
        nat: g1.nat_ipv4,
        protocol: PROTOCOL_TCP,
        port: 80,
        backends: vec![(b1, 8080), (b2, 8080)],
    };
    assert_eq!(
        installed(&host),
        vec![want.clone()],
        "only the active grant, not the pending offer"
    );

    // Accepting the offer installs it, where the host has room: not here (one VIP), and the
    // API shows the grant failed with the host's reason.
    let accepted = grant(
        exec(
            &core,
            Cmd::AcceptOffer {
                cloud: c2,
                provider: p,
                exposure: "admin".into(),
            },
        )
        .await,
    );
    assert_ne!(g1.nat_ipv4, accepted.nat_ipv4);
    step(&core, &mut conv, &mut host).await;
    assert_eq!(installed(&host).len(), 1);
    let admin = || async {
        match exec(
            &core,
            Cmd::ListGrants {
                cloud: p,
                exposure: "admin".into(),
            },
        )
        .await
        {
            Reply::Grants(g) => g.into_iter().next().unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let failed = admin().await;
    assert_eq!(failed.state, GrantState::Failed, "{failed:?}");
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap_or("")
            .starts_with("host h1: "),
        "{failed:?}"
    );

    // A deleted backend VM leaves the backends.
    exec(
        &core,
        Cmd::DeleteVm {
            cloud: p,
            vm: "b2".into(),
        },
    )
    .await;
    step(&core, &mut conv, &mut host).await;
    let now = installed(&host);
    let web = now
        .iter()
        .find(|s| s.vip == g1.vip)
        .expect("web still granted");
    assert_eq!(web.backends, vec![(b1, 8080)]);

    // Revoking removes the service, which makes room for the failed one: installed and
    // reported, it is active; a restarted agent (full state) agrees.
    exec(
        &core,
        Cmd::RevokeGrant {
            cloud: p,
            exposure: "web".into(),
            consumer: c1,
        },
    )
    .await;
    step(&core, &mut conv, &mut host).await;
    assert_eq!(installed(&host).len(), 1);
    assert!(installed(&host).iter().all(|s| s.vip == accepted.vip));
    assert_eq!(admin().await.state, GrantState::Active);
    drop(conv);
    let mut conv = Converger::new(conv_cfg, source.clone(), None);
    step(&core, &mut conv, &mut host).await;
    assert_eq!(
        installed(&host).len(),
        1,
        "a full sync keeps the live grant"
    );

    // Deleting the provider removes everything of it.
    exec(&core, Cmd::DeleteCloud { cloud: p }).await;
    step(&core, &mut conv, &mut host).await;
    assert!(installed(&host).is_empty());
    host.destroy().await.unwrap();
}

/// What the converger hands the host's DNS server: each cloud's last zone; and the refusals
/// the test has it report.
#[derive(Default)]
struct ZoneLog(
    std::sync::Mutex<Vec<(u32, Zone)>>,
    std::sync::Mutex<Vec<atoll_api::model::DeniedReport>>,
);

impl atoll_agent::converge::DnsSink for ZoneLog {
    fn set_endpoint(&self, _slot: u32, _cloud: atoll_agent::types::CloudId) {}
    fn remove_endpoint(&self, _slot: u32) {}
    fn set_zone(&self, cloud: atoll_agent::types::CloudId, zone: &Zone) {
        self.0.lock().unwrap().push((cloud.get(), zone.clone()));
    }
    fn remove_zone(&self, _cloud: atoll_agent::types::CloudId) {}
    fn take_denied(&self) -> Vec<atoll_api::model::DeniedReport> {
        std::mem::take(&mut *self.1.lock().unwrap())
    }
}

/// A VM driver that runs nothing: it records the kernel and initramfs each boot would read,
/// and fails the boot.
#[derive(Default)]
struct BootLog(std::sync::Mutex<Vec<(PathBuf, PathBuf)>>);

impl Driver for BootLog {
    fn command(&self, _plan: &VmPlan) -> VmmCommand {
        unreachable!("no boot gets past accel")
    }
    fn accel(&self, kernel: &Path, initrd: &Path) -> Result<Accel, VmError> {
        self.0
            .lock()
            .unwrap()
            .push((kernel.to_path_buf(), initrd.to_path_buf()));
        Err(VmError::KvmUnusable("no VMM in this test".into()))
    }
    fn check(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn program(&self) -> PathBuf {
        "/nonexistent/atoll-test-vmm".into()
    }
}

/// Every file and directory under `root` (relative, with the contents of files up to 64 KiB and
/// the size of others), except the top-level entries in `skip`.
fn tree(root: &Path, skip: &[&str]) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Option<Vec<u8>>)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                out.push((rel, None));
                walk(root, &path, out);
            } else {
                let len = e.metadata().unwrap().len();
                let content = if len <= 64 << 10 {
                    std::fs::read(&path).unwrap()
                } else {
                    format!("{len} bytes").into_bytes()
                };
                out.push((rel, Some(content)));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.retain(|(p, _)| {
        let top = p.components().next().unwrap().as_os_str();
        !skip.iter().any(|s| top == *s)
    });
    out.sort();
    out
}

/// A compromised control plane (its store written directly) sends a remote agent hostile
/// names next to valid ones: VMs named `../../canary/vm`, `a/b`, with a NUL, overlong; a
/// kernel `../../etc/shadow`, an image `..`, a volume `../../canary/victim` in a VM's list, a
/// zone outside the suffix; volumes `../../canary/vol`, `..` and ``; the removal of a volume
/// `../../canary/victim`; a cloud's zone moved to `evil.example.`, records outside their zone
/// and with a bad label. Nothing is created, read or removed outside the configured
/// directories (the canaries beside them are untouched, no boot reads a file outside
/// `images_dir`), no device exists for a refused VM, every refused VM is reported `failed`
/// with the field at fault, refused records and zones never reach the DNS server, and the
/// valid VMs, volume and records converge (docs/design.md, "Trust boundaries").
#[tokio::test]
async fn hostile_names_from_the_control_plane_are_refused_one_by_one() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let cp = root.join("cp");
    std::fs::create_dir(&cp).unwrap();
    let pins = PinRoot::new("cn");
    let prefix = unique_prefix("n");
    let _links = LinksWithPrefix(prefix.clone());
    let core = control_plane(&cp).await;
    let api = serve_api(core.clone()).await;
    let Reply::HostToken(issued) = exec(&core, Cmd::IssueHostToken { host: "h1".into() }).await
    else {
        panic!()
    };
    let source = Source::new(Remote::new(vec![api.client(&issued.token)], None));
    source.register("h1").await.unwrap();

    // The host's directories, and canaries where hostile names lead out of them.
    let vm_cfg = VmConfig {
        images_dir: root.join("images"),
        state_dir: root.join("state"),
        run_dir: root.join("run"),
        ..VmConfig::default()
    };
    let image = vm_cfg.images_dir.join("default");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("vmlinux"), "kernel").unwrap();
    std::fs::write(image.join("initramfs.cpio.gz"), "initramfs").unwrap();
    std::fs::create_dir_all(root.join("canary")).unwrap();
    std::fs::write(root.join("canary/victim.raw"), "victim").unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/shadow"), "secret").unwrap();
    std::fs::write(root.join("vmlinux"), "not an image").unwrap();
    std::fs::write(root.join("initramfs.cpio.gz"), "not an image").unwrap();
    let configured = ["cp", "images", "state", "run", "volumes"];
    let canaries = tree(root, &configured);

    // Valid: cloud prod with VM web (volume data, record www), cloud other with VM ok.
    let created = |r: Reply| match r {
        Reply::CreatedCloud(c) => c.cloud,
        other => panic!("{other:?}"),
    };
    let named = |n: &str| CreateCloud {
        name: Some(n.into()),
        ..CreateCloud::default()
    };
    let a = created(
        exec(
            &core,
            Cmd::CreateCloud {
                spec: named("prod"),
            },
        )
        .await,
    )
    .id;
    let b = created(
        exec(
            &core,
            Cmd::CreateCloud {
                spec: named("other"),
            },
        )
        .await,
    )
    .id;
    let data = CreateVolume {
        name: "data".into(),
        size_gib: 1,
        format: VolumeFormat::Raw,
    };
    exec(
        &core,
        Cmd::CreateVolume {
            cloud: a,
            spec: data,
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateVm {
            cloud: a,
            spec: CreateVm {
                volumes: vec!["data".into()],
                ..vm("web")
            },
        },
    )
    .await;
    exec(
        &core,
        Cmd::CreateVm {
            cloud: b,
            spec: vm("ok"),
        },
    )
    .await;
    let www = PutRecordSet {
        ttl: 60,
        values: vec!["web.prod.atoll.internal.".into()],
    };
    exec(
        &core,
        Cmd::PutRecordSet {
            cloud: a,
            name: "www".into(),
            rtype: atoll_control::model::RecordType::Cname,
            spec: www,
        },
    )
    .await;

    // The compromised store.
    let store = core.store();
    let put = |key: String, value: Vec<u8>| async move {
        let txn = atoll_control::store::Txn {
            compares: vec![],
            success: vec![atoll_control::store::Op::Put { key, value }],
        };
        store.txn(txn).await.unwrap();
    };
    let web: Placement = serde_json::from_slice(
        &store
            .get(&format!("h/h1/vms/{a}/web"))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    let hostile = |name: &str, octet: u8, change: &dyn Fn(&mut Placement)| {
        let ipv4 = Ipv4Addr::new(10, 0, 0, octet);
        let mut p = Placement {
            vm: name.into(),
            ipv4,
            mac: guest_mac(ipv4),
            fqdn: format!("{name}.{}", web.zone),
            volumes: vec![],
            ..web.clone()
        };
        change(&mut p);
        p
    };
    let long = "x".repeat(300);
    let vms = [
        (hostile("../../canary/vm", 50, &|_| ()), "vm"),
        (hostile("a/b", 51, &|_| ()), "vm"),
        (hostile("nul\0x", 52, &|_| ()), "vm"),
        (hostile(&long, 53, &|_| ()), "vm"),
        (
            hostile("k", 54, &|p| p.kernel = Some("../../etc/shadow".into())),
            "kernel",
        ),
        (hostile("i", 55, &|p| p.image = Some("..".into())), "image"),
        (
            hostile("v", 56, &|p| p.volumes = vec!["../../canary/victim".into()]),
            "volumes[0]",
        ),
        (
            hostile("z", 57, &|p| {
                p.zone = "evil.example.".into();
                p.fqdn = "z.evil.example.".into();
            }),
            "zone",
        ),
    ];
    for (p, _) in &vms {
        put(
            format!("h/h1/vms/{a}/{}", p.vm),
            serde_json::to_vec(p).unwrap(),
        )
        .await;
    }
    for name in ["../../canary/vol", "..", ""] {
        let v = VolumePlacement {
            cloud: a,
            name: name.into(),
            size_gib: 1,
            format: VolumeFormat::Raw,
            created_at_ms: 0,
        };
        put(
            format!("h/h1/volumes/{a}/{name}"),
            serde_json::to_vec(&v).unwrap(),
        )
        .await;
    }
    for (key, name) in [("evil", "x.evil.example."), ("bad", "under_score")] {
        let rs = RecordSet {
            name: name.into(),
            rtype: atoll_control::model::RecordType::A,
            ttl: 30,
            values: vec!["10.0.9.9".into()],
            automatic: name.ends_with('.'),
        };
        put(
            format!("c/{a}/dns/{key}/A"),
            serde_json::to_vec(&rs).unwrap(),
        )
        .await;
    }
    let mut other: Cloud = serde_json::from_slice(
        &store
            .get(&format!("clouds/{b}"))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    other.zone = "evil.example.".into();
    put(format!("clouds/{b}"), serde_json::to_vec(&other).unwrap()).await;
    // An egress policy the API would refuse (a deny by name, a bad wildcard).
    put(
        format!("c/{b}/egress"),
        serde_json::to_vec(&serde_json::json!({
            "mode": "allow",
            "deny": [{"domain": "evil.example"}],
            "allow": [{"domain": "a.*.example"}]
        }))
        .unwrap(),
    )
    .await;

    // The agent, remote, with a VM driver and a DNS server.
    let zones = std::sync::Arc::new(ZoneLog::default());
    let boots = std::sync::Arc::new(BootLog::default());
    let (vmm, mut events) = VmManager::with_driver(vm_cfg.clone(), boots.clone());
    let mut host = Host::open(&cfg(&pins, 32, 0)).unwrap();
    let mut conv = Converger::new(
        ConvergeConfig {
            host: "h1".into(),
            tap_prefix: prefix.clone(),
            volumes_dir: root.join("volumes"),
        },
        source,
        Some(zones.clone()),
    )
    .with_vms(vmm, "default")
    .with_dns_suffix("atoll.internal.");
    let stats = sync_all(&mut conv, &mut host, &core).await;
    assert_eq!((stats.created, stats.failed), (2, vms.len()), "{stats:?}");

    // The valid VMs converge: endpoints, reported booting, their boots read the image.
    let mut eps: Vec<(u32, Ipv4Addr)> = host
        .endpoints()
        .unwrap()
        .iter()
        .map(|e| (e.cloud.get(), e.ipv4))
        .collect();
    eps.sort();
    let mut want = vec![(a.get(), web.ipv4), (b.get(), Ipv4Addr::new(10, 0, 0, 2))];
    want.sort();
    assert_eq!(eps, want, "devices only for the valid VMs");
    for (c, name) in [(a, "web"), (b, "ok")] {
        let Reply::Vm(v) = exec(
            &core,
            Cmd::GetVm {
                cloud: c,
                vm: name.into(),
            },
        )
        .await
        else {
            panic!()
        };
        assert_eq!(v.status.unwrap().state, VmState::Booting, "{name}");
    }
    let mut booted = Vec::new();
    for _ in 0..2 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("a supervisor's event")
            .unwrap();
        assert_eq!(ev.state, VmState::Failed, "{ev:?}");
        booted.push(ev.key);
    }
    booted.sort();
    let mut want = vec![(a.get(), "web".to_string()), (b.get(), "ok".to_string())];
    want.sort();
    assert_eq!(booted, want, "supervisors only for the valid VMs");
    assert!(events.try_recv().is_err(), "no other VM was started");
    for (kernel, initrd) in boots.0.lock().unwrap().iter() {
        assert_eq!(
            (kernel, initrd),
            (&image.join("vmlinux"), &image.join("initramfs.cpio.gz"))
        );
    }
    // Refusals reach the control plane (over HTTPS, with the host's token), for the clouds
    // this host runs only; nothing new, nothing sent.
    {
        use atoll_api::model::{DeniedDestination, DeniedReport, DenyReason};
        let entry = DeniedDestination {
            name: Some("exfil.example".into()),
            address: None,
            port: None,
            protocol: None,
            reason: DenyReason::NameNotAllowed,
            count: 3,
            last_seen: 1,
            host: String::new(),
        };
        *zones.1.lock().unwrap() = vec![DeniedReport {
            cloud: a,
            entries: vec![entry.clone()],
        }];
        conv.report_denied().await.expect("reporting refusals");
        conv.report_denied().await.expect("nothing to report");
        let Reply::Denied(got) = exec(&core, Cmd::ListDenied { cloud: a }).await else {
            panic!()
        };
        assert_eq!(
            got,
            vec![DeniedDestination {
                host: "h1".into(),
                ..entry
            }]
        );
    }
    // Egress policies: the valid cloud's held; the hostile one refused, and the cloud denied
    // (fails closed).
    let hostile: atoll_api::model::EgressPolicy = serde_json::from_slice(
        &store
            .get(&format!("c/{b}/egress"))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert_eq!(
        hostile.mode,
        atoll_api::model::EgressMode::Allow,
        "the store holds it"
    );
    assert_eq!(
        (conv.egress_policy(a), conv.egress_policy(b)),
        (
            Some(&atoll_api::model::EgressPolicy::deny_all()),
            Some(&atoll_api::model::EgressPolicy::deny_all())
        )
    );
    // The refused VMs are reported failed, naming the field at fault.
    for (p, field) in &vms {
        let kv = store
            .get(&format!("c/{a}/vmstatus/{}", p.vm))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{:?} reported", p.vm));
        let st: VmStatus = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(st.state, VmState::Failed, "{:?}", p.vm);
        let msg = st.message.unwrap();
        assert!(
            msg.contains(&format!("from the control plane: {field}: ")),
            "{:?}: {msg}",
            p.vm
        );
    }
    // Volumes: the valid one only, in its cloud's directory.
    assert_eq!(
        tree(&root.join("volumes"), &[]),
        vec![
            (PathBuf::from(a.to_string()), None),
            (
                PathBuf::from(format!("{a}/data.raw")),
                Some(format!("{} bytes", 1u64 << 30).into_bytes())
            ),
        ]
    );
    // VM state: the valid VMs' directories only.
    let state: Vec<PathBuf> = tree(&vm_cfg.state_dir, &[])
        .into_iter()
        .filter(|(p, _)| p.components().count() == 2)
        .map(|(p, _)| p)
        .collect();
    let mut want = vec![
        PathBuf::from(format!("{}/web", a.get())),
        PathBuf::from(format!("{}/ok", b.get())),
    ];
    want.sort();
    assert_eq!(state, want);
    // DNS: cloud prod's zone without the refused records; cloud other's zone (moved out of
    // the suffix) never.
    {
        let zones = zones.0.lock().unwrap();
        assert!(zones.iter().all(|(c, _)| *c == a.get()), "{zones:?}");
        let (_, zone) = zones.last().expect("prod's zone");
        let mut names: Vec<&str> = zone.records.iter().map(|r| r.fqdn.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["web.prod.atoll.internal.", "www.prod.atoll.internal."]
        );
    }

    // A removal naming a file outside the volumes directory removes nothing.
    let key = format!("h/h1/volumes/{a}/../../canary/victim");
    let v = VolumePlacement {
        cloud: a,
        name: "../../canary/victim".into(),
        size_gib: 1,
        format: VolumeFormat::Raw,
        created_at_ms: 0,
    };
    put(key.clone(), serde_json::to_vec(&v).unwrap()).await;
    let txn = atoll_control::store::Txn {
        compares: vec![],
        success: vec![atoll_control::store::Op::Delete { key }],
    };
    store.txn(txn).await.unwrap();
    sync_all(&mut conv, &mut host, &core).await;
    assert!(root.join(format!("volumes/{a}/data.raw")).exists());
    assert_eq!(
        tree(root, &configured),
        canaries,
        "nothing outside the configured directories changed"
    );
    conv.kill_vms().await;
    host.destroy().await.unwrap();
}

/// Syncs and applies until the host has applied everything `core`'s store holds now.
async fn sync_all(
    c: &mut Converger,
    host: &mut Host,
    core: &Core,
) -> atoll_agent::converge::ApplyStats {
    let target = core.store().revision().await.unwrap();
    let mut total = atoll_agent::converge::ApplyStats::default();
    while c.revision() < target {
        let delta = c.next_delta(Duration::from_secs(5)).await.expect("sync");
        let s = c.apply(host, delta).await.expect("apply");
        total.created += s.created;
        total.deleted += s.deleted;
        total.failed += s.failed;
    }
    total
}

/// A cloud spread over two overlay hosts: each host's converger writes the cloud's network id,
/// the other host as a peer and routes to the cloud's VMs there (and never to its own), and
/// removes them as the VMs and the cloud go. (The packet path over those maps is
/// `overlay.rs`'s.)
#[tokio::test]
async fn remote_endpoints_converge_onto_every_host_of_the_cloud() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let core = control_plane(dir.path()).await;
    let source = Source::new(Embedded(core.clone()));
    let underlay = |h: &str| match h {
        "ha" => Ipv4Addr::new(10, 9, 0, 1),
        _ => Ipv4Addr::new(10, 9, 0, 2),
    };
    // Per host: its converger, dataplane, device guard and pins (dropped in that order).
    let mut sides = Vec::new();
    for (h, tag) in [("ha", "oa"), ("hb", "ob")] {
        source.register(h).await.unwrap();
        source.register_underlay(h, underlay(h)).await.unwrap();
        let pins = PinRoot::new(tag);
        let prefix = unique_prefix(tag);
        let links = LinksWithPrefix(prefix.clone());
        let host = Host::open(&cfg(&pins, 64, 0)).unwrap();
        let conv = Converger::new(
            ConvergeConfig {
                host: h.into(),
                tap_prefix: prefix,
                volumes_dir: dir.path().join(h),
            },
            source.clone(),
            None,
        );
        sides.push((conv, host, links, pins));
    }
    let Reply::CreatedCloud(x) = exec(
        &core,
        Cmd::CreateCloud {
            spec: CreateCloud::default(),
        },
    )
    .await
    else {
        panic!()
    };
    let (xid, vni) = (x.cloud.id, x.cloud.vni);
    for i in 0..4 {
        exec(
            &core,
            Cmd::CreateVm {
                cloud: xid,
                spec: vm(&format!("v{i}")),
            },
        )
        .await;
    }
    let Reply::Vms(vms) = exec(&core, Cmd::ListVms { cloud: xid }).await else {
        panic!()
    };
    let on = |h: &str| -> Vec<(Ipv4Addr, MacAddr)> {
        let mut v: Vec<_> = vms
            .iter()
            .filter(|v| v.host == h)
            .map(|v| {
                let o = v.ipv4.octets();
                (v.ipv4, MacAddr([0x02, 0xa8, o[0], o[1], o[2], o[3]]))
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!((on("ha").len(), on("hb").len()), (2, 2), "{vms:?}");
    for (conv, host, _, _) in sides.iter_mut() {
        step(&core, conv, host).await;
    }
    let remote = |host: &Host| -> Vec<(Ipv4Addr, MacAddr, Ipv4Addr)> {
        let mut v: Vec<_> = host
            .remote_endpoints()
            .unwrap()
            .into_iter()
            .map(|(c, ip, mac, u)| {
                assert_eq!(c, xid);
                (ip, mac, u)
            })
            .collect();
        v.sort();
        v
    };
    for (i, (me, other)) in [("ha", "hb"), ("hb", "ha")].into_iter().enumerate() {
        let host = &sides[i].1;
        let want: Vec<_> = on(other)
            .into_iter()
            .map(|(ip, mac)| (ip, mac, underlay(other)))
            .collect();
        assert_eq!(
            remote(host),
            want,
            "{me}'s routes to the cloud's VMs on {other}"
        );
        assert_eq!(host.cloud_vnis().unwrap(), vec![(xid, vni)], "{me}");
        assert_eq!(host.overlay_peers().unwrap(), vec![underlay(other)], "{me}");
    }
    // The VMs on hb go: ha forgets the routes and the peer, keeps the cloud's network id
    // (the cloud still runs there); hb, with no VM of the cloud left, forgets it all.
    for v in vms.iter().filter(|v| v.host == "hb") {
        exec(
            &core,
            Cmd::DeleteVm {
                cloud: xid,
                vm: v.name.clone(),
            },
        )
        .await;
    }
    for (conv, host, _, _) in sides.iter_mut() {
        step(&core, conv, host).await;
    }
    assert!(remote(&sides[0].1).is_empty());
    assert!(sides[0].1.overlay_peers().unwrap().is_empty());
    assert_eq!(sides[0].1.cloud_vnis().unwrap(), vec![(xid, vni)]);
    assert!(remote(&sides[1].1).is_empty());
    assert!(sides[1].1.cloud_vnis().unwrap().is_empty());
    // The cloud goes: ha forgets its network id too.
    exec(&core, Cmd::DeleteCloud { cloud: xid }).await;
    for (conv, host, _, _) in sides.iter_mut() {
        step(&core, conv, host).await;
    }
    assert!(sides[0].1.cloud_vnis().unwrap().is_empty());
}
