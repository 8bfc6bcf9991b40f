//! A cloud's egress policy as the dataplane's rule tries hold it (`EGRESS_ALLOW`,
//! `EGRESS_DENY`), kept current as policies change and names are resolved.
//!
//! Decisions:
//! - **The longest match alone decides**, so each prefix carries its own port rules and those
//!   of every shorter prefix of the same cloud covering it ([`compile`]): an allow of
//!   `10.0.0.0/8` for any port and of `10.1.0.0/16` for TCP 443 leaves `10.1.2.3` reachable on
//!   every port, as the policy says.
//! - **More rules than an entry holds fail closed** ([`RULES_PER_PREFIX`], 8): an allow entry
//!   keeps its first 8 (its own before inherited ones, so it allows less, never more); a deny
//!   entry becomes one rule for every protocol and port (it denies more, never less). Either
//!   is logged. Policies name a few ports per prefix in practice.
//! - **Learnt addresses** (answers to allowed names, from the DNS server) are `/32` allow
//!   entries whose rules are the port rules of the domain rules matching the name asked, each
//!   with an expiry in `CLOCK_BOOTTIME` nanoseconds (the kernel's `bpf_ktime_get_boot_ns`), so
//!   the kernel stops admitting new flows to an address when its answer expires even before
//!   [`EgressTables::prune`] removes it. They are written before the DNS answer is sent to the
//!   guest, so the guest's first packet finds them.
//! - **The tries are the state**: a restarted agent adopts what is pinned (per cloud) and the
//!   first policy it receives rewrites the difference; a cloud it no longer has is removed by
//!   the converger's full state.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Mutex,
    time::Duration,
};

use atoll_api::model::{EgressMode, EgressPolicy, EgressRule, Protocol};
use atoll_dataplane_common::{EgressRules, PortRule, RULES_PER_PREFIX};

use crate::{
    dataplane::{DataplaneError, RuleKind, RuleTries},
    types::CloudId,
};

/// A prefix: network address (masked) and length.
pub type Prefix = (Ipv4Addr, u8);

fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        l if l >= 32 => u32::MAX,
        l => u32::MAX << (32 - l),
    }
}

fn prefix(addr: Ipv4Addr, len: u8) -> Prefix {
    let len = len.min(32);
    (Ipv4Addr::from(u32::from(addr) & mask(len)), len)
}

/// The port rule of a policy rule (no expiry).
pub fn port_rule(rule: &EgressRule) -> PortRule {
    let (first, last) = rule
        .ports
        .map(|p| (p.first, p.last))
        .unwrap_or((0, u16::MAX));
    PortRule {
        expires_ns: 0,
        first,
        last,
        protocol: match rule.protocol {
            None => 0,
            Some(Protocol::Tcp) => 6,
            Some(Protocol::Udp) => 17,
        },
        _pad: [0; 3],
    }
}

/// Adds `rule` to `rules` unless an equal one (protocol and ports) is there; equal ones keep
/// the later expiry (0: never expires, the latest).
fn merge_rule(rules: &mut Vec<PortRule>, rule: PortRule) {
    match rules
        .iter_mut()
        .find(|r| r.protocol == rule.protocol && r.first == rule.first && r.last == rule.last)
    {
        Some(r) => {
            if r.expires_ns != 0 && (rule.expires_ns == 0 || rule.expires_ns > r.expires_ns) {
                r.expires_ns = rule.expires_ns;
            }
        }
        None => rules.push(rule),
    }
}

