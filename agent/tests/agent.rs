//! Agent behaviour against the real kernel: typed errors (bpffs missing, map full, device
//! exists, invalid input, missing capability), rollback leaving nothing behind, resuming from
//! pins, and the warm tap pool surviving a restart. Needs root; fails loudly otherwise.

use std::{net::Ipv4Addr, process::Command};

use atoll_dataplane_common::{ipv4_to_map, EndpointInfo, NextHop, RouteKey};

mod support;

use atoll_testbed::frame::echo_frame;
use support::{cfg, read_frame, require_root, tap};

use atoll_agent::{
    config::DataplaneConfig,
    dataplane::{Dataplane, DataplaneError, Hook},
    device::{self, DeviceError},
    endpoint::{EndpointError, Host},
};
use atoll_testbed::{unique_name, unique_prefix, LinksWithPrefix, PinRoot};

#[test]
fn open_outside_bpffs_is_a_clear_error() {
    require_root();
    let dir = std::env::temp_dir().join(unique_name("nb"));
    std::fs::create_dir_all(&dir).unwrap();
    let err = Dataplane::open(&DataplaneConfig {
        bpffs_root: dir.join("atoll"),
        ..Default::default()
    })
    .expect_err("must fail outside bpffs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        matches!(err, DataplaneError::BpffsNotMounted { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("mount -t bpf"),
        "message names the fix: {err}"
    );
}

#[tokio::test]
async fn full_map_rolls_back_and_names_the_setting() {
    require_root();
    let pins = PinRoot::new("mf");
    let _links = LinksWithPrefix(unique_prefix("mf"));
    let mut host = Host::open(&cfg(&pins, 2, 0)).unwrap();
    let names: Vec<String> = (0..3).map(|_| unique_name("mf")).collect();
    host.create_endpoint(&tap(&names[0], 1, 2)).await.unwrap();
    host.create_endpoint(&tap(&names[1], 1, 3)).await.unwrap();
    let err = host
        .create_endpoint(&tap(&names[2], 1, 4))
        .await
        .unwrap_err();
    match &err {
        EndpointError::Program { source, .. } => {
            assert!(
                matches!(
                    source,
                    // The counter slots run out together with the endpoint map (both are
                    // sized by max_endpoints) and are checked first, before any device exists.
                    DataplaneError::MapFull {
                        capacity: 2,
                        setting: "max_endpoints",
                        ..
                    }
                ),
                "{source}"
            )
        }
        other => panic!("expected a map-full error, got {other}"),
    }
    assert!(err.to_string().contains("max_endpoints"), "{err}");
    assert_eq!(
        device::ifindex(&names[2]),
        None,
        "the failed endpoint's tap must be removed"
    );
    assert_eq!(host.endpoints().unwrap().len(), 2);
    host.destroy().await.unwrap();
    for n in &names {
        assert_eq!(device::ifindex(n), None, "{n} left behind");
    }
    assert!(!pins.path().join("v1").exists(), "pins left behind");
}

#[tokio::test]
async fn identity_is_cached_on_create_and_cleared_on_delete() {
    require_root();
    let pins = PinRoot::new("ch");
    let _links = LinksWithPrefix(unique_prefix("ch"));
    let mut host = Host::open(&cfg(&pins, 16, 0)).unwrap();
    let name = unique_name("ch");
    let ep = host.create_endpoint(&tap(&name, 5, 2)).await.unwrap();
    let cached = host
        .dataplane()
        .cached_endpoint(ep.ifindex)
        .unwrap()
        .expect("cached on create");
    assert_eq!(
        Some(cached),
        host.dataplane().endpoint(ep.ifindex).unwrap(),
        "cache equals hash"
    );
    assert_eq!(cached.cloud, 5);
    host.delete_endpoint(&name).await.unwrap();
    assert_eq!(
        host.dataplane().cached_endpoint(ep.ifindex).unwrap(),
        None,
        "slot cleared"
    );
    assert_eq!(host.dataplane().endpoint(ep.ifindex).unwrap(), None);
    host.destroy().await.unwrap();
}

