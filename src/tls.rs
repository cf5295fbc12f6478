//! TLS material of a node, loaded from a directory laid out the way QEMU's
//! `tls-creds-x509` and libnbd's `tls-certificates=DIR` expect:
//!
//! | file              | used for                                            |
//! |-------------------|-----------------------------------------------------|
//! | `ca-cert.pem`     | the CA that signs every node's and client's cert    |
//! | `server-cert.pem` | what this node presents to NBD and API clients      |
//! | `server-key.pem`  | its key                                             |
//! | `client-cert.pem` | what this node presents when it is the client (fetching from a migration source, calling another node's API) |
//! | `client-key.pem`  | its key                                             |
//! | `ca-crl.pem`      | optional: certificates the CA has revoked           |
//!
//! One directory therefore works for `dlsm serve --tls-dir`, for
//! `nbdinfo 'nbds://…?tls-certificates=DIR'` and for QEMU's
//! `tls-creds-x509,dir=DIR`.
//!
//! Policy, fixed here so no caller can weaken it: TLS 1.2 or 1.3 from
//! rustls's safe defaults (ring provider); servers *require* a client
//! certificate signed by the CA (mutual TLS, like QEMU's `verify-peer=on`
//! default); clients verify the server's certificate and its name (DNS name
//! or IP address) against the CA. With `ca-crl.pem`, both sides refuse a
//! peer whose certificate it lists (as QEMU and libnbd do with the same
//! file), so a compromised host is shut out by revoking its certificate,
//! without re-keying the cluster. A node reads the directory at start and
//! again on `SIGHUP` (see `Node::reload_tls`), without dropping a
//! connection.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS: {path} holds no certificate")]
    NoCert { path: PathBuf },
    #[error("TLS: {path} holds no certificate revocation list")]
    NoCrl { path: PathBuf },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS: CA certificate rejected: {0}")]
    BadCa(String),
    #[error("TLS: {0:?} is not a valid server name")]
    BadName(String),
}

/// The loaded TLS configuration of a node (or of a CLI talking to one).
#[derive(Clone)]
pub struct TlsConfig {
    pub dir: PathBuf,
    /// For the NBD server and the API server. `None` when the directory has
    /// only client material (a CLI's directory).
    pub server: Option<Arc<ServerConfig>>,
    /// For outgoing connections: NBD to a migration source, API calls.
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").field("dir", &self.dir).finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every PEM item of type `T` in `path`; `empty` is the error for none.
fn pem_all<T: PemObject + 'static>(
    path: &Path,
    empty: fn(PathBuf) -> TlsError,
) -> Result<Vec<T>, TlsError> {
    let items = T::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if items.is_empty() {
        return Err(empty(path.to_owned()));
    }
    Ok(items)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem_all(path, |path| TlsError::NoCert { path })
}

/// The CRLs in `path`, or none if there is no such file.
fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    pem_all(path, |path| TlsError::NoCrl { path })
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl TlsConfig {
    /// Loads a node's directory: CA, server and client material all required.
    pub fn load_node(dir: &Path) -> Result<Self, TlsError> {
        Self::load(dir, true)
    }

    /// Loads a client's directory: CA and client material; server material
    /// is used if present.
    pub fn load_client(dir: &Path) -> Result<Self, TlsError> {
        Self::load(dir, dir.join("server-cert.pem").exists())
    }

    fn load(dir: &Path, with_server: bool) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in certs(&dir.join("ca-cert.pem"))? {
            roots.add(c).map_err(|e| {
                TlsError::BadCa(format!("{}: {e}", dir.join("ca-cert.pem").display()))
            })?;
        }
        let roots = Arc::new(roots);
        let crls = crls(&dir.join("ca-crl.pem"))?;
        let server = if with_server {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .with_crls(crls.clone())
                .build()
                .map_err(|e| TlsError::BadCa(e.to_string()))?;
            let cfg = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    certs(&dir.join("server-cert.pem"))?,
                    key(&dir.join("server-key.pem"))?,
                )?;
            Some(Arc::new(cfg))
        } else {
            None
        };
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .with_crls(crls)
            .build()
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(
                certs(&dir.join("client-cert.pem"))?,
                key(&dir.join("client-key.pem"))?,
            )?;
        Ok(Self {
            dir: dir.to_owned(),
            server,
            client: Arc::new(client),
        })
    }

    /// The acceptor for servers (panics never: `None` if no server material).
    pub fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.server.clone().map(tokio_rustls::TlsAcceptor::from)
    }

    /// The connector for outgoing connections.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }
}

/// The name a client checks the server's certificate against, from a
/// `HOST:PORT` address (`[v6]:port` too).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::BadName(host.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_addresses() {
        assert!(matches!(
            server_name("127.0.0.1:10809").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:10809").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("node-a.example:10809").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name!:1").is_err());
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let e = TlsConfig::load_node(Path::new("/nonexistent/tls"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/tls/ca-cert.pem"), "{e}");
    }
}
