//! The one list of commands and IMAP ID fields by which a backend lets a proxy it trusts
//! speak for the client (its address, port, session, TTL, fields for the passdb).
//!
//! A backend grants that trust by the connection's source address (Dovecot's
//! `login_trusted_networks`, Postfix's `smtpd_authorized_xclient_hosts`...). Behind mailtls
//! every connection comes from mailtls's address, so without care every client would hold
//! mailtls's trust. Therefore, on every protocol and in every phase before the opaque relay:
//! - a client's command named here is answered by mailtls and never forwarded;
//! - an IMAP `ID` carrying a field named here reaches the backend as `ID NIL`;
//! - a backend's advertisement of such a command (SMTP EHLO keyword, POP3 `[XCLIENT]`
//!   greeting code or CAPA line, IMAP capability) never reaches the client.
//!
//! What mailtls itself says on the client's behalf (`xclient = true`) is the one exception:
//! mailtls is the trusted proxy, and it names the real client.

use super::Protocol;

/// What kind of token an entry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A command verb; backends advertise it under the same name.
    Command,
    /// An IMAP ID field name, matched exactly (ASCII case ignored).
    IdField,
    /// An IMAP ID field name prefix (`x-forward-<name>`).
    IdFieldPrefix,
}

/// One way for a trusted proxy to speak for its client.
#[derive(Debug)]
pub struct Entry {
    pub protocol: Protocol,
    pub kind: Kind,
    pub name: &'static str,
    /// Which backends honour it, from whom, and what it lets the sender set.
    pub why: &'static str,
}

const fn entry(protocol: Protocol, kind: Kind, name: &'static str, why: &'static str) -> Entry {
    Entry { protocol, kind, name, why }
}

use Kind::{Command, IdField, IdFieldPrefix};
use Protocol::{Imap, Pop3, Smtp};

/// Everything mailtls refuses from clients and hides from them. Sources: Postfix
/// XCLIENT_README and XFORWARD_README, Dovecot's "Forwarding parameters" documentation and
/// its login sources (pop3-login `cmd_xclient`, imap-login `imap_login_id_params`), checked
/// against the Dovecot 2.3.19 binaries the interop tests run.
#[rustfmt::skip]
pub const ENTRIES: &[Entry] = &[
    entry(Smtp, Command, "XCLIENT",
        "Postfix (smtpd_authorized_xclient_hosts), Exim (hosts_xclient), Dovecot submission and LMTP \
         (login_trusted_networks): sets the client's address, port, HELO name, login, protocol, \
         session and forwarded fields"),
    entry(Smtp, Command, "XFORWARD",
        "Postfix (smtpd_authorized_xforward_hosts): sets the client address, name, HELO and source \
         recorded for the message"),
    entry(Pop3, Command, "XCLIENT",
        "Dovecot pop3-login (login_trusted_networks): ADDR, PORT, SESSION, TTL and FORWARD (fields \
         for the passdb); a trusted peer sees [XCLIENT] in the greeting"),
    entry(Pop3, Command, "XOIP",
        "Zimbra's POP3 server (zimbraMailTrustedIP) and Dovecot pop3-login, for Zimbra's nginx: \
         sets the client's address"),
    entry(Imap, Command, "XCLIENT",
        "no IMAP server known to us takes it; refused and hidden all the same, since a capability \
         of that name could only announce the same trust"),
    entry(Imap, IdField, "x-originating-ip",
        "Dovecot imap-login (login_trusted_networks) and Zimbra: the client's address"),
    entry(Imap, IdField, "x-originating-port", "Dovecot imap-login: the client's port"),
    entry(Imap, IdField, "x-connected-ip", "Dovecot imap-login: the server address the client reached"),
    entry(Imap, IdField, "x-connected-port", "Dovecot imap-login: the server port the client reached"),
    entry(Imap, IdField, "x-proxy-ttl", "Dovecot imap-login: the proxy hop budget (loop prevention)"),
    entry(Imap, IdField, "x-session-id", "Dovecot imap-login: the session ID logged and passed on"),
    entry(Imap, IdField, "x-session-ext-id", "Dovecot imap-login: the same, under its older name"),
    entry(Imap, IdField, "x-client-transport",
        "Dovecot imap-login (versions after the tests' 2.3.19): whether the client's own \
         connection used TLS"),
    entry(Imap, IdFieldPrefix, "x-forward-",
        "Dovecot imap-login: any x-forward-<name> becomes a forward_<name> field for the passdb"),
];