#[tokio::test]
async fn duplicate_device_and_invalid_specs_are_typed_errors() {
    require_root();
    let pins = PinRoot::new("dv");
    let _links = LinksWithPrefix(unique_prefix("dv"));
    let mut host = Host::open(&cfg(&pins, 16, 0)).unwrap();
    let name = unique_name("dv");
    host.create_endpoint(&tap(&name, 1, 2)).await.unwrap();
    let err = host.create_endpoint(&tap(&name, 2, 2)).await.unwrap_err();
    assert!(
        matches!(err, EndpointError::CreateDevice(DeviceError::Exists(_))),
        "{err}"
    );

    let mut bad = tap(&unique_name("dv"), 1, 9);
    bad.mac = "01:00:5e:00:00:01".parse().unwrap();
    let mut same_as_gw = tap(&unique_name("dv"), 1, 9);
    same_as_gw.ipv4 = same_as_gw.gateway;
    let mut long_name = tap("atl-name-too-long-for-linux", 1, 9);
    long_name.name = "atl-name-too-long-for-linux".into();
    let mut broadcast = tap(&unique_name("dv"), 1, 9);
    broadcast.ipv4 = Ipv4Addr::BROADCAST;
    for spec in [bad, same_as_gw, long_name, broadcast] {
        let err = host.create_endpoint(&spec).await.unwrap_err();
        assert!(
            matches!(err, EndpointError::InvalidSpec { .. }),
            "{}: {err}",
            spec.name
        );
        assert_eq!(device::ifindex(&spec.name), None);
    }
    assert_eq!(host.endpoints().unwrap().len(), 1);
    host.destroy().await.unwrap();
    assert_eq!(device::ifindex(&name), None);
}

#[tokio::test]
async fn resumes_from_pins_and_reuses_the_pool() {
    require_root();
    let pins = PinRoot::new("rp");
    let _links = LinksWithPrefix(unique_prefix("rp"));
    // The only test in this binary with a tap pool, so this process's spare taps are its own.
    let _spares = LinksWithPrefix(atoll_agent::endpoint::pool_process_prefix());
    let c = cfg(&pins, 16, 2);
    let name = unique_name("rp");
    {
        let mut host = Host::open(&c).unwrap();
        host.refill_pool().await.unwrap();
        assert_eq!(host.pool_len(), 2);
        host.create_endpoint(&tap(&name, 3, 2)).await.unwrap();
        assert_eq!(host.pool_len(), 1, "the endpoint claimed a spare tap");
    }
    // A new agent finds the endpoint, its identity and the remaining spare in the pins.
    let mut host = Host::open(&c).unwrap();
    assert_eq!(host.pool_len(), 1);
    let eps = host.endpoints().unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].name.as_deref(), Some(name.as_str()));
    assert_eq!(eps[0].cloud.get(), 3);
    assert_eq!(
        host.dataplane().attached().unwrap().len(),
        2,
        "endpoint + spare keep their links"
    );
    // A device removed behind the agent's back is reconciled away.
    let ifindex = eps[0].ifindex;
    assert!(Command::new("ip")
        .args(["link", "del", &name])
        .status()
        .unwrap()
        .success());
    assert_eq!(host.reconcile().unwrap(), 1);
    assert!(host.endpoints().unwrap().is_empty());
    assert!(!host.dataplane().attached().unwrap().contains(&ifindex));
    host.destroy().await.unwrap();
    let left = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    let ours = atoll_agent::endpoint::pool_process_prefix();
    assert!(!left.contains(&ours), "spare taps left behind: {left}");
}

