//! TLS wherever a token travels: the API server, its clients (the CLI, remote agents) and the
//! etcd store. rustls with the `ring` provider throughout.
//!
//! Decisions:
//! - **The API serves HTTPS by default.** Its certificate and key come from config
//!   (`tls.cert_file`, `tls.key_file`) or, when none is configured, from a CA and a server
//!   certificate that the control plane generates on its first start in `tls.dir` (keys 0600,
//!   certificates 0644, directory 0700) and reuses after; the CA's SHA-256 fingerprint is
//!   printed, for clients to pin. The generated server certificate names `localhost`,
//!   127.0.0.1, ::1, the host name, the listen address (unless unspecified) and every name in
//!   `tls.names`; the server sends it with the CA, so a client may pin either.
//! - **Plain HTTP only on loopback, only when asked** (`tls.mode = "off"` with a loopback
//!   listen address): a bearer token in clear text on a network is never an option.
//! - **Clients verify the server** against a CA file (`Trust::CaFile`: ordinary WebPKI
//!   verification with that CA as the only root, host name included) or a pinned SHA-256
//!   fingerprint (`Trust::Fingerprint`): of the server's own certificate (that exact
//!   certificate is accepted, whatever name it carries) or of a CA the server presents in its
//!   chain (that CA becomes the only root and the server certificate is verified against it,
//!   host name included; a CA certificate is public, so merely presenting it proves nothing).
//!   The handshake signature is always checked. A failed verification is reported with the
//!   setting that chose the trust, so an operator knows what to fix.
//! - **etcd speaks TLS with client certificates** (`store.etcd_ca_file`, `etcd_cert_file`,
//!   `etcd_key_file`) over `https://` endpoints.

use std::{
    fmt,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    ReadPem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("invalid fingerprint {0:?}: expected 64 hex digits (colons allowed), a SHA-256")]
    Fingerprint(String),
}

/// The crypto provider every TLS configuration here uses: `ring`, because the alternative
/// (aws-lc-rs) needs a C toolchain with CMake to build. rustls marks ring's provider deprecated
/// only for lacking post-quantum key exchange; its classical suites are what this uses.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `AB:CD:…`: the SHA-256 of a DER certificate, as printed and as pinned.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let bad = || TlsError::Fingerprint(s.to_string());
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

/// Certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadPem {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::ReadPem {
        path: path.into(),
        source,
    })
}

/// A certificate authority that issues certificates (the generated one of the API, and the
/// tests' CAs for etcd).
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate()?;
        Ok(Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key)?,
        })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(self.issuer.der())
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) named `cn`, usable by a
    /// server and/or a client.
    pub fn issue(
        &self,
        cn: &str,
        names: &[String],
        server: bool,
        client: bool,
    ) -> Result<Issued, TlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        if server {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        }
        if client {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        }
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Where a generated server identity lives in `dir`.
#[derive(Debug, Clone)]
pub struct GeneratedPaths {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl GeneratedPaths {
    pub fn in_dir(dir: &Path) -> Self {
        GeneratedPaths {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
        }
    }
}

/// The generated identity in `dir`, made on first use: a CA (its key kept 0600 beside it, for
/// re-issuing by hand) and a server certificate for `names`, sent with the CA. Returns the
/// paths, the CA's fingerprint and whether it was made now.
pub fn ensure_generated(
    dir: &Path,
    names: &[String],
) -> Result<(GeneratedPaths, String, bool), TlsError> {
    let paths = GeneratedPaths::in_dir(dir);
    if paths.ca_file.exists() && paths.cert_file.exists() && paths.key_file.exists() {
        let ca = load_certs(&paths.ca_file)?;
        return Ok((paths, fingerprint(&ca[0]), false));
    }
    let write = |path: &Path, text: &str, mode: u32| -> Result<(), TlsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| TlsError::Write {
            path: path.into(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    };
    crate::private::create_dir_all(dir, 0o700).map_err(|source| TlsError::Write {
        path: dir.into(),
        source,
    })?;
    let ca = Ca::new("atoll control plane CA")?;
    let server = ca.issue("atoll control plane", names, true, false)?;
    write(&dir.join("ca.key"), &ca.issuer.key().serialize_pem(), 0o600)?;
    write(&paths.key_file, &server.key_pem, 0o600)?;
    write(
        &paths.cert_file,
        &format!("{}{}", server.cert_pem, ca.cert_pem()),
        0o644,
    )?;
    // Last: its presence marks a complete identity.
    write(&paths.ca_file, &ca.cert_pem(), 0o644)?;
    Ok((paths, ca.fingerprint(), true))
}

/// A server configuration from a certificate chain file and a key file.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A server configuration with a new self-signed certificate for `names` (kept in memory
/// only), and that certificate's fingerprint, for clients to pin (an agent's guest access).
pub fn self_signed(names: &[String]) -> Result<(Arc<ServerConfig>, String), TlsError> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names.to_vec())?;
    let der = cert.der().clone();
    let fp = fingerprint(&der);
    let key = PrivateKeyDer::try_from(signing_key.serialize_der())
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), fp))
}

