//! The cleartext backend: connecting to it and opening the connection with a PROXY header
//! (v1 or v2, built with the `ppp` crate) so the mail server sees the real client.
//!
//! The v2 header carries the TLS facts (PP2_TYPE_SSL with PP2_CLIENT_SSL, version and
//! cipher; PP2_TYPE_AUTHORITY with the SNI): that is what lets Dovecot keep
//! `disable_plaintext_auth = yes` and still accept logins that arrived over TLS.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2::{self, Builder, Command, Protocol as PpProtocol, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{ProxyProtocol, ProxyTlvs};
use crate::tls::TlsFacts;

// PROXY v2 type codes (haproxy's proxy-protocol.txt, section 2.2).
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_CLIENT_SSL: u8 = 0x01;

/// Who is connected to whom, and over what; what the PROXY header tells the backend.
#[derive(Clone, Debug)]
pub struct Peer {
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// `None` for the opportunistic plaintext SMTP path.
    pub tls: Option<TlsFacts>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot resolve backend {target}: {source}")]
    Resolve { target: String, source: io::Error },
    #[error("connecting to backend {target} timed out after {after:?}")]
    ConnectTimeout { target: String, after: Duration },
    #[error("cannot connect to backend {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("cannot send the PROXY header to backend {target}: {source}")]
    Header { target: String, source: io::Error },
}

/// Connects to `target` (host:port) within `timeout` and sends `header` (if any) in one
/// write before anything else, as PROXY protocol receivers require.
pub async fn connect(
    target: &str,
    header: Option<&[u8]>,
    timeout: Duration,
) -> Result<TcpStream, BackendError> {
    let mut stream = open(target, timeout).await?;
    if let Some(header) = header {
        send_header(&mut stream, target, header).await?;
    }
    Ok(stream)
}

/// Connects for mailtls's own use (the SMTP capability probe), introducing the
/// connection as itself: v2 `LOCAL`, v1 with the socket's own addresses. (v1 `UNKNOWN`
/// would be the spec's way, but Postfix 3.7 refuses it: "bad or missing protocol type".)
pub async fn connect_local(
    target: &str,
    version: ProxyProtocol,
    timeout: Duration,
) -> Result<TcpStream, BackendError> {
    let mut stream = open(target, timeout).await?;
    let header = match version {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => {
            let addr = |r: io::Result<SocketAddr>| {
                r.map_err(|source| BackendError::Header { target: target.to_owned(), source })
            };
            let own =
                Peer { client: addr(stream.local_addr())?, local: addr(stream.peer_addr())?, tls: None };
            Some(v1_header(&own))
        }
        ProxyProtocol::V2 => Builder::new(
            Version::Two | Command::Local,
            v2::AddressFamily::Unspecified | PpProtocol::Unspecified,
        )
        .build()
        .ok(),
    };
    if let Some(header) = header {
        send_header(&mut stream, target, &header).await?;
    }
    Ok(stream)
}

async fn open(target: &str, timeout: Duration) -> Result<TcpStream, BackendError> {
    let stream = match tokio::time::timeout(timeout, connect_any(target)).await {
        Ok(result) => result?,
        Err(_) => return Err(BackendError::ConnectTimeout { target: target.to_owned(), after: timeout }),
    };
    // Mail is a chatty line protocol: Nagle would hold every small reply back by up to 40 ms.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn send_header(stream: &mut TcpStream, target: &str, header: &[u8]) -> Result<(), BackendError> {
    stream
        .write_all(header)
        .await
        .map_err(|source| BackendError::Header { target: target.to_owned(), source })
}

/// Tries every address the name resolves to, in order, like a mail client would.
async fn connect_any(target: &str) -> Result<TcpStream, BackendError> {
    let addrs = tokio::net::lookup_host(target)
        .await
        .map_err(|source| BackendError::Resolve { target: target.to_owned(), source })?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(BackendError::Connect { target: target.to_owned(), source: last })
}

/// The PROXY header for `peer`, or `None` when the listener sends none.
pub fn proxy_header(version: ProxyProtocol, tlvs: ProxyTlvs, peer: &Peer) -> Option<Vec<u8>> {
    match version {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(v1_header(peer)),
        ProxyProtocol::V2 => Some(v2_header(peer, tlvs)),
    }
}

/// Both ends in one address family: a v4 client on a dual-stack socket shows up mapped.
fn same_family(peer: &Peer) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    };
    let (client, local) = (canonical(peer.client), canonical(peer.local));
    let to_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if client.is_ipv4() == local.is_ipv4() {
        (client, local)
    } else {
        (to_v6(client), to_v6(local))
    }
}

fn v1_header(peer: &Peer) -> Vec<u8> {
    let (client, local) = same_family(peer);
    ppp::v1::Addresses::from((client, local)).to_string().into_bytes()
}