/// What a kill -9 can leave half-made, each built for real: a spare tap with only its
/// `from_vm` link pinned (killed between the two attaches), a tap claimed (renamed) but not yet
/// programmed, and a held tap never made persistent. A restarted agent keeps the complete
/// spare and removes the rest; the held tap never outlives its holder.
#[tokio::test]
async fn half_made_taps_are_removed_on_restart() {
    require_root();
    let pins = PinRoot::new("hm");
    let _links = LinksWithPrefix(unique_prefix("hm"));
    // Spare-like names no process can own: a pid is at most 0x400000.
    let spare_prefix = format!("{}ffffff", atoll_agent::endpoint::POOL_PREFIX);
    let _spares = LinksWithPrefix(spare_prefix.clone());
    let c = cfg(&pins, 16, 0);
    let devices = device::Devices::new().unwrap();
    let (one_link, claimed, complete) = (
        format!("{spare_prefix}00001"),
        unique_name("hm"),
        format!("{spare_prefix}00002"),
    );
    let (no_route, no_link, down) = (unique_name("hm"), unique_name("hm"), unique_name("hm"));
    let (one_link_ix, complete_ix) = {
        let mut host = Host::open(&c).unwrap();
        let mut ix = Vec::new();
        for name in [&one_link, &claimed, &complete] {
            let i = devices.create_tap(name, None).unwrap();
            host.dataplane_mut().attach(name, i).unwrap();
            ix.push(i);
        }
        let out_pin = host
            .dataplane()
            .pin_dir()
            .join("links")
            .join(format!("{}-out", ix[0]));
        std::fs::remove_file(&out_pin).unwrap();

        let held = unique_name("hm");
        let (held_ix, held_tap) = devices.create_tap_held(&held, None).unwrap();
        assert_eq!(device::ifindex(&held), Some(held_ix));
        drop(held_tap);
        assert_eq!(
            device::ifindex(&held),
            None,
            "a held tap dies with its holder"
        );

        let ep = host.create_endpoint(&tap(&no_route, 7, 2)).await.unwrap();
        let key = host
            .dataplane()
            .routes()
            .unwrap()
            .into_iter()
            .find(|(_, h)| h.ifindex == ep.ifindex)
            .unwrap()
            .0;
        host.dataplane_mut().remove_route(key).unwrap();
        // Identity and route written, `from_vm` attached, then the agent died: built step by
        // step as `create_endpoint` goes (unpinning a live link instead would release it
        // later, from a kernel work queue, which is not what a crash leaves).
        let i = devices.create_tap(&no_link, None).unwrap();
        let info = EndpointInfo {
            cloud: 7,
            ipv4: ipv4_to_map([10, 0, 0, 3]),
            gateway_ipv4: ipv4_to_map([10, 0, 0, 1]),
            mac: [2, 0, 0, 0, 0, 3],
            gateway_mac: DataplaneConfig::default().gateway_mac.0,
            slot: 15,
        };
        let dp = host.dataplane_mut();
        dp.insert_endpoint(i, info).unwrap();
        let key = RouteKey {
            cloud: 7,
            ipv4: info.ipv4,
        };
        let hop = NextHop {
            ifindex: i,
            slot: 15,
            mac: info.mac,
            flags: 0,
        };
        dp.insert_route(key, hop).unwrap();
        dp.attach_hook(&no_link, i, Hook::FromVm).unwrap();
        host.create_endpoint(&tap(&down, 7, 4)).await.unwrap();
        assert!(device::is_up(&down));
        assert!(Command::new("ip")
            .args(["link", "set", &down, "down"])
            .status()
            .unwrap()
            .success());
        assert!(!device::is_up(&down));
        (ix[0], ix[2])
    };
    let mut host = Host::open(&c).unwrap();
    assert_eq!(host.pool_len(), 1, "only the complete spare is one");
    // Removed: the one-link spare and the claimed tap. Finished: a route, a link and a
    // link-up (of the endpoint that also lacked its link), another link-up.
    assert_eq!(host.reconcile().unwrap(), 6);
    assert_eq!(device::ifindex(&one_link), None);
    assert_eq!(device::ifindex(&claimed), None);
    assert_eq!(device::ifindex(&complete), Some(complete_ix));
    assert!(!host.dataplane().fully_attached(one_link_ix));
    let routes = host.dataplane().routes().unwrap();
    for name in [&no_route, &no_link, &down] {
        let ifindex = device::ifindex(name).unwrap();
        assert!(device::is_up(name), "{name} is up");
        assert!(
            host.dataplane().fully_attached(ifindex),
            "{name} has both links"
        );
        assert!(
            routes.iter().any(|(_, h)| h.ifindex == ifindex),
            "{name} has its route"
        );
    }
    assert_eq!(host.endpoints().unwrap().len(), 3);
    assert_eq!(
        host.reconcile().unwrap(),
        0,
        "reconciling again finds nothing"
    );
    host.destroy().await.unwrap();
    assert_eq!(device::ifindex(&complete), None);
}

