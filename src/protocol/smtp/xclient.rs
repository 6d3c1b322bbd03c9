//! Postfix XCLIENT: naming the real client to a backend that takes no PROXY header, with
//! every client-chosen value xtext-encoded.

use std::net::{IpAddr, SocketAddr};

use super::*;

/// RFC 3461 xtext, which Postfix's XCLIENT uses for attribute values: printable ASCII
/// except `+` and `=` stands for itself, every other octet is `+` and two upper-case hex
/// digits. A client-chosen HELO name can thus never add an attribute or end the line.
pub(super) fn xtext(value: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'+', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0x0f)]]);
        }
    }
    out
}

/// The XCLIENT command naming `client` to the backend (Postfix XCLIENT_README). A v4 client
/// on a dual-stack socket is named as v4; v6 addresses take Postfix's `IPV6:` prefix. NAME
/// is `[UNAVAILABLE]`: mailtls does no reverse lookups, and the backend may do its own.
/// `helo` is the client's HELO/EHLO name where mailtls already knows it.
pub(super) fn xclient_command(client: SocketAddr, helo: Option<&[u8]>) -> Vec<u8> {
    let addr = match client.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPV6:{v6}"),
        },
        IpAddr::V4(v4) => v4.to_string(),
    };
    let mut line = b"XCLIENT ADDR=".to_vec();
    line.extend_from_slice(&xtext(addr.as_bytes()));
    line.extend_from_slice(format!(" PORT={} NAME=[UNAVAILABLE]", client.port()).as_bytes());
    if let Some(helo) = helo.filter(|h| !h.is_empty()) {
        line.extend_from_slice(b" HELO=");
        line.extend_from_slice(&xtext(helo));
    }
    line.extend_from_slice(b"\r\n");
    line
}

/// The domain of a replayed `EHLO domain` / `HELO domain` line, for XCLIENT's HELO.
pub(super) fn helo_name(replay: &[u8]) -> Option<&[u8]> {
    let argument = Command::parse(replay).argument?.trim_ascii();
    argument.split(|b| b.is_ascii_whitespace()).next()
}
