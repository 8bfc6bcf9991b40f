//! The host side of egress, inside a test's own internet (`atoll_testbed::internet`): the
//! uplink is the default route's device with its address, the never-reachable set holds the
//! host's address and network, the NAT port range is refused where it overlaps the ephemeral
//! ports and otherwise reserved (in the test's namespace only: the machine's own setting is
//! untouched), and the doctor reports it.

mod support;

use atoll_agent::{
    config::{DeviceName, EgressConfig, NatPorts},
    doctor::{self, Status},
    egress::{self, EgressError},
};
use atoll_testbed::{
    guest::in_netns,
    internet::{Internet, HOST_IP, UPLINK},
    leaves_nothing, unique_prefix,
};
use support::require_root;

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

#[test]
fn uplink_never_set_and_nat_ports_in_the_hosts_namespace() {
    require_root();
    let machine_reserved = std::fs::read_to_string(RESERVED).unwrap();
    leaves_nothing(&[unique_prefix("eg")], || {
        let net = Internet::build("eg").expect("building the internet");
        let got = in_netns(&net.host, || {
            let cfg = EgressConfig::default();
            let uplink = egress::uplink(&cfg).unwrap();
            let host = egress::host_addresses().unwrap();
            let never: Vec<String> = egress::never(&cfg, &host)
                .iter()
                .map(|n| n.to_string())
                .collect();
            let missing = egress::uplink(&EgressConfig {
                uplink: Some(DeviceName::new("nope0").unwrap()),
                ..EgressConfig::default()
            })
            .unwrap_err();
            let check = doctor::egress(&cfg);

            // The default range is clear of the default ephemeral ports: reserved, idempotent.
            assert!(!egress::nat_ports_reserved(cfg.nat_ports).unwrap());
            egress::reserve_nat_ports(cfg.nat_ports).unwrap();
            egress::reserve_nat_ports(cfg.nat_ports).unwrap();
            assert!(egress::nat_ports_reserved(cfg.nat_ports).unwrap());
            let reserved = std::fs::read_to_string(RESERVED).unwrap();
            // A range inside the ephemeral ports is refused and reserves nothing.
            let inside = NatPorts::try_from("40000-41023".to_string()).unwrap();
            let overlap = egress::reserve_nat_ports(inside).unwrap_err();
            assert!(!egress::nat_ports_reserved(inside).unwrap());
            (uplink, never, missing, check, reserved, overlap)
        });
        let (uplink, never, missing, check, reserved, overlap) = got;
        assert_eq!(
            (uplink.name.as_str(), &uplink.addresses[..]),
            (UPLINK, &[(HOST_IP, 24)][..])
        );
        for n in [
            "198.18.0.0/24",
            "198.18.0.2/32",
            "127.0.0.0/8",
            "169.254.0.0/16",
        ] {
            assert!(never.contains(&n.to_string()), "{n} in {never:?}");
        }
        assert!(
            matches!(missing, EgressError::NoUplink(ref d) if d == "nope0"),
            "{missing}"
        );
        assert_eq!(check.status, Status::Ok, "{check}");
        assert!(
            check.detail.contains("uplink uplink0 (198.18.0.2/24)"),
            "{check}"
        );
        assert_eq!(reserved.trim(), "61000-65535");
        assert!(
            matches!(
                overlap,
                EgressError::PortsOverlap {
                    first: 32768,
                    last: 60999,
                    ..
                }
            ),
            "{overlap}"
        );

        // The world has no default route: no uplink, a warning that says what to set.
        let check = in_netns(&net.world, || doctor::egress(&EgressConfig::default()));
        assert_eq!(check.status, Status::Warn, "{check}");
        assert!(
            check.fix.as_deref().unwrap().contains("egress.uplink"),
            "{check}"
        );
    });
    assert_eq!(
        std::fs::read_to_string(RESERVED).unwrap(),
        machine_reserved,
        "the machine's own reserved ports are untouched"
    );
}
