//! The HTTP API end to end, on both store backends: authorization of every route, resources and
//! their invariants (IPAM, quotas, atomic creates, cascade delete, deletes within the store's
//! transaction limit), bad input, host syncs, and the VM lifecycle (power, user data, reported
//! states, console tails).
//! Every case is written once against [`Api`] and runs as `sqlite::<case>` (the embedded store
//! in a temporary directory) and as `etcd::<case>` (a fresh etcd in a network namespace of its
//! own, see `support/mod.rs`; needs root and `etcd`, and fails rather than skips without them).
//! For etcd the API server, its clients and the store's connections all run on a runtime inside
//! that namespace and talk over its loopback only.
//!
//! The OpenAPI document test runs once (on SQLite): the document is built from the route table
//! and does not depend on the store.

mod support;

use atoll_api::routes::{self, ROUTES};
use std::{collections::HashSet, future::Future, net::Ipv4Addr, sync::Arc, time::Duration};

use atoll_control::{
    api,
    client::{Client, ClientError},
    config::{ControlConfig, StoreConfig},
    core::{Core, Principal},
    model::*,
    store::Store,
};
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

macro_rules! api_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $case() { crate::run(crate::Backend::Sqlite, super::$case) } )*
        }
        mod etcd {
            $( #[test] #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: etcd runs in a network namespace of its own (cargo xtask test runs it)")] fn $case() { crate::run(crate::Backend::Etcd, super::$case) } )*
        }
    };
}

api_suite!(
    every_route_refuses_other_clouds_tokens_and_missing_tokens,
    cloud_lifecycle_ipam_quotas_dns_and_cascade_delete,
    concurrent_creates_respect_quota_and_never_share_an_address,
    bad_input_gets_4xx_json_naming_the_field,
    host_sync_sends_changes_then_waits,
    deletes_revoke_more_grants_than_one_store_txn_holds,
    deleting_a_cloud_on_too_many_hosts_is_refused_before_revoking,
    vm_lifecycle_power_user_data_states_and_console,
    grants_racing_cloud_deletes_leave_nothing_behind,
    host_tokens_reach_only_their_host,
    silent_hosts_get_no_new_placements,
    cordoned_hosts_get_no_new_placements,
    a_cloud_stays_on_one_host,
    a_cloud_spreads_over_overlay_hosts_and_each_syncs_the_others,
    vms_of_one_anti_affinity_group_never_share_a_host,
    grants_get_a_nat_address_per_consumer_host_and_each_host_its_part,
    concurrent_creates_spread_instead_of_herding,
    cloud_tokens_rotate_and_the_old_one_stops_at_once,
    what_hosts_cannot_hold_is_refused_at_the_request,
    offers_change_nothing_in_the_consumer_until_it_accepts,
    offers_to_unknown_clouds_look_like_offers_to_existing_ones_and_are_bounded,
    offer_policy_and_same_named_providers_get_distinct_names,
    grants_are_active_only_where_they_carry_traffic,
    egress_policies_start_at_the_default_and_are_checked,
    egress_addresses_are_the_operators_to_give_and_each_clouds_alone,
    denied_destinations_come_from_the_hosts_running_the_cloud,
    published_ports_take_pool_addresses_and_go_with_their_vm,
    a_clouds_publications_are_bounded,
    clouds_expire_with_everything_in_them_also_after_a_restart,
    idle_vms_are_stopped_on_their_hosts_report_only,
    hosts_deliver_usage_once_per_id_and_clouds_read_their_own,
    budgets_stop_a_clouds_vms_and_egress_and_start_them_again,
    usage_records_past_their_retention_are_deleted_and_refused,
);

/// The store the control plane under test is configured with.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Etcd,
}

/// Runs `case` against a control plane on a fresh store of `backend`.
fn run<F, Fut>(backend: Backend, case: F)
where
    F: FnOnce(Api) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    match backend {
        Backend::Sqlite => support::runtime().block_on(async { case(start(backend).await).await }),
        Backend::Etcd => {
            let etcd = support::EtcdServer::start();
            support::block_on_in_netns(&etcd.netns, || async {
                // The control plane connects once at start; wait until etcd serves.
                etcd.connect_when_ready(support::ETCD_PREFIX).await;
                case(start(backend).await).await
            });
        }
    }
}

struct Api {
    url: String,
    op_token: String,
    op: Client,
    core: Arc<Core>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts a control plane the way `atoll serve` does (from a [`ControlConfig`]) on `backend`,
/// serves its API on 127.0.0.1 and registers `host-a`. For etcd, the caller runs inside the
/// etcd's namespace, where [`support::ETCD_ENDPOINT`] is that etcd.
async fn start(backend: Backend) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = match backend {
        Backend::Sqlite => StoreConfig {
            path: dir.path().join("control.db"),
            ..StoreConfig::default()
        },
        Backend::Etcd => StoreConfig {
            backend: atoll_control::config::StoreBackend::Etcd,
            etcd_endpoints: vec![support::ETCD_ENDPOINT.into()],
            etcd_prefix: support::ETCD_PREFIX.into(),
            ..StoreConfig::default()
        },
    };
    let mut cfg = ControlConfig {
        operator_token_file: dir.path().join("operator.token"),
        store,
        ..ControlConfig::default()
    };
    // Two addresses to give: 203.0.113.9 and .10.
    cfg.clouds.egress_pool = vec!["203.0.113.8/30".parse().unwrap()];
    // Two addresses to publish at: 198.51.100.1 and .2.
    cfg.clouds.ingress_pool = vec!["198.51.100.0/30".parse().unwrap()];
    cfg.clouds.max_publications_per_cloud = 3;
    // Two consumer hosts per grant (a third gets no NAT address, and no service).
    cfg.clouds.max_nat_addresses_per_grant = 2;
    // A GB a guest sends within its cloud costs 1 (so a byte, a nano).
    cfg.prices.from_guest.intra_cloud = 1.0;
    cfg.validate().expect("valid config");
    let core = cfg.start().await.expect("start control plane");
    assert_eq!(
        matches!(core.store(), Store::Etcd(_)),
        matches!(backend, Backend::Etcd),
        "the control plane runs on another store than the case's {backend:?}"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(core.clone(), listener, async {
        let _ = rx.await;
    }));
    let op = Client::new(&url, &cfg.operator_token().unwrap()).unwrap();
    op.call::<Value, Value>(Method::PUT, &routes::REGISTER_HOST.at(&[&"host-a"]), None)
        .await
        .expect("register host");
    Api {
        url,
        op_token: cfg.operator_token().unwrap(),
        op,
        core,
        _dir: dir,
        _stop: tx,
    }
}

impl Api {
    fn as_token(&self, token: &str) -> Client {
        Client::new(&self.url, token).unwrap()
    }

    /// Registers `host` with a token of its own and, given one, its underlay address (it runs
    /// the overlay); returns the host's client.
    async fn host(&self, host: &str, underlay: Option<Ipv4Addr>) -> Client {
        let t: HostToken = ok(
            &self.op,
            Method::POST,
            &routes::ISSUE_HOST_TOKEN.at(&[&host]),
            None,
        )
        .await;
        let c = self.as_token(&t.token);
        let _: HostInfo = ok(&c, Method::PUT, &routes::REGISTER_HOST.at(&[&host]), None).await;
        if let Some(underlay) = underlay {
            let info: HostInfo = ok(
                &c,
                Method::PUT,
                &routes::SET_HOST_UNDERLAY.at(&[&host]),
                Some(json!({ "underlay": underlay })),
            )
            .await;
            assert_eq!(info.underlay, Some(underlay));
        }
        c
    }

    async fn cloud(&self, body: Value) -> (CreatedCloud, Client) {
        let c: CreatedCloud = self
            .op
            .call(Method::POST, routes::CREATE_CLOUD.path, Some(&body))
            .await
            .expect("create cloud");
        let client = self.as_token(&c.token);
        (c, client)
    }
}

async fn raw(c: &Client, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
    let (status, bytes) = c
        .send(method, path, body, Duration::ZERO)
        .await
        .expect("request");
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("non-JSON body from {path}: {bytes:?}"))
    };
    (status, v)
}

/// A GET whose body is text (a FOCUS export).
async fn raw_text(c: &Client, path: &str) -> (StatusCode, String) {
    let (status, bytes) = c
        .send(Method::GET, path, None::<&Value>, Duration::ZERO)
        .await
        .expect("request");
    (status, String::from_utf8(bytes.to_vec()).expect("UTF-8"))
}