/// Whether `verb` (a command, or the keyword a backend advertises it by) lets a proxy speak
/// for its client on `protocol`. ASCII case is ignored, as every backend here does.
pub fn is_proxy_command(protocol: Protocol, verb: &[u8]) -> bool {
    ENTRIES
        .iter()
        .filter(|e| e.protocol == protocol && e.kind == Command)
        .any(|e| verb.eq_ignore_ascii_case(e.name.as_bytes()))
}

/// Whether an IMAP `ID` command line (tag and name included) may carry a field of the
/// list, and must therefore reach the backend as `ID NIL`.
///
/// Deliberately coarse: backslashes are dropped before matching (Dovecot's quoted strings
/// take `\x` as `x`, so `"x-originating\-ip"` is that field), so are control bytes (a NUL
/// a C parser would stop at, say), any occurrence anywhere in the line counts (a value that
/// merely looks like a field name costs the client nothing but its ID), and a literal
/// counts, since its bytes arrive after the decision is made. An `ID NIL` loses only the
/// client's name and version in the backend's log; a field the check misses would let the
/// client choose its logged address and more.
pub fn id_may_speak_for_client(line: &[u8]) -> bool {
    if line.contains(&b'{') {
        return true;
    }
    let plain: Vec<u8> =
        line.iter().filter(|&&b| b != b'\\' && !b.is_ascii_control()).map(u8::to_ascii_lowercase).collect();
    ENTRIES
        .iter()
        .filter(|e| e.protocol == Imap && e.kind != Command)
        .any(|e| plain.windows(e.name.len()).any(|w| w == e.name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_gives_its_reason_and_is_written_as_matched() {
        for e in ENTRIES {
            assert!(e.why.len() > 20, "{e:?}");
            match e.kind {
                Kind::Command => assert_eq!(e.name, e.name.to_ascii_uppercase()),
                Kind::IdField | Kind::IdFieldPrefix => assert_eq!(e.name, e.name.to_ascii_lowercase()),
            }
        }
    }

    #[test]
    fn proxy_commands_are_known_per_protocol_in_any_case() {
        assert!(is_proxy_command(Protocol::Pop3, b"xclient"));
        assert!(is_proxy_command(Protocol::Pop3, b"XOIP"));
        assert!(is_proxy_command(Protocol::Smtp, b"XForward"));
        assert!(is_proxy_command(Protocol::Imap, b"XCLIENT"));
        assert!(!is_proxy_command(Protocol::Pop3, b"XFORWARD"));
        assert!(!is_proxy_command(Protocol::Pop3, b"XCLIENTS"));
        assert!(!is_proxy_command(Protocol::Imap, b"ID"));
        assert!(!is_proxy_command(Protocol::Smtp, b""));
    }

    #[test]
    fn id_with_any_dovecot_trust_field_is_caught() {
        for field in [
            "x-originating-ip",
            "X-Originating-Port",
            "x-connected-ip",
            "x-connected-port",
            "x-proxy-ttl",
            "x-session-id",
            "x-session-ext-id",
            "x-client-transport",
            "x-forward-anything",
        ] {
            let line = format!("a ID (\"name\" \"mutt\" \"{field}\" \"203.0.113.77\")\r\n");
            assert!(id_may_speak_for_client(line.as_bytes()), "{field}");
        }
    }

    #[test]
    fn id_hiding_a_field_behind_escapes_or_a_literal_is_caught() {
        assert!(id_may_speak_for_client(b"a ID (\"x-originating\\-ip\" \"203.0.113.77\")\r\n"));
        assert!(id_may_speak_for_client(b"a ID (\"x\\-forward\\-user\" \"root\")\r\n"));
        assert!(id_may_speak_for_client(b"a ID ({16}\r\n"));
        assert!(id_may_speak_for_client(b"a ID (x-session-id abc)\r\n"), "atoms too");
        assert!(id_may_speak_for_client(b"a ID (\"x-originating-\0ip\" \"203.0.113.77\")\r\n"));
    }

    #[test]
    fn ordinary_id_is_left_alone() {
        assert!(!id_may_speak_for_client(b"a ID (\"name\" \"Thunderbird\" \"version\" \"115.0\")\r\n"));
        assert!(!id_may_speak_for_client(b"a ID NIL\r\n"));
        assert!(!id_may_speak_for_client(b"a ID (\"x-mailer\" \"y\")\r\n"));
    }
}