/// How a client trusts a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Certificates signed by the CA(s) in this PEM file.
    CaFile(PathBuf),
    /// The certificate, or the CA in its chain, with this SHA-256 fingerprint.
    Fingerprint(String),
}

/// A client's TLS settings: whom it trusts, the setting that said so (named in errors), and
/// optionally its own certificate (etcd's client certificate authentication).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub trust: Trust,
    pub setting: String,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// The rustls configuration.
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = match &self.trust {
            Trust::CaFile(path) => {
                let mut roots = RootCertStore::empty();
                for c in load_certs(path)? {
                    roots.add(c).map_err(TlsError::Config)?;
                }
                builder.with_root_certificates(roots)
            }
            Trust::Fingerprint(fp) => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Pinned {
                        fingerprint: parse_fingerprint(fp)?,
                        provider: provider(),
                    }))
            }
        };
        let cfg = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(TlsError::Config)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(cfg))
    }
}

/// A hyper connector for `http://` and, with `tls`, `https://` URLs.
pub fn connector(
    mut http: hyper_util::client::legacy::connect::HttpConnector,
    tls: Option<Arc<ClientConfig>>,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    http.enforce_http(false);
    match tls {
        Some(cfg) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*cfg).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
        // No TLS configuration: https URLs are refused before a connection is made.
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default versions")
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            )
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
    }
}

/// The TLS error in `e`'s source chain, if the failure was TLS's. `io::Error`s are looked into
/// (their `source()` skips the error they wrap, and connectors wrap TLS errors in them, twice).
pub fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r.to_string());
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if let Some(found) = tls_cause(inner) {
            return Some(found);
        }
    }
    e.source().and_then(tls_cause)
}

/// Accepts the pinned certificate itself, or a server certificate verified against the
/// pinned CA found in the presented chain.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = |c: &CertificateDer<'_>| Sha256::digest(c.as_ref())[..] == self.fingerprint;
        if pinned(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(ca) = intermediates.iter().find(|c| pinned(c)) else {
            return Err(rustls::Error::General(format!(
                "the server's certificate ({}) is not the pinned one, nor issued by a CA with the pinned fingerprint",
                fingerprint(end_entity.as_ref())
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let fp = fingerprint(b"x");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert_eq!(
            parse_fingerprint(&fp).unwrap(),
            parse_fingerprint(&fp.replace(':', "")).unwrap()
        );
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_generated_identity_is_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("atl-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let (paths, fp, created) = ensure_generated(&dir, &names).unwrap();
        assert!(created);
        use std::os::unix::fs::MetadataExt;
        for (p, mode) in [
            (&paths.key_file, 0o600),
            (&dir.join("ca.key"), 0o600),
            (&dir, 0o700),
        ] {
            assert_eq!(
                std::fs::metadata(p).unwrap().mode() & 0o777,
                mode,
                "{}",
                p.display()
            );
        }
        assert_eq!(
            load_certs(&paths.cert_file).unwrap().len(),
            2,
            "sent with its CA"
        );
        server_config(&paths.cert_file, &paths.key_file).unwrap();
        let (_, again, created) = ensure_generated(&dir, &names).unwrap();
        assert!(!created);
        assert_eq!(fp, again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A handshake in memory between `server` and a client with `tls`, to `name`.
    fn handshake(
        server: Arc<ServerConfig>,
        tls: &ClientTls,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let mut client = rustls::ClientConnection::new(
            tls.config().unwrap(),
            ServerName::try_from(name.to_string()).unwrap(),
        )?;
        let mut server = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn clients_trust_the_ca_file_or_a_pinned_fingerprint_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("atl-tlsh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (paths, fp, _) = ensure_generated(&dir, &["127.0.0.1".to_string()]).unwrap();
        let server = server_config(&paths.cert_file, &paths.key_file).unwrap();
        let with = |trust| ClientTls {
            trust,
            setting: "s".into(),
            identity: None,
        };
        handshake(
            server.clone(),
            &with(Trust::CaFile(paths.ca_file.clone())),
            "127.0.0.1",
        )
        .expect("the CA file");
        handshake(
            server.clone(),
            &with(Trust::Fingerprint(fp.clone())),
            "127.0.0.1",
        )
        .expect("the CA's fingerprint");
        let leaf = load_certs(&paths.cert_file).unwrap();
        let leaf_fp = fingerprint(leaf[0].as_ref());
        handshake(
            server.clone(),
            &with(Trust::Fingerprint(leaf_fp)),
            "other.example",
        )
        .expect("the certificate's own fingerprint, whatever its name");
        // The CA pinned, but a name the certificate does not carry.
        assert!(handshake(
            server.clone(),
            &with(Trust::Fingerprint(fp)),
            "other.example"
        )
        .is_err());
        let other = Ca::new("other").unwrap();
        assert!(handshake(
            server.clone(),
            &with(Trust::Fingerprint(other.fingerprint())),
            "127.0.0.1"
        )
        .is_err());
        let other_file = dir.join("other.pem");
        std::fs::write(&other_file, other.cert_pem()).unwrap();
        assert!(handshake(server, &with(Trust::CaFile(other_file)), "127.0.0.1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