#[test]
fn unprivileged_agent_reports_missing_capability() {
    require_root();
    let pins = PinRoot::new("np");
    let _links = LinksWithPrefix(unique_prefix("np"));
    let config = std::env::temp_dir().join(format!("{}.toml", unique_name("np")));
    std::fs::write(
        &config,
        format!("[dataplane]\nbpffs_root = \"{}\"\n", pins.path().display()),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_atoll-agent"))
        .arg("--config")
        .arg(&config)
        .args([
            "endpoint",
            "add",
            "--name",
            "atlnopriv0",
            "--cloud",
            "1",
            "--ip",
            "10.0.0.2",
        ])
        .args(["--mac", "02:a7:00:00:00:02", "--gateway", "10.0.0.1"])
        .output()
        .expect("setpriv (util-linux) must be installed");
    let _ = std::fs::remove_file(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("missing capability"), "stderr: {stderr}");
    assert_eq!(device::ifindex("atlnopriv0"), None);
}

#[test]
fn bad_config_file_is_rejected_with_the_key() {
    let config = std::env::temp_dir().join(format!("{}.toml", unique_name("bc")));
    std::fs::write(&config, "[dataplane]\nmax_endpionts = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_atoll-agent"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 2: a configuration error (docs/operations.md).
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("max_endpionts"),
        "stderr names the bad key: {stderr}"
    );
}

#[tokio::test]
async fn usage_records_sum_exactly_to_the_traffic_including_the_final_flush() {
    use atoll_agent::usage::{Recorder, UsageEvent};
    use std::os::fd::AsRawFd;
    require_root();
    let pins = PinRoot::new("us");
    let _links = LinksWithPrefix(unique_prefix("us"));
    let journal_dir = std::env::temp_dir().join(unique_name("us"));
    let mut host = Host::open(&cfg(&pins, 16, 0)).unwrap();
    host.set_usage(Recorder::open(&journal_dir, "atoll/test").unwrap());
    let (a_name, b_name) = (unique_name("us"), unique_name("us"));
    let a = host.create_endpoint(&tap(&a_name, 9, 2)).await.unwrap();
    let b = host.create_endpoint(&tap(&b_name, 9, 3)).await.unwrap();
    let qa = device::open_tap_queue(&a_name, true).unwrap();
    let qb = device::open_tap_queue(&b_name, true).unwrap();
    // Frames sent to a tap before the kernel activates its queue are dropped.
    for n in [&a_name, &b_name] {
        device::wait_until_up(n, std::time::Duration::from_secs(2)).unwrap();
    }
    let gw = host.gateway_mac();
    let send = |size: usize| {
        let f = echo_frame(a.mac, gw, a.ipv4, b.ipv4, size);
        // SAFETY: `f` is a valid buffer.
        let n = unsafe { libc::write(qa.as_raw_fd(), f.as_ptr().cast(), f.len()) };
        assert_eq!(n, f.len() as isize);
        let got = read_frame(&qb).expect("frame delivered to b");
        assert_eq!(got.len(), size);
    };
    let mut sent = 0u64;
    for size in [60, 200, 1000] {
        send(size);
        sent += size as u64;
    }
    assert_eq!(host.collect_usage().unwrap(), 2, "one record per endpoint");
    for size in [90, 1514] {
        send(size);
        sent += size as u64;
    }
    drop((qa, qb));
    host.delete_endpoint(&a_name).await.unwrap();
    host.delete_endpoint(&b_name).await.unwrap();
    let journal = host.usage().unwrap().journal().path().to_path_buf();
    let events: Vec<UsageEvent> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 4, "two periodic, two final");
    let sum = |ep: &str, dir: &str| -> u64 {
        events
            .iter()
            .filter(|e| e.data.endpoint == ep)
            .map(|e| e.data.usage.bytes(dir, "intra_cloud"))
            .sum()
    };
    assert_eq!(sum(&a_name, "from_guest"), sent);
    assert_eq!(sum(&b_name, "to_guest"), sent);
    assert_eq!(sum(&a_name, "to_guest"), 0);
    assert!(events.iter().filter(|e| e.data.is_final).count() == 2);
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "ids are unique");
    assert!(events
        .iter()
        .all(|e| e.specversion == "1.0" && e.ty == "dev.atoll.usage.v1"));
    host.destroy().await.unwrap();
    std::fs::remove_dir_all(&journal_dir).unwrap();
}