fn api_err(e: ClientError) -> (StatusCode, ErrorBody) {
    match e {
        ClientError::Api { status, body } => (status, body),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Fills a route's path parameters: clouds with `cloud`, names with `x`.
fn fill(path: &str, cloud: CloudId, other: CloudId) -> String {
    path.replace("{cloud}", &cloud.to_string())
        .replace("{provider}", &other.to_string())
        .replace("{consumer}", &other.to_string())
        .replace("{type}", "A")
        .replace(['{', '}'], "")
}

async fn every_route_refuses_other_clouds_tokens_and_missing_tokens(api: Api) {
    let (a, a_client) = api.cloud(json!({"name": "alpha"})).await;
    let (b, _b_client) = api.cloud(json!({"name": "beta"})).await;
    let anonymous = api.as_token("");
    let forged = api.as_token(&format!("atl_{}_not-the-secret", b.cloud.id));
    // Another host's token (paths name host "host"), and a host token with a made-up secret.
    let other_host = {
        let t: HostToken = ok(
            &api.op,
            Method::POST,
            &routes::ISSUE_HOST_TOKEN.at(&[&"other"]),
            None,
        )
        .await;
        api.as_token(&t.token)
    };
    let forged_host = api.as_token("atl_host_other_not-the-secret");
    let body = json!({});
    let mut checked = 0;
    for r in ROUTES.iter() {
        let path = fill(r.path, b.cloud.id, a.cloud.id);
        let send_body = r.body.map(|_| &body);
        // A host's token reaches no cloud's, operator's or other host's route.
        let (status, v) = raw(&other_host, r.method.http(), &path, send_body).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{} {path} with another host's token: {v}",
            r.method
        );
        // No token, and a token with a made-up secret: 401.
        for c in [&anonymous, &forged, &forged_host] {
            let (status, v) = raw(c, r.method.http(), &path, send_body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{} {path}: {v}", r.method);
            assert_eq!(v["error"]["code"], "unauthenticated");
        }
        // Cloud A's token on cloud B's resources (and on operator routes): 403, never data.
        let (status, v) = raw(&a_client, r.method.http(), &path, send_body).await;
        let own_listing = r.method == routes::Method::GET && r.path == routes::LIST_CLOUDS.path;
        if own_listing {
            assert_eq!(status, StatusCode::OK);
            let ids: Vec<&str> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap())
                .collect();
            assert_eq!(
                ids,
                vec![a.cloud.id.to_string()],
                "a cloud token lists only its cloud"
            );
        } else {
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{} {path} with cloud A's token: {v}",
                r.method
            );
            assert_eq!(v["error"]["code"], "forbidden");
        }
        checked += 1;
    }
    assert!(checked >= 35, "only {checked} routes checked");
    // Cloud B is untouched.
    let (status, v) = raw(
        &api.op,
        Method::GET,
        &routes::GET_CLOUD.at(&[&b.cloud.id]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(
        v.get("token_sha256").is_none(),
        "token hashes are never returned"
    );
}

async fn cloud_lifecycle_ipam_quotas_dns_and_cascade_delete(api: Api) {
    let (a, ac) = api
        .cloud(json!({"name": "prod", "quotas": {"vms": 3, "vcpus": 8}}))
        .await;
    let (b, bc) = api.cloud(json!({"name": "other"})).await;
    assert_eq!(a.cloud.cidr.to_string(), "10.0.0.0/16");
    assert_eq!(a.cloud.gateway, Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(a.cloud.zone, "prod.atoll.internal.");
    assert!(a.token.starts_with(&format!("atl_{}_", a.cloud.id)));

    let vm = |name: &str| json!({"name": name, "vcpus": 2, "memory_mib": 256});
    let v1: Vm = ac
        .call(
            Method::POST,
            &routes::CREATE_VM.at(&[&a.cloud.id]),
            Some(&vm("web")),
        )
        .await
        .unwrap();
    let v2: Vm = ac
        .call(
            Method::POST,
            &routes::CREATE_VM.at(&[&a.cloud.id]),
            Some(&vm("db")),
        )
        .await
        .unwrap();
    assert_eq!(v1.ipv4, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(v2.ipv4, Ipv4Addr::new(10, 0, 0, 3));
    assert_eq!(v1.fqdn, "web.prod.atoll.internal.");
    assert_eq!(v1.host, "host-a");
    assert_eq!(v1.status.as_ref().unwrap().state, VmState::Pending);
    // Overlapping ranges: cloud B gets the same first address.
    let vb: Vm = bc
        .call(
            Method::POST,
            &routes::CREATE_VM.at(&[&b.cloud.id]),
            Some(&vm("web")),
        )
        .await
        .unwrap();
    assert_eq!(vb.ipv4, Ipv4Addr::new(10, 0, 0, 2));
    // Same name twice: 409.
    let e = ac
        .call::<Value, Value>(
            Method::POST,
            &routes::CREATE_VM.at(&[&a.cloud.id]),
            Some(&vm("web")),
        )
        .await
        .unwrap_err();
    assert_eq!(api_err(e).0, StatusCode::CONFLICT);
    // vCPU quota (8): 2 + 2 + 6 > 8.
    let big = json!({"name": "big", "vcpus": 6});
    let (status, body) = api_err(
        ac.call::<Value, Value>(
            Method::POST,
            &routes::CREATE_VM.at(&[&a.cloud.id]),
            Some(&big),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body.error.code, "quota_exceeded");
    assert_eq!(body.error.field.as_deref(), Some("quotas.vcpus"));

    // Delete releases the address; the next VM reuses the lowest free one.
    let _: Value = ac
        .call(
            Method::DELETE,
            &routes::DELETE_VM.at(&[&a.cloud.id, &"web"]),
            None::<&Value>,
        )
        .await
        .unwrap();
    let v3: Vm = ac
        .call(
            Method::POST,
            &routes::CREATE_VM.at(&[&a.cloud.id]),
            Some(&vm("cache")),
        )
        .await
        .unwrap();
    assert_eq!(v3.ipv4, Ipv4Addr::new(10, 0, 0, 2));

    // Volumes: quota, attach to a VM, refuse delete while attached.
    let vol: Volume = ac
        .call(
            Method::POST,
            &routes::CREATE_VOLUME.at(&[&a.cloud.id]),
            Some(&json!({"name": "data", "size_gib": 10, "format": "qcow2"})),
        )
        .await
        .unwrap();
    assert_eq!(vol.format, VolumeFormat::Qcow2);
    let _: Volume = ac
        .call(
            Method::POST,
            &routes::ATTACH_VOLUME.at(&[&a.cloud.id, &"data"]),
            Some(&json!({"vm": "db"})),
        )
        .await
        .unwrap();
    let (status, _) = api_err(
        ac.call::<Value, Value>(
            Method::DELETE,
            &routes::DELETE_VOLUME.at(&[&a.cloud.id, &"data"]),
            None,
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status, StatusCode::CONFLICT);
    let db: Vm = ac
        .call(
            Method::GET,
            &routes::GET_VM.at(&[&a.cloud.id, &"db"]),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert_eq!(db.volumes, vec!["data".to_string()]);
    let huge = json!({"name": "huge", "size_gib": 5000});
    let (status, body) = api_err(
        ac.call::<Value, Value>(
            Method::POST,
            &routes::CREATE_VOLUME.at(&[&a.cloud.id]),
            Some(&huge),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (status, body.error.field.as_deref()),
        (StatusCode::CONFLICT, Some("quotas.volume_gib"))
    );

    // DNS: user records beside the automatic ones.
    let _: RecordSet = ac
        .call(
            Method::PUT,
            &routes::PUT_RECORD_SET.at(&[&a.cloud.id, &"www", &"CNAME"]),
            Some(&json!({"values": ["db.prod.atoll.internal."]})),
        )
        .await
        .unwrap();
    let _: RecordSet = ac
        .call(
            Method::PUT,
            &routes::PUT_RECORD_SET.at(&[&a.cloud.id, &"@", &"TXT"]),
            Some(&json!({"values": ["hello"], "ttl": 300})),
        )
        .await
        .unwrap();
    let (status, _) = api_err(
        ac.call::<Value, Value>(
            Method::PUT,
            &routes::PUT_RECORD_SET.at(&[&a.cloud.id, &"www", &"A"]),
            Some(&json!({"values": ["10.0.0.9"]})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status, StatusCode::CONFLICT, "CNAME excludes other types");
    let zone = api.core.zone(a.cloud.id).await.unwrap().unwrap();
    let names: HashSet<(String, RecordType)> = zone
        .records
        .iter()
        .map(|r| (r.fqdn.clone(), r.rtype))
        .collect();
    for want in [
        ("db.prod.atoll.internal.", RecordType::A),
        ("cache.prod.atoll.internal.", RecordType::A),
        ("www.prod.atoll.internal.", RecordType::Cname),
        ("prod.atoll.internal.", RecordType::Txt),
    ] {
        assert!(
            names.contains(&(want.0.to_string(), want.1)),
            "{want:?} missing from {names:?}"
        );
    }

    // Exposure offered to B and accepted: B gets a VIP in its own range and a name in its own
    // zone.
    let _: Exposure = ac
        .call(
            Method::POST,
            &routes::CREATE_EXPOSURE.at(&[&a.cloud.id]),
            Some(&json!({"name": "pg", "protocol": "tcp", "port": 5432, "backends": [{"vm": "db", "port": 5432}]})),
        )
        .await
        .unwrap();
    let _: Offer = ac
        .call(
            Method::POST,
            &routes::CREATE_GRANT.at(&[&a.cloud.id, &"pg"]),
            Some(&json!({"consumer": b.cloud.id})),
        )
        .await
        .unwrap();
    let g: Grant = ok(
        &bc,
        Method::POST,
        &routes::ACCEPT_OFFER.at(&[&b.cloud.id, &a.cloud.id, &"pg"]),
        None,
    )
    .await;
    assert_eq!(
        g.vip,
        Ipv4Addr::new(10, 0, 0, 3),
        "lowest free address of B"
    );
    assert_eq!(
        g.fqdn,
        format!("pg.{}.svc.other.atoll.internal.", a.cloud.id)
    );
    let imports: Vec<Grant> = bc
        .call(
            Method::GET,
            &routes::LIST_IMPORTS.at(&[&b.cloud.id]),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert_eq!(imports, vec![g.clone()]);
    let bzone = api.core.zone(b.cloud.id).await.unwrap().unwrap();
    assert!(bzone
        .records
        .iter()
        .any(|r| r.fqdn == g.fqdn && r.values == vec!["10.0.0.3".to_string()]));

    // Deleting cloud A removes everything of A, and A's grant from B, and nothing of B's own.
    let _: Value = ac
        .call(
            Method::DELETE,
            &routes::DELETE_CLOUD.at(&[&a.cloud.id]),
            None::<&Value>,
        )
        .await
        .unwrap();
    let all = api.core.store().range("", None, 0).await.unwrap();
    let a_id = a.cloud.id.to_string();
    let left: Vec<&str> = all
        .iter()
        .map(|kv| kv.key.as_str())
        .filter(|k| k.contains(&a_id) && !outlives_its_cloud(k))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let imports: Vec<Grant> = bc
        .call(
            Method::GET,
            &routes::LIST_IMPORTS.at(&[&b.cloud.id]),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert!(imports.is_empty());
    let vms: Vec<Vm> = bc
        .call(
            Method::GET,
            &routes::LIST_VMS.at(&[&b.cloud.id]),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert_eq!(vms.len(), 1);
    // A's token is dead.
    let (status, _) = raw(
        &ac,
        Method::GET,
        &routes::GET_CLOUD.at(&[&a.cloud.id]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The grant's VIP went back to B's pool.
    let vb2: Vm = bc
        .call(
            Method::POST,
            &routes::CREATE_VM.at(&[&b.cloud.id]),
            Some(&vm("two")),
        )
        .await
        .unwrap();
    assert_eq!(vb2.ipv4, Ipv4Addr::new(10, 0, 0, 3));
}

async fn concurrent_creates_respect_quota_and_never_share_an_address(api: Api) {
    let (a, ac) = api.cloud(json!({"quotas": {"vms": 7}})).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = ac.clone();
        let path = routes::CREATE_VM.at(&[&a.cloud.id]);
        tasks.push(tokio::spawn(async move {
            c.call::<Value, Vm>(
                Method::POST,
                &path,
                Some(&json!({"name": format!("vm{i}")})),
            )
            .await
        }));
    }
    let mut ips = HashSet::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(vm) => assert!(ips.insert(vm.ipv4), "address {} given twice", vm.ipv4),
            Err(e) => {
                let (status, body) = api_err(e);
                assert_eq!(
                    (status, body.error.code.as_str()),
                    (StatusCode::CONFLICT, "quota_exceeded")
                );
                refused += 1;
            }
        }
    }
    assert_eq!((ips.len(), refused), (7, 13));
    let cloud: Cloud = ac
        .call(
            Method::GET,
            &routes::GET_CLOUD.at(&[&a.cloud.id]),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert_eq!(cloud.usage.vms, 7);
}

async fn bad_input_gets_4xx_json_naming_the_field(api: Api) {
    let (a, ac) = api.cloud(json!({})).await;
    let vms = routes::LIST_VMS.at(&[&a.cloud.id]);
    let cases: Vec<(Method, String, Vec<u8>, StatusCode, &str)> = vec![
        (
            Method::POST,
            vms.clone(),
            b"{\"name\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            Method::POST,
            vms.clone(),
            b"[1,2]".to_vec(),
            StatusCode::BAD_REQUEST,
            "body",
        ),
        (
            Method::POST,
            vms.clone(),
            b"".to_vec(),
            StatusCode::BAD_REQUEST,
            "body",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"x","vcpu":2}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "vcpu",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"vcpus":2}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"x","vcpus":"two"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "vcpus",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"x","vcpus":0}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "vcpus",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"Not_A_Label"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"x","volumes":["a","a"]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "volumes[1]",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"x","volumes":["a","b","c","d","e","f","g","h","i"]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "volumes",
        ),
        (
            Method::POST,
            routes::CREATE_CLOUD.path.into(),
            br#"{"quotas":{"vcpus":-1}}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "quotas.vcpus",
        ),
        (
            Method::POST,
            routes::CREATE_CLOUD.path.into(),
            br#"{"quotas":{"cpus":1}}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "quotas.cpus",
        ),
        (
            Method::POST,
            routes::CREATE_CLOUD.path.into(),
            br#"{"cidr":"10.0.0.1/16"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "cidr",
        ),
        (
            Method::POST,
            routes::CREATE_CLOUD.path.into(),
            br#"{"cidr":"10.0.0.0/30"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "cidr",
        ),
        (
            Method::GET,
            routes::GET_CLOUD.at(&[&"notacloud"]),
            vec![],
            StatusCode::BAD_REQUEST,
            "cloud",
        ),
        (
            Method::GET,
            format!("{}?limit=0", routes::LIST_CLOUDS.path),
            vec![],
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            Method::GET,
            format!("{}?bogus=1", routes::LIST_CLOUDS.path),
            vec![],
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            Method::PUT,
            routes::PUT_RECORD_SET.at(&[&a.cloud.id, &"www", &"A"]),
            br#"{"values":["10.0.0.300"]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "values[0]",
        ),
        (
            Method::PUT,
            routes::PUT_RECORD_SET.at(&[&a.cloud.id, &"www", &"MX"]),
            br#"{"values":["x"]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "type",
        ),
        (
            Method::POST,
            routes::CREATE_EXPOSURE.at(&[&a.cloud.id]),
            br#"{"name":"s","protocol":"sctp","port":1,"backends":[]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "protocol",
        ),
        (
            Method::POST,
            routes::CREATE_EXPOSURE.at(&[&a.cloud.id]),
            br#"{"name":"s","protocol":"tcp","port":80,"backends":[{"vm":"ghost","port":80}]}"#
                .to_vec(),
            StatusCode::BAD_REQUEST,
            "backends[0].vm",
        ),
        (
            Method::POST,
            routes::CREATE_VOLUME.at(&[&a.cloud.id]),
            br#"{"name":"v","size_gib":0}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "size_gib",
        ),
        (
            Method::POST,
            vms.clone(),
            vec![b' '; (1 << 20) + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
        ),
        (
            Method::POST,
            vms.clone(),
            serde_json::to_vec(&json!({"name": "x", "user_data": "a".repeat(MAX_USER_DATA_BYTES + 1)}))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "user_data",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"x","start":"no"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "start",
        ),
        (
            Method::POST,
            vms.clone(),
            br#"{"name":"x","power":"stopped"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "power",
        ),
        // Start and stop take no body or `{}`, nothing else.
        (
            Method::POST,
            format!("{vms}/x/start"),
            br#"{"force":true}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "force",
        ),
        (
            Method::POST,
            format!("{vms}/x/stop"),
            b"[]".to_vec(),
            StatusCode::BAD_REQUEST,
            "body",
        ),
        (
            Method::POST,
            format!("{vms}/x/stop"),
            b"{".to_vec(),
            StatusCode::BAD_REQUEST,
            "body",
        ),
        (
            Method::GET,
            format!("{vms}/Bad_Name/console"),
            vec![],
            StatusCode::BAD_REQUEST,
            "vm",
        ),
        // Status reports are as strict as the rest.
        (
            Method::POST,
            routes::REPORT_STATUS.at(&[&"host-a"]),
            serde_json::to_vec(&json!({"vms": [{"cloud": a.cloud.id, "vm": "x", "status": {"state": "running", "updated_at": 1}, "consol": "x"}]}))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "vms[0].consol",
        ),
        (
            Method::POST,
            routes::REPORT_STATUS.at(&[&"host-a"]),
            serde_json::to_vec(&json!({"vms": [{"cloud": a.cloud.id, "vm": "x", "status": {"state": "rebooting", "updated_at": 1}}]}))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "vms[0].status.state",
        ),
    ];
    for (m, path, body, want_status, want_field) in cases {
        let own = routes::GET_CLOUD.at(&[&a.cloud.id]);
        let token = if path.starts_with(&own) {
            &a.token
        } else {
            &api.op_token
        };
        let (status, bytes) = send_raw(&api.url, token, m.clone(), &path, body).await;
        let v: ErrorBody = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{m} {path}: not an error body ({e}): {bytes:?}"));
        assert_eq!(status, want_status, "{m} {path}: {v:?}");
        assert_eq!(
            v.error.field.as_deref(),
            Some(want_field),
            "{m} {path}: {v:?}"
        );
    }
    // Nothing half-made: the cloud has no VMs, exposures or volumes after all that.
    let vms_now: Vec<Vm> = ac.call(Method::GET, &vms, None::<&Value>).await.unwrap();
    assert!(vms_now.is_empty());
    let cloud: Cloud = ac
        .call(
            Method::GET,
            &routes::GET_CLOUD.at(&[&a.cloud.id]),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert_eq!(cloud.usage, Usage::default());
    // Unknown routes and methods are JSON errors too.
    let (status, v) = raw(&ac, Method::GET, "/v2/clouds", None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_route"))
    );
    let (status, v) = raw(&ac, Method::PATCH, &vms, None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    // A VM holds at most 8 volumes, also by attaching.
    let names: Vec<String> = (0..9).map(|i| format!("d{i}")).collect();
    for name in &names {
        let _: Volume = ok(
            &ac,
            Method::POST,
            &routes::CREATE_VOLUME.at(&[&a.cloud.id]),
            Some(json!({"name": name, "size_gib": 1})),
        )
        .await;
    }
    let vm: Vm = ok(
        &ac,
        Method::POST,
        &vms,
        Some(json!({"name": "full", "volumes": names[..8]})),
    )
    .await;
    assert_eq!(vm.volumes.len(), 8);
    let (status, v) = raw(
        &ac,
        Method::POST,
        &routes::ATTACH_VOLUME.at(&[&a.cloud.id, &"d8"]),
        Some(&json!({"vm": "full"})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("too_many_volumes")),
        "{v}"
    );
    // Deleting it (8 volumes to detach) fits every store's limit.
    let _: Value = ok(&ac, Method::DELETE, &format!("{vms}/full"), None).await;
}

async fn send_raw(
    url: &str,
    token: &str,
    m: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<hyper::body::Bytes>>();
    let req = hyper::Request::builder()
        .method(m)
        .uri(format!("{url}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(hyper::body::Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.expect("request");
    let status = resp.status();
    (
        status,
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

/// SQLite only: the document is generated from the route table and the model types, and the
/// route probe checks routing, which happens before the store is involved.
#[test]
fn openapi_document_is_served_and_checked_in() {
    run(Backend::Sqlite, openapi_document_case);
}

async fn openapi_document_case(api: Api) {
    let (status, served) = raw(&api.as_token(""), Method::GET, routes::OPENAPI_PATH, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, atoll_api::openapi());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let checked_in: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json"))
            .expect("docs/openapi.json is JSON");
    assert!(
        checked_in == served,
        "docs/openapi.json is stale: regenerate it with `cargo run -p atoll-control -- openapi > docs/openapi.json`"
    );
    // Every documented route exists (a request reaches a handler, not the 404/405 fallbacks).
    let empty = json!({});
    for r in ROUTES {
        let path = fill(r.path, CloudId::new(1).unwrap(), CloudId::new(2).unwrap());
        let (status, v) = raw(&api.op, r.method.http(), &path, r.body.map(|_| &empty)).await;
        assert!(
            !matches!(
                v["error"]["code"].as_str(),
                Some("no_route" | "method_not_allowed")
            ),
            "{} {path}: {status} {v}",
            r.method
        );
    }
}

/// host-a's sync after `revision`, long-polling (up to 20 s) on a task of its own.
fn sync_after(
    api: &Api,
    revision: u64,
) -> tokio::task::JoinHandle<Result<SyncDelta, atoll_control::core::CoreError>> {
    let core = api.core.clone();
    tokio::spawn(async move {
        core.sync(
            Principal::Operator,
            "host-a",
            revision,
            Duration::from_secs(20),
        )
        .await
    })
}

async fn host_sync_sends_changes_then_waits(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "s"})).await;
    let full = api
        .core
        .sync(Principal::Operator, "host-a", 0, Duration::ZERO)
        .await
        .unwrap();
    assert!(full.full && full.vms.is_empty());
    // Nothing changes: the long poll times out with no changes.
    let idle = api
        .core
        .sync(
            Principal::Operator,
            "host-a",
            full.revision,
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    assert!(!idle.full && idle.vms.is_empty() && idle.zones.is_empty());
    // A VM created while the host waits wakes it with the placement and the zone.
    let waiter = sync_after(&api, idle.revision);
    let vm: Vm = ac
        .call(
            Method::POST,
            &routes::CREATE_VM.at(&[&a.cloud.id]),
            Some(&json!({"name": "w"})),
        )
        .await
        .unwrap();
    let d = waiter.await.unwrap().unwrap();
    assert_eq!(d.vms.len(), 1);
    assert_eq!(
        (d.vms[0].ipv4, d.vms[0].gateway, d.vms[0].mac.as_str()),
        (vm.ipv4, Ipv4Addr::new(10, 0, 0, 1), "02:a8:0a:00:00:02")
    );
    assert_eq!(d.zones.len(), 1);
    assert!(d.zones[0]
        .records
        .iter()
        .any(|r| r.fqdn == "w.s.atoll.internal."));
    // The cloud came to the host: its egress policy comes with it.
    assert_eq!(
        d.egress,
        vec![CloudEgress {
            cloud: a.cloud.id,
            policy: EgressPolicy::deny_all(),
            address: None,
            cidr: Some(a.cloud.cidr),
        }]
    );
    // A changed policy wakes the host with the policy alone.
    let waiter = sync_after(&api, d.revision);
    let policy: EgressPolicy = ac
        .call(
            Method::PUT,
            &routes::PUT_EGRESS_POLICY.at(&[&a.cloud.id]),
            Some(&json!({"mode": "allow", "deny": [{"cidr": "198.18.0.0/15"}]})),
        )
        .await
        .unwrap();
    let pd = waiter.await.unwrap().unwrap();
    assert_eq!(
        (pd.vms.len(), pd.zones.len(), &pd.egress[..]),
        (
            0,
            0,
            &[CloudEgress {
                cloud: a.cloud.id,
                policy: policy.clone(),
                address: None,
                cidr: Some(a.cloud.cidr),
            }][..]
        )
    );
    let snapshot = api
        .core
        .sync(Principal::Operator, "host-a", 0, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        snapshot.egress,
        vec![CloudEgress {
            cloud: a.cloud.id,
            policy,
            address: None,
            cidr: Some(a.cloud.cidr),
        }]
    );
    // A status report shows up on the VM.
    let report = json!({"vms": [{"cloud": a.cloud.id, "vm": "w", "status": {"state": "network_ready", "device": "atvx", "updated_at": 1}}]});
    let _: Value = api
        .op
        .call(
            Method::POST,
            &routes::REPORT_STATUS.at(&[&"host-a"]),
            Some(&report),
        )
        .await
        .unwrap();
    let got: Vm = ac
        .call(
            Method::GET,
            &routes::GET_VM.at(&[&a.cloud.id, &"w"]),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert_eq!(got.status.unwrap().state, VmState::NetworkReady);
    // The remote form of the long poll, and removal of the cloud.
    let _: Value = ac
        .call(
            Method::DELETE,
            &routes::DELETE_CLOUD.at(&[&a.cloud.id]),
            None::<&Value>,
        )
        .await
        .unwrap();
    let d2: SyncDelta = api
        .op
        .call(
            Method::GET,
            &format!(
                "{}?after={}&wait_ms=5000",
                &routes::SYNC.at(&[&"host-a"]),
                pd.revision
            ),
            None::<&Value>,
        )
        .await
        .unwrap();
    assert_eq!(
        d2.removed_vms,
        vec![VmRef {
            cloud: a.cloud.id,
            vm: "w".into()
        }]
    );
    assert_eq!(d2.removed_zones, vec![a.cloud.id]);
    assert_eq!(d2.removed_egress, vec![a.cloud.id]);
    // Cloud tokens cannot read host state.
    let (status, _) = raw(&ac, Method::GET, &routes::SYNC.at(&[&"host-a"]), None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the cloud is gone, so is its token"
    );
}

/// `method path` with `body` as `c`; panics with the error unless it succeeds.
async fn ok<T: DeserializeOwned>(c: &Client, method: Method, path: &str, body: Option<Value>) -> T {
    c.call(method.clone(), path, body.as_ref())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Whether a key outlives its cloud by design: usage records (billing needs them) and the
/// grace that lets its hosts deliver its last ones.
fn outlives_its_cloud(key: &str) -> bool {
    [
        "usage/",
        "usagegrace/",
        "usagehour/",
        "usagefleet/",
        "usagefrom/",
    ]
    .iter()
    .any(|p| key.starts_with(p))
}

/// Every stored key or value that mentions `cloud` (but what outlives it by design).
async fn mentions(api: &Api, cloud: CloudId) -> Vec<String> {
    let id = cloud.to_string();
    api.core
        .store()
        .range("", None, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|kv| !outlives_its_cloud(&kv.key))
        .filter(|kv| kv.key.contains(&id) || String::from_utf8_lossy(&kv.value).contains(&id))
        .map(|kv| format!("{} = {}", kv.key, String::from_utf8_lossy(&kv.value)))
        .collect()
}

/// Consumers of the provider in the wide-grant case: deleting the provider's exposure revokes
/// this many grants (2 store ops each in one transaction: 142 ops), deleting the provider twice
/// as many (212 ops), over a default etcd's 128.
const CONSUMERS: usize = 70;

async fn deletes_revoke_more_grants_than_one_store_txn_holds(api: Api) {
    let (p, pc) = api.cloud(json!({"name": "provider"})).await;
    let pid = p.cloud.id;
    let _: Vm = ok(
        &pc,
        Method::POST,
        &routes::CREATE_VM.at(&[&pid]),
        Some(json!({"name": "db"})),
    )
    .await;
    for name in ["a", "b"] {
        let _: Exposure = ok(
            &pc,
            Method::POST,
            &routes::CREATE_EXPOSURE.at(&[&pid]),
            Some(json!({"name": name, "protocol": "tcp", "port": 5432, "backends": [{"vm": "db", "port": 5432}]})),
        )
        .await;
    }
    // Every consumer is offered exposures a (half of them accept it, the other half leave it
    // pending) and b (accepted), and grants the provider an exposure of its own.
    let mut consumers = Vec::new();
    for i in 0..CONSUMERS {
        let (c, cc) = api.cloud(json!({"name": format!("c{i}")})).await;
        let cid = c.cloud.id;
        let mut granted = Vec::new();
        for exposure in ["a", "b"] {
            let o: Offer = ok(
                &pc,
                Method::POST,
                &routes::CREATE_GRANT.at(&[&pid, &exposure]),
                Some(json!({"consumer": cid})),
            )
            .await;
            assert_eq!(o.state, OfferState::Pending);
        }
        for exposure in ["a", "b"] {
            if exposure == "a" && i % 2 == 1 {
                continue;
            }
            let g: Grant = ok(
                &cc,
                Method::POST,
                &routes::ACCEPT_OFFER.at(&[&cid, &pid, &exposure]),
                None,
            )
            .await;
            assert_eq!(g.state, GrantState::Active);
            granted.push(g);
        }
        let gb = granted.pop().unwrap();
        let ga = granted.pop();
        let _: Vm = ok(
            &cc,
            Method::POST,
            &routes::CREATE_VM.at(&[&cid]),
            Some(json!({"name": "svc"})),
        )
        .await;
        let _: Exposure = ok(
            &cc,
            Method::POST,
            &routes::CREATE_EXPOSURE.at(&[&cid]),
            Some(json!({"name": "s", "protocol": "udp", "port": 53, "backends": [{"vm": "svc", "port": 53}]})),
        )
        .await;
        let _: Offer = ok(
            &cc,
            Method::POST,
            &routes::CREATE_GRANT.at(&[&cid, &"s"]),
            Some(json!({"consumer": pid})),
        )
        .await;
        let _: Grant = ok(
            &pc,
            Method::POST,
            &routes::ACCEPT_OFFER.at(&[&pid, &cid, &"s"]),
            None,
        )
        .await;
        consumers.push((cid, cc, ga, gb));
    }
    let received: Vec<Grant> = ok(&pc, Method::GET, &routes::LIST_IMPORTS.at(&[&pid]), None).await;
    assert_eq!(received.len(), CONSUMERS);

    // Deleting exposure a revokes its grants and withdraws its offers: the consumers keep only
    // b.
    let _: Value = ok(
        &pc,
        Method::DELETE,
        &routes::DELETE_EXPOSURE.at(&[&pid, &"a"]),
        None,
    )
    .await;
    let (status, _) = raw(
        &pc,
        Method::GET,
        &routes::LIST_GRANTS.at(&[&pid, &"a"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (cid, cc, ga, gb) in &consumers {
        let imports: Vec<Grant> =
            ok(cc, Method::GET, &routes::LIST_IMPORTS.at(&[&cid]), None).await;
        assert_eq!(imports, vec![gb.clone()], "imports of {cid}");
        let offers: Vec<Offer> = ok(cc, Method::GET, &routes::LIST_OFFERS.at(&[&cid]), None).await;
        assert!(offers.is_empty(), "offers to {cid}: {offers:?}");
        if let Some(ga) = ga {
            let vip = format!("c/{cid}/ip/{}", ga.vip);
            assert!(
                api.core.store().get(&vip).await.unwrap().is_none(),
                "{vip} is still allocated"
            );
        }
    }

    // Deleting the provider revokes the grants of b and the grants it received; nothing of it
    // is left anywhere, and the consumers keep their own things.
    let _: Value = ok(&pc, Method::DELETE, &routes::DELETE_CLOUD.at(&[&pid]), None).await;
    let left = mentions(&api, pid).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    for (cid, cc, _, _) in &consumers {
        let imports: Vec<Grant> =
            ok(cc, Method::GET, &routes::LIST_IMPORTS.at(&[&cid]), None).await;
        assert!(imports.is_empty(), "imports of {cid}: {imports:?}");
        let grants: Vec<Grant> = ok(
            cc,
            Method::GET,
            &routes::LIST_GRANTS.at(&[&cid, &"s"]),
            None,
        )
        .await;
        assert!(grants.is_empty(), "grants of {cid}'s exposure: {grants:?}");
        let vms: Vec<Vm> = ok(cc, Method::GET, &routes::LIST_VMS.at(&[&cid]), None).await;
        assert_eq!(vms.len(), 1);
    }
    // Both VIPs went back to the consumer's pool.
    let (cid, cc, ga, gb) = &consumers[0];
    for (name, vip) in [("n1", ga.as_ref().unwrap().vip), ("n2", gb.vip)] {
        let vm: Vm = ok(
            cc,
            Method::POST,
            &routes::CREATE_VM.at(&[&cid]),
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(vm.ipv4, vip, "{name} gets the lowest free address");
    }
}

/// Hosts the cloud of the too-many-hosts case is placed on: removing its placements and its own
/// keys (its record, everything under it, its network id's holder) takes 126 + 3 store ops,
/// one over a default etcd's 128.
const PLACEMENT_HOSTS: usize = 126;

/// A host's token: its own registration, sync and status work; another host's, the host list
/// and token issuing do not; issuing a new token ends the old one; hashes are never returned.
async fn host_tokens_reach_only_their_host(api: Api) {
    let issued: HostToken = ok(
        &api.op,
        Method::POST,
        &routes::ISSUE_HOST_TOKEN.at(&[&"h1"]),
        None,
    )
    .await;
    assert!(issued.token.starts_with("atl_host_h1_"), "{}", issued.token);
    assert_eq!(issued.host.name, "h1");
    let h1 = api.as_token(&issued.token);
    let _: HostInfo = ok(&h1, Method::PUT, &routes::REGISTER_HOST.at(&[&"h1"]), None).await;
    let delta: SyncDelta = ok(
        &h1,
        Method::GET,
        &format!("{}?wait_ms=0", &routes::SYNC.at(&[&"h1"])),
        None,
    )
    .await;
    assert!(delta.full);
    let (status, v) = raw(
        &h1,
        Method::POST,
        &routes::REPORT_STATUS.at(&[&"h1"]),
        Some(&json!({"vms": []})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let _: HostToken = ok(
        &api.op,
        Method::POST,
        &routes::ISSUE_HOST_TOKEN.at(&[&"h2"]),
        None,
    )
    .await;
    for (m, path) in [
        (
            Method::GET,
            format!("{}?wait_ms=0", &routes::SYNC.at(&[&"h2"])),
        ),
        (Method::PUT, routes::REGISTER_HOST.at(&[&"h2"])),
        (Method::GET, routes::LIST_HOSTS.path.to_string()),
        (Method::POST, routes::ISSUE_HOST_TOKEN.at(&[&"h1"])),
        (Method::GET, routes::LIST_CLOUDS.path.to_string()),
        (Method::POST, routes::CREATE_CLOUD.path.to_string()),
    ] {
        let body = (m == Method::POST).then(|| json!({}));
        let (status, v) = raw(&h1, m.clone(), &path, body.as_ref()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{m} {path}: {v}");
    }
    // Reports for another host's VMs are refused by the store compare (tested elsewhere);
    // here a bad host name in a token issue is a 400 naming the field.
    let (status, v) = raw(
        &api.op,
        Method::POST,
        &routes::ISSUE_HOST_TOKEN.at(&[&"Bad_Name"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    // Rotation: the old token stops working at once, the new one works.
    let rotated: HostToken = ok(
        &api.op,
        Method::POST,
        &routes::ISSUE_HOST_TOKEN.at(&[&"h1"]),
        None,
    )
    .await;
    assert_ne!(rotated.token, issued.token);
    assert_eq!(rotated.host.registered_at, issued.host.registered_at);
    let (status, v) = raw(
        &h1,
        Method::GET,
        &format!("{}?wait_ms=0", &routes::SYNC.at(&[&"h1"])),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let _: SyncDelta = ok(
        &api.as_token(&rotated.token),
        Method::GET,
        &format!("{}?wait_ms=0", &routes::SYNC.at(&[&"h1"])),
        None,
    )
    .await;
    let (status, v) = raw(&api.op, Method::GET, routes::LIST_HOSTS.path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !v.to_string().contains("token"),
        "hashes are never returned: {v}"
    );
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"h1") && names.contains(&"h2"), "{names:?}");
}

/// A second control plane on the case's store (a fresh etcd connection for etcd, the same
/// SQLite store otherwise), serving on another loopback port until the sender is dropped.
async fn second_plane(api: &Api) -> (String, tokio::sync::oneshot::Sender<()>) {
    let store = match api.core.store() {
        Store::Etcd(_) => Store::Etcd(
            atoll_control::store::etcd::EtcdStore::connect(
                vec![support::ETCD_ENDPOINT.into()],
                support::ETCD_PREFIX.into(),
            )
            .await
            .expect("second etcd connection"),
        ),
        other => other.clone(),
    };
    let core = Core::start(store, api.core.config().clone())
        .await
        .expect("second control plane");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(core, listener, async {
        let _ = rx.await;
    }));
    (url, tx)
}

/// A cloud's token rotates (`POST /v1/clouds/{cloud}/token`, by the cloud itself or the
/// operator): the reply carries a new token once, the old one is refused at once, also by a
/// second control plane on the same store that had just accepted it; another cloud cannot
/// rotate it, and the route takes no body but `{}`.
async fn cloud_tokens_rotate_and_the_old_one_stops_at_once(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "rot"})).await;
    let (_, bc) = api.cloud(json!({"name": "other"})).await;
    let id = a.cloud.id;
    let get = routes::GET_CLOUD.at(&[&id]);
    let rotate = routes::ROTATE_CLOUD_TOKEN.at(&[&id]);
    let (url2, _stop2) = second_plane(&api).await;
    let on_second = |token: &str| Client::new(&url2, token).unwrap();
    let _: Cloud = ok(&on_second(&a.token), Method::GET, &get, None).await;

    // The cloud rotates its own token.
    let (status, v) = raw(&ac, Method::POST, &rotate, None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let first: CloudToken = serde_json::from_value(v.clone()).expect("a CloudToken");
    assert!(
        first.token.starts_with(&format!("atl_{id}_")) && first.token != a.token,
        "{v}"
    );
    assert_eq!(first.cloud.id, id);
    assert!(
        v["cloud"].get("token_sha256").is_none(),
        "hashes are never returned: {v}"
    );
    for url in [&api.url, &url2] {
        let (status, v) = raw(
            &Client::new(url, &a.token).unwrap(),
            Method::GET,
            &get,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "old token at {url}: {v}");
        let _: Cloud = ok(
            &Client::new(url, &first.token).unwrap(),
            Method::GET,
            &get,
            None,
        )
        .await;
    }
    // The operator rotates it too; `{}` is accepted, any other body is refused by name.
    let second: CloudToken = ok(&api.op, Method::POST, &rotate, Some(json!({}))).await;
    assert_ne!(second.token, first.token);
    for url in [&api.url, &url2] {
        let (status, _) = raw(
            &Client::new(url, &first.token).unwrap(),
            Method::GET,
            &get,
            None,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "first rotated token at {url}"
        );
    }
    let c2 = api.as_token(&second.token);
    let (status, v) = raw(&c2, Method::POST, &rotate, Some(&json!({"keep_old": true}))).await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("keep_old")),
        "{v}"
    );
    // Another cloud cannot rotate it; the current token still works after all that.
    let (status, v) = raw(&bc, Method::POST, &rotate, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let vm: Vm = ok(
        &c2,
        Method::POST,
        &format!("{get}/vms"),
        Some(json!({"name": "w"})),
    )
    .await;
    assert_eq!(vm.cloud, id);
    // A deleted cloud has no token to rotate.
    let _: Value = ok(&api.op, Method::DELETE, &get, None).await;
    let (status, v) = raw(&api.op, Method::POST, &rotate, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
}

/// A dotted name of `len` characters (labels of at most 50).
fn dotted_name(len: usize) -> String {
    let mut name = String::new();
    while len - name.len() > 51 {
        name.push_str(&"n".repeat(50));
        name.push('.');
    }
    name.push_str(&"n".repeat(len - name.len()));
    name
}

/// What the dataplane or a host's DNS server cannot hold is refused with a 4xx naming the
/// field, and nothing is stored: an exposure with more backends than a `VIPS` entry holds
/// (`MAX_BACKENDS`, 16: it used to be accepted and never installed), a record set whose name
/// with the zone is over DNS's 253 characters, and a VM under a name that holds a CNAME (both
/// would make hosts refuse the cloud's whole zone, and every later change of it).
async fn what_hosts_cannot_hold_is_refused_at_the_request(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "l".repeat(63)})).await;
    let base = routes::GET_CLOUD.at(&[&a.cloud.id]);
    let _: Vm = ok(
        &ac,
        Method::POST,
        &format!("{base}/vms"),
        Some(json!({"name": "b"})),
    )
    .await;

    // Backends: MAX_BACKENDS fit, one more is refused.
    let max = atoll_control::core::MAX_BACKENDS;
    assert_eq!(max, 16, "the dataplane's limit, as this test documents it");
    let exposure = |name: &str, n: usize| {
        let backends: Vec<Value> = (1..=n).map(|p| json!({"vm": "b", "port": p})).collect();
        json!({"name": name, "protocol": "tcp", "port": 80, "backends": backends})
    };
    let exposures = format!("{base}/exposures");
    let (status, v) = raw(
        &ac,
        Method::POST,
        &exposures,
        Some(&exposure("wide", max + 1)),
    )
    .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("backends")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("17 backends") && msg.contains("1 to 16"),
        "{msg}"
    );
    let (status, _) = raw(&ac, Method::GET, &format!("{exposures}/wide"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing stored");
    let full: Exposure = ok(&ac, Method::POST, &exposures, Some(exposure("full", max))).await;
    assert_eq!(full.backends.len(), max);

    // Record names: with the zone (63-character cloud name) at most 253 characters.
    let apex = a.cloud.zone.trim_end_matches('.');
    let room = 253 - apex.len() - 1;
    assert!(
        room < 190,
        "the per-name limit alone would accept what DNS cannot hold"
    );
    let record = |name: &str| format!("{base}/dns/{name}/TXT");
    let body = json!({"values": ["x"]});
    let fits: RecordSet = ok(
        &ac,
        Method::PUT,
        &record(&dotted_name(room)),
        Some(body.clone()),
    )
    .await;
    assert_eq!(fits.name.len(), room);
    let long = dotted_name(room + 1);
    let (status, v) = raw(&ac, Method::PUT, &record(&long), Some(&body)).await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("name")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("254 characters") && msg.contains("at most 253"),
        "{msg}"
    );

    // A CNAME's name cannot become a VM's (nor a VM's name a record's, as before).
    let target = json!({"values": [format!("b.{}", a.cloud.zone)]});
    let _: RecordSet = ok(
        &ac,
        Method::PUT,
        &format!("{base}/dns/alias/CNAME"),
        Some(target),
    )
    .await;
    let (status, v) = raw(
        &ac,
        Method::POST,
        &format!("{base}/vms"),
        Some(&json!({"name": "alias"})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("cname_conflict")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("alias holds a CNAME"),
        "{v}"
    );
    let (status, v) = raw(&ac, Method::PUT, &format!("{base}/dns/b/TXT"), Some(&body)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("reserved"))
    );
    let vms: Vec<Vm> = ok(&ac, Method::GET, &format!("{base}/vms"), None).await;
    assert_eq!(
        vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    let zone = api.core.zone(a.cloud.id).await.unwrap().unwrap();
    assert!(
        zone.records
            .iter()
            .all(|r| r.fqdn.trim_end_matches('.').len() <= 253),
        "every name a host gets fits DNS"
    );
}

/// Hosts heartbeat through their syncs. One silent for longer than `hosts.timeout_secs` is
/// shown as not live and gets no new VM; with no live host a create is a 503 `no_host`; a sync
/// brings it back.
async fn silent_hosts_get_no_new_placements(api: Api) {
    let (c, cc) = api.cloud(json!({"name": "live"})).await;
    let id = c.cloud.id;
    let hosts = || async {
        let v: Vec<HostInfo> = ok(&api.op, Method::GET, routes::LIST_HOSTS.path, None).await;
        v.into_iter()
            .map(|h| (h.name.clone(), h))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let mut now = hosts().await;
    // Hosts other cases of this store registered may be there too; ours is "quiet".
    let _: HostInfo = ok(
        &api.op,
        Method::PUT,
        &routes::REGISTER_HOST.at(&[&"quiet"]),
        None,
    )
    .await;
    now.extend(hosts().await);
    assert!(now["quiet"].live, "a registration is a sign of life");
    for (name, h) in &now {
        if name != "quiet" {
            silence(&api, h).await;
        }
    }
    let vm: Vm = ok(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&id]),
        Some(json!({"name": "a"})),
    )
    .await;
    assert_eq!(vm.host, "quiet");
    // "quiet" goes silent: its record says it was last seen long ago.
    silence(&api, &hosts().await["quiet"]).await;
    let shown = hosts().await;
    assert!(!shown["quiet"].live, "{:?}", shown["quiet"]);
    let a: Vm = ok(&cc, Method::GET, &routes::GET_VM.at(&[&id, &"a"]), None).await;
    assert!(
        !a.host_live,
        "a VM shows that its host's reports may be stale"
    );
    let (status, v) = raw(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&id]),
        Some(&json!({"name": "b"})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_host")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hosts.timeout_secs"),
        "{v}"
    );
    // A sync is a heartbeat: the host is live and placed on again.
    let _: SyncDelta = ok(
        &api.op,
        Method::GET,
        &format!("{}?wait_ms=0", &routes::SYNC.at(&[&"quiet"])),
        None,
    )
    .await;
    wait_for_host(&api, "quiet", true).await;
    let vm: Vm = ok(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&id]),
        Some(json!({"name": "b"})),
    )
    .await;
    assert_eq!(vm.host, "quiet");
    assert!(vm.host_live);
    let listed: Vec<Vm> = ok(&cc, Method::GET, &routes::LIST_VMS.at(&[&id]), None).await;
    assert!(listed.iter().all(|v| v.host_live), "{listed:?}");
}

/// A cordoned host gets no new VM or volume (with no other host, a create is a 503
/// `no_host`), keeps its cordon through its heartbeats, and takes placements again once
/// uncordoned. Only the operator cordons.
async fn cordoned_hosts_get_no_new_placements(api: Api) {
    let (c, cc) = api.cloud(json!({"name": "cordon"})).await;
    let id = c.cloud.id;
    let _: HostInfo = ok(
        &api.op,
        Method::PUT,
        &routes::REGISTER_HOST.at(&[&"busy"]),
        None,
    )
    .await;
    let others: Vec<HostInfo> = ok(&api.op, Method::GET, routes::LIST_HOSTS.path, None).await;
    for h in others.iter().filter(|h| h.name != "busy") {
        silence(&api, h).await;
    }
    let vm: Vm = ok(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&id]),
        Some(json!({"name": "a"})),
    )
    .await;
    assert_eq!(vm.host, "busy");
    let (status, v) = raw(&cc, Method::POST, &routes::CORDON_HOST.at(&[&"busy"]), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let h: HostInfo = ok(
        &api.op,
        Method::POST,
        &routes::CORDON_HOST.at(&[&"busy"]),
        None,
    )
    .await;
    assert!(h.cordoned && h.live, "{h:?}");
    let (status, v) = raw(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&id]),
        Some(&json!({"name": "b"})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_host")),
        "{v}"
    );
    let (status, v) = raw(
        &cc,
        Method::POST,
        &routes::CREATE_VOLUME.at(&[&id]),
        Some(&json!({"name": "d", "size_gib": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    // A heartbeat rewrites the record: the cordon stays.
    let stale: Vec<HostInfo> = ok(&api.op, Method::GET, routes::LIST_HOSTS.path, None).await;
    silence(&api, stale.iter().find(|h| h.name == "busy").unwrap()).await;
    let _: SyncDelta = ok(
        &api.op,
        Method::GET,
        &format!("{}?wait_ms=0", &routes::SYNC.at(&[&"busy"])),
        None,
    )
    .await;
    wait_for_host(&api, "busy", true).await;
    let (status, _) = raw(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&id]),
        Some(&json!({"name": "b"})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "still cordoned after a heartbeat"
    );
    let listed: Vec<HostInfo> = ok(&api.op, Method::GET, routes::LIST_HOSTS.path, None).await;
    assert!(
        listed.iter().any(|h| h.name == "busy" && h.cordoned),
        "{listed:?}"
    );
    let h: HostInfo = ok(
        &api.op,
        Method::POST,
        &routes::UNCORDON_HOST.at(&[&"busy"]),
        None,
    )
    .await;
    assert!(!h.cordoned);
    let vm: Vm = ok(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&id]),
        Some(json!({"name": "b"})),
    )
    .await;
    assert_eq!(vm.host, "busy");
    let (status, v) = raw(
        &api.op,
        Method::POST,
        &routes::CORDON_HOST.at(&[&"nosuch"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
}

/// Until traffic between hosts is carried, a cloud's VMs and volumes go where the cloud
/// already is, and a new cloud goes to the least loaded host.
async fn a_cloud_stays_on_one_host(api: Api) {
    for h in ["ha", "hb", "hc"] {
        let _: HostInfo = ok(&api.op, Method::PUT, &routes::REGISTER_HOST.at(&[&h]), None).await;
    }
    let (x, xc) = api.cloud(json!({"name": "x"})).await;
    let xid = x.cloud.id;
    let mut hosts = HashSet::new();
    for i in 0..6 {
        let vm: Vm = ok(
            &xc,
            Method::POST,
            &routes::CREATE_VM.at(&[&xid]),
            Some(json!({"name": format!("v{i}")})),
        )
        .await;
        hosts.insert(vm.host);
    }
    let vol: Volume = ok(
        &xc,
        Method::POST,
        &routes::CREATE_VOLUME.at(&[&xid]),
        Some(json!({"name": "d", "size_gib": 1})),
    )
    .await;
    hosts.insert(vol.host);
    assert_eq!(hosts.len(), 1, "cloud x is on one host: {hosts:?}");
    let home = hosts.into_iter().next().unwrap();
    let (y, yc) = api.cloud(json!({"name": "y"})).await;
    let vm: Vm = ok(
        &yc,
        Method::POST,
        &routes::CREATE_VM.at(&[&y.cloud.id]),
        Some(json!({"name": "w"})),
    )
    .await;
    assert_ne!(vm.host, home, "a new cloud goes to a less loaded host");
    // Its home cordoned, the cloud grows elsewhere rather than not at all.
    let _: HostInfo = ok(
        &api.op,
        Method::POST,
        &routes::CORDON_HOST.at(&[&home]),
        None,
    )
    .await;
    let vm: Vm = ok(
        &xc,
        Method::POST,
        &routes::CREATE_VM.at(&[&xid]),
        Some(json!({"name": "later"})),
    )
    .await;
    assert_ne!(vm.host, home);
}

/// Hosts register their underlay addresses with their own tokens (one host per address);
/// each cloud gets a network id of its own; a cloud whose hosts all run the overlay spreads
/// over them (never to a host without it), and each host's sync carries the cloud's VMs on
/// the other hosts (and nothing of clouds it does not run), and forgets them when they go.
/// Placement reads the feed, which a host's own requests update at once.
/// Exposures across hosts, as the control plane sends them (see "Exposures across hosts" in
/// docs/design.md): the backend on host xa, the consumer on xb and xc. Each consumer host's
/// sync carries the service with its own NAT address (xb, first, the grant's; xc a new one of
/// the provider's range), the provider's network id and where its backend runs, and nothing
/// of the provider's other VMs; the provider's host carries the NAT addresses as routes to the
/// consumer hosts and no service. The grant shows them, stays `active`, and its revocation
/// frees the extra address. A control plane starting on a store whose grants predate the grant
/// index builds it, so it still sends consumer hosts their services.
async fn grants_get_a_nat_address_per_consumer_host_and_each_host_its_part(api: Api) {
    let underlay = |i: u8| Ipv4Addr::new(10, 9, 2, i + 1);
    for (i, h) in ["xa", "xb", "xc"].into_iter().enumerate() {
        api.host(h, Some(underlay(i as u8))).await;
    }
    let (p, pc) = api.cloud(json!({"name": "prov"})).await;
    let (c, cc) = api.cloud(json!({"name": "cons"})).await;
    let (pid, cid) = (p.cloud.id, c.cloud.id);
    let vm = |client: &Client, cloud: CloudId, name: &'static str| {
        let client = client.clone();
        async move {
            let v: Vm = ok(
                &client,
                Method::POST,
                &routes::CREATE_VM.at(&[&cloud]),
                Some(json!({ "name": name })),
            )
            .await;
            v
        }
    };
    // By load: the backend on xa, then the consumer on xb and xc; then another provider VM,
    // not a backend, on xa (a tie goes to the first host by name): never sent to the
    // consumer hosts.
    let web = vm(&pc, pid, "web").await;
    let c1 = vm(&cc, cid, "c1").await;
    let c2 = vm(&cc, cid, "c2").await;
    assert_eq!(
        (web.host.as_str(), c1.host.as_str(), c2.host.as_str()),
        ("xa", "xb", "xc")
    );
    let other = vm(&pc, pid, "other").await;
    assert_eq!(other.host, "xa");
    let _: Exposure = ok(
        &pc,
        Method::POST,
        &routes::CREATE_EXPOSURE.at(&[&pid]),
        Some(json!({"name": "svc", "protocol": "udp", "port": 53,
                    "backends": [{"vm": "web", "port": 5353}]})),
    )
    .await;
    let _: OfferPolicy = ok(
        &cc,
        Method::PUT,
        &routes::PUT_OFFER_POLICY.at(&[&cid]),
        Some(json!({"accept_from": [pid]})),
    )
    .await;
    let _: Value = ok(
        &pc,
        Method::POST,
        &routes::CREATE_GRANT.at(&[&pid, &"svc"]),
        Some(json!({"consumer": cid})),
    )
    .await;
    let sync = |h: &'static str| {
        let core = api.core.clone();
        async move {
            core.sync(Principal::Operator, h, 0, Duration::ZERO)
                .await
                .unwrap()
        }
    };
    let grant = || async {
        let g: Vec<Grant> = ok(
            &pc,
            Method::GET,
            &routes::LIST_GRANTS.at(&[&pid, &"svc"]),
            None,
        )
        .await;
        g.into_iter().next().expect("the grant")
    };
    let first = grant().await;
    // Each consumer host: its service, from its own NAT address, and the backend's location.
    let mut nats = Vec::new();
    for (h, other_consumer) in [("xb", &c2), ("xc", &c1)] {
        let d = sync(h).await;
        let svc: Vec<&Service> = d
            .services
            .iter()
            .filter(|s| s.provider == pid)
            .flat_map(|s| &s.services)
            .collect();
        assert_eq!(svc.len(), 1, "{h}: {:?}", d.services);
        assert_eq!((svc[0].consumer, svc[0].vip), (cid, first.vip));
        nats.push(svc[0].nat_ipv4);
        let provider = d
            .remote
            .iter()
            .find(|r| r.cloud == pid)
            .expect("the provider");
        assert_eq!(provider.vni, p.cloud.vni);
        assert_eq!(
            provider
                .endpoints
                .iter()
                .map(|e| (e.vm.as_str(), e.host.as_str()))
                .collect::<Vec<_>>(),
            vec![("web", "xa")],
            "{h}: only the backend"
        );
        assert!(provider.nats.is_empty());
        // Its own cloud's other VM, on the other consumer host, as always.
        let own = d.remote.iter().find(|r| r.cloud == cid).expect("its cloud");
        assert!(own.endpoints.iter().any(|e| e.vm == other_consumer.name));
    }
    assert_eq!(
        nats[0], first.nat_ipv4,
        "the first consumer host has the grant's"
    );
    assert_ne!(nats[1], nats[0]);
    assert!(![web.ipv4, other.ipv4].contains(&nats[1]));
    let g = grant().await;
    assert_eq!(g.state, GrantState::Active, "{g:?}");
    let mut listed: Vec<(String, Ipv4Addr)> = g
        .host_nats
        .iter()
        .map(|n| (n.host.clone(), n.ipv4))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![("xb".to_string(), nats[0]), ("xc".to_string(), nats[1])]
    );
    // The provider's host: routes back to both consumer hosts, no service.
    let d = sync("xa").await;
    assert!(
        d.services.iter().all(|s| s.services.is_empty()),
        "{:?}",
        d.services
    );
    let mine = d
        .remote
        .iter()
        .find(|r| r.cloud == pid)
        .expect("the provider");
    let mut routed: Vec<(Ipv4Addr, String, Ipv4Addr)> = mine
        .nats
        .iter()
        .map(|n| (n.ipv4, n.host.clone(), n.underlay))
        .collect();
    routed.sort();
    let mut want = vec![
        (nats[0], "xb".to_string(), underlay(1)),
        (nats[1], "xc".to_string(), underlay(2)),
    ];
    want.sort();
    assert_eq!(routed, want);
    // A third consumer host is beyond `clouds.max_nat_addresses_per_grant` (2 here): its
    // VM's host gets its cloud but not the service, and the grant keeps two addresses.
    api.host("xd", Some(underlay(3))).await;
    let c3 = vm(&cc, cid, "c3").await;
    assert_eq!(c3.host, "xd");
    let d = sync("xd").await;
    assert!(
        d.services
            .iter()
            .filter(|s| s.provider == pid)
            .all(|s| s.services.is_empty()),
        "{:?}",
        d.services
    );
    assert!(d.remote.iter().any(|r| r.cloud == cid));
    assert_eq!(grant().await.host_nats.len(), 2);
    assert_eq!(
        sync("xa")
            .await
            .remote
            .iter()
            .find(|r| r.cloud == pid)
            .expect("the provider")
            .nats
            .len(),
        2
    );

    // A control plane starting on this store after its grants lost their index (as a store
    // written before the index has none) builds it and sends xb its service.
    let store = api.core.store().clone();
    store
        .txn(atoll_control::store::Txn {
            compares: vec![],
            success: vec![
                atoll_control::store::Op::DeletePrefix {
                    prefix: "grantidx/".into(),
                },
                atoll_control::store::Op::Delete {
                    key: "migrations/grantidx".into(),
                },
            ],
        })
        .await
        .unwrap();
    let restarted = Core::start(store.clone(), api.core.config().clone())
        .await
        .unwrap();
    let d = restarted
        .sync(Principal::Operator, "xb", 0, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        d.services
            .iter()
            .any(|s| s.provider == pid && s.services.len() == 1),
        "{:?}",
        d.services
    );
    assert!(store.get("migrations/grantidx").await.unwrap().is_some());

    // Revoked: the extra address is free again, the index key gone.
    let (status, _) = raw(
        &pc,
        Method::DELETE,
        &routes::REVOKE_GRANT.at(&[&pid, &"svc", &cid]),
        None,
    )
    .await;
    assert!(status.is_success());
    assert!(store
        .get(&format!("c/{pid}/ip/{}", nats[1]))
        .await
        .unwrap()
        .is_none());
    assert!(store.range("grantidx/", None, 0).await.unwrap().is_empty());
}

/// 32 VMs of 32 new clouds created at once over 8 overlay hosts: each pick counts in its
/// host's load until it commits, so they spread (without that, all of them read the same
/// least-loaded host and herd there).
async fn concurrent_creates_spread_instead_of_herding(api: Api) {
    for i in 0..8u8 {
        api.host(&format!("sp{i}"), Some(Ipv4Addr::new(10, 9, 3, i + 1)))
            .await;
    }
    let mut clouds = Vec::new();
    for i in 0..32 {
        clouds.push(api.cloud(json!({ "name": format!("s{i}") })).await);
    }
    let creates = clouds.iter().map(|(c, cc)| {
        let (cc, id) = (cc.clone(), c.cloud.id);
        async move {
            let v: Vm = ok(
                &cc,
                Method::POST,
                &routes::CREATE_VM.at(&[&id]),
                Some(json!({ "name": "v" })),
            )
            .await;
            v.host
        }
    });
    let hosts: Vec<String> = futures_join_all(creates).await;
    let mut per_host = std::collections::BTreeMap::new();
    for h in &hosts {
        *per_host.entry(h.as_str()).or_insert(0) += 1;
    }
    assert_eq!(per_host.len(), 8, "every host took some: {per_host:?}");
    assert!(
        per_host.values().all(|n| (2..=6).contains(n)),
        "{per_host:?}"
    );
}

/// Runs the futures concurrently on this task (no spawn: the clients are not `'static`).
async fn futures_join_all<F: Future>(fs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let fs: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = fs.iter().map(|_| None).collect();
    let mut fs: Vec<Option<std::pin::Pin<Box<F>>>> = fs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in fs.iter_mut().enumerate() {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        out[i] = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|v| v.expect("ready")).collect()
}

/// Anti-affinity: VMs of one cloud naming the same group land on different hosts; when every
/// host running the overlay holds one (another host without the overlay does not count), or
/// the volumes bind a VM to such a host, the create is refused (409 `anti_affinity`) and
/// nothing is written; other groups and VMs without one are unaffected; a group member's
/// delete frees its host; a bad group name is a 400 naming the field.
async fn vms_of_one_anti_affinity_group_never_share_a_host(api: Api) {
    for (i, h) in ["aa", "ab", "ac", "ad"].into_iter().enumerate() {
        // Host ad runs no overlay.
        let underlay = (h != "ad").then(|| Ipv4Addr::new(10, 9, 1, i as u8 + 1));
        api.host(h, underlay).await;
    }
    let (x, xc) = api.cloud(json!({"name": "x"})).await;
    let xid = x.cloud.id;
    let create = |name: &str, group: Option<&str>, volumes: Vec<&str>| {
        let body = json!({"name": name, "anti_affinity": group, "volumes": volumes});
        let (xc, path) = (&xc, routes::CREATE_VM.at(&[&xid]));
        async move { raw(xc, Method::POST, &path, Some(&body)).await }
    };
    let mut web_hosts = std::collections::BTreeSet::new();
    for name in ["w1", "w2", "w3"] {
        let (status, v) = create(name, Some("web"), vec![]).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let vm: Vm = serde_json::from_value(v).unwrap();
        assert_eq!(vm.anti_affinity.as_deref(), Some("web"));
        web_hosts.insert(vm.host);
    }
    assert_eq!(
        web_hosts,
        ["aa", "ab", "ac"].map(String::from).into(),
        "one per overlay host"
    );
    let (status, v) = create("w4", Some("web"), vec![]).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("anti_affinity")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("every live host running the overlay"),
        "{v}"
    );
    let (status, _) = raw(&xc, Method::GET, &routes::GET_VM.at(&[&xid, &"w4"]), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused VM leaves nothing");
    // Another group and a VM without one are placed as usual.
    for (name, group) in [("d1", Some("db")), ("plain", None)] {
        let (status, v) = create(name, group, vec![]).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    // Volumes bind a VM to their host: one that holds a web VM is refused.
    let vol: Volume = ok(
        &xc,
        Method::POST,
        &routes::CREATE_VOLUME.at(&[&xid]),
        Some(json!({"name": "data", "size_gib": 1})),
    )
    .await;
    assert!(web_hosts.contains(&vol.host), "{vol:?}");
    let (status, v) = create("w5", Some("web"), vec!["data"]).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("anti_affinity")),
        "{v}"
    );
    let (status, v) = create("bad", Some("Not A Label"), vec![]).await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("anti_affinity")),
        "{v}"
    );
    // A member goes: its host takes the next.
    let w1: Vm = ok(&xc, Method::GET, &routes::GET_VM.at(&[&xid, &"w1"]), None).await;
    let (status, _) = raw(
        &xc,
        Method::DELETE,
        &routes::DELETE_VM.at(&[&xid, &"w1"]),
        None,
    )
    .await;
    assert!(status.is_success());
    let (status, v) = create("w4", Some("web"), vec![]).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["host"].as_str(), Some(w1.host.as_str()));
}

async fn a_cloud_spreads_over_overlay_hosts_and_each_syncs_the_others(api: Api) {
    let underlay = |h: &str| match h {
        "oa" => Ipv4Addr::new(10, 9, 0, 1),
        "ob" => Ipv4Addr::new(10, 9, 0, 2),
        _ => Ipv4Addr::new(10, 9, 0, 3),
    };
    let mut host_clients = Vec::new();
    for h in ["oa", "ob", "oc"] {
        // Host oc runs no overlay.
        host_clients.push(api.host(h, (h != "oc").then(|| underlay(h))).await);
    }
    // Another host's address, an address no host can have, another host's route: refused.
    let oc = &host_clients[2];
    let path = routes::SET_HOST_UNDERLAY.at(&[&"oc"]);
    let (status, v) = raw(
        oc,
        Method::PUT,
        &path,
        Some(&json!({ "underlay": "10.9.0.1" })),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("underlay_taken")),
        "{v}"
    );
    let (status, v) = raw(
        oc,
        Method::PUT,
        &path,
        Some(&json!({ "underlay": "127.0.0.1" })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let other = routes::SET_HOST_UNDERLAY.at(&[&"oa"]);
    let (status, v) = raw(
        oc,
        Method::PUT,
        &other,
        Some(&json!({ "underlay": "10.9.0.7" })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");

    let (x, xc) = api.cloud(json!({"name": "x"})).await;
    let (y, _) = api.cloud(json!({"name": "y"})).await;
    let (xid, yid) = (x.cloud.id, y.cloud.id);
    assert!(x.cloud.vni >= 1 && x.cloud.vni < 1 << 24, "{}", x.cloud.vni);
    assert_ne!(x.cloud.vni, y.cloud.vni);
    let mut placed = std::collections::HashMap::new();
    for i in 0..4 {
        let vm: Vm = ok(
            &xc,
            Method::POST,
            &routes::CREATE_VM.at(&[&xid]),
            Some(json!({"name": format!("v{i}")})),
        )
        .await;
        placed.insert(vm.name.clone(), (vm.host.clone(), vm.ipv4));
    }
    let on = |h: &str| placed.values().filter(|(host, _)| host == h).count();
    assert_eq!((on("oa"), on("ob")), (2, 2), "spread by load: {placed:?}");

    // Each host's snapshot: the cloud's VMs on the other host, with its underlay address.
    for (h, other) in [("oa", "ob"), ("ob", "oa")] {
        let d = api
            .core
            .sync(Principal::Operator, h, 0, Duration::ZERO)
            .await
            .unwrap();
        assert!(d.full);
        assert!(
            d.remote.iter().all(|r| r.cloud == xid),
            "{h} syncs only its clouds: {:?}",
            d.remote
        );
        let r = d.remote.iter().find(|r| r.cloud == xid).expect("cloud x");
        assert_eq!(r.vni, x.cloud.vni);
        let mut got: Vec<(String, String, Ipv4Addr)> = r
            .endpoints
            .iter()
            .map(|e| (e.vm.clone(), e.host.clone(), e.underlay))
            .collect();
        got.sort();
        let mut want: Vec<(String, String, Ipv4Addr)> = placed
            .iter()
            .filter(|(_, (host, _))| host == other)
            .map(|(vm, (host, _))| (vm.clone(), host.clone(), underlay(other)))
            .collect();
        want.sort();
        assert_eq!(got, want, "{h}'s remote set");
        for e in &r.endpoints {
            assert_eq!(e.ipv4, placed[&e.vm].1);
            let o = e.ipv4.octets();
            let mac = format!("02:a8:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
            assert_eq!(e.mac, mac);
        }
    }

    // A VM deleted on ob: oa's next delta carries the cloud's remote set without it.
    let rev = api
        .core
        .sync(Principal::Operator, "oa", 0, Duration::ZERO)
        .await
        .unwrap()
        .revision;
    let gone = placed
        .iter()
        .find(|(_, (h, _))| h == "ob")
        .map(|(vm, _)| vm.clone())
        .unwrap();
    let (status, v) = raw(
        &xc,
        Method::DELETE,
        &routes::DELETE_VM.at(&[&xid, &gone]),
        None,
    )
    .await;
    assert!(status.is_success(), "{status} {v}");
    let mut after = rev;
    let remote = loop {
        let d = api
            .core
            .sync(Principal::Operator, "oa", after, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(d.revision > after, "no delta for the delete within 5 s");
        after = d.revision;
        if let Some(r) = d.remote.into_iter().find(|r| r.cloud == xid) {
            break r;
        }
    };
    assert_eq!(remote.endpoints.len(), 1, "{remote:?}");
    assert_ne!(remote.endpoints[0].vm, gone);
    // Cloud y has no VMs: no host syncs anything of it.
    let d = api
        .core
        .sync(Principal::Operator, "oa", 0, Duration::ZERO)
        .await
        .unwrap();
    assert!(!d.remote.iter().any(|r| r.cloud == yid));
}

/// Rewrites a host's record as last seen an hour ago (what a host that stopped syncing has),
/// and waits until the control plane's feed has it.
async fn silence(api: &Api, h: &HostInfo) {
    let key = format!("hosts/{}", h.name);
    let kv = api.core.store().get(&key).await.unwrap().unwrap();
    let mut record: Value = serde_json::from_slice(&kv.value).unwrap();
    let old = h.registered_at.min(h.last_seen).saturating_sub(3600);
    record["registered_at"] = old.into();
    record["last_seen"] = old.into();
    api.core
        .store()
        .txn(atoll_control::store::Txn {
            compares: vec![],
            success: vec![atoll_control::store::Op::Put {
                key,
                value: serde_json::to_vec(&record).unwrap(),
            }],
        })
        .await
        .unwrap();
    wait_for_host(api, &h.name, false).await;
}

/// The feed applies store changes from its watch, which the API does not expose: poll the
/// host list, bounded.
async fn wait_for_host(api: &Api, name: &str, live: bool) {
    for _ in 0..500 {
        let v: Vec<HostInfo> = ok(&api.op, Method::GET, routes::LIST_HOSTS.path, None).await;
        if v.iter().any(|h| h.name == name && h.live == live) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("host {name} never became live = {live}");
}

/// Rounds of the grant/delete race; each races one provider delete and one consumer delete
/// against grants in flight.
const RACE_ROUNDS: usize = 12;

/// Grants `provider`'s exposure `svc` to `consumer` in a task (revoking an earlier grant
/// first if `regrant`); whether the grant was made. The consumers list the provider in their
/// offer policy, so an offer is a grant at once.
fn grant_task(
    pc: &Client,
    provider: CloudId,
    consumer: CloudId,
    regrant: bool,
) -> tokio::task::JoinHandle<bool> {
    let pc = pc.clone();
    tokio::spawn(async move {
        let grants = routes::CREATE_GRANT.at(&[&provider, &"svc"]);
        if regrant {
            let path = format!("{grants}/{consumer}");
            let _ = pc
                .call::<Value, Value>(Method::DELETE, &path, None::<&Value>)
                .await;
        }
        pc.call::<Value, Offer>(Method::POST, &grants, Some(&json!({"consumer": consumer})))
            .await
            .is_ok_and(|o| o.state == OfferState::Accepted)
    })
}

/// Deletes `cloud` while `grants` run; how many of them made a grant.
async fn race_delete(
    client: &Client,
    cloud: CloudId,
    grants: Vec<tokio::task::JoinHandle<bool>>,
) -> usize {
    let c = client.clone();
    let deleted = tokio::spawn(async move {
        c.call::<Value, Value>(
            Method::DELETE,
            &routes::DELETE_CLOUD.at(&[&cloud]),
            None::<&Value>,
        )
        .await
    });
    let mut granted = 0;
    for t in grants {
        granted += usize::from(t.await.unwrap());
    }
    deleted
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("delete {cloud}: {e}"));
    granted
}

/// A grant created while its provider or its consumer is being deleted either fails or is
/// revoked by the delete: no record of a deleted cloud survives (a grant in the provider, an
/// import or VIP address in the consumer, a NAT address in the provider).
async fn grants_racing_cloud_deletes_leave_nothing_behind(api: Api) {
    let mut granted = 0;
    for round in 0..RACE_ROUNDS {
        let (p, pc) = api.cloud(json!({"name": format!("p{round}")})).await;
        let pid = p.cloud.id;
        let _: Vm = ok(
            &pc,
            Method::POST,
            &routes::CREATE_VM.at(&[&pid]),
            Some(json!({"name": "db"})),
        )
        .await;
        let _: Exposure = ok(
            &pc,
            Method::POST,
            &routes::CREATE_EXPOSURE.at(&[&pid]),
            Some(json!({"name": "svc", "protocol": "tcp", "port": 5432, "backends": [{"vm": "db", "port": 5432}]})),
        )
        .await;
        let mut consumers = Vec::new();
        for i in 0..4 {
            let (c, cc) = api.cloud(json!({"name": format!("c{round}x{i}")})).await;
            let cid = c.cloud.id;
            let _: OfferPolicy = ok(
                &cc,
                Method::PUT,
                &routes::PUT_OFFER_POLICY.at(&[&cid]),
                Some(json!({"accept_from": [pid]})),
            )
            .await;
            consumers.push((cid, cc));
        }
        // The provider stays; consumer 0 is deleted while grants to it are in flight.
        let (victim, victim_client) = &consumers[0];
        let grants = consumers
            .iter()
            .map(|(cid, _)| grant_task(&pc, pid, *cid, false));
        granted += race_delete(victim_client, *victim, grants.collect()).await;
        // An offer that found the consumer gone is pending, as one to an id that never
        // existed: the provider's record and the id's offer list hold it, nothing else.
        let pending = [format!("offers/{victim}/"), format!("c/{pid}/offers/")];
        let left: Vec<String> = mentions(&api, *victim)
            .await
            .into_iter()
            .filter(|kv| !pending.iter().any(|p| kv.starts_with(p.as_str())))
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: consumer {victim} left {left:?}"
        );

        // Now the provider is deleted while it grants to the remaining consumers afresh.
        let grants = consumers[1..]
            .iter()
            .map(|(cid, _)| grant_task(&pc, pid, *cid, true));
        granted += race_delete(&pc, pid, grants.collect()).await;
        // The consumers' offer policies are theirs: they still name the provider.
        let left: Vec<String> = mentions(&api, pid)
            .await
            .into_iter()
            .filter(|kv| !kv.contains("/offerpolicy = "))
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: provider {pid} left {left:?}"
        );
        for (cid, cc) in &consumers[1..] {
            let path = routes::GET_CLOUD.at(&[&cid]);
            let _ = cc
                .call::<Value, Value>(Method::DELETE, &path, None::<&Value>)
                .await;
        }
    }
    assert!(granted > 0, "some grants must have been made");
}

async fn deleting_a_cloud_on_too_many_hosts_is_refused_before_revoking(api: Api) {
    let limit = api.core.store().max_txn_ops();
    for i in 1..PLACEMENT_HOSTS {
        let _: HostInfo = ok(
            &api.op,
            Method::PUT,
            &routes::REGISTER_HOST.at(&[&format!("h{i}")]),
            None,
        )
        .await;
    }
    let (w, wc) = api
        .cloud(
            json!({"name": "wide", "quotas": {"vms": 1000, "vcpus": 1000, "memory_mib": 1 << 20}}),
        )
        .await;
    let wid = w.cloud.id;
    // One VM per host. A cloud's VMs stay on its host while that host takes placements, so
    // each host is cordoned once it holds one (and all are uncordoned after).
    let mut vms: Vec<Vm> = Vec::new();
    for i in 0..PLACEMENT_HOSTS {
        let vm: Vm = ok(
            &wc,
            Method::POST,
            &routes::CREATE_VM.at(&[&wid]),
            Some(json!({"name": format!("v{i}")})),
        )
        .await;
        let path = routes::CORDON_HOST.at(&[&vm.host]);
        let _: HostInfo = ok(&api.op, Method::POST, &path, None).await;
        vms.push(vm);
    }
    let hosts: HashSet<&String> = vms.iter().map(|v| &v.host).collect();
    assert_eq!(hosts.len(), PLACEMENT_HOSTS, "one VM per host");
    for h in hosts {
        let _: HostInfo = ok(
            &api.op,
            Method::POST,
            &routes::UNCORDON_HOST.at(&[&h]),
            None,
        )
        .await;
    }
    // A grant the cloud gives and one it receives.
    let (b, bc) = api.cloud(json!({"name": "peer"})).await;
    let bid = b.cloud.id;
    let _: Exposure = ok(
        &wc,
        Method::POST,
        &routes::CREATE_EXPOSURE.at(&[&wid]),
        Some(json!({"name": "web", "protocol": "tcp", "port": 80, "backends": [{"vm": "v0", "port": 80}]})),
    )
    .await;
    let _: Offer = ok(
        &wc,
        Method::POST,
        &routes::CREATE_GRANT.at(&[&wid, &"web"]),
        Some(json!({"consumer": bid})),
    )
    .await;
    let given: Grant = ok(
        &bc,
        Method::POST,
        &routes::ACCEPT_OFFER.at(&[&bid, &wid, &"web"]),
        None,
    )
    .await;
    let _: Vm = ok(
        &bc,
        Method::POST,
        &routes::CREATE_VM.at(&[&bid]),
        Some(json!({"name": "svc"})),
    )
    .await;
    let _: Exposure = ok(
        &bc,
        Method::POST,
        &routes::CREATE_EXPOSURE.at(&[&bid]),
        Some(json!({"name": "s", "protocol": "tcp", "port": 1, "backends": [{"vm": "svc", "port": 1}]})),
    )
    .await;
    let _: Offer = ok(
        &bc,
        Method::POST,
        &routes::CREATE_GRANT.at(&[&bid, &"s"]),
        Some(json!({"consumer": wid})),
    )
    .await;
    let received: Grant = ok(
        &wc,
        Method::POST,
        &routes::ACCEPT_OFFER.at(&[&wid, &bid, &"s"]),
        None,
    )
    .await;

    let (status, v) = raw(&wc, Method::DELETE, &routes::DELETE_CLOUD.at(&[&wid]), None).await;
    match limit {
        None => assert!(status.is_success(), "SQLite has no limit: {status} {v}"),
        Some(128) => {
            assert_eq!(
                (status, v["error"]["code"].as_str()),
                (StatusCode::CONFLICT, Some("txn_too_large")),
                "{v}"
            );
            let message = v["error"]["message"].as_str().unwrap();
            for want in ["129 operations", "limit of 128", "store.etcd_max_txn_ops"] {
                assert!(message.contains(want), "{want:?} not in {message:?}");
            }
            // Refused before anything was revoked.
            let imports: Vec<Grant> =
                ok(&bc, Method::GET, &routes::LIST_IMPORTS.at(&[&bid]), None).await;
            assert_eq!(imports, vec![given.clone()]);
            let imports: Vec<Grant> =
                ok(&wc, Method::GET, &routes::LIST_IMPORTS.at(&[&wid]), None).await;
            assert_eq!(imports, vec![received.clone()]);
            // Emptying one host brings the cloud's own keys to exactly 128 ops: the grants are
            // revoked ahead and the rest is one transaction.
            let last = vms.last().unwrap().host.clone();
            for vm in vms.iter().filter(|v| v.host == last) {
                let _: Value = ok(
                    &wc,
                    Method::DELETE,
                    &routes::DELETE_VM.at(&[&wid, &vm.name]),
                    None,
                )
                .await;
            }
            let _: Value = ok(&wc, Method::DELETE, &routes::DELETE_CLOUD.at(&[&wid]), None).await;
        }
        Some(other) => panic!("the etcd case runs with etcd's default limit, not {other}"),
    }
    let left = mentions(&api, wid).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    let imports: Vec<Grant> = ok(&bc, Method::GET, &routes::LIST_IMPORTS.at(&[&bid]), None).await;
    assert!(imports.is_empty());
    let grants: Vec<Grant> = ok(
        &bc,
        Method::GET,
        &routes::LIST_GRANTS.at(&[&bid, &"s"]),
        None,
    )
    .await;
    assert!(grants.is_empty());
}

/// The latest placement of every VM `host` syncs after revision `after`, followed until `done`
/// holds for them (syncs may return the changes in several deltas), and the revision reached.
async fn sync_until(
    api: &Api,
    host: &str,
    mut after: u64,
    done: impl Fn(&std::collections::HashMap<String, Placement>) -> bool,
) -> (std::collections::HashMap<String, Placement>, u64) {
    let mut seen = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(&seen) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{host} never synced the expected placements; it has {seen:#?}"
        );
        let d = api
            .core
            .sync(Principal::Operator, host, after, Duration::from_secs(5))
            .await
            .expect("sync");
        for p in d.vms {
            seen.insert(p.vm.clone(), p);
        }
        after = d.revision;
    }
    (seen, after)
}

/// Reports `status` (and `console`) of VM `vm` of `cloud` as `host`.
async fn report(
    api: &Api,
    host: &str,
    cloud: CloudId,
    vm: &str,
    status: &VmStatus,
    console: Option<&str>,
) {
    let body = StatusReport {
        services: Vec::new(),
        idle: Vec::new(),
        vms: vec![VmReport {
            cloud,
            vm: vm.into(),
            status: status.clone(),
            console: console.map(String::from),
        }],
        denied: Vec::new(),
    };
    let body = serde_json::to_value(&body).unwrap();
    let () = ok(
        &api.op,
        Method::POST,
        &routes::REPORT_STATUS.at(&[&host]),
        Some(body),
    )
    .await;
}

fn status(state: VmState) -> VmStatus {
    VmStatus {
        state,
        device: Some("atv0".into()),
        message: None,
        updated_at: 1_700_000_000,
        restarts: 0,
        boot_ms: None,
        accel: None,
    }
}

async fn vm_lifecycle_power_user_data_states_and_console(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "life"})).await;
    let id = a.cloud.id;
    let vms = routes::CREATE_VM.at(&[&id]);
    let start = api
        .core
        .sync(Principal::Operator, "host-a", 0, Duration::ZERO)
        .await
        .unwrap()
        .revision;

    // Created with user data (started by default), and created stopped: the placements the
    // host syncs carry both, with what the guest needs to configure itself.
    let script = "#!/bin/sh\necho héllo > /run/hello\n";
    let web: Vm = ok(
        &ac,
        Method::POST,
        &vms,
        Some(json!({"name": "web", "user_data": script, "image": "default"})),
    )
    .await;
    assert_eq!(
        (web.power, web.user_data.as_deref()),
        (Power::Running, Some(script))
    );
    let idle: Vm = ok(
        &ac,
        Method::POST,
        &vms,
        Some(json!({"name": "idle", "start": false})),
    )
    .await;
    assert_eq!(
        (idle.power, idle.user_data.as_deref()),
        (Power::Stopped, None)
    );
    let (seen, rev) = sync_until(&api, "host-a", start, |s| s.len() == 2).await;
    let (pw, pi) = (&seen["web"], &seen["idle"]);
    assert_eq!(
        (pw.power, pw.user_data.as_deref(), pw.image.as_deref()),
        (Power::Running, Some(script), Some("default"))
    );
    assert_eq!(
        (pw.fqdn.as_str(), pw.zone.as_str()),
        ("web.life.atoll.internal.", "life.atoll.internal.")
    );
    assert_eq!((pi.power, pi.user_data.as_deref()), (Power::Stopped, None));

    // User data up to the limit (in bytes, not characters) is taken, one byte more is not, and
    // the refused VM does not exist.
    let most = "é".repeat(MAX_USER_DATA_BYTES / 2);
    let big: Vm = ok(
        &ac,
        Method::POST,
        &vms,
        Some(json!({"name": "big", "user_data": most})),
    )
    .await;
    assert_eq!(big.user_data.map(|u| u.len()), Some(MAX_USER_DATA_BYTES));
    let (status_code, v) = raw(
        &ac,
        Method::POST,
        &vms,
        Some(&json!({"name": "bigger", "user_data": format!("{most}x")})),
    )
    .await;
    assert_eq!(
        (status_code, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("user_data")),
        "{v}"
    );
    let (status_code, _) = raw(&ac, Method::GET, &format!("{vms}/bigger"), None).await;
    assert_eq!(status_code, StatusCode::NOT_FOUND);
    let _: Value = ok(&ac, Method::DELETE, &format!("{vms}/big"), None).await;

    // Stop, then start: the power changes in the VM and in the placement the host syncs.
    let stopped: Vm = ok(&ac, Method::POST, &format!("{vms}/web/stop"), None).await;
    assert_eq!(stopped.power, Power::Stopped);
    assert_eq!(stopped.status.map(|s| s.state), Some(VmState::Pending));
    let (seen, rev) = sync_until(&api, "host-a", rev, |s| {
        s.get("web").is_some_and(|p| p.power == Power::Stopped)
    })
    .await;
    assert_eq!(
        seen["web"].user_data.as_deref(),
        Some(script),
        "a changed placement is sent whole"
    );
    let started: Vm = ok(&ac, Method::POST, &format!("{vms}/idle/start"), None).await;
    assert_eq!(started.power, Power::Running);
    let (_, rev) = sync_until(&api, "host-a", rev, |s| {
        s.get("idle").is_some_and(|p| p.power == Power::Running)
    })
    .await;
    let got: Vm = ok(&ac, Method::GET, &format!("{vms}/idle"), None).await;
    assert_eq!(got.power, Power::Running);
    // Asking again is a success that writes nothing (an empty JSON object as the body too).
    let before = api.core.store().revision().await.unwrap();
    let again: Vm = ok(&ac, Method::POST, &format!("{vms}/idle/start"), None).await;
    assert_eq!(again.power, Power::Running);
    let again: Vm = ok(
        &ac,
        Method::POST,
        &format!("{vms}/web/stop"),
        Some(json!({})),
    )
    .await;
    assert_eq!(again.power, Power::Stopped);
    assert_eq!(api.core.store().revision().await.unwrap(), before);

    // A VM that does not exist: 404 for start, stop and console.
    for (m, what) in [
        (Method::POST, "start"),
        (Method::POST, "stop"),
        (Method::GET, "console"),
    ] {
        let (status_code, v) = raw(&ac, m, &format!("{vms}/ghost/{what}"), None).await;
        assert_eq!(
            (status_code, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{what}: {v}"
        );
    }

    // No console reported yet: an empty one.
    let console: Console = ok(&ac, Method::GET, &format!("{vms}/web/console"), None).await;
    assert_eq!(
        console,
        Console {
            text: String::new(),
            updated_at: 0
        }
    );

    // The states a VM driver reports round-trip, with restarts, boot time and accelerator; the
    // console comes with the status and stays until a report brings a new one.
    let booting = VmStatus {
        accel: Some("kvm".into()),
        ..status(VmState::Booting)
    };
    report(
        &api,
        "host-a",
        id,
        "web",
        &booting,
        Some("SeaBIOS\nLinux 6.1\n"),
    )
    .await;
    let got: Vm = ok(&ac, Method::GET, &format!("{vms}/web"), None).await;
    assert_eq!(got.status.as_ref(), Some(&booting));
    let console: Console = ok(&ac, Method::GET, &format!("{vms}/web/console"), None).await;
    assert_eq!(console.text, "SeaBIOS\nLinux 6.1\n");
    assert!(console.updated_at > 0);
    for st in [
        VmStatus {
            boot_ms: Some(420),
            accel: Some("kvm".into()),
            ..status(VmState::Running)
        },
        VmStatus {
            restarts: 2,
            message: Some("qemu exited with status 1".into()),
            accel: Some("tcg".into()),
            ..status(VmState::Crashed)
        },
        status(VmState::Stopping),
        status(VmState::Stopped),
    ] {
        report(&api, "host-a", id, "web", &st, None).await;
        let got: Vm = ok(&ac, Method::GET, &format!("{vms}/web"), None).await;
        assert_eq!(got.status.as_ref(), Some(&st));
        let listed: Vec<Vm> = ok(&ac, Method::GET, &vms, None).await;
        let listed = listed.into_iter().find(|v| v.name == "web").unwrap();
        assert_eq!(listed.status.as_ref(), Some(&st));
    }
    let console: Console = ok(&ac, Method::GET, &format!("{vms}/web/console"), None).await;
    assert_eq!(
        console.text, "SeaBIOS\nLinux 6.1\n",
        "kept when not reported"
    );
    // Start and stop return the VM with its reported status.
    let restarted: Vm = ok(&ac, Method::POST, &format!("{vms}/web/start"), None).await;
    assert_eq!(restarted.status.map(|s| s.state), Some(VmState::Stopped));
    let (_, rev) = sync_until(&api, "host-a", rev, |s| {
        s.get("web").is_some_and(|p| p.power == Power::Running)
    })
    .await;

    // A console over the limit is cut to its last CONSOLE_TAIL_BYTES bytes, not refused; the
    // cut falls inside a two-byte character, which is dropped whole.
    let long = format!("{}{}", "é".repeat(CONSOLE_TAIL_BYTES / 2 + 10), "$");
    assert!(!long.is_char_boundary(long.len() - CONSOLE_TAIL_BYTES));
    report(
        &api,
        "host-a",
        id,
        "web",
        &status(VmState::Running),
        Some(&long),
    )
    .await;
    let console: Console = ok(&ac, Method::GET, &format!("{vms}/web/console"), None).await;
    assert_eq!(console.text.len(), CONSOLE_TAIL_BYTES - 1);
    assert!(console.text.starts_with('é') && long.ends_with(&console.text));

    // Statuses and consoles are not the hosts' business: none of that reached the host feed.
    let idle_sync = api
        .core
        .sync(
            Principal::Operator,
            "host-a",
            rev,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    assert!(
        !idle_sync.full
            && idle_sync.vms.is_empty()
            && idle_sync.zones.is_empty()
            && idle_sync.services.is_empty(),
        "{idle_sync:?}"
    );

    // Another host cannot write the status or console of a VM placed on host-a.
    let _: HostInfo = ok(
        &api.op,
        Method::PUT,
        &routes::REGISTER_HOST.at(&[&"host-b"]),
        None,
    )
    .await;
    report(
        &api,
        "host-b",
        id,
        "web",
        &status(VmState::Failed),
        Some("forged"),
    )
    .await;
    let console: Console = ok(&ac, Method::GET, &format!("{vms}/web/console"), None).await;
    assert_eq!(console.text.len(), CONSOLE_TAIL_BYTES - 1);
    let got: Vm = ok(&ac, Method::GET, &format!("{vms}/web"), None).await;
    assert_eq!(got.status.map(|s| s.state), Some(VmState::Running));

    // Deleting a VM removes its status and console; deleting the cloud removes the others'.
    let _: Value = ok(&ac, Method::DELETE, &format!("{vms}/web"), None).await;
    for key in [
        format!("c/{id}/vmstatus/web"),
        format!("c/{id}/vmconsole/web"),
    ] {
        assert!(
            api.core.store().get(&key).await.unwrap().is_none(),
            "{key} left behind"
        );
    }
    report(
        &api,
        "host-a",
        id,
        "idle",
        &status(VmState::Running),
        Some("login: "),
    )
    .await;
    let console: Console = ok(&ac, Method::GET, &format!("{vms}/idle/console"), None).await;
    assert_eq!(console.text, "login: ");
    let _: Value = ok(&ac, Method::DELETE, &routes::DELETE_CLOUD.at(&[&id]), None).await;
    let left = mentions(&api, id).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Every delta `host-a` syncs after revision `after` until it has seen the store's revision
/// `target` (a commit's events reach syncs through the store watch), and the revision reached.
async fn sync_through(api: &Api, mut after: u64, target: u64) -> (Vec<SyncDelta>, u64) {
    let mut deltas = Vec::new();
    while after < target {
        let d = api
            .core
            .sync(Principal::Operator, "host-a", after, Duration::from_secs(5))
            .await
            .expect("sync");
        after = d.revision;
        deltas.push(d);
    }
    (deltas, after)
}

/// Every stored key under the consumer's own prefix and its IPAM, with its value.
async fn cloud_keys(api: &Api, cloud: CloudId) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for prefix in [format!("c/{cloud}/"), format!("clouds/{cloud}")] {
        for kv in api.core.store().range(&prefix, None, 0).await.unwrap() {
            out.push((kv.key, kv.value));
        }
    }
    out
}

/// An offer writes nothing into the consumer (no key under its prefix or its record: no VIP,
/// no import, no name in its zone) and sends its hosts nothing, until the consumer accepts;
/// then the grant is active, with a VIP in the consumer's range and a name in its zone.
/// Declined and withdrawn offers leave nothing; a revoked grant gives its VIP back.
async fn offers_change_nothing_in_the_consumer_until_it_accepts(api: Api) {
    let (p, pc) = api.cloud(json!({"name": "prod"})).await;
    let (c, cc) = api.cloud(json!({"name": "beta"})).await;
    let (pid, cid) = (p.cloud.id, c.cloud.id);
    let _: Vm = ok(
        &pc,
        Method::POST,
        &routes::CREATE_VM.at(&[&pid]),
        Some(json!({"name": "web"})),
    )
    .await;
    let _: Vm = ok(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&cid]),
        Some(json!({"name": "app"})),
    )
    .await;
    for name in ["web", "admin"] {
        let _: Exposure = ok(
            &pc,
            Method::POST,
            &routes::CREATE_EXPOSURE.at(&[&pid]),
            Some(json!({"name": name, "protocol": "tcp", "port": 80, "backends": [{"vm": "web", "port": 8080}]})),
        )
        .await;
    }
    let grants = |e: &str| routes::CREATE_GRANT.at(&[&pid, &e]);
    let base = api
        .core
        .sync(Principal::Operator, "host-a", 0, Duration::ZERO)
        .await
        .unwrap();
    let before = cloud_keys(&api, cid).await;

    let (status, offer) = raw(
        &pc,
        Method::POST,
        &grants("web"),
        Some(&json!({"consumer": cid})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{offer}");
    assert_eq!(offer["state"], "pending", "{offer}");
    // Nothing in the consumer: not a key of its own, so no VIP, import or name.
    assert_eq!(
        cloud_keys(&api, cid).await,
        before,
        "the offer wrote into the consumer"
    );
    let zone = api.core.zone(cid).await.unwrap().unwrap();
    assert!(
        zone.records.iter().all(|r| !r.fqdn.contains(".svc.")),
        "{zone:?}"
    );
    let imports: Vec<Value> = ok(&cc, Method::GET, &routes::LIST_IMPORTS.at(&[&cid]), None).await;
    assert!(imports.is_empty(), "{imports:?}");
    let given: Vec<Value> = ok(&pc, Method::GET, &grants("web"), None).await;
    assert!(given.is_empty(), "an offer is not a grant: {given:?}");
    // Its hosts get nothing for it: no zone of the consumer, no service to it.
    let target = api.core.store().revision().await.unwrap();
    let (deltas, rev) = sync_through(&api, base.revision, target).await;
    for d in &deltas {
        assert!(d.zones.iter().all(|z| z.cloud != cid), "{d:?}");
        assert!(d.services.iter().all(|s| s.services.is_empty()), "{d:?}");
    }
    // Both sides see the offer.
    let pending: Vec<Offer> = ok(
        &pc,
        Method::GET,
        &routes::LIST_EXPOSURE_OFFERS.at(&[&pid, &"web"]),
        None,
    )
    .await;
    let inbox: Vec<Offer> = ok(&cc, Method::GET, &routes::LIST_OFFERS.at(&[&cid]), None).await;
    assert_eq!(pending, inbox);
    assert_eq!(
        (
            inbox.len(),
            inbox[0].provider,
            inbox[0].exposure.as_str(),
            inbox[0].state,
            inbox[0].port
        ),
        (1, pid, "web", OfferState::Pending, 80)
    );

    // Accepted: an active grant, a VIP in the consumer's range, a name in its zone, on its host.
    let g: Grant = ok(
        &cc,
        Method::POST,
        &routes::ACCEPT_OFFER.at(&[&cid, &pid, &"web"]),
        None,
    )
    .await;
    assert_eq!(g.state, GrantState::Active);
    assert_eq!(
        g.vip,
        Ipv4Addr::new(10, 0, 0, 3),
        "lowest free address of the consumer"
    );
    assert_eq!(g.fqdn, format!("web.{pid}.svc.beta.atoll.internal."));
    let imports: Vec<Grant> = ok(&cc, Method::GET, &routes::LIST_IMPORTS.at(&[&cid]), None).await;
    assert_eq!(imports, vec![g.clone()]);
    let inbox: Vec<Offer> = ok(&cc, Method::GET, &routes::LIST_OFFERS.at(&[&cid]), None).await;
    assert!(inbox.is_empty(), "{inbox:?}");
    let pending: Vec<Offer> = ok(
        &pc,
        Method::GET,
        &routes::LIST_EXPOSURE_OFFERS.at(&[&pid, &"web"]),
        None,
    )
    .await;
    assert!(pending.is_empty(), "{pending:?}");
    let target = api.core.store().revision().await.unwrap();
    let (deltas, _) = sync_through(&api, rev, target).await;
    assert!(deltas.iter().any(|d| d.zones.iter().any(|z| z.cloud == cid
        && z.records
            .iter()
            .any(|r| r.fqdn == g.fqdn && r.values == vec![g.vip.to_string()]))));
    assert!(deltas
        .iter()
        .any(|d| d.services.iter().any(|s| s.provider == pid
            && s.services
                .iter()
                .any(|s| s.consumer == cid && s.vip == g.vip))));

    // Declined, and withdrawn: nothing is left of either, in the consumer nothing changed.
    let before = cloud_keys(&api, cid).await;
    for withdraw in [false, true] {
        let (status, _) = raw(
            &pc,
            Method::POST,
            &grants("admin"),
            Some(&json!({"consumer": cid})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (status, v) = if withdraw {
            raw(
                &pc,
                Method::DELETE,
                &format!("{}/{cid}", grants("admin")),
                None,
            )
            .await
        } else {
            raw(
                &cc,
                Method::DELETE,
                &routes::DECLINE_OFFER.at(&[&cid, &pid, &"admin"]),
                None,
            )
            .await
        };
        assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
        let inbox: Vec<Offer> = ok(&cc, Method::GET, &routes::LIST_OFFERS.at(&[&cid]), None).await;
        assert!(inbox.is_empty(), "{inbox:?}");
        let pending: Vec<Offer> = ok(
            &pc,
            Method::GET,
            &routes::LIST_EXPOSURE_OFFERS.at(&[&pid, &"admin"]),
            None,
        )
        .await;
        assert!(pending.is_empty(), "{pending:?}");
        let (status, _) = raw(
            &cc,
            Method::POST,
            &routes::ACCEPT_OFFER.at(&[&cid, &pid, &"admin"]),
            None,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "a declined or withdrawn offer cannot be accepted"
        );
    }
    assert_eq!(cloud_keys(&api, cid).await, before);

    // Revoked: the grant, its name and its VIP go.
    let (status, _) = raw(
        &pc,
        Method::DELETE,
        &format!("{}/{cid}", grants("web")),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let imports: Vec<Grant> = ok(&cc, Method::GET, &routes::LIST_IMPORTS.at(&[&cid]), None).await;
    assert!(imports.is_empty());
    let vip = format!("c/{cid}/ip/{}", g.vip);
    assert!(
        api.core.store().get(&vip).await.unwrap().is_none(),
        "{vip} is still allocated"
    );
}

/// A cloud id that does not exist gets offers like one that does: the same status and body
/// (but for the consumer's id and the time), the same conflicts, and the same refusal once its
/// pending offers are at a bound (per provider, then per consumer). Offers to an unknown id
/// write nothing but the provider's record and the id's bounded offer list.
async fn offers_to_unknown_clouds_look_like_offers_to_existing_ones_and_are_bounded(api: Api) {
    let (_c, _cc) = api.cloud(json!({"name": "real"})).await;
    let real = _c.cloud.id;
    // Another id, which no cloud has (random ids: checked).
    let unknown = CloudId::new(real.get() ^ 0x5a5a_5a5a).unwrap();
    let (status, _) = raw(
        &api.op,
        Method::GET,
        &routes::GET_CLOUD.at(&[&unknown]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{unknown} exists");
    let per_provider = 16;
    let per_cloud = 64;
    // Providers, each with per_provider + 1 exposures.
    let mut providers = Vec::new();
    for i in 0..per_cloud / per_provider + 1 {
        let (p, pc) = api.cloud(json!({"name": format!("p{i}")})).await;
        let pid = p.cloud.id;
        let _: Vm = ok(
            &pc,
            Method::POST,
            &routes::CREATE_VM.at(&[&pid]),
            Some(json!({"name": "b"})),
        )
        .await;
        for e in 0..=per_provider {
            let _: Exposure = ok(
                &pc,
                Method::POST,
                &routes::CREATE_EXPOSURE.at(&[&pid]),
                Some(json!({"name": format!("e{e}"), "protocol": "udp", "port": 53, "backends": [{"vm": "b", "port": 53}]})),
            )
            .await;
        }
        providers.push((pid, pc));
    }
    // What one offer gets, with the consumer's id and the time taken out.
    let offer = |pc: Client, pid: CloudId, e: usize, to: CloudId| async move {
        let path = routes::CREATE_GRANT.at(&[&pid, &format!("e{e}")]);
        let (status, mut v) = raw(&pc, Method::POST, &path, Some(&json!({"consumer": to}))).await;
        let text = v.to_string().replace(&to.to_string(), "CONSUMER");
        v = serde_json::from_str(&text).unwrap();
        if let Some(o) = v.as_object_mut() {
            o.remove("created_at");
        }
        (status, v)
    };
    let before = cloud_keys(&api, real).await;
    let (p0, pc0) = providers[0].clone();
    // The first offers, the same offer again, and an offer over the provider's bound.
    for e in 0..per_provider {
        let a = offer(pc0.clone(), p0, e, real).await;
        let b = offer(pc0.clone(), p0, e, unknown).await;
        assert_eq!(a.0, StatusCode::ACCEPTED, "{}", a.1);
        assert_eq!(a, b, "offer e{e}");
    }
    let a = offer(pc0.clone(), p0, 0, real).await;
    assert_eq!(
        (a.0, a.1["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("exists")),
        "{}",
        a.1
    );
    assert_eq!(a, offer(pc0.clone(), p0, 0, unknown).await);
    let a = offer(pc0.clone(), p0, per_provider, real).await;
    assert_eq!(
        (a.0, a.1["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("offer_refused")),
        "{}",
        a.1
    );
    assert_eq!(a, offer(pc0.clone(), p0, per_provider, unknown).await);
    // Other providers fill the consumer's bound; then every provider is refused alike.
    for (pid, pc) in &providers[1..per_cloud / per_provider] {
        for e in 0..per_provider {
            for to in [real, unknown] {
                let (status, v) = offer(pc.clone(), *pid, e, to).await;
                assert_eq!(status, StatusCode::ACCEPTED, "{v}");
            }
        }
    }
    let (plast, pclast) = providers.last().unwrap().clone();
    let a = offer(pclast.clone(), plast, 0, real).await;
    assert_eq!(
        (a.0, a.1["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("offer_refused")),
        "{}",
        a.1
    );
    assert_eq!(a, offer(pclast.clone(), plast, 0, unknown).await);
    // Nothing was written into the real consumer; the unknown id holds only its bounded list.
    assert_eq!(cloud_keys(&api, real).await, before);
    let inbox = api
        .core
        .store()
        .range(&format!("offers/{unknown}/"), None, 0)
        .await
        .unwrap();
    assert_eq!(inbox.len(), per_cloud);
    let inbox: Vec<Offer> = ok(&_cc, Method::GET, &routes::LIST_OFFERS.at(&[&real]), None).await;
    assert_eq!(inbox.len(), per_cloud);
    // Withdrawing them empties both lists.
    for (pid, pc) in &providers[..per_cloud / per_provider] {
        for e in 0..per_provider {
            for to in [real, unknown] {
                let _: Value = ok(
                    pc,
                    Method::DELETE,
                    &routes::REVOKE_GRANT.at(&[&pid, &format!("e{e}"), &to]),
                    None,
                )
                .await;
            }
        }
    }
    for to in [real, unknown] {
        let left = api
            .core
            .store()
            .range(&format!("offers/{to}/"), None, 0)
            .await
            .unwrap();
        assert!(left.is_empty(), "{} offers to {to} left", left.len());
    }
    let left: Vec<String> = mentions(&api, unknown).await;
    assert!(left.is_empty(), "{left:?}");
}

/// A consumer's offer policy makes its listed providers' offers grants at once; others wait
/// for acceptance. Two providers both named `prod` exposing `web` give the consumer two
/// distinct names (the provider's id is in the name), and nobody can make a record set there.
async fn offer_policy_and_same_named_providers_get_distinct_names(api: Api) {
    let (c, cc) = api.cloud(json!({"name": "beta"})).await;
    let cid = c.cloud.id;
    let mut providers = Vec::new();
    for _ in 0..2 {
        let (p, pc) = api.cloud(json!({"name": "prod"})).await;
        let pid = p.cloud.id;
        let _: Vm = ok(
            &pc,
            Method::POST,
            &routes::CREATE_VM.at(&[&pid]),
            Some(json!({"name": "web"})),
        )
        .await;
        let _: Exposure = ok(
            &pc,
            Method::POST,
            &routes::CREATE_EXPOSURE.at(&[&pid]),
            Some(json!({"name": "web", "protocol": "tcp", "port": 80, "backends": [{"vm": "web", "port": 80}]})),
        )
        .await;
        providers.push((pid, pc));
    }
    let (p1, pc1) = providers[0].clone();
    let (p2, pc2) = providers[1].clone();
    let policy_path = routes::GET_OFFER_POLICY.at(&[&cid]);
    let empty: Value = ok(&cc, Method::GET, &policy_path, None).await;
    assert_eq!(empty, json!({"accept_from": []}));
    let set: Value = ok(
        &cc,
        Method::PUT,
        &policy_path,
        Some(json!({"accept_from": [p1, p1]})),
    )
    .await;
    assert_eq!(set, json!({"accept_from": [p1]}));
    let got: Value = ok(&cc, Method::GET, &policy_path, None).await;
    assert_eq!(got, set);
    let (status, v) = raw(
        &cc,
        Method::PUT,
        &policy_path,
        Some(&json!({"accept_from": ["nope"]})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("accept_from[0]")),
        "{v}"
    );

    // The listed provider's offer is a grant at once; the other's waits.
    let path = |p: CloudId| routes::CREATE_GRANT.at(&[&p, &"web"]);
    let (status, o1) = raw(
        &pc1,
        Method::POST,
        &path(p1),
        Some(&json!({"consumer": cid})),
    )
    .await;
    assert_eq!(
        (status, o1["state"].as_str()),
        (StatusCode::ACCEPTED, Some("accepted")),
        "{o1}"
    );
    let (status, o2) = raw(
        &pc2,
        Method::POST,
        &path(p2),
        Some(&json!({"consumer": cid})),
    )
    .await;
    assert_eq!(
        (status, o2["state"].as_str()),
        (StatusCode::ACCEPTED, Some("pending")),
        "{o2}"
    );
    let imports: Vec<Grant> = ok(&cc, Method::GET, &routes::LIST_IMPORTS.at(&[&cid]), None).await;
    assert_eq!(imports.len(), 1);
    let g1 = imports[0].clone();
    assert_eq!((g1.provider, g1.state), (p1, GrantState::Active));
    let given: Vec<Grant> = ok(&pc1, Method::GET, &path(p1), None).await;
    assert_eq!(given, vec![g1.clone()]);
    let g2: Grant = ok(
        &cc,
        Method::POST,
        &routes::ACCEPT_OFFER.at(&[&cid, &p2, &"web"]),
        None,
    )
    .await;

    // Two names, one per provider, each with its own VIP.
    assert_eq!(g1.fqdn, format!("web.{p1}.svc.beta.atoll.internal."));
    assert_eq!(g2.fqdn, format!("web.{p2}.svc.beta.atoll.internal."));
    assert_ne!(g1.vip, g2.vip);
    let zone = api.core.zone(cid).await.unwrap().unwrap();
    for g in [&g1, &g2] {
        let records: Vec<&ZoneRecord> = zone.records.iter().filter(|r| r.fqdn == g.fqdn).collect();
        assert_eq!(records.len(), 1, "{zone:?}");
        assert_eq!(records[0].values, vec![g.vip.to_string()]);
    }
    // The consumer cannot shadow them with a record set of its own.
    let (status, v) = raw(
        &cc,
        Method::PUT,
        &routes::PUT_RECORD_SET.at(&[&cid, &format!("web.{p2}.svc"), &"A"]),
        Some(&json!({"values": ["10.0.0.99"]})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("name")),
        "{v}"
    );
}

/// A VM of cloud `c` named `name`; its host.
async fn vm_on(c: &Client, cloud: CloudId, name: &str) -> String {
    let vm: Vm = ok(
        c,
        Method::POST,
        &routes::CREATE_VM.at(&[&cloud]),
        Some(json!({"name": name})),
    )
    .await;
    vm.host
}

/// A grant is `active` only while it can carry traffic: `unreachable` (with the hosts) while
/// its provider and consumer run on different hosts, `failed` (with the host's reason) while a
/// host that runs one of them reports it could not install it, and `active` again once that
/// host reports it installed. A host that runs neither cannot mark it failed.
async fn grants_are_active_only_where_they_carry_traffic(api: Api) {
    for h in ["host-b", "host-z"] {
        let _: HostInfo = ok(&api.op, Method::PUT, &routes::REGISTER_HOST.at(&[&h]), None).await;
    }
    let cordon = |h: String, on: bool| {
        let op = api.op.clone();
        async move {
            let route = if on {
                &routes::CORDON_HOST
            } else {
                &routes::UNCORDON_HOST
            };
            let _: HostInfo = ok(&op, Method::POST, &route.at(&[&h]), None).await;
        }
    };
    let (p, pc) = api.cloud(json!({"name": "prov"})).await;
    let pid = p.cloud.id;
    let home = vm_on(&pc, pid, "web").await;
    let _: Exposure = ok(
        &pc,
        Method::POST,
        &routes::CREATE_EXPOSURE.at(&[&pid]),
        Some(json!({"name": "web", "protocol": "tcp", "port": 80, "backends": [{"vm": "web", "port": 80}]})),
    )
    .await;
    // A consumer elsewhere: every host but one cordoned while it gets its VM.
    let others: Vec<String> = ["host-a", "host-b", "host-z"]
        .iter()
        .map(|h| h.to_string())
        .filter(|h| *h != home)
        .collect();
    let away = others[0].clone();
    let spare = others[1].clone();
    let (far, farc) = api.cloud(json!({"name": "far"})).await;
    let (near, nearc) = api.cloud(json!({"name": "near"})).await;
    for (cloud, client, host) in [(&far, &farc, &away), (&near, &nearc, &home)] {
        for h in ["host-a", "host-b", "host-z"] {
            if h != host {
                cordon(h.to_string(), true).await;
            }
        }
        assert_eq!(&vm_on(client, cloud.cloud.id, "app").await, host);
        for h in ["host-a", "host-b", "host-z"] {
            cordon(h.to_string(), false).await;
        }
        let _: Value = ok(
            client,
            Method::PUT,
            &routes::PUT_OFFER_POLICY.at(&[&cloud.cloud.id]),
            Some(json!({"accept_from": [pid]})),
        )
        .await;
        let _: Value = ok(
            &pc,
            Method::POST,
            &routes::CREATE_GRANT.at(&[&pid, &"web"]),
            Some(json!({"consumer": cloud.cloud.id})),
        )
        .await;
    }
    let grants = || async {
        let g: Vec<Grant> = ok(
            &pc,
            Method::GET,
            &routes::LIST_GRANTS.at(&[&pid, &"web"]),
            None,
        )
        .await;
        let of = |c: CloudId| g.iter().find(|g| g.consumer == c).cloned().unwrap();
        (of(far.cloud.id), of(near.cloud.id))
    };
    let (f, n) = grants().await;
    assert_eq!(f.state, GrantState::Unreachable, "{f:?}");
    let why = f.reason.clone().unwrap();
    assert!(why.contains(&home) && why.contains(&away), "{why}");
    assert_eq!(
        (n.state, n.reason.clone()),
        (GrantState::Active, None),
        "{n:?}"
    );
    // The consumer sees its import the same way.
    let imports: Vec<Grant> = ok(
        &farc,
        Method::GET,
        &routes::LIST_IMPORTS.at(&[&far.cloud.id]),
        None,
    )
    .await;
    assert_eq!(imports[0].state, GrantState::Unreachable);

    let service = |error: Option<&str>| json!({"vms": [], "services": [{"provider": pid, "consumer": near.cloud.id, "vip": n.vip.to_string(), "error": error}]});
    // A host running neither cloud cannot mark the grant failed.
    let () = ok(
        &api.op,
        Method::POST,
        &routes::REPORT_STATUS.at(&[&spare]),
        Some(service(Some("made up"))),
    )
    .await;
    assert_eq!(grants().await.1.state, GrantState::Active);
    // The provider's host failed to install it: failed, with its reason.
    let () = ok(
        &api.op,
        Method::POST,
        &routes::REPORT_STATUS.at(&[&home]),
        Some(service(Some("VIPS is full (dataplane.max_vips = 1)"))),
    )
    .await;
    let (_, n2) = grants().await;
    assert_eq!(n2.state, GrantState::Failed, "{n2:?}");
    assert_eq!(
        n2.reason.as_deref(),
        Some(format!("host {home}: VIPS is full (dataplane.max_vips = 1)").as_str())
    );
    // Installed after all: active again.
    let () = ok(
        &api.op,
        Method::POST,
        &routes::REPORT_STATUS.at(&[&home]),
        Some(json!({"vms": [], "services": [{"provider": pid, "consumer": near.cloud.id, "vip": n.vip.to_string()}]})),
    )
    .await;
    assert_eq!(grants().await.1.state, GrantState::Active);
}

/// A new cloud's egress policy is the configured default's mode (here the default, `deny`);
/// a cloud replaces its own; names are stored in lower case; what the dataplane could not
/// enforce or a deny by name is refused naming the field; the policy goes with the cloud.
async fn egress_policies_start_at_the_default_and_are_checked(api: Api) {
    let (c, cc) = api.cloud(json!({})).await;
    let cid = c.cloud.id;
    let path = routes::GET_EGRESS_POLICY.at(&[&cid]);
    let got: Value = ok(&cc, Method::GET, &path, None).await;
    assert_eq!(got, json!({"mode": "deny", "allow": [], "deny": []}));

    let set: Value = ok(
        &cc,
        Method::PUT,
        &routes::PUT_EGRESS_POLICY.at(&[&cid]),
        Some(json!({
            "mode": "allowlist",
            "allow": [
                {"domain": "*.PyPI.org.", "protocol": "tcp", "ports": {"first": 443, "last": 443}},
                {"cidr": "198.18.0.0/15"}
            ],
            "deny": [{"cidr": "198.18.5.0/24"}]
        })),
    )
    .await;
    assert_eq!(
        set,
        json!({
            "mode": "allowlist",
            "allow": [
                {"domain": "*.pypi.org", "protocol": "tcp", "ports": {"first": 443, "last": 443}},
                {"cidr": "198.18.0.0/15"}
            ],
            "deny": [{"cidr": "198.18.5.0/24"}]
        })
    );
    let got: Value = ok(&cc, Method::GET, &path, None).await;
    assert_eq!(got, set);
    let typed: EgressPolicy = serde_json::from_value(got).expect("the reply's schema");
    assert_eq!(typed.allow[0].to_string(), "*.pypi.org:tcp:443");

    let many: Vec<Value> = (0..=MAX_EGRESS_RULES)
        .map(|i| json!({"cidr": format!("10.{}.{}.0/24", i / 256, i % 256)}))
        .collect();
    let bad: Vec<(Value, &str)> = vec![
        (
            json!({"mode": "allow", "deny": [{"domain": "evil.example"}]}),
            "deny[0].domain",
        ),
        (
            json!({"mode": "deny", "allow": [{"cidr": "1.0.0.0/8"}]}),
            "allow",
        ),
        (
            json!({"mode": "allow", "allow": [{"cidr": "1.0.0.0/8"}]}),
            "allow",
        ),
        (
            json!({"mode": "allowlist", "allow": [{"cidr": "1.0.0.0/8", "domain": "a.example"}]}),
            "allow[0]",
        ),
        (json!({"mode": "allowlist", "allow": [{}]}), "allow[0]"),
        (
            json!({"mode": "allowlist", "allow": [{"domain": "a.*.example"}]}),
            "allow[0].domain",
        ),
        (
            json!({"mode": "allowlist", "allow": [{"domain": "bad_name.example"}]}),
            "allow[0].domain",
        ),
        (
            json!({"mode": "allowlist", "allow": [{"cidr": "10.0.0.1/8"}]}),
            "allow[0].cidr",
        ),
        (
            json!({"mode": "allowlist", "allow": [{"cidr": "1.2.3.0/24", "ports": {"first": 10, "last": 5}}]}),
            "allow[0].ports",
        ),
        (
            json!({"mode": "allowlist", "allow": [{"cidr": "1.2.3.0/24", "port": 80}]}),
            "allow[0].port",
        ),
        (json!({"mode": "sometimes"}), "mode"),
        (
            json!({"mode": "allow", "limits": {"rate_bytes_per_sec": 10}}),
            "limits.rate_bytes_per_sec",
        ),
        (
            json!({"mode": "allow", "limits": {"budget": {"bytes": 0, "period": "day"}}}),
            "limits.budget.bytes",
        ),
        (
            json!({"mode": "allow", "limits": {"budget": {"bytes": 5, "period": "week"}}}),
            "limits.budget.period",
        ),
        (json!({"mode": "allowlist", "allow": many}), "allow"),
    ];
    for (body, field) in bad {
        let (status, v) = raw(&cc, Method::PUT, &path, Some(&body)).await;
        assert_eq!(
            (status, v["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{body}: {v}"
        );
    }
    // Nothing refused changed the policy.
    let got: Value = ok(&cc, Method::GET, &path, None).await;
    assert_eq!(got, set);

    // Limits: a rate and a budget per period, shown only when set.
    let limited: Value = ok(
        &cc,
        Method::PUT,
        &path,
        Some(json!({"mode": "allow", "limits": {"rate_bytes_per_sec": 1000000, "budget": {"bytes": 10000000000u64, "period": "month"}}})),
    )
    .await;
    assert_eq!(
        limited,
        json!({"mode": "allow", "allow": [], "deny": [], "limits": {"rate_bytes_per_sec": 1000000, "budget": {"bytes": 10000000000u64, "period": "month"}}})
    );

    // The policy goes with its cloud.
    let _: Value = ok(
        &api.op,
        Method::DELETE,
        &routes::DELETE_CLOUD.at(&[&cid]),
        None,
    )
    .await;
    let (status, _) = raw(&api.op, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(mentions(&api, cid).await, Vec::<String>::new());

    // Another default: a control plane configured with `clouds.default_egress = "allow"`.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = ControlConfig {
        operator_token_file: dir.path().join("operator.token"),
        store: StoreConfig {
            path: dir.path().join("control.db"),
            ..StoreConfig::default()
        },
        ..ControlConfig::default()
    };
    cfg.clouds.default_egress = EgressMode::Allow;
    let core = cfg.start().await.expect("start control plane");
    let created = core
        .execute(
            Principal::Operator,
            atoll_api::Command::CreateCloud {
                spec: CreateCloud::default(),
            },
        )
        .await
        .expect("create cloud");
    let atoll_api::Reply::CreatedCloud(created) = created else {
        panic!("{created:?}")
    };
    let policy = core
        .execute(
            Principal::Operator,
            atoll_api::Command::GetEgressPolicy {
                cloud: created.cloud.id,
            },
        )
        .await
        .expect("egress policy");
    assert_eq!(
        policy,
        atoll_api::Reply::EgressPolicy(EgressPolicy {
            mode: EgressMode::Allow,
            ..EgressPolicy::deny_all()
        })
    );
}

/// Own egress addresses: only the operator gives and takes them, from the pool, one cloud per
/// address; a cloud reads its own; its hosts receive it with the policy; deleting the cloud
/// gives it back.
async fn egress_addresses_are_the_operators_to_give_and_each_clouds_alone(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "ea"})).await;
    let (b, bc) = api.cloud(json!({"name": "eb"})).await;
    let (c, _) = api.cloud(json!({"name": "ec"})).await;
    let at = |c: CloudId| routes::GET_EGRESS_ADDRESS.at(&[&c]);
    let (status, _) = raw(&ac, Method::GET, &at(a.cloud.id), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "none given yet");
    // A cloud cannot give itself one.
    let (status, v) = raw(&ac, Method::PUT, &at(a.cloud.id), Some(&json!({}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");

    let first: EgressAddress = ok(&api.op, Method::PUT, &at(a.cloud.id), Some(json!({}))).await;
    assert_eq!(first.address, Ipv4Addr::new(203, 0, 113, 9));
    // Asking again keeps it.
    let again: EgressAddress = ok(&api.op, Method::PUT, &at(a.cloud.id), Some(json!({}))).await;
    assert_eq!(again, first);
    // Another cloud cannot have it; outside the pool is refused naming the field.
    let (status, v) = raw(
        &api.op,
        Method::PUT,
        &at(b.cloud.id),
        Some(&json!({"address": "203.0.113.9"})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("egress_address_taken")),
        "{v}"
    );
    let (status, v) = raw(
        &api.op,
        Method::PUT,
        &at(b.cloud.id),
        Some(&json!({"address": "198.51.100.1"})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("address")),
        "{v}"
    );
    let second: EgressAddress = ok(&api.op, Method::PUT, &at(b.cloud.id), Some(json!({}))).await;
    assert_eq!(second.address, Ipv4Addr::new(203, 0, 113, 10));
    let (status, v) = raw(&api.op, Method::PUT, &at(c.cloud.id), Some(&json!({}))).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("egress_pool_exhausted")),
        "{v}"
    );
    // Each cloud reads its own, not the other's.
    let mine: EgressAddress = ok(&bc, Method::GET, &at(b.cloud.id), None).await;
    assert_eq!(mine, second);
    let (status, _) = raw(&bc, Method::GET, &at(a.cloud.id), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The hosts of cloud a receive its address with its policy.
    let _: Vm = ok(
        &ac,
        Method::POST,
        &routes::CREATE_VM.at(&[&a.cloud.id]),
        Some(json!({"name": "w"})),
    )
    .await;
    let snapshot = api
        .core
        .sync(Principal::Operator, "host-a", 0, Duration::ZERO)
        .await
        .unwrap();
    let got = snapshot
        .egress
        .iter()
        .find(|e| e.cloud == a.cloud.id)
        .expect("cloud a's egress");
    assert_eq!(got.address, Some(first.address));

    // Released, or with its cloud deleted, an address is free again.
    let _: Value = ok(&api.op, Method::DELETE, &at(b.cloud.id), None).await;
    let (status, _) = raw(&bc, Method::GET, &at(b.cloud.id), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let _: Value = ok(
        &api.op,
        Method::DELETE,
        &routes::DELETE_CLOUD.at(&[&a.cloud.id]),
        None,
    )
    .await;
    let reused: EgressAddress = ok(
        &api.op,
        Method::PUT,
        &at(c.cloud.id),
        Some(json!({"address": "203.0.113.9"})),
    )
    .await;
    assert_eq!(reused.address, first.address);
    let moved: EgressAddress = ok(
        &api.op,
        Method::PUT,
        &at(c.cloud.id),
        Some(json!({"address": "203.0.113.10"})),
    )
    .await;
    assert_eq!(moved.address, second.address);
    // Moving freed .9: cloud b can take it.
    let b_again: EgressAddress = ok(&api.op, Method::PUT, &at(b.cloud.id), Some(json!({}))).await;
    assert_eq!(b_again.address, first.address);
    assert_eq!(mentions(&api, a.cloud.id).await, Vec::<String>::new());
}

/// Publications: the same port on the first pool address where it is free, each address and
/// port once; only the cloud's VMs; its host receives them; deleting the VM or unpublishing
/// frees the address and port.
async fn published_ports_take_pool_addresses_and_go_with_their_vm(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "pa"})).await;
    let (b, bc) = api.cloud(json!({"name": "pb"})).await;
    let (c, cc) = api.cloud(json!({"name": "pc"})).await;
    for (cloud, client) in [(&a, &ac), (&b, &bc), (&c, &cc)] {
        let _: Vm = ok(
            client,
            Method::POST,
            &routes::CREATE_VM.at(&[&cloud.cloud.id]),
            Some(json!({"name": "web"})),
        )
        .await;
    }
    let publish = |cloud: CloudId| routes::PUBLISH.at(&[&cloud]);
    let body =
        json!({"vm": "web", "protocol": "tcp", "port": 443, "allow_from": ["198.18.0.0/15"]});
    let pa: Publication = ok(&ac, Method::POST, &publish(a.cloud.id), Some(body.clone())).await;
    assert_eq!(
        (pa.name.as_str(), pa.address, pa.port, pa.ipv4),
        (
            "web-tcp-443",
            Ipv4Addr::new(198, 51, 100, 1),
            443,
            Ipv4Addr::new(10, 0, 0, 2)
        )
    );
    let (status, v) = raw(&ac, Method::POST, &publish(a.cloud.id), Some(&body)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_published")),
        "{v}"
    );
    // Another cloud, the same port: the next address; then no address is left for it.
    let pb: Publication = ok(&bc, Method::POST, &publish(b.cloud.id), Some(body.clone())).await;
    assert_eq!(pb.address, Ipv4Addr::new(198, 51, 100, 2));
    let (status, v) = raw(&cc, Method::POST, &publish(c.cloud.id), Some(&body)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("ingress_pool_exhausted")),
        "{v}"
    );
    // UDP 443 is another port.
    let udp = json!({"vm": "web", "protocol": "udp", "port": 443});
    let pc: Publication = ok(&cc, Method::POST, &publish(c.cloud.id), Some(udp)).await;
    assert_eq!(pc.address, Ipv4Addr::new(198, 51, 100, 1));
    // Bad input and other clouds' VMs.
    for (bad, field) in [
        (json!({"vm": "web", "protocol": "tcp", "port": 0}), "port"),
        (
            json!({"vm": "Bad Name", "protocol": "tcp", "port": 80}),
            "vm",
        ),
    ] {
        let (status, v) = raw(&ac, Method::POST, &publish(a.cloud.id), Some(&bad)).await;
        assert_eq!(
            (status, v["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{v}"
        );
    }
    let (status, _) = raw(
        &ac,
        Method::POST,
        &publish(a.cloud.id),
        Some(&json!({"vm": "nope", "protocol": "tcp", "port": 80})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = raw(
        &bc,
        Method::GET,
        &routes::LIST_PUBLICATIONS.at(&[&a.cloud.id]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mine: Vec<Publication> = ok(
        &ac,
        Method::GET,
        &routes::LIST_PUBLICATIONS.at(&[&a.cloud.id]),
        None,
    )
    .await;
    assert_eq!(mine, vec![pa.clone()]);

    // The VM's host receives its cloud's publications.
    let host = api
        .core
        .sync(Principal::Operator, "host-a", 0, Duration::ZERO)
        .await
        .unwrap();
    let got = host
        .published
        .iter()
        .find(|p| p.cloud == a.cloud.id)
        .expect("cloud a's publications");
    assert_eq!(got.publications, vec![pa.clone()]);

    // Unpublished: the address and port are free again (cloud c takes .1 for TCP 443).
    let _: Value = ok(
        &ac,
        Method::DELETE,
        &routes::UNPUBLISH.at(&[&a.cloud.id, &"web-tcp-443"]),
        None,
    )
    .await;
    let (status, _) = raw(
        &ac,
        Method::DELETE,
        &routes::UNPUBLISH.at(&[&a.cloud.id, &"web-tcp-443"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let pc2: Publication = ok(&cc, Method::POST, &publish(c.cloud.id), Some(body.clone())).await;
    assert_eq!(pc2.address, Ipv4Addr::new(198, 51, 100, 1));
    // Deleting the VM unpublishes its ports: .2 is free for cloud a.
    let _: Value = ok(
        &bc,
        Method::DELETE,
        &routes::DELETE_VM.at(&[&b.cloud.id, &"web"]),
        None,
    )
    .await;
    let empty: Vec<Publication> = ok(
        &bc,
        Method::GET,
        &routes::LIST_PUBLICATIONS.at(&[&b.cloud.id]),
        None,
    )
    .await;
    assert!(empty.is_empty());
    let pa2: Publication = ok(&ac, Method::POST, &publish(a.cloud.id), Some(body.clone())).await;
    assert_eq!(pa2.address, Ipv4Addr::new(198, 51, 100, 2));
    // Deleting the cloud frees its ports too.
    let _: Value = ok(
        &api.op,
        Method::DELETE,
        &routes::DELETE_CLOUD.at(&[&c.cloud.id]),
        None,
    )
    .await;
    let (_, bc2) = (b.clone(), bc.clone());
    let _: Vm = ok(
        &bc2,
        Method::POST,
        &routes::CREATE_VM.at(&[&b.cloud.id]),
        Some(json!({"name": "web"})),
    )
    .await;
    let pb2: Publication = ok(&bc, Method::POST, &publish(b.cloud.id), Some(body)).await;
    assert_eq!(pb2.address, Ipv4Addr::new(198, 51, 100, 1));
}

/// What hosts report their DNS servers refused shows to the cloud, per host and most recent
/// first; a host's report of a cloud it does not run is ignored, an oversized one refused, and
/// a later report replaces the host's earlier one.
async fn denied_destinations_come_from_the_hosts_running_the_cloud(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "da"})).await;
    let (b, bc) = api.cloud(json!({"name": "db"})).await;
    let _: Vm = ok(
        &ac,
        Method::POST,
        &routes::CREATE_VM.at(&[&a.cloud.id]),
        Some(json!({"name": "w"})),
    )
    .await;
    let entry = |name: &str, count: u64, last_seen: u64| DeniedDestination {
        name: Some(name.into()),
        address: None,
        port: None,
        protocol: None,
        reason: DenyReason::NameNotAllowed,
        count,
        last_seen,
        host: String::new(),
    };
    let report = |denied: Vec<DeniedReport>| atoll_api::Command::ReportStatus {
        host: "host-a".into(),
        report: StatusReport {
            vms: vec![],
            services: vec![],
            denied,
            idle: vec![],
        },
    };
    api.core
        .execute(
            Principal::Host("host-a".into()),
            report(vec![
                DeniedReport {
                    cloud: a.cloud.id,
                    entries: vec![entry("old.example", 3, 100), entry("new.example", 1, 200)],
                },
                // host-a runs nothing of cloud b: ignored.
                DeniedReport {
                    cloud: b.cloud.id,
                    entries: vec![entry("forged.example", 1, 300)],
                },
            ]),
        )
        .await
        .expect("report");
    let path = routes::LIST_DENIED.at(&[&a.cloud.id]);
    let got: Vec<DeniedDestination> = ok(&ac, Method::GET, &path, None).await;
    let seen: Vec<(Option<&str>, u64, &str)> = got
        .iter()
        .map(|d| (d.name.as_deref(), d.count, d.host.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Some("new.example"), 1, "host-a"),
            (Some("old.example"), 3, "host-a")
        ]
    );
    let raw_b: Value = ok(
        &bc,
        Method::GET,
        &routes::LIST_DENIED.at(&[&b.cloud.id]),
        None,
    )
    .await;
    assert_eq!(raw_b, json!([]));
    // A later report replaces the host's list.
    api.core
        .execute(
            Principal::Host("host-a".into()),
            report(vec![DeniedReport {
                cloud: a.cloud.id,
                entries: vec![entry("new.example", 5, 400)],
            }]),
        )
        .await
        .unwrap();
    let got: Vec<DeniedDestination> = ok(&ac, Method::GET, &path, None).await;
    assert_eq!((got.len(), got[0].count), (1, 5));
    // Bounded.
    let too_many = (0..=MAX_DENIED_PER_HOST as u64)
        .map(|i| entry(&format!("n{i}.example"), 1, i))
        .collect();
    let e = api
        .core
        .execute(
            Principal::Host("host-a".into()),
            report(vec![DeniedReport {
                cloud: a.cloud.id,
                entries: too_many,
            }]),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 64"), "{e}");
}

/// A cloud's publications are bounded (`clouds.max_publications_per_cloud`, 3 here): the next
/// is refused as a quota, and an unpublished port makes room again.
async fn a_clouds_publications_are_bounded(api: Api) {
    let (a, ac) = api.cloud(json!({"name": "pq"})).await;
    let _: Vm = ok(
        &ac,
        Method::POST,
        &routes::CREATE_VM.at(&[&a.cloud.id]),
        Some(json!({"name": "web"})),
    )
    .await;
    let publish = routes::PUBLISH.at(&[&a.cloud.id]);
    for port in [80, 443, 8080] {
        let body = json!({"vm": "web", "protocol": "tcp", "port": port});
        let _: Publication = ok(&ac, Method::POST, &publish, Some(body)).await;
    }
    let fourth = json!({"vm": "web", "protocol": "udp", "port": 443});
    let (status, v) = raw(&ac, Method::POST, &publish, Some(&fourth)).await;
    assert_eq!(
        (
            status,
            v["error"]["code"].as_str(),
            v["error"]["field"].as_str()
        ),
        (
            StatusCode::CONFLICT,
            Some("quota_exceeded"),
            Some("quotas.publications")
        ),
        "{v}"
    );
    let _: Value = ok(
        &ac,
        Method::DELETE,
        &routes::UNPUBLISH.at(&[&a.cloud.id, &"web-tcp-80"]),
        None,
    )
    .await;
    let p: Publication = ok(&ac, Method::POST, &publish, Some(fourth)).await;
    assert_eq!((p.name.as_str(), p.port), ("web-udp-443", 443));
}

/// Polls `cond` until it holds, for at most `secs` seconds (expiry is checked once a second:
/// there is no event to wait for, only the clock).
async fn eventually<F, Fut>(what: &str, secs: u64, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clouds with a time to live or an expiry time (issue 19): bad values refused naming the
/// field; set, extended and cleared through the API, each leaving exactly one index key; at
/// expiry the cloud goes with everything it held (its VM's placement leaves the host's sync,
/// nothing in the store mentions it); and a control plane started after the cloud fell due,
/// with none running meanwhile, deletes it: expiry lives in the store, not in a process.
async fn clouds_expire_with_everything_in_them_also_after_a_restart(api: Api) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    for (body, field) in [
        (json!({"ttl_secs": 0}), "ttl_secs"),
        (json!({"ttl_secs": 400_000_000u64}), "ttl_secs"),
        (
            json!({"ttl_secs": 60, "expires_at": now() + 60}),
            "expires_at",
        ),
        (json!({"expires_at": now() - 1}), "expires_at"),
        (json!({"expires_at": "soon"}), "expires_at"),
    ] {
        let (status, e) = raw(
            &api.op,
            Method::POST,
            routes::CREATE_CLOUD.path,
            Some(&body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }
    let index = || async {
        api.core
            .store()
            .range("expiry/", None, 0)
            .await
            .unwrap()
            .into_iter()
            .map(|kv| kv.key)
            .collect::<Vec<_>>()
    };
    // Set at creation, cleared, set again, by the cloud's own token.
    let (keep, kc) = api.cloud(json!({"name": "keep", "ttl_secs": 3600})).await;
    let kid = keep.cloud.id;
    let at = keep.cloud.expires_at.expect("an expiry");
    assert!((now() + 3590..=now() + 3600).contains(&at), "{at}");
    assert_eq!(index().await, vec![format!("expiry/{at:020}/{kid}")]);
    let expiry = routes::SET_CLOUD_EXPIRY.at(&[&kid]);
    let c: Cloud = ok(&kc, Method::PUT, &expiry, Some(json!({}))).await;
    assert_eq!(c.expires_at, None);
    assert!(index().await.is_empty());
    let c: Cloud = ok(&kc, Method::PUT, &expiry, Some(json!({"ttl_secs": 7200}))).await;
    let at = c.expires_at.expect("an expiry");
    assert_eq!(index().await, vec![format!("expiry/{at:020}/{kid}")]);
    let got: Cloud = ok(&kc, Method::GET, &routes::GET_CLOUD.at(&[&kid]), None).await;
    assert_eq!(got.expires_at, Some(at));

    // A cloud with a VM that expires in a second: gone with its VM, on its host too.
    let (short, sc) = api.cloud(json!({"name": "short"})).await;
    let sid = short.cloud.id;
    let vm: Vm = ok(
        &sc,
        Method::POST,
        &routes::CREATE_VM.at(&[&sid]),
        Some(json!({"name": "web"})),
    )
    .await;
    let sync = || async {
        api.core
            .sync(Principal::Operator, &vm.host, 0, Duration::ZERO)
            .await
            .unwrap()
    };
    assert!(sync().await.vms.iter().any(|p| p.cloud == sid));
    let c: Cloud = ok(
        &sc,
        Method::PUT,
        &routes::SET_CLOUD_EXPIRY.at(&[&sid]),
        Some(json!({"ttl_secs": 1})),
    )
    .await;
    assert!(c.expires_at.is_some());
    let get_short = routes::GET_CLOUD.at(&[&sid]);
    eventually("the cloud expires", 10, || async {
        raw(&api.op, Method::GET, &get_short, None).await.0 == StatusCode::NOT_FOUND
    })
    .await;
    assert!(!sync().await.vms.iter().any(|p| p.cloud == sid));
    assert!(
        mentions(&api, sid).await.is_empty(),
        "{:?}",
        mentions(&api, sid).await
    );
    assert_eq!(index().await.len(), 1, "only the kept cloud's key");

    // No control plane runs while a cloud falls due; the next one to start deletes it.
    let (late, lc) = api.cloud(json!({"name": "late"})).await;
    let lid = late.cloud.id;
    let c: Cloud = ok(
        &lc,
        Method::PUT,
        &routes::SET_CLOUD_EXPIRY.at(&[&lid]),
        Some(json!({"ttl_secs": 2})),
    )
    .await;
    let due = c.expires_at.expect("an expiry");
    let store = api.core.store().clone();
    let cfg = api.core.config().clone();
    let gone = Arc::downgrade(&api.core);
    drop((kc, sc, lc));
    drop(api);
    eventually("the control plane stops", 10, || {
        let g = gone.clone();
        async move { g.upgrade().is_none() }
    })
    .await;
    while now() <= due + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let record = format!("clouds/{lid}");
    assert!(
        store.get(&record).await.unwrap().is_some(),
        "deleted with no control plane running"
    );
    let restarted = Core::start(store.clone(), cfg).await.expect("restart");
    eventually(
        "the restarted control plane deletes the due cloud",
        10,
        || {
            let (store, record) = (store.clone(), record.clone());
            async move { store.get(&record).await.unwrap().is_none() }
        },
    )
    .await;
    assert!(store.get(&format!("clouds/{kid}")).await.unwrap().is_some());
    drop(restarted);
}

/// VM idle timeouts (issue 19): bad values refused naming the field; the timeout reaches the
/// VM's placement; a report of idleness from the VM's own host stops it (`stopped_by: idle`,
/// the placement stopped), while one from another host, or about a VM without a timeout, or
/// one already stopped, changes nothing; a start clears the reason, and a stop by request
/// says so.
async fn idle_vms_are_stopped_on_their_hosts_report_only(api: Api) {
    let (c, cc) = api.cloud(json!({"name": "idle"})).await;
    let cid = c.cloud.id;
    for bad in [
        json!(0),
        json!(MAX_IDLE_TIMEOUT_SECS as u64 + 1),
        json!("1h"),
    ] {
        let body = json!({"name": "x", "idle_timeout_secs": bad});
        let (status, e) = raw(
            &cc,
            Method::POST,
            &routes::CREATE_VM.at(&[&cid]),
            Some(&body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert!(e.to_string().contains("idle_timeout_secs"), "{body}: {e}");
    }
    let vm = |name: &'static str, body: Value| {
        let cc = cc.clone();
        async move {
            let v: Vm = ok(
                &cc,
                Method::POST,
                &routes::CREATE_VM.at(&[&cid]),
                Some(body),
            )
            .await;
            assert_eq!(v.name, name);
            v
        }
    };
    let lazy = vm("lazy", json!({"name": "lazy", "idle_timeout_secs": 300})).await;
    let busy = vm("busy", json!({"name": "busy"})).await;
    let cold = vm(
        "cold",
        json!({"name": "cold", "start": false, "idle_timeout_secs": 60}),
    )
    .await;
    assert_eq!((lazy.idle_timeout_secs, lazy.stopped_by), (Some(300), None));
    assert_eq!(busy.idle_timeout_secs, None);
    assert_eq!(cold.stopped_by, Some(StopReason::Request));
    let sync = |h: String| {
        let core = api.core.clone();
        async move {
            core.sync(Principal::Operator, &h, 0, Duration::ZERO)
                .await
                .unwrap()
        }
    };
    let placed = |d: &SyncDelta, name: &str| {
        d.vms
            .iter()
            .find(|p| p.cloud == cid && p.vm == name)
            .cloned()
            .unwrap_or_else(|| panic!("no placement of {name}"))
    };
    let d = sync(lazy.host.clone()).await;
    assert_eq!(placed(&d, "lazy").idle_timeout_secs, Some(300));
    let report = |host: &str, names: &[&str]| {
        let core = api.core.clone();
        let host = host.to_string();
        let idle: Vec<VmRef> = names
            .iter()
            .map(|n| VmRef {
                cloud: cid,
                vm: n.to_string(),
            })
            .collect();
        async move {
            core.execute(
                Principal::Host(host.clone()),
                atoll_api::Command::ReportStatus {
                    host,
                    report: StatusReport {
                        vms: vec![],
                        services: vec![],
                        denied: vec![],
                        idle,
                    },
                },
            )
            .await
            .expect("a status report")
        }
    };
    let get = |name: &'static str| {
        let cc = cc.clone();
        async move {
            let v: Vm = ok(&cc, Method::GET, &routes::GET_VM.at(&[&cid, &name]), None).await;
            v
        }
    };
    // Another host cannot stop it; nor can a report about VMs without a timeout, stopped, or
    // unknown.
    let other = "host-idle-other";
    api.host(other, None).await;
    report(other, &["lazy"]).await;
    assert_eq!(get("lazy").await.power, Power::Running);
    report(&lazy.host, &["busy", "cold", "ghost"]).await;
    assert_eq!(get("busy").await.power, Power::Running);
    assert_eq!(get("cold").await.stopped_by, Some(StopReason::Request));
    // Its own host can.
    report(&lazy.host, &["lazy"]).await;
    let v = get("lazy").await;
    assert_eq!(
        (v.power, v.stopped_by),
        (Power::Stopped, Some(StopReason::Idle))
    );
    assert_eq!(
        placed(&sync(lazy.host.clone()).await, "lazy").power,
        Power::Stopped
    );
    // Started again: running, no reason; stopped by request: says so.
    let v: Vm = ok(
        &cc,
        Method::POST,
        &routes::START_VM.at(&[&cid, &"lazy"]),
        None,
    )
    .await;
    assert_eq!((v.power, v.stopped_by), (Power::Running, None));
    assert_eq!(
        placed(&sync(lazy.host.clone()).await, "lazy").power,
        Power::Running
    );
    let v: Vm = ok(
        &cc,
        Method::POST,
        &routes::STOP_VM.at(&[&cid, &"lazy"]),
        None,
    )
    .await;
    assert_eq!(
        (v.power, v.stopped_by),
        (Power::Stopped, Some(StopReason::Request))
    );
}

/// A usage record of cloud `cloud` whose window ends at `end_ms`, with `bytes` sent as
/// `class`.
fn usage_record(cloud: u32, id: &str, end_ms: u64, class: &str, bytes: u64) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "test", "type": atoll_api::usage::EVENT_TYPE,
        "subject": format!("{cloud}/atv1"), "time": "2026-12-06T00:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "cloud": cloud, "endpoint": "atv1", "incarnation": "b-1", "seq": 1,
            "start_unix_ms": end_ms - 1000, "end_unix_ms": end_ms, "final": false,
            "usage": {"traffic": [{"direction": "from_guest", "class": class, "packets": 2, "bytes": bytes}], "drops": {}},
            "cumulative": {"traffic": [], "drops": {}},
        },
    })
}

/// Usage delivered by hosts (issue 20, first part): each id is kept once however often it
/// comes (at-least-once delivery), only the host running a cloud may deliver its records,
/// another host's token is refused, bad records are refused naming the field; a cloud reads
/// its own quantities summed over a period, and the period's bounds hold.
async fn hosts_deliver_usage_once_per_id_and_clouds_read_their_own(api: Api) {
    let (c, cc) = api.cloud(json!({"name": "metered"})).await;
    let cid = c.cloud.id;
    let vm: Vm = ok(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&cid]),
        Some(json!({"name": "m"})),
    )
    .await;
    let host = api.host(&vm.host, None).await;
    let other = api.host("host-usage-other", None).await;
    let n = cid.get();
    let t0 = 1_800_000_000_000u64;
    let ingest = |c: &Client, h: &str, records: Vec<Value>| {
        let (c, path) = (c.clone(), routes::INGEST_USAGE.at(&[&h]));
        async move {
            raw(
                &c,
                Method::POST,
                &path,
                Some(&json!({ "records": records })),
            )
            .await
        }
    };
    let (st, r) = ingest(
        &host,
        &vm.host,
        vec![
            usage_record(n, "b-1-1", t0 + 1000, "intra_cloud", 100),
            usage_record(n, "b-1-2", t0 + 3_601_000, "exposure", 40),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r, json!({"accepted": 2, "duplicates": 0, "refused": 0}));
    // Delivered again (a crash before the cursor moved): kept once.
    let (_, r) = ingest(
        &host,
        &vm.host,
        vec![usage_record(n, "b-1-1", t0 + 1000, "intra_cloud", 100)],
    )
    .await;
    assert_eq!(r, json!({"accepted": 0, "duplicates": 1, "refused": 0}));
    // A host that does not run the cloud is refused its records; another host's route too.
    let (_, r) = ingest(
        &other,
        "host-usage-other",
        vec![usage_record(n, "x-1-1", t0 + 2000, "intra_cloud", 1 << 40)],
    )
    .await;
    assert_eq!(r, json!({"accepted": 0, "duplicates": 0, "refused": 1}));
    let (st, _) = ingest(&other, &vm.host, vec![]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Bad records, named.
    for (bad, field) in [
        (
            usage_record(n, "a/b", t0, "intra_cloud", 1),
            "records[0].id",
        ),
        (
            {
                let mut r = usage_record(n, "ok-1", t0, "intra_cloud", 1);
                r["type"] = json!("other");
                r
            },
            "records[0].type",
        ),
        (
            {
                // Five seconds of a one-vCPU VM in a one-second window.
                let mut r = usage_record(n, "ok-2", t0, "intra_cloud", 0);
                r["data"]["resource"] =
                    json!({"kind": "vm", "name": "m", "vcpus": 1, "memory_mib": 16});
                r["data"]["usage"] = json!({"traffic": [], "drops": {}, "vcpu_ms": 5000});
                r
            },
            "records[0].data.usage",
        ),
    ] {
        let (st, e) = ingest(&host, &vm.host, vec![bad]).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(e["error"]["field"], field, "{e}");
    }
    let over: Vec<Value> = (0..257)
        .map(|i| usage_record(n, &format!("o-{i}"), t0, "intra_cloud", 1))
        .collect();
    let (st, _) = ingest(&host, &vm.host, over).await;
    assert!(
        st == StatusCode::BAD_REQUEST || st == StatusCode::PAYLOAD_TOO_LARGE,
        "{st}"
    );

    // The cloud reads its quantities: both records in a period holding both, one in one
    // holding only the first's hour (a window's end decides; periods are whole hours),
    // nothing after.
    let usage = |from: u64, to: u64| {
        let cc = cc.clone();
        async move {
            let u: CloudUsage = ok(
                &cc,
                Method::GET,
                &format!("{}?from={from}&to={to}", routes::GET_USAGE.at(&[&cid])),
                None,
            )
            .await;
            u
        }
    };
    let s0 = t0 / 1000;
    let all = usage(s0, s0 + 7200).await;
    assert_eq!(all.records, 2);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        all.complete_to <= now + 1 && all.complete_to + 60 >= now,
        "its one host delivered up to its last window's end, never past now: {} vs {now}",
        all.complete_to
    );
    // A host's word on how far it delivered (each interval, with no records).
    let (st, r) = raw(
        &host,
        Method::POST,
        &routes::INGEST_USAGE.at(&[&vm.host]),
        Some(&json!({"records": [], "complete_to_ms": (now - 100) * 1000})),
    )
    .await;
    assert_eq!((st, r["accepted"].clone()), (StatusCode::OK, json!(0)));
    assert_eq!(
        usage(s0, s0 + 7200).await.complete_to,
        all.complete_to,
        "never back"
    );
    assert_eq!(all.items.len(), 2, "{:?}", all.items);
    assert_eq!(
        (all.cost.as_str(), all.cost_nanos),
        ("0.000000100", 100),
        "100 bytes within the cloud at 1 per GB; exposure has no price"
    );
    let bytes = |u: &CloudUsage, class: &str| {
        u.traffic
            .iter()
            .filter(|t| t.class == class)
            .map(|t| t.bytes)
            .sum::<u64>()
    };
    assert_eq!(
        (bytes(&all, "intra_cloud"), bytes(&all, "exposure")),
        (100, 40)
    );
    let first = usage(s0 + 10, s0 + 60).await;
    assert_eq!(
        (first.from, first.to),
        (s0, s0 + 3600),
        "widened to the hour"
    );
    assert_eq!((first.records, bytes(&first, "exposure")), (1, 0));
    assert_eq!(usage(s0 + 7200, s0 + 9000).await.records, 0);
    // The operator sees every cloud, as JSON and as FOCUS; a cloud may not.
    let fleet: FleetUsage = ok(
        &api.op,
        Method::GET,
        &format!(
            "{}?from={s0}&to={}",
            routes::GET_FLEET_USAGE.at(&[]),
            s0 + 7200
        ),
        None,
    )
    .await;
    let mine = fleet
        .clouds
        .iter()
        .find(|c| c.cloud == cid)
        .expect("the cloud");
    assert_eq!(mine.records, 2);
    let (st, csv) = raw_text(
        &api.op,
        &format!(
            "{}?from={s0}&to={}&format=focus",
            routes::GET_FLEET_USAGE.at(&[]),
            s0 + 7200
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{csv}");
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().contains("BilledCost"), "{csv}");
    assert_eq!(
        lines.filter(|l| l.contains(&cid.to_string())).count(),
        2,
        "a row per cloud, hour and SKU: {csv}"
    );
    let (st, _) = raw(&cc, Method::GET, &routes::GET_FLEET_USAGE.at(&[]), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, e) = raw(
        &cc,
        Method::GET,
        &format!("{}?from=10&to=5", routes::GET_USAGE.at(&[&cid])),
        None,
    )
    .await;
    assert_eq!(
        (st, e["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("from"))
    );

    // A cloud that never ran on a host (or never existed) gets no records from it; once
    // deleted, the hosts that ran it may deliver its last records (a grace of a day), others
    // not; its usage stays (billing).
    let (_, r) = ingest(
        &host,
        &vm.host,
        vec![usage_record(0x7eed_0001, "n-1-1", t0, "intra_cloud", 1)],
    )
    .await;
    assert_eq!(r["refused"], 1, "{r}");
    let _: () = ok(
        &api.op,
        Method::DELETE,
        &routes::DELETE_CLOUD.at(&[&cid]),
        None,
    )
    .await;
    let (_, r) = ingest(
        &host,
        &vm.host,
        vec![usage_record(n, "b-1-3", t0 + 62_000, "intra_cloud", 7)],
    )
    .await;
    assert_eq!(r, json!({"accepted": 1, "duplicates": 0, "refused": 0}));
    let (_, r) = ingest(
        &other,
        "host-usage-other",
        vec![usage_record(n, "x-1-2", t0 + 62_000, "intra_cloud", 7)],
    )
    .await;
    assert_eq!(r["refused"], 1, "{r}");
    let u: CloudUsage = ok(
        &api.op,
        Method::GET,
        &format!(
            "{}?from={s0}&to={}",
            routes::GET_USAGE.at(&[&cid]),
            s0 + 7200
        ),
        None,
    )
    .await;
    assert_eq!((u.records, bytes(&u, "intra_cloud")), (3, 107));
}

/// A cloud's spend budget (issue 20): past its warning threshold an event is recorded; at the
/// amount its running VMs stop (`stopped_by: budget`), starting one is refused, and its hosts
/// get its egress as `deny`; raising the budget over the spend starts exactly those VMs again
/// and gives back the cloud's own egress policy; lifting it does the same. Only the operator
/// sets budgets.
async fn budgets_stop_a_clouds_vms_and_egress_and_start_them_again(api: Api) {
    let (c, cc) = api.cloud(json!({"name": "budgeted"})).await;
    let cid = c.cloud.id;
    let create = |name: &str, start: bool| {
        let (cc, name) = (cc.clone(), name.to_string());
        async move {
            let vm: Vm = ok(
                &cc,
                Method::POST,
                &routes::CREATE_VM.at(&[&cid]),
                Some(json!({"name": name, "start": start})),
            )
            .await;
            vm
        }
    };
    let vm = create("run", true).await;
    create("off", false).await;
    let _: EgressPolicy = ok(
        &cc,
        Method::PUT,
        &routes::PUT_EGRESS_POLICY.at(&[&cid]),
        Some(json!({"mode": "allow"})),
    )
    .await;
    let host = api.host(&vm.host, None).await;
    let budget = |amount: f64| {
        let op = api.op.clone();
        async move {
            let st: BudgetStatus = ok(
                &op,
                Method::PUT,
                &routes::SET_BUDGET.at(&[&cid]),
                Some(json!({"amount": amount, "warn_percent": 50})),
            )
            .await;
            st
        }
    };
    let (st, _) = raw(
        &cc,
        Method::PUT,
        &routes::SET_BUDGET.at(&[&cid]),
        Some(&json!({"amount": 100.0})),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "a cloud does not set its own budget"
    );
    for bad in [
        json!({"amount": -1.0}),
        json!({"amount": 1.0, "warn_percent": 0}),
    ] {
        let (st, _) = raw(
            &api.op,
            Method::PUT,
            &routes::SET_BUDGET.at(&[&cid]),
            Some(&bad),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
    }
    // 1000 nanos: 1000 bytes sent within the cloud.
    let st = budget(0.000_001).await;
    assert_eq!((st.state, st.spent_nanos), (BudgetState::Ok, 0));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let spend = |id: &str, bytes: u64| {
        let (host, path, n, id) = (
            host.clone(),
            routes::INGEST_USAGE.at(&[&vm.host]),
            cid.get(),
            id.to_string(),
        );
        async move {
            let r: UsageIngested = ok(
                &host,
                Method::POST,
                &path,
                Some(json!({"records": [usage_record(n, &id, now_ms(), "intra_cloud", bytes)]})),
            )
            .await;
            assert_eq!(r.accepted, 1);
        }
    };
    let cloud = || {
        let cc = cc.clone();
        async move {
            let c: Cloud = ok(&cc, Method::GET, &routes::GET_CLOUD.at(&[&cid]), None).await;
            c.budget.expect("a budget")
        }
    };
    let power = |name: &str| {
        let (cc, name) = (cc.clone(), name.to_string());
        async move {
            let v: Vm = ok(&cc, Method::GET, &routes::GET_VM.at(&[&cid, &name]), None).await;
            (v.power, v.stopped_by)
        }
    };
    let egress = || {
        let (host, path) = (
            host.clone(),
            format!("{}?wait_ms=0", routes::SYNC.at(&[&vm.host])),
        );
        async move {
            let d: SyncDelta = ok(&host, Method::GET, &path, None).await;
            d.egress
                .iter()
                .find(|e| e.cloud == cid)
                .expect("the cloud's egress")
                .policy
                .mode
        }
    };
    assert_eq!(egress().await, EgressMode::Allow);

    spend("b-1", 600).await;
    let b = cloud().await;
    assert_eq!((b.state, b.spent_nanos), (BudgetState::Warning, 600));
    assert_eq!(b.events.len(), 1);
    assert_eq!(power("run").await, (Power::Running, None), "a warning only");

    spend("b-2", 400).await;
    let b = cloud().await;
    assert_eq!((b.state, b.spent_nanos), (BudgetState::Exceeded, 1000));
    assert_eq!(
        b.events.iter().map(|e| e.state).collect::<Vec<_>>(),
        [BudgetState::Warning, BudgetState::Exceeded]
    );
    assert_eq!(
        power("run").await,
        (Power::Stopped, Some(StopReason::Budget))
    );
    assert_eq!(
        power("off").await,
        (Power::Stopped, Some(StopReason::Request)),
        "what was stopped stays stopped, for its own reason"
    );
    assert_eq!(egress().await, EgressMode::Deny, "egress stops");
    let (st, e) = raw(
        &cc,
        Method::POST,
        &routes::START_VM.at(&[&cid, &"run"]),
        None,
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("budget_exceeded"))
    );
    let (st, _) = raw(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&cid]),
        Some(&json!({"name": "more"})),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = raw(
        &cc,
        Method::POST,
        &routes::CREATE_VOLUME.at(&[&cid]),
        Some(&json!({"name": "more", "size_gib": 1})),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "a volume costs from its creation");
    let u: CloudUsage = ok(&cc, Method::GET, &routes::GET_USAGE.at(&[&cid]), None).await;
    assert_eq!(u.budget.map(|b| b.state), Some(BudgetState::Exceeded));

    // Raised over the spend: what the budget stopped runs again, the cloud's egress is back.
    let st = budget(1.0).await;
    assert_eq!(st.state, BudgetState::Ok);
    assert_eq!(power("run").await, (Power::Running, None));
    assert_eq!(power("off").await.0, Power::Stopped);
    assert_eq!(egress().await, EgressMode::Allow);

    // Lowered under it, then lifted.
    assert_eq!(budget(0.000_000_5).await.state, BudgetState::Exceeded);
    assert_eq!(power("run").await.0, Power::Stopped);
    let (st, _) = raw(
        &api.op,
        Method::DELETE,
        &routes::LIFT_BUDGET.at(&[&cid]),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(power("run").await, (Power::Running, None));
    assert_eq!(egress().await, EgressMode::Allow);
    let c: Cloud = ok(&cc, Method::GET, &routes::GET_CLOUD.at(&[&cid]), None).await;
    assert!(c.budget.is_none());
    let (st, _) = raw(
        &api.op,
        Method::DELETE,
        &routes::LIFT_BUDGET.at(&[&cid]),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Raw usage records are kept `usage.record_retention_days` (35 here): the reaper deletes
/// older ones (the hourly rollups stay, and with them the cost), and a host delivering a record
/// that old is refused (it could no longer be found a duplicate).
async fn usage_records_past_their_retention_are_deleted_and_refused(api: Api) {
    use atoll_control::store::{Op, Txn};
    let (c, cc) = api.cloud(json!({"name": "old-usage"})).await;
    let cid = c.cloud.id;
    let vm: Vm = ok(
        &cc,
        Method::POST,
        &routes::CREATE_VM.at(&[&cid]),
        Some(json!({"name": "m"})),
    )
    .await;
    let host = api.host(&vm.host, None).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let old_hour = (now - 40 * 86_400) / 3600 * 3600;
    let old_end_ms = (old_hour + 60) * 1000;
    // What an ingest 40 days ago left: the record and its hour's rollups.
    let record_key = format!("usage/{cid}/{old_end_ms:020}/old-1");
    let rollup = json!({"records": 1, "traffic": {"from_guest/intra_cloud": [1, 1000]}});
    api.core
        .store()
        .txn(Txn {
            compares: vec![],
            success: vec![
                Op::Put {
                    key: record_key.clone(),
                    value: serde_json::to_vec(&usage_record(
                        cid.get(),
                        "old-1",
                        old_end_ms,
                        "intra_cloud",
                        1000,
                    ))
                    .unwrap(),
                },
                Op::Put {
                    key: format!("usagehour/{cid}/{old_hour:012}/{}", vm.host),
                    value: serde_json::to_vec(&rollup).unwrap(),
                },
                Op::Put {
                    key: format!("usagefleet/{old_hour:012}/{cid}/{}", vm.host),
                    value: serde_json::to_vec(&rollup).unwrap(),
                },
            ],
        })
        .await
        .unwrap();
    // The reaper (every second) gets to it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while api.core.store().get(&record_key).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "{record_key} outlived its retention"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let u: CloudUsage = ok(
        &cc,
        Method::GET,
        &format!(
            "{}?from={old_hour}&to={}",
            routes::GET_USAGE.at(&[&cid]),
            old_hour + 3600
        ),
        None,
    )
    .await;
    assert_eq!(
        (u.records, u.cost_nanos),
        (1, 1000),
        "the rollup and its cost stay"
    );
    // A record that old is refused; a recent one is kept.
    let r: UsageIngested = ok(
        &host,
        Method::POST,
        &routes::INGEST_USAGE.at(&[&vm.host]),
        Some(json!({"records": [
            usage_record(cid.get(), "old-2", old_end_ms, "intra_cloud", 5),
            usage_record(cid.get(), "new-1", (now - 60) * 1000, "intra_cloud", 5),
        ]})),
    )
    .await;
    assert_eq!((r.accepted, r.refused), (1, 1));
}
