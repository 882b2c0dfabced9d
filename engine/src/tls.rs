//! TLS with rustls: the standalone server's certificate (`wss://`,
//! `https://`), and the trust the Redis brokers' `rediss://` connections
//! check the server against.
//!
//! The server's handshake runs on the shard the connection was handed to,
//! so TLS work spreads over the shards like the connections themselves.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate, key or CA file that cannot be used. Its message names
/// the file and the setting; key material is never printed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `tls_cert` or `tls_key` (or a CA file) cannot be read or parsed.
    #[error("{setting} {path:?}: {reason}")]
    File {
        /// The setting that named the file.
        setting: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key does not fit the certificate, or rustls refused them.
    #[error("tls_cert and tls_key cannot be used together: {0}")]
    Pair(String),
    /// rustls refused its own setup (a protocol version its provider lacks).
    #[error("TLS cannot be set up: {0}")]
    Setup(String),
}

fn file_error(setting: &'static str, path: &str, reason: impl ToString) -> TlsError {
    TlsError::File { setting, path: path.to_string(), reason: reason.to_string() }
}

/// Reads the PEM certificate chain at `path` (leaf first).
fn certificates(setting: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(Path::new(path)).map_err(|e| file_error(setting, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| file_error(setting, path, e))?;
    if certs.is_empty() {
        return Err(file_error(setting, path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// The server side: the certificate chain and private key (PEM files), for
/// HTTP/1.1 (ALPN `http/1.1`; WebSockets upgrade over it).
pub(crate) fn acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let chain = certificates("tls_cert", cert)?;
    let pem = std::fs::read(Path::new(key)).map_err(|e| file_error("tls_key", key, e))?;
    // The parse error never quotes the key's bytes.
    let key_der =
        PrivateKeyDer::from_pem_slice(&pem).map_err(|_| file_error("tls_key", key, "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The CA certificates a client trusts: those in `ca` (a PEM bundle) if
/// given, else the system's.
pub fn roots(setting: &'static str, ca: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates(setting, path)? {
                store.add(cert).map_err(|e| file_error(setting, path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    Ok(store)
}

/// A client configuration that trusts `roots`.
pub fn client_config(roots: RootCertStore) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok(Arc::new(builder.with_root_certificates(roots).with_no_client_auth()))
}

/// ring, named rather than left to rustls's choice among the providers
/// compiled in, and installed as the process default for the TLS that
/// redis-rs sets up itself.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let ring = Arc::new(rustls::crypto::ring::default_provider());
    let _ = rustls::crypto::CryptoProvider::install_default(rustls::crypto::ring::default_provider());
    ring
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_file_and_the_setting() {
        let dir = std::env::temp_dir().join(format!("herald-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = junk.to_str().unwrap();
        let e = acceptor("/nonexistent/cert.pem", junk).err().unwrap().to_string();
        assert!(e.starts_with("tls_cert \"/nonexistent/cert.pem\": "), "{e}");
        let e = acceptor(junk, junk).err().unwrap().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let c = dir.join("c.pem");
        std::fs::write(&c, cert.cert.pem()).unwrap();
        let e = acceptor(c.to_str().unwrap(), junk).err().unwrap().to_string();
        assert!(e.starts_with("tls_key") && e.contains("no PEM private key"), "{e}");
        // A key that is not the certificate's.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let k = dir.join("k.pem");
        std::fs::write(&k, other.signing_key.serialize_pem()).unwrap();
        assert!(matches!(acceptor(c.to_str().unwrap(), k.to_str().unwrap()), Err(TlsError::Pair(_))));
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        assert!(acceptor(c.to_str().unwrap(), k.to_str().unwrap()).is_ok());
        assert_eq!(roots("redis_tls_ca", Some(c.to_str().unwrap())).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
