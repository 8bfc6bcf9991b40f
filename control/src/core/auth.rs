//! Who a request comes from and what it may do: bearer tokens (256-bit secrets, stored as
//! SHA-256 hashes and compared in constant time) resolve to a [`Principal`], and
//! [`Core::authorize`] decides per command before any store read: a cloud token only ever
//! names its own cloud, a host token its own host, and the operator token administers everything.

use super::*;

/// SHA-256 of a token, lowercase hex.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The operator, or the host itself.
pub fn authorize_host(p: &Principal, host: &str) -> Result<(), CoreError> {
    match p {
        Principal::Operator => Ok(()),
        Principal::Host(own) if own == host => Ok(()),
        Principal::Host(_) => Err(CoreError::Forbidden(format!("act as host {host}"))),
        Principal::Cloud(_) => Err(CoreError::Forbidden("manage hosts".into())),
    }
}

/// A new random token of cloud `c`: `atl_<cloud>_<256-bit secret>`.
pub(super) fn new_cloud_token(c: CloudId) -> Result<String, CoreError> {
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    Ok(format!("atl_{c}_{secret}"))
}

/// A new random operator token.
pub fn new_operator_token() -> Result<String, CoreError> {
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    Ok(format!("atl_op_{secret}"))
}

pub(super) fn random_bytes<const N: usize>() -> Result<[u8; N], CoreError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| CoreError::Random(e.to_string()))?;
    Ok(buf)
}

impl Core {
    /// Resolves a bearer token to its principal.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, CoreError> {
        if token.starts_with("atl_op_") {
            return if ct_eq(&token_hash(token), &self.cfg.operator_token_sha256) {
                Ok(Principal::Operator)
            } else {
                Err(CoreError::Unauthenticated)
            };
        }
        if let Some(rest) = token.strip_prefix("atl_host_") {
            // Host names are labels (no '_'), so the first '_' ends the name.
            let name = rest
                .split_once('_')
                .map(|(n, _)| n)
                .filter(|n| validate_label("host", n).is_ok())
                .ok_or(CoreError::Unauthenticated)?;
            let Some(kv) = self.store.get(&keys::host(name)).await? else {
                return Err(CoreError::Unauthenticated);
            };
            let h: HostInfo = decode(&kv.key, &kv.value)?;
            return if !h.token_sha256.is_empty() && ct_eq(&token_hash(token), &h.token_sha256) {
                Ok(Principal::Host(name.to_string()))
            } else {
                Err(CoreError::Unauthenticated)
            };
        }
        let cloud: CloudId = token
            .strip_prefix("atl_")
            .and_then(|t| t.split_once('_'))
            .and_then(|(c, _)| c.parse().ok())
            .ok_or(CoreError::Unauthenticated)?;
        let Some(kv) = self.store.get(&keys::cloud(cloud)).await? else {
            return Err(CoreError::Unauthenticated);
        };
        let c: Cloud = decode(&kv.key, &kv.value)?;
        if ct_eq(&token_hash(token), &c.token_sha256) {
            Ok(Principal::Cloud(cloud))
        } else {
            Err(CoreError::Unauthenticated)
        }
    }

    pub(super) fn authorize(&self, p: &Principal, cmd: &Command) -> Result<(), CoreError> {
        match (cmd.issuer(), p) {
            (_, Principal::Operator) => Ok(()),
            (Issuer::Operator, _) | (Issuer::AnyCloud, Principal::Host(_)) => {
                Err(CoreError::Forbidden(cmd.refusal().into()))
            }
            (Issuer::AnyCloud, Principal::Cloud(_)) => Ok(()),
            (Issuer::Host(host), _) => authorize_host(p, host),
            (Issuer::Cloud(own), Principal::Cloud(c)) if *c == own => Ok(()),
            (Issuer::Cloud(cloud), _) => Err(CoreError::Forbidden(format!("access cloud {cloud}"))),
        }
    }
}
