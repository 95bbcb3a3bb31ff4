//! TLS for the HTTP API and the mesh (rustls, ring): server configs from PEM files, a client config
//! that trusts only a configured CA, and one boxed stream type so plain and TLS connections share
//! every code path above this module.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Any byte stream a connection runs over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// A client has this long to finish the TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

fn file_err(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A server config from a PEM certificate chain and its PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// A client config that trusts exactly the CA certificate(s) in `ca`.
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).map_err(|e| file_err(ca, e))?;
    }
    Ok(Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Wraps an accepted connection in TLS when `acceptor` is set.
pub async fn accept(acceptor: Option<&TlsAcceptor>, tcp: TcpStream) -> io::Result<BoxIo> {
    match acceptor {
        None => Ok(Box::new(tcp)),
        Some(a) => {
            let tls = tokio::time::timeout(HANDSHAKE, a.accept(tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(Box::new(tls))
        }
    }
}

/// Connects to `host:port`, with TLS (verifying `host` against the CA) when `tls` is set.
pub async fn connect(host: &str, port: u16, tls: Option<&Arc<ClientConfig>>) -> io::Result<BoxIo> {
    let tcp = TcpStream::connect((host, port)).await?;
    over(tcp, host, tls).await
}

/// Connects to one address `host` resolved to, verifying the certificate against `host`.
pub async fn connect_addr(
    addr: std::net::SocketAddr,
    host: &str,
    tls: Option<&Arc<ClientConfig>>,
) -> io::Result<BoxIo> {
    let tcp = TcpStream::connect(addr).await?;
    over(tcp, host, tls).await
}

async fn over(tcp: TcpStream, host: &str, tls: Option<&Arc<ClientConfig>>) -> io::Result<BoxIo> {
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(tcp)),
        Some(config) => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let connector = TlsConnector::from(Arc::clone(config));
            let stream = tokio::time::timeout(HANDSHAKE, connector.connect(name, tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(Box::new(stream))
        }
    }
}

/// Where a URL points: `(secure, host, port)`, where `secure` means the scheme is `tls_scheme`
/// (`https` or `wss`) and the port defaults to 443 or 80.
pub fn endpoint(url: &str, tls_scheme: &str) -> Result<(bool, String, u16), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let secure = uri.scheme_str() == Some(tls_scheme);
    let host = uri.host().ok_or_else(|| format!("no host in {url}"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    Ok((secure, host, port))
}

/// The acceptor for an optional server config.
pub fn acceptor(config: &Option<Arc<ServerConfig>>) -> Option<TlsAcceptor> {
    config.as_ref().map(|c| TlsAcceptor::from(Arc::clone(c)))
}