fn v2_header(peer: &Peer, wanted: ProxyTlvs) -> Vec<u8> {
    let (client, local) = same_family(peer);
    let addresses = v2::Addresses::from((client, local));
    let mut builder = Builder::with_addresses(Version::Two | Command::Proxy, PpProtocol::Stream, addresses);
    let mut tlvs: Vec<(u8, Vec<u8>)> = Vec::new();
    if let Some(tls) = &peer.tls {
        if let Some(sni) = tls.sni.as_ref().filter(|_| wanted.authority) {
            tlvs.push((PP2_TYPE_AUTHORITY, sni.as_bytes().to_vec()));
        }
        if wanted.ssl {
            tlvs.push((PP2_TYPE_SSL, ssl_tlv_value(tls)));
        }
    }
    for (kind, value) in &tlvs {
        builder = match builder.write_tlv(*kind, value) {
            Ok(b) => b,
            // Only possible past 64 KiB of TLVs; ours are a few hundred bytes at most.
            Err(_) => return Vec::new(),
        };
    }
    builder.build().unwrap_or_default()
}

/// The value of PP2_TYPE_SSL: client flags, verify result, then sub-TLVs.
fn ssl_tlv_value(tls: &TlsFacts) -> Vec<u8> {
    let mut value = vec![PP2_CLIENT_SSL];
    // verify = 0: no client certificate was asked for, so none failed verification.
    value.extend_from_slice(&0u32.to_be_bytes());
    for (kind, text) in
        [(PP2_SUBTYPE_SSL_VERSION, tls.version), (PP2_SUBTYPE_SSL_CIPHER, tls.cipher.as_str())]
    {
        value.push(kind);
        value.extend_from_slice(&(text.len() as u16).to_be_bytes());
        value.extend_from_slice(text.as_bytes());
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(tls: bool) -> Peer {
        Peer {
            client: "192.0.2.7:50123".parse().unwrap(),
            local: "198.51.100.1:993".parse().unwrap(),
            tls: tls.then(|| TlsFacts {
                version: "TLSv1.3",
                cipher: "TLS_AES_128_GCM_SHA256".to_owned(),
                sni: Some("imap.example.org".to_owned()),
            }),
        }
    }

    #[test]
    fn v1_header_names_both_ends() {
        let h = proxy_header(ProxyProtocol::V1, ProxyTlvs::default(), &peer(true)).unwrap();
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 198.51.100.1 50123 993\r\n");
    }

    #[test]
    fn v2_header_carries_only_the_chosen_tlvs() {
        let none = ProxyTlvs { authority: false, ssl: false };
        let h = proxy_header(ProxyProtocol::V2, none, &peer(true)).unwrap();
        // 16 bytes of header and 12 of IPv4 addresses: what every receiver can hold.
        assert_eq!(h.len(), 28);
        assert_eq!(v2::Header::try_from(h.as_slice()).expect("valid v2 header").tlvs().count(), 0);
        let ssl_only = ProxyTlvs { authority: false, ssl: true };
        let h = proxy_header(ProxyProtocol::V2, ssl_only, &peer(true)).unwrap();
        let parsed = v2::Header::try_from(h.as_slice()).expect("valid v2 header");
        let kinds: Vec<u8> = parsed.tlvs().map(|t| t.expect("well-formed tlv").kind).collect();
        assert_eq!(kinds, [PP2_TYPE_SSL]);
    }

    #[test]
    fn v2_header_carries_ssl_and_sni_tlvs() {
        let h = proxy_header(ProxyProtocol::V2, ProxyTlvs::default(), &peer(true)).unwrap();
        let parsed = v2::Header::try_from(h.as_slice()).expect("valid v2 header");
        assert_eq!(
            parsed.addresses,
            v2::Addresses::from((
                "192.0.2.7:50123".parse::<SocketAddr>().unwrap(),
                "198.51.100.1:993".parse::<SocketAddr>().unwrap()
            ))
        );
        let tlvs: Vec<_> = parsed.tlvs().map(|t| t.expect("well-formed tlv")).collect();
        assert_eq!(tlvs[0].kind, PP2_TYPE_AUTHORITY);
        assert_eq!(&tlvs[0].value[..], b"imap.example.org");
        assert_eq!(tlvs[1].kind, PP2_TYPE_SSL);
        assert_eq!(tlvs[1].value[0], PP2_CLIENT_SSL);
        assert!(h.len() <= 1500);
    }

    #[test]
    fn v2_header_of_plaintext_session_has_no_ssl_tlv() {
        let h = proxy_header(ProxyProtocol::V2, ProxyTlvs::default(), &peer(false)).unwrap();
        let parsed = v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.tlvs().count(), 0);
    }

    #[test]
    fn mixed_families_are_mapped_to_v6() {
        let p = Peer {
            client: "192.0.2.7:1".parse().unwrap(),
            local: "[2001:db8::1]:25".parse().unwrap(),
            tls: None,
        };
        let h = proxy_header(ProxyProtocol::V1, ProxyTlvs::default(), &p).unwrap();
        assert_eq!(h, b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 25\r\n");
    }
}
