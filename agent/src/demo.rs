//! `atoll-agent demo`: two clouds with overlapping address ranges on this host, showing the
//! isolation verdicts and the drop counters, then removing everything it created.
//!
//! Cloud A: a1 10.0.0.2, a2 10.0.0.3. Cloud B: b1 10.0.0.2 (the same address as a1), b2
//! 10.0.0.4. Each guest is a veth in its own network namespace with a real kernel stack.

use std::net::Ipv4Addr;

use crate::{
    config::DataplaneConfig,
    endpoint::{DeviceSpec, EndpointError, EndpointSpec, Host},
    scratch::{unique_name, NetNs, PinRoot},
    types::{CloudId, MacAddr},
};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("setting up guest namespace: {0}")]
    Namespace(#[source] std::io::Error),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("demo verdict differs from the expected one: {0}")]
    Unexpected(String),
}

struct Guest {
    label: &'static str,
    ns: NetNs,
}

/// Runs the demo, printing to stdout. Fails if any verdict is not the expected one.
pub async fn run() -> Result<(), DemoError> {
    let pins = PinRoot::new("demo");
    let cfg = DataplaneConfig {
        bpffs_root: pins.path().into(),
        ..DataplaneConfig::default()
    };
    let mut host = Host::open(&cfg)?;
    let result = scenario(&mut host).await;
    host.destroy().await?;
    result
}

async fn scenario(host: &mut Host) -> Result<(), DemoError> {
    let gw = Ipv4Addr::new(10, 0, 0, 1);
    let a = CloudId::new(1).expect("non-zero");
    let b = CloudId::new(2).expect("non-zero");
    let plan = [
        ("a1", a, Ipv4Addr::new(10, 0, 0, 2)),
        ("a2", a, Ipv4Addr::new(10, 0, 0, 3)),
        ("b1", b, Ipv4Addr::new(10, 0, 0, 2)),
        ("b2", b, Ipv4Addr::new(10, 0, 0, 4)),
    ];
    println!("atoll demo: two clouds on one host, both using 10.0.0.0/24 (gateway {gw})\n");
    let mut guests = Vec::new();
    for (i, (label, cloud, ip)) in plan.iter().enumerate() {
        let ns = NetNs::new(&unique_name(&format!("d{label}"))).map_err(DemoError::Namespace)?;
        let spec = EndpointSpec {
            name: unique_name(&format!("h{label}")),
            cloud: *cloud,
            ipv4: *ip,
            mac: MacAddr::local(0x1000 + i as u32),
            gateway: gw,
            device: DeviceSpec::Veth {
                peer_name: "eth0".into(),
                netns: ns.path(),
            },
        };
        let t = std::time::Instant::now();
        let ep = host.create_endpoint(&spec).await?;
        ns.configure_guest("eth0", *ip, 24, gw)
            .map_err(DemoError::Namespace)?;
        println!(
            "  endpoint {:<15} cloud {} guest {:<9} {}  created in {:?}",
            ep.name.as_deref().unwrap_or("?"),
            cloud,
            ip,
            label,
            t.elapsed()
        );
        guests.push(Guest { label, ns });
    }
    println!();
    let checks: [(usize, &str, &str, bool); 6] = [
        (0, "10.0.0.3", "a1 -> a2 (same cloud)", true),
        (0, "10.0.0.1", "a1 -> gateway", true),
        (
            2,
            "10.0.0.4",
            "b1 -> b2 (same cloud, b1 shares a1's address)",
            true,
        ),
        (
            0,
            "10.0.0.4",
            "a1 -> 10.0.0.4 (exists only in cloud B)",
            false,
        ),
        (
            3,
            "10.0.0.3",
            "b2 -> 10.0.0.3 (exists only in cloud A)",
            false,
        ),
        (1, "10.0.0.5", "a2 -> 10.0.0.5 (nobody)", false),
    ];
    let mut wrong = Vec::new();
    println!("  {:<50} {:<9} result", "ping", "expected");
    for (from, dst, what, expect) in checks {
        let ok = guests[from]
            .ns
            .succeeds(&["ping", "-c", "1", "-W", "1", "-q", dst])
            .map_err(DemoError::Namespace)?;
        let word = |b: bool| if b { "reached" } else { "blocked" };
        println!("  {:<50} {:<9} {}", what, word(expect), word(ok));
        if ok != expect {
            wrong.push(format!("{what}: {}", word(ok)));
        }
    }
    // A spoofing attempt: a1 adds an address that is not its own and uses it as source.
    let a1 = &guests[0];
    a1.ns
        .exec(&["ip", "addr", "add", "10.0.0.9/32", "dev", "eth0"])
        .map_err(DemoError::Namespace)?;
    let spoofed = a1
        .ns
        .succeeds(&[
            "ping", "-c", "1", "-W", "1", "-q", "-I", "10.0.0.9", "10.0.0.3",
        ])
        .map_err(DemoError::Namespace)?;
    println!(
        "  {:<50} {:<9} {}",
        "a1 -> a2 with forged source 10.0.0.9",
        "blocked",
        if spoofed { "reached" } else { "blocked" }
    );
    if spoofed {
        wrong.push("spoofed ping reached a2".into());
    }
    println!("\n  drop counters (all endpoints):");
    for (reason, n) in host
        .dataplane()
        .drop_counters()
        .map_err(EndpointError::OpenDataplane)?
    {
        if n > 0 {
            println!("    {:<28} {n}", reason.name());
        }
    }
    println!(
        "\n  {} guests: {}",
        guests.len(),
        guests
            .iter()
            .map(|g| g.label)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if wrong.is_empty() {
        println!("  all verdicts as expected; removing the demo's namespaces, devices and pins.");
        Ok(())
    } else {
        Err(DemoError::Unexpected(wrong.join("; ")))
    }
}