/// The entry of `p` given every prefix's own rules: its own, then those of the shorter
/// prefixes covering it, longest first; capped as the module docs say.
fn entry_for(p: Prefix, own: &HashMap<Prefix, Vec<PortRule>>, kind: RuleKind) -> EgressRules {
    let mut rules = Vec::new();
    for len in (0..=p.1).rev() {
        if let Some(rs) = own.get(&prefix(p.0, len)) {
            for r in rs {
                merge_rule(&mut rules, *r);
            }
        }
    }
    let mut out = EgressRules::default();
    if rules.len() > RULES_PER_PREFIX {
        tracing::warn!(
            prefix = %format!("{}/{}", p.0, p.1),
            rules = rules.len(),
            "more egress port rules apply to one prefix than the dataplane holds ({RULES_PER_PREFIX}): {}",
            match kind {
                RuleKind::Allow => "the extra allow rules are left out",
                RuleKind::Deny => "the prefix is denied on every port",
            }
        );
        if kind == RuleKind::Deny {
            rules = vec![PortRule {
                expires_ns: 0,
                first: 0,
                last: u16::MAX,
                protocol: 0,
                _pad: [0; 3],
            }];
        } else {
            rules.truncate(RULES_PER_PREFIX);
        }
    }
    for (slot, r) in out.rules.iter_mut().zip(&rules) {
        *slot = *r;
    }
    out.count = rules.len() as u32;
    out
}

/// Every prefix's entry for rules given as `(prefix, rule)` (see module docs).
pub fn compile(rules: &[(Prefix, PortRule)], kind: RuleKind) -> BTreeMap<Prefix, EgressRules> {
    let own = own_rules(rules);
    own.keys()
        .map(|p| (*p, entry_for(*p, &own, kind)))
        .collect()
}

fn own_rules(rules: &[(Prefix, PortRule)]) -> HashMap<Prefix, Vec<PortRule>> {
    let mut own: HashMap<Prefix, Vec<PortRule>> = HashMap::new();
    for (p, r) in rules {
        merge_rule(own.entry(prefix(p.0, p.1)).or_default(), *r);
    }
    own
}

/// Whether a domain rule's name (`name` or `*.name`) covers `name` (lower case, no final dot
/// on either side needed).
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(base) => name
            .strip_suffix(base)
            .is_some_and(|head| head.ends_with('.') && head.len() > 1),
        None => name == pattern,
    }
}

/// `CLOCK_BOOTTIME` now, nanoseconds: the kernel's `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we own; CLOCK_BOOTTIME exists on every Linux
    // this agent runs on.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The most learnt addresses per cloud (as the DNS view keeps,
/// `crate::dns::view::MAX_LEARNT_PER_CLOUD`).
pub const MAX_LEARNT: usize = 4096;

/// The most address → name pairs kept per cloud for the denied list.
const MAX_NAMES: usize = 4096;

/// One cloud as the tries hold it.
#[derive(Default)]
struct CloudRules {
    policy: Option<EgressPolicy>,
    /// Learnt `/32`s and their rules (with expiries).
    learnt: HashMap<Ipv4Addr, Vec<PortRule>>,
    /// The name each learnt address was last the answer to (kept after it expires, for the
    /// denied list; bounded by [`MAX_NAMES`]).
    names: HashMap<Ipv4Addr, String>,
    installed: HashMap<RuleKind, BTreeMap<Prefix, EgressRules>>,
}

impl CloudRules {
    /// The own rules of each trie: the policy's CIDR rules (allow only in `allowlist` mode),
    /// and the learnt addresses.
    fn own(&self, kind: RuleKind) -> HashMap<Prefix, Vec<PortRule>> {
        let Some(policy) = &self.policy else {
            return HashMap::new();
        };
        let mut rules: Vec<(Prefix, PortRule)> = Vec::new();
        let list = match kind {
            RuleKind::Allow if policy.mode == EgressMode::Allowlist => &policy.allow,
            RuleKind::Allow => return HashMap::new(),
            RuleKind::Deny if policy.mode == EgressMode::Deny => return HashMap::new(),
            RuleKind::Deny => &policy.deny,
        };
        for r in list {
            if let Some(c) = r.cidr {
                rules.push(((c.addr, c.len), port_rule(r)));
            }
        }
        if kind == RuleKind::Allow {
            for (ip, rs) in &self.learnt {
                for r in rs {
                    rules.push(((*ip, 32), *r));
                }
            }
        }
        own_rules(&rules)
    }
}

/// The rule tries and what each cloud has in them.
pub struct EgressTables {
    state: Mutex<State>,
}

struct State {
    tries: RuleTries,
    clouds: HashMap<u32, CloudRules>,
}

