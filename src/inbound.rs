//! Inbound PROXY protocol: a trusted load balancer opens each connection with a v1 or v2
//! header naming the real client, which then counts everywhere (logs, limits, our header).
//!
//! The header is read exactly, never past its end, so the session starts at a clean byte
//! boundary: whatever follows is the client's ClientHello or first command.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v1;
use ppp::v2;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (haproxy's proxy-protocol.txt, 2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v2: signature, version/command, family, and a two-byte length.
const V2_FIXED: usize = 16;
/// v1: the spec's bound, CRLF included.
const V1_MAX: usize = 107;
/// v2: addresses plus the TLVs a load balancer adds; a longer header is refused, not read.
const V2_MAX_PAYLOAD: usize = 4096;

/// The two ends of the client's connection as the load balancer saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ends {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// Why a header was not accepted; the connection then ends.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("the connection did not open with a PROXY header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl InboundError {
    /// The `outcome` label of the PROXY header metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            InboundError::Timeout(_) => "timeout",
            InboundError::Missing => "missing",
            InboundError::Malformed(_) | InboundError::Io(_) => "malformed",
        }
    }
}

/// Reads one v1 or v2 header within `within`. `Ok(None)`: a LOCAL / UNKNOWN header (the
/// balancer's own health check), so the connection's real addresses stand.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Result<Option<Ends>, InboundError> {
    tokio::time::timeout(within, read(stream)).await.map_err(|_| InboundError::Timeout(within))?
}

async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<Ends>, InboundError> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    if head == *b"PROXY" {
        read_v1(stream, head).await
    } else if head[..] == V2_SIGNATURE[..5] {
        read_v2(stream, head).await
    } else {
        Err(InboundError::Missing)
    }
}

/// Byte by byte up to CRLF: at most 107 small reads, once per connection from a trusted
/// balancer, and never a byte of the client's own data.
async fn read_v1<S: AsyncRead + Unpin>(stream: &mut S, head: [u8; 5]) -> Result<Option<Ends>, InboundError> {
    let mut line = head.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(InboundError::Malformed("v1 header longer than 107 bytes".to_owned()));
        }
        line.push(stream.read_u8().await?);
    }
    parse_v1(&line)
}

fn parse_v1(line: &[u8]) -> Result<Option<Ends>, InboundError> {
    let header = v1::Header::try_from(line).map_err(|e| InboundError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        v1::Addresses::Unknown => None,
        v1::Addresses::Tcp4(a) => Some(Ends {
            client: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            local: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        }),
        v1::Addresses::Tcp6(a) => Some(Ends {
            client: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            local: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        }),
    })
}

async fn read_v2<S: AsyncRead + Unpin>(stream: &mut S, head: [u8; 5]) -> Result<Option<Ends>, InboundError> {
    let mut fixed = [0u8; V2_FIXED];
    fixed[..5].copy_from_slice(&head);
    stream.read_exact(&mut fixed[5..]).await?;
    if fixed[..12] != V2_SIGNATURE[..] {
        return Err(InboundError::Malformed("bad v2 signature".to_owned()));
    }
    let payload = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(InboundError::Malformed(format!("v2 header of {payload} bytes is too long")));
    }
    let mut whole = fixed.to_vec();
    whole.resize(V2_FIXED + payload, 0);
    stream.read_exact(&mut whole[V2_FIXED..]).await?;
    parse_v2(&whole)
}

fn parse_v2(bytes: &[u8]) -> Result<Option<Ends>, InboundError> {
    let header = v2::Header::try_from(bytes).map_err(|e| InboundError::Malformed(e.to_string()))?;
    if header.command == v2::Command::Local {
        return Ok(None);
    }
    if header.protocol != v2::Protocol::Stream {
        return Err(InboundError::Malformed("v2 header is not for a TCP stream".to_owned()));
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Ok(Some(Ends {
            client: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            local: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        })),
        v2::Addresses::IPv6(a) => Ok(Some(Ends {
            client: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            local: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        })),
        // A PROXY command without addresses says nothing usable about the client.
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => {
            Err(InboundError::Malformed("v2 PROXY header without IP addresses".to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<Ends>, InboundError>, Vec<u8>) {
        let mut input = bytes;
        let result = read_header(&mut input, Duration::from_secs(1)).await;
        (result, input.to_vec())
    }

    #[tokio::test]
    async fn v1_is_read_to_its_crlf_and_no_further() {
        let (ends, rest) = parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 50123 993\r\n\x16\x03\x01").await;
        let ends = ends.unwrap().unwrap();
        assert_eq!(ends.client, "192.0.2.7:50123".parse().unwrap());
        assert_eq!(ends.local, "10.0.0.1:993".parse().unwrap());
        assert_eq!(rest, b"\x16\x03\x01");
        let (ends, rest) = parse(b"PROXY UNKNOWN\r\nEHLO").await;
        assert_eq!(ends.unwrap(), None);
        assert_eq!(rest, b"EHLO");
    }

    #[tokio::test]
    async fn v2_is_read_exactly() {
        let addrs: (SocketAddr, SocketAddr) =
            ("[2001:db8::7]:4000".parse().unwrap(), "[2001:db8::1]:25".parse().unwrap());
        let mut header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            v2::Addresses::from(addrs),
        )
        .build()
        .unwrap();
        header.extend_from_slice(b"a1 NOOP");
        let (ends, rest) = parse(&header).await;
        assert_eq!(ends.unwrap(), Some(Ends { client: addrs.0, local: addrs.1 }));
        assert_eq!(rest, b"a1 NOOP");
    }

    #[tokio::test]
    async fn malformed_and_missing_headers_are_refused() {
        for bad in [&b"PROXY TCP4 300.0.0.1 10.0.0.1 1 2\r\n"[..], b"PROXY TCP4 nonsense without end"] {
            assert!(matches!(parse(bad).await.0, Err(InboundError::Malformed(_) | InboundError::Io(_))));
        }
        let long = [b"PROXY ".to_vec(), vec![b'1'; 200]].concat();
        assert!(matches!(parse(&long).await.0, Err(InboundError::Malformed(_))));
        assert!(matches!(parse(b"EHLO client\r\n").await.0, Err(InboundError::Missing)));
        let mut truncated = V2_SIGNATURE.to_vec();
        truncated.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&truncated).await.0, Err(InboundError::Malformed(_))));
    }
}