impl std::fmt::Debug for EgressTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressTables").finish_non_exhaustive()
    }
}

impl EgressTables {
    /// Adopts what the tries hold (see module docs).
    pub fn new(tries: RuleTries) -> Result<Self, DataplaneError> {
        let mut clouds: HashMap<u32, CloudRules> = HashMap::new();
        for kind in [RuleKind::Allow, RuleKind::Deny] {
            for (cloud, p, rules) in tries.entries(kind)? {
                clouds
                    .entry(cloud)
                    .or_default()
                    .installed
                    .entry(kind)
                    .or_default()
                    .insert(p, rules);
            }
        }
        Ok(EgressTables {
            state: Mutex::new(State { tries, clouds }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the tries hold `policy` for `cloud` (learnt addresses stay while the cloud is in
    /// `allowlist` mode).
    pub fn set_policy(&self, cloud: u32, policy: &EgressPolicy) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        let c = state.clouds.entry(cloud).or_default();
        if policy.mode != EgressMode::Allowlist {
            c.learnt.clear();
        }
        c.policy = Some(policy.clone());
        state.sync(cloud)
    }

    /// Removes everything of `cloud`.
    pub fn remove(&self, cloud: u32) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        if let Some(c) = state.clouds.get_mut(&cloud) {
            c.policy = None;
            c.learnt.clear();
        }
        state.sync(cloud)?;
        state.clouds.remove(&cloud);
        Ok(())
    }

    /// The name `ip` was last learnt as for `cloud`, if any.
    pub fn name_of(&self, cloud: u32, ip: Ipv4Addr) -> Option<String> {
        self.lock()
            .clouds
            .get(&cloud)
            .and_then(|c| c.names.get(&ip).cloned())
    }

    /// The policy the tries hold for `cloud`.
    pub fn policy(&self, cloud: u32) -> Option<EgressPolicy> {
        self.lock()
            .clouds
            .get(&cloud)
            .and_then(|c| c.policy.clone())
    }

    /// Clouds with entries in the tries.
    pub fn clouds(&self) -> Vec<u32> {
        self.lock().clouds.keys().copied().collect()
    }

    /// Installs the answer to `name` for `cloud`: each address reachable for `ttl` on the
    /// ports of the cloud's domain rules that match `name`. Nothing if the cloud is not in
    /// `allowlist` mode or no rule matches.
    pub fn learn(
        &self,
        cloud: u32,
        name: &str,
        addresses: &[(Ipv4Addr, Duration)],
    ) -> Result<(), DataplaneError> {
        let mut state = self.lock();
        let Some(c) = state.clouds.get_mut(&cloud) else {
            return Ok(());
        };
        let Some(policy) = c
            .policy
            .as_ref()
            .filter(|p| p.mode == EgressMode::Allowlist)
        else {
            return Ok(());
        };
        let ports: Vec<PortRule> = policy
            .allow
            .iter()
            .filter(|r| r.domain.as_deref().is_some_and(|d| domain_matches(d, name)))
            .map(port_rule)
            .collect();
        if ports.is_empty() {
            return Ok(());
        }
        let now = boottime_ns();
        if c.names.len() + addresses.len() > MAX_NAMES {
            c.names.clear();
        }
        for (ip, _) in addresses {
            c.names
                .insert(*ip, name.trim_end_matches('.').to_ascii_lowercase());
        }
        for (ip, ttl) in addresses {
            let expires = now.saturating_add(ttl.as_nanos().min(u128::from(u64::MAX)) as u64);
            let rules = c.learnt.entry(*ip).or_default();
            for p in &ports {
                merge_rule(
                    rules,
                    PortRule {
                        expires_ns: expires.max(1),
                        ..*p
                    },
                );
            }
        }
        let mut ips: Vec<Ipv4Addr> = addresses.iter().map(|(ip, _)| *ip).collect();
        // Bounded per cloud: the soonest to expire go first, so a tenant answering its own
        // allowed names with many addresses cannot fill the trie all clouds share.
        if c.learnt.len() > MAX_LEARNT {
            let mut by_expiry: Vec<(u64, Ipv4Addr)> = c
                .learnt
                .iter()
                .map(|(ip, rules)| (rules.iter().map(|r| r.expires_ns).max().unwrap_or(0), *ip))
                .collect();
            by_expiry.sort_unstable();
            for (_, ip) in &by_expiry[..by_expiry.len() - MAX_LEARNT] {
                c.learnt.remove(ip);
                ips.push(*ip);
            }
        }
        state.sync_prefixes(cloud, RuleKind::Allow, ips.iter().map(|ip| (*ip, 32)))
    }

    /// Drops learnt rules that expired, and entries left without rules.
    pub fn prune(&self) -> Result<(), DataplaneError> {
        let now = boottime_ns();
        let mut state = self.lock();
        let clouds: Vec<u32> = state.clouds.keys().copied().collect();
        for cloud in clouds {
            let Some(c) = state.clouds.get_mut(&cloud) else {
                continue;
            };
            let mut touched = Vec::new();
            c.learnt.retain(|ip, rules| {
                let before = rules.len();
                rules.retain(|r| r.expires_ns == 0 || r.expires_ns > now);
                if rules.len() != before {
                    touched.push(*ip);
                }
                !rules.is_empty()
            });
            if !touched.is_empty() {
                state.sync_prefixes(cloud, RuleKind::Allow, touched.iter().map(|ip| (*ip, 32)))?;
            }
        }
        Ok(())
    }

    /// What the tries hold for `cloud`: `(kind, prefix, rules)`.
    pub fn installed(&self, cloud: u32) -> Vec<(RuleKind, Prefix, EgressRules)> {
        let state = self.lock();
        let mut out = Vec::new();
        if let Some(c) = state.clouds.get(&cloud) {
            for (kind, entries) in &c.installed {
                for (p, r) in entries {
                    out.push((*kind, *p, *r));
                }
            }
        }
        out
    }
}

impl crate::dns::LearnSink for EgressTables {
    fn learnt(&self, cloud: CloudId, name: &str, addresses: &[(Ipv4Addr, Duration)]) {
        if let Err(e) = self.learn(cloud.get(), name, addresses) {
            tracing::error!(cloud = %cloud, "installing the addresses of {name}: {e}");
        }
    }
}

impl State {
    /// Rewrites every entry of `cloud` that differs from what its rules compile to: new and
    /// changed entries first, then stale ones removed.
    fn sync(&mut self, cloud: u32) -> Result<(), DataplaneError> {
        for kind in [RuleKind::Allow, RuleKind::Deny] {
            let want = {
                let c = self.clouds.entry(cloud).or_default();
                let own = c.own(kind);
                own.keys()
                    .map(|p| (*p, entry_for(*p, &own, kind)))
                    .collect::<BTreeMap<_, _>>()
            };
            let have = self
                .clouds
                .get_mut(&cloud)
                .map(|c| std::mem::take(c.installed.entry(kind).or_default()))
                .unwrap_or_default();
            let mut installed = BTreeMap::new();
            let result = (|| {
                for (p, rules) in &want {
                    if have.get(p) != Some(rules) {
                        self.tries.insert(kind, cloud, *p, rules)?;
                    }
                    installed.insert(*p, *rules);
                }
                for p in have.keys() {
                    if !want.contains_key(p) {
                        self.tries.remove(kind, cloud, *p)?;
                    }
                }
                Ok(())
            })();
            if result.is_err() {
                // What is in the tries now is unknown: keep both, so the next sync rewrites
                // or removes whatever it must.
                installed.extend(have);
            }
            if let Some(c) = self.clouds.get_mut(&cloud) {
                c.installed.insert(kind, installed);
            }
            result?;
        }
        Ok(())
    }

    /// Rewrites the entries of `prefixes` only (a learnt address came or went).
    fn sync_prefixes(
        &mut self,
        cloud: u32,
        kind: RuleKind,
        prefixes: impl Iterator<Item = Prefix>,
    ) -> Result<(), DataplaneError> {
        let Some(c) = self.clouds.get_mut(&cloud) else {
            return Ok(());
        };
        let own = c.own(kind);
        for p in prefixes {
            let p = prefix(p.0, p.1);
            let installed = c.installed.entry(kind).or_default();
            if own.contains_key(&p) {
                let rules = entry_for(p, &own, kind);
                if installed.get(&p) != Some(&rules) {
                    self.tries.insert(kind, cloud, p, &rules)?;
                    installed.insert(p, rules);
                }
            } else if installed.remove(&p).is_some() {
                self.tries.remove(kind, cloud, p)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(protocol: u8, first: u16, last: u16) -> PortRule {
        PortRule {
            expires_ns: 0,
            first,
            last,
            protocol,
            _pad: [0; 3],
        }
    }

    fn p(s: &str, len: u8) -> Prefix {
        (s.parse().unwrap(), len)
    }

    fn rules_of(e: &EgressRules) -> Vec<PortRule> {
        e.rules[..e.count as usize].to_vec()
    }

    #[test]
    fn a_prefix_carries_the_rules_of_the_prefixes_covering_it() {
        let any = rule(0, 0, u16::MAX);
        let https = rule(6, 443, 443);
        let out = compile(
            &[(p("10.0.0.0", 8), any), (p("10.1.0.0", 16), https)],
            RuleKind::Allow,
        );
        assert_eq!(rules_of(&out[&p("10.0.0.0", 8)]), vec![any]);
        assert_eq!(rules_of(&out[&p("10.1.0.0", 16)]), vec![https, any]);
        // Unmasked input is masked; a disjoint prefix inherits nothing.
        let out = compile(
            &[(p("10.1.2.3", 16), https), (p("11.0.0.0", 8), any)],
            RuleKind::Allow,
        );
        assert_eq!(rules_of(&out[&p("10.1.0.0", 16)]), vec![https]);
        assert_eq!(rules_of(&out[&p("11.0.0.0", 8)]), vec![any]);
    }

    #[test]
    fn too_many_rules_fail_closed() {
        let many: Vec<(Prefix, PortRule)> = (0..10)
            .map(|i| (p("192.0.2.0", 24), rule(6, 1000 + i, 1000 + i)))
            .collect();
        let allow = compile(&many, RuleKind::Allow);
        let a = rules_of(&allow[&p("192.0.2.0", 24)]);
        assert_eq!(a.len(), RULES_PER_PREFIX);
        assert_eq!(a[0], rule(6, 1000, 1000));
        let deny = compile(&many, RuleKind::Deny);
        assert_eq!(
            rules_of(&deny[&p("192.0.2.0", 24)]),
            vec![rule(0, 0, u16::MAX)]
        );
    }

    #[test]
    fn equal_rules_merge_keeping_the_later_expiry() {
        let mut rules = vec![PortRule {
            expires_ns: 10,
            ..rule(6, 443, 443)
        }];
        merge_rule(
            &mut rules,
            PortRule {
                expires_ns: 20,
                ..rule(6, 443, 443)
            },
        );
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].expires_ns, 20);
        merge_rule(&mut rules, rule(6, 443, 443));
        assert_eq!(
            rules[0].expires_ns, 0,
            "a permanent rule outlives any expiry"
        );
        merge_rule(
            &mut rules,
            PortRule {
                expires_ns: 30,
                ..rule(6, 443, 443)
            },
        );
        assert_eq!(rules[0].expires_ns, 0);
    }

    #[test]
    fn learnt_addresses_are_bounded_per_cloud() {
        // The bound is the DNS view's: what the tries hold never outgrows what it reports.
        assert_eq!(MAX_LEARNT, crate::dns::view::MAX_LEARNT_PER_CLOUD);
    }

    #[test]
    fn domain_patterns() {
        assert!(domain_matches("example.com", "Example.COM."));
        assert!(!domain_matches("example.com", "www.example.com"));
        assert!(domain_matches("*.example.com", "www.example.com"));
        assert!(domain_matches("*.example.com", "a.b.example.com"));
        assert!(!domain_matches("*.example.com", "example.com"));
        assert!(!domain_matches("*.example.com", "badexample.com"));
    }
}
