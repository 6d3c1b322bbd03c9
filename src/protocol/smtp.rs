//! SMTP for mailtls: the pre-TLS dialogue mailtls speaks itself, the negotiation relay with
//! its EHLO filter and local refusals, and the probe that learns a backend's extensions.
//!
//! The opportunistic plaintext path (port 25 without STARTTLS) ends in one of two ways once
//! the replayed EHLO/HELO is answered:
//! - opaque relay, only when the probe showed a backend that offers nothing a plaintext
//!   client must not reach (no AUTH, XCLIENT or XFORWARD): it refuses those itself, and the
//!   relay can stay opaque (splice(2));
//! - otherwise a *guarded* session that never leaves the negotiation: commands are relayed
//!   lock-step, AUTH/STARTTLS/XCLIENT/XFORWARD are answered locally, EHLO replies lose those
//!   extensions, and message content is streamed, never held whole: DATA bodies through
//!   the smuggling guard (smtp_guard.rs), BDAT chunks unexamined, so nothing in a body is
//!   ever taken for a command.
//!
//! Every session that ends in a relay hands the relay the same guard ([`Negotiation::client_guard`]),
//! started in command mode and told whether the backend announced CHUNKING.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::BytesMut;

use super::line::{self, Line};
use super::smtp_guard::{BareNewline, SmtpGuard};
use super::trusted_proxy::is_proxy_command;
use super::{
    ClientGuard, Entry, Farewell, Finding, Negotiation, Next, PreTls, PreTlsStep, Protocol, Settings, Step,
};

/// Sent by the session to end a probe connection politely once [`ProbeStep::Done`] came.
pub const PROBE_QUIT: &[u8] = b"QUIT\r\n";

const OK: &[u8] = b"250 2.0.0 OK\r\n";
const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
const HELP: &[u8] = b"214 2.0.0 See RFC 5321\r\n";
const READY_FOR_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
const STARTTLS_WITH_ARGUMENT: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
const EHLO_WITHOUT_DOMAIN: &[u8] = b"501 5.5.4 Syntax: EHLO hostname\r\n";
const HELO_WITHOUT_DOMAIN: &[u8] = b"501 5.5.4 Syntax: HELO hostname\r\n";
const TLS_FIRST: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
const HELO_FIRST: &[u8] = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
const MAIL_FIRST: &[u8] = b"503 5.5.1 Error: need MAIL command\r\n";
const CANNOT_VRFY: &[u8] = b"252 2.0.0 Cannot VRFY user\r\n";
const NOT_IMPLEMENTED: &[u8] = b"502 5.5.1 Command not implemented\r\n";
const UNRECOGNIZED: &[u8] = b"500 5.5.2 Error: command not recognized\r\n";
const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Error: line too long\r\n";
const TLS_ALREADY_ACTIVE: &[u8] = b"503 5.5.1 Error: TLS already active\r\n";
const NOT_AUTHORIZED: &[u8] = b"550 5.7.0 Error: not authorized\r\n";
/// RFC 3207: STARTTLS is not available at this point (the plaintext session already began).
const TLS_NOT_AVAILABLE: &[u8] = b"454 4.7.0 TLS not available now\r\n";
const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n";

/// A probe reads replies from a backend we configured ourselves; these bounds only stop a
/// broken one from growing our memory.
const PROBE_MAX_LINE: usize = 4096;
const PROBE_MAX_REPLY: usize = 64 * 1024;

/// The protocol's last words when mailtls ends a session itself.
pub fn farewell(why: Farewell) -> Vec<u8> {
    let text: &[u8] = match why {
        Farewell::BackendUnavailable => b"421 4.3.2 Service not available, closing transmission channel\r\n",
        Farewell::Timeout => b"421 4.4.2 Error: timeout exceeded\r\n",
        Farewell::ShuttingDown => b"421 4.3.2 Server shutting down\r\n",
        Farewell::TooManyConnections => b"421 4.7.0 Too many connections, try again later\r\n",
    };
    text.to_vec()
}

// ---------------------------------------------------------------------------------------
// Commands

/// The SMTP verbs mailtls treats differently; everything else is `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Vrfy,
    Expn,
    Etrn,
    Noop,
    Rset,
    Quit,
    Help,
    /// XCLIENT, XFORWARD: a trusted proxy naming its client (`trusted_proxy`).
    ProxyOnly,
    Unknown,
}

impl Verb {
    fn of(word: &[u8]) -> Verb {
        if is_proxy_command(Protocol::Smtp, word) {
            return Verb::ProxyOnly;
        }
        const VERBS: [(&[u8], Verb); 15] = [
            (b"EHLO", Verb::Ehlo),
            (b"HELO", Verb::Helo),
            (b"STARTTLS", Verb::StartTls),
            (b"AUTH", Verb::Auth),
            (b"MAIL", Verb::Mail),
            (b"RCPT", Verb::Rcpt),
            (b"DATA", Verb::Data),
            (b"BDAT", Verb::Bdat),
            (b"VRFY", Verb::Vrfy),
            (b"EXPN", Verb::Expn),
            (b"ETRN", Verb::Etrn),
            (b"NOOP", Verb::Noop),
            (b"RSET", Verb::Rset),
            (b"QUIT", Verb::Quit),
            (b"HELP", Verb::Help),
        ];
        VERBS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(word))
            .map_or(Verb::Unknown, |&(_, verb)| verb)
    }

    /// Commands that carry or start a mail transaction: refused before TLS on a
    /// require_tls listener, like AUTH.
    fn needs_tls_when_required(self) -> bool {
        matches!(
            self,
            Verb::Mail | Verb::Rcpt | Verb::Data | Verb::Bdat | Verb::Vrfy | Verb::Expn | Verb::Etrn
        )
    }
}

/// One command line, split into what mailtls needs to decide on it.
struct Command<'a> {
    verb: Verb,
    argument: Option<&'a [u8]>,
    /// NUL, bare CR and other control bytes: no valid command contains them, and a backend
    /// that split on them could be fed a command mailtls never saw.
    has_control_bytes: bool,
}

impl<'a> Command<'a> {
    fn parse(line: &'a [u8]) -> Command<'a> {
        let (word, argument) = line::split_word(line);
        Command { verb: Verb::of(word), argument, has_control_bytes: has_control_bytes(line::trim_eol(line)) }
    }

    /// `STARTTLS ` with only trailing blanks is how some clients write a bare STARTTLS.
    fn has_argument(&self) -> bool {
        self.argument.is_some_and(|arg| arg.iter().any(|b| !b.is_ascii_whitespace()))
    }
}

fn has_control_bytes(text: &[u8]) -> bool {
    text.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

fn with_crlf(line: &[u8]) -> Vec<u8> {
    let mut out = line::trim_eol(line).to_vec();
    out.extend_from_slice(b"\r\n");
    out
}

/// Gives a line taken by `take_line` back to the front of the buffer. `line` was split off
/// `input`, so the two halves are adjacent and `unsplit` joins them without copying.
fn put_back(input: &mut BytesMut, mut line: BytesMut) {
    line.unsplit(input.split());
    *input = line;
}

fn reply(text: &[u8]) -> PreTlsStep {
    PreTlsStep::Reply(text.to_vec())
}

fn too_many(hostname: &str, what: &str) -> Vec<u8> {
    format!("421 4.7.0 {hostname} Error: too many {what}\r\n").into_bytes()
}

/// `code` followed by one line per text, `-` on all but the last (RFC 5321 4.2.1).
fn multiline(code: &[u8], texts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        out.extend_from_slice(code);
        out.push(if i + 1 == texts.len() { b' ' } else { b'-' });
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The keyword of an EHLO extension line ("SIZE 1000" -> "SIZE").
fn keyword(extension: &[u8]) -> &[u8] {
    let extension = extension.trim_ascii_start();
    let end = extension.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(extension.len());
    extension.get(..end).unwrap_or(extension)
}

fn is_keyword(extension: &[u8], names: &[&[u8]]) -> bool {
    let word = keyword(extension);
    names.iter().any(|name| name.eq_ignore_ascii_case(word))
}

/// After TLS: the TLS is mailtls's, and the XCLIENT/XFORWARD trust is mailtls's alone.
fn hidden_after_tls(extension: &[u8]) -> bool {
    is_keyword(extension, &[b"STARTTLS"]) || is_proxy_command(Protocol::Smtp, keyword(extension))
}

/// `AUTH mechanisms` or the old `AUTH=mechanisms` form some clients still look for.
fn is_auth(extension: &[u8]) -> bool {
    let word = keyword(extension);
    word.eq_ignore_ascii_case(b"AUTH")
        || word.get(..5).is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"AUTH="))
}

/// In plaintext: as after TLS, and no AUTH in the clear.
fn hidden_in_plaintext(extension: &[u8]) -> bool {
    is_auth(extension) || hidden_after_tls(extension)
}

/// Before TLS on an opportunistic listener: what the backend has, minus what is hidden in
/// plaintext, minus lines no client should be shown.
fn offered_before_tls(extension: &[u8]) -> bool {
    !extension.trim_ascii().is_empty() && !has_control_bytes(extension) && !hidden_in_plaintext(extension)
}

/// An opaque plaintext relay is safe only with a backend known (from the probe) to offer
/// neither AUTH nor the XCLIENT/XFORWARD trust: it then refuses them itself, whatever the
/// client sends through the relay. Unknown extensions are not known to be safe.
fn opaque_plaintext_is_safe(extensions: &[String]) -> bool {
    !extensions.is_empty()
        && !extensions.iter().any(|extension| {
            let extension = extension.as_bytes();
            is_auth(extension) || is_proxy_command(Protocol::Smtp, keyword(extension))
        })
}

/// Whether a (positive) EHLO reply announces CHUNKING (RFC 3030).
fn announces_chunking(reply: &Reply) -> bool {
    reply.is_positive() && reply.texts().skip(1).any(|extension| is_keyword(extension, &[b"CHUNKING"]))
}

/// The size of a `BDAT <size> [LAST]` command, parsed strictly (digits, single spaces):
/// the backend must count exactly the bytes mailtls counts, or the rest of a chunk would
/// become commands there. `None` for anything else, overflow included.
pub(super) fn bdat_size(argument: Option<&[u8]>) -> Option<u64> {
    let argument = argument?;
    let digits = match argument.iter().position(|&b| b == b' ') {
        Some(sp) => {
            let (digits, last) = argument.split_at(sp);
            if !last.get(1..).is_some_and(|word| word.eq_ignore_ascii_case(b"LAST")) {
                return None;
            }
            digits
        }
        None => argument,
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = if b.is_ascii_digit() { u64::from(b - b'0') } else { return None };
        size.checked_mul(10)?.checked_add(digit)
    })
}

/// RFC 3461 xtext, which Postfix's XCLIENT uses for attribute values: printable ASCII
/// except `+` and `=` stands for itself, every other octet is `+` and two upper-case hex
/// digits. A client-chosen HELO name can thus never add an attribute or end the line.
fn xtext(value: &[u8]) -> Vec<u8> {
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
fn xclient_command(client: SocketAddr, helo: Option<&[u8]>) -> Vec<u8> {
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
fn helo_name(replay: &[u8]) -> Option<&[u8]> {
    let argument = Command::parse(replay).argument?.trim_ascii();
    argument.split(|b| b.is_ascii_whitespace()).next()
}

// ---------------------------------------------------------------------------------------
// Backend replies

/// One whole backend reply, multi-line ones included.
struct Reply {
    raw: BytesMut,
    code: [u8; 3],
}

enum Frame {
    Complete(Reply),
    Incomplete,
    Bad(&'static str),
}

impl Reply {
    fn is_positive(&self) -> bool {
        self.code[0] == b'2'
    }

    fn is(&self, code: &[u8; 3]) -> bool {
        &self.code == code
    }

    /// The text of each line, after `ddd-` / `ddd `, without its terminator.
    fn texts(&self) -> impl Iterator<Item = &[u8]> {
        self.raw.split_inclusive(|&b| b == b'\n').map(|line| line::trim_eol(line).get(4..).unwrap_or(b""))
    }

    fn first_line(&self) -> String {
        let first = self.raw.as_ref().split(|&b| b == b'\n').next().unwrap_or(b"");
        printable(line::trim_eol(first))
    }
}

/// The code of a reply line and whether another line follows; `None` when malformed.
fn reply_line(line: &[u8]) -> Option<([u8; 3], bool)> {
    match line::trim_eol(line) {
        [a, b, c, rest @ ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
            let more = match rest.first() {
                None | Some(b' ') => false,
                Some(b'-') => true,
                Some(_) => return None,
            };
            Some(([*a, *b, *c], more))
        }
        _ => None,
    }
}

/// Takes one whole reply from the front of `input`, leaving it untouched until the final
/// line has arrived. Lines are bounded by `max_line`, the whole reply by `max_reply`.
fn take_reply(input: &mut BytesMut, max_line: usize, max_reply: usize) -> Frame {
    let mut end = 0;
    let mut code = None;
    loop {
        let rest = input.get(end..).unwrap_or(&[]);
        let window = rest.get(..rest.len().min(max_line)).unwrap_or(rest);
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            if rest.len() >= max_line {
                return Frame::Bad("reply line too long");
            }
            if input.len() >= max_reply {
                return Frame::Bad("reply too long");
            }
            return Frame::Incomplete;
        };
        let Some((line_code, more)) = reply_line(window.get(..=lf).unwrap_or(window)) else {
            return Frame::Bad("malformed reply line");
        };
        if *code.get_or_insert(line_code) != line_code {
            return Frame::Bad("reply code changed between lines");
        }
        end += lf + 1;
        if !more {
            let raw = input.split_to(end);
            return Frame::Complete(Reply { raw, code: line_code });
        }
        if end >= max_reply {
            return Frame::Bad("reply too long");
        }
    }
}

/// An EHLO reply without the extensions the client must not see (`hidden`); unchanged
/// bytes when nothing is dropped. The first line is the server's name, never an extension.
fn filter_capabilities(reply: &Reply, hidden: fn(&[u8]) -> bool) -> Vec<u8> {
    let mut texts = reply.texts();
    let Some(first) = texts.next() else {
        return reply.raw.to_vec();
    };
    let extensions: Vec<&[u8]> = texts.collect();
    let kept: Vec<&[u8]> = extensions.iter().copied().filter(|extension| !hidden(extension)).collect();
    if kept.len() == extensions.len() {
        return reply.raw.to_vec();
    }
    let mut lines = vec![first];
    lines.extend(kept);
    multiline(&reply.code, &lines)
}

/// Peer text made safe for a log line or an error message.
fn printable(text: &[u8]) -> String {
    text.iter()
        .take(200)
        .map(|&b| if b.is_ascii_graphic() || b == b' ' { char::from(b) } else { '?' })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Before TLS

/// The plaintext dialogue on an SMTP STARTTLS listener (587, or 25 with require_tls false).
pub struct SmtpPreTls {
    hostname: String,
    require_tls: bool,
    max_line: usize,
    max_commands: u32,
    max_errors: u32,
    extensions: Arc<[String]>,
    /// The client's last accepted EHLO/HELO, replayed to the backend on the plaintext path.
    helo: Option<Vec<u8>>,
    commands: u32,
    errors: u32,
    /// Set once a step hands the connection on (TLS, plaintext relay, close): from then on
    /// the buffer belongs to someone else and is never read again.
    finished: bool,
    refused_logins: u32,
}

impl SmtpPreTls {
    pub fn new(settings: &Settings) -> Self {
        SmtpPreTls {
            hostname: settings.hostname.clone(),
            require_tls: settings.require_tls,
            max_line: settings.max_pre_tls_line,
            max_commands: settings.max_pre_tls_commands,
            max_errors: settings.max_errors,
            extensions: Arc::clone(&settings.backend_extensions),
            helo: None,
            commands: 0,
            errors: 0,
            finished: false,
            refused_logins: 0,
        }
    }

    fn ehlo_reply(&self) -> Vec<u8> {
        let mut texts: Vec<&[u8]> = vec![self.hostname.as_bytes()];
        if self.require_tls {
            texts.push(b"ENHANCEDSTATUSCODES");
        } else {
            texts.extend(
                self.extensions
                    .iter()
                    .map(|extension| extension.trim_ascii().as_bytes())
                    .filter(|extension| offered_before_tls(extension)),
            );
        }
        texts.push(b"STARTTLS");
        multiline(b"250", &texts)
    }

    /// A refusal counts as an error; one too many ends the session instead.
    fn refuse(&mut self, text: &[u8]) -> PreTlsStep {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            return PreTlsStep::Close(too_many(&self.hostname, "errors"));
        }
        reply(text)
    }

    fn greet_back(&mut self, command: &Command, line: &[u8]) -> PreTlsStep {
        if !command.has_argument() {
            let usage = match command.verb {
                Verb::Helo => HELO_WITHOUT_DOMAIN,
                _ => EHLO_WITHOUT_DOMAIN,
            };
            return self.refuse(usage);
        }
        self.helo = Some(with_crlf(line));
        match command.verb {
            Verb::Helo => PreTlsStep::Reply(format!("250 {}\r\n", self.hostname).into_bytes()),
            _ => PreTlsStep::Reply(self.ehlo_reply()),
        }
    }

    fn answer(&mut self, line: &[u8]) -> PreTlsStep {
        let command = Command::parse(line);
        if command.has_control_bytes {
            return self.refuse(UNRECOGNIZED);
        }
        match command.verb {
            Verb::Ehlo | Verb::Helo => self.greet_back(&command, line),
            Verb::StartTls if command.has_argument() => self.refuse(STARTTLS_WITH_ARGUMENT),
            Verb::StartTls => PreTlsStep::StartTls(READY_FOR_TLS.to_vec()),
            Verb::Auth => {
                self.refused_logins = self.refused_logins.saturating_add(1);
                self.refuse(TLS_FIRST)
            }
            verb if self.require_tls && verb.needs_tls_when_required() => self.refuse(TLS_FIRST),
            Verb::Mail => match &self.helo {
                Some(replay) => PreTlsStep::Plaintext { replay: replay.clone() },
                None => self.refuse(HELO_FIRST),
            },
            Verb::Rcpt | Verb::Data | Verb::Bdat => self.refuse(MAIL_FIRST),
            Verb::Vrfy => reply(CANNOT_VRFY),
            // ETRN asks this server to flush a queue it does not have: known, not offered.
            Verb::Expn | Verb::Etrn => self.refuse(NOT_IMPLEMENTED),
            Verb::Noop | Verb::Rset => reply(OK),
            Verb::Quit => PreTlsStep::Close(BYE.to_vec()),
            Verb::Help => reply(HELP),
            Verb::ProxyOnly | Verb::Unknown => self.refuse(UNRECOGNIZED),
        }
    }
}

impl PreTls for SmtpPreTls {
    fn refused_logins(&self) -> u32 {
        self.refused_logins
    }

    fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP\r\n", self.hostname).into_bytes()
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<PreTlsStep> {
        if self.finished {
            return None;
        }
        let line = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => {
                self.finished = true;
                return Some(PreTlsStep::Close(LINE_TOO_LONG.to_vec()));
            }
            Line::Complete(line) => line,
        };
        if self.commands >= self.max_commands {
            self.finished = true;
            return Some(PreTlsStep::Close(too_many(&self.hostname, "commands")));
        }
        self.commands += 1;
        let step = self.answer(&line);
        match step {
            PreTlsStep::Reply(_) => {}
            PreTlsStep::Plaintext { .. } => {
                // The backend answers this MAIL itself: it must reach it unchanged.
                put_back(input, line);
                self.finished = true;
            }
            PreTlsStep::StartTls(_) | PreTlsStep::Close(_) => self.finished = true,
        }
        Some(step)
    }
}

// ---------------------------------------------------------------------------------------
// Negotiation

/// Which kind of reply the backend owes, so it is treated right when it comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Ehlo,
    Auth,
    /// Guarded plaintext only: 354 starts the body, anything else ends the command.
    Data,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the backend's greeting.
    Greeting,
    /// XCLIENT was sent after the backend's positive `greeting`; its 220 is awaited.
    Xclient { greeting: Vec<u8> },
    /// Opportunistic path: the client's EHLO/HELO was replayed; its reply is swallowed.
    Replay,
    /// Nothing outstanding: the next client line is a command.
    Idle,
    /// A command was forwarded; the client waits for its reply.
    Awaiting(Pending),
    /// The backend sent a 334 challenge: the next client line is a SASL response.
    SaslResponse,
    /// Guarded plaintext: after the 354, client bytes go to the backend through the
    /// smuggling guard (`SmtpNegotiation::body`) until the end of data.
    DataBody { answered: bool },
    /// Guarded plaintext: the `remaining` octets of a BDAT chunk go to the backend unexamined.
    Chunk { remaining: u64, answered: bool },
    /// Relay or close was decided; nothing more is read.
    Over,
}

/// How the session reached the backend, which decides what the negotiation may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Inside TLS: AUTH is relayed; the first MAIL or a 235 ends the negotiation.
    Tls,
    /// Opportunistic plaintext in front of a backend known to offer no AUTH, XCLIENT or
    /// XFORWARD: the replayed EHLO's reply ends the negotiation (opaque relay).
    PlaintextOpaque,
    /// Opportunistic plaintext otherwise: the negotiation never ends in a relay.
    PlaintextGuarded,
}

/// The SMTP line-by-line phase between client and backend, until AUTH succeeds or MAIL
/// (inside TLS), or for the whole session (guarded plaintext).
pub struct SmtpNegotiation {
    hostname: String,
    max_line: usize,
    max_reply: usize,
    max_errors: u32,
    replay: Option<Vec<u8>>,
    /// The XCLIENT command to send after the greeting (`xclient = true` listeners).
    xclient: Option<Vec<u8>>,
    entry_is_implicit: bool,
    mode: Mode,
    /// The backend's last EHLO reply in this session announced CHUNKING. Guarded plaintext
    /// forwards BDAT only then: a backend without it would answer the BDAT line with an
    /// error and read the chunk's bytes as commands (XCLIENT, AUTH...) mailtls never saw.
    /// The relay's guard is told the same, for the same reason.
    chunking: bool,
    phase: Phase,
    errors: u32,
    bare_newline: BareNewline,
    /// Guarded plaintext, inside a DATA body: the guard scanning it.
    body: Option<SmtpGuard>,
    /// What the body guards found and the session has not yet been told.
    finding: Option<Finding>,
}

impl SmtpNegotiation {
    pub fn new(settings: &Settings, entry: Entry) -> Self {
        let (replay, entry_is_implicit, mode) = match entry {
            Entry::Implicit => (None, true, Mode::Tls),
            Entry::AfterStartTls => (None, false, Mode::Tls),
            // The config refuses `routes` on SMTP listeners; were one built, it would behave
            // as its TLS mode says.
            Entry::Routed { greet } => (None, greet, Mode::Tls),
            Entry::Plaintext { replay } => {
                let mode = if opaque_plaintext_is_safe(&settings.backend_extensions) {
                    Mode::PlaintextOpaque
                } else {
                    Mode::PlaintextGuarded
                };
                (Some(replay), false, mode)
            }
        };
        // After STARTTLS or on implicit TLS the client has not said HELO to the backend yet
        // (its pre-TLS EHLO is forgotten with the plaintext); on the plaintext path it has.
        let xclient = match (settings.xclient, settings.client) {
            (true, Some(client)) => Some(xclient_command(client, replay.as_deref().and_then(helo_name))),
            _ => None,
        };
        SmtpNegotiation {
            hostname: settings.hostname.clone(),
            max_line: settings.max_line,
            // An EHLO reply is a few hundred bytes; this leaves room for a verbose backend.
            max_reply: settings.max_line.saturating_mul(4),
            max_errors: settings.max_errors,
            replay,
            xclient,
            entry_is_implicit,
            mode,
            chunking: false,
            phase: Phase::Greeting,
            errors: 0,
            bare_newline: settings.bare_newline,
            body: None,
            finding: None,
        }
    }

    fn close(&mut self, to_client: Vec<u8>) -> Step {
        self.phase = Phase::Over;
        Step::to_client(to_client).then(Next::Close)
    }

    fn backend_unavailable(&mut self) -> Step {
        self.close(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
    }

    fn refuse(&mut self, reply: &[u8]) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            let reply = too_many(&self.hostname, "errors");
            return self.close(reply);
        }
        Step::to_client(reply)
    }

    fn forward(&mut self, line: &[u8], pending: Pending) -> Step {
        self.phase = Phase::Awaiting(pending);
        Step::to_backend(with_crlf(line))
    }

    fn relay_from(&mut self, line: &[u8]) -> Step {
        self.phase = Phase::Over;
        Step::to_backend(with_crlf(line)).then(Next::Relay)
    }

    /// What a capability reply may show the client in this mode.
    fn hidden(&self) -> fn(&[u8]) -> bool {
        match self.mode {
            Mode::Tls => hidden_after_tls,
            Mode::PlaintextOpaque | Mode::PlaintextGuarded => hidden_in_plaintext,
        }
    }

    fn command(&mut self, line: &[u8]) -> Step {
        let command = Command::parse(line);
        if command.has_control_bytes {
            return self.refuse(UNRECOGNIZED);
        }
        if self.mode == Mode::PlaintextGuarded {
            return self.guarded_command(&command, line);
        }
        match command.verb {
            Verb::StartTls => self.refuse(TLS_ALREADY_ACTIVE),
            // They would let the client tell the backend a forged address or identity.
            Verb::ProxyOnly => self.refuse(NOT_AUTHORIZED),
            Verb::Auth => self.forward(line, Pending::Auth),
            Verb::Mail => self.relay_from(line),
            // HELO too: its reply says whether the backend still does CHUNKING (no).
            Verb::Ehlo | Verb::Helo => self.forward(line, Pending::Ehlo),
            _ => self.forward(line, Pending::Other),
        }
    }

    /// A command of a guarded plaintext session: everything the backend may see goes to it
    /// one command at a time; what it must never see is answered here.
    fn guarded_command(&mut self, command: &Command, line: &[u8]) -> Step {
        match command.verb {
            // Never a credential in the clear, whatever the backend would say.
            Verb::Auth => self.refuse(TLS_FIRST),
            // The client already had mailtls's plaintext reply to EHLO; TLS now would not
            // be mailtls's to give (and the backend's STARTTLS is hidden from it).
            Verb::StartTls => self.refuse(TLS_NOT_AVAILABLE),
            // They would let the client tell the backend a forged address or identity.
            Verb::ProxyOnly => self.refuse(NOT_AUTHORIZED),
            // HELO too: its reply resets what the backend announced (no CHUNKING).
            Verb::Ehlo | Verb::Helo => self.forward(line, Pending::Ehlo),
            Verb::Data => self.forward(line, Pending::Data),
            Verb::Bdat => self.bdat(command, line),
            _ => self.forward(line, Pending::Other),
        }
    }

    /// BDAT: the line, then exactly `size` octets that are message content, not commands.
    fn bdat(&mut self, command: &Command, line: &[u8]) -> Step {
        if !self.chunking {
            return self.refuse(NOT_IMPLEMENTED);
        }
        let Some(size) = bdat_size(command.argument) else {
            return self.refuse(BDAT_SYNTAX);
        };
        let step = self.forward(line, Pending::Other);
        if size > 0 {
            self.phase = Phase::Chunk { remaining: size, answered: false };
        }
        step
    }

    /// Guarded plaintext, inside a DATA body or a BDAT chunk: hands on everything buffered
    /// (up to the end of the content), never waiting for lines, so the buffer never grows.
    fn stream(&mut self, input: &mut BytesMut) -> Option<Step> {
        if input.is_empty() {
            return None;
        }
        let (taken, answered, done) = match &mut self.phase {
            Phase::DataBody { answered } => {
                let answered = *answered;
                return Some(self.body(input, answered));
            }
            Phase::Chunk { remaining, answered } => {
                // A chunk larger than the address space simply takes all that is buffered.
                let taken = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
                *remaining = remaining.saturating_sub(taken as u64);
                (taken, *answered, *remaining == 0)
            }
            _ => return None,
        };
        if done {
            self.content_done(answered);
        }
        Some(Step::to_backend(input.split_to(taken).to_vec()))
    }

    /// Lock-step again after message content: its reply is owed, unless it came early.
    fn content_done(&mut self, answered: bool) {
        self.phase = if answered { Phase::Idle } else { Phase::Awaiting(Pending::Other) };
    }

    /// A piece of a DATA body, through the smuggling guard, up to the end of data.
    fn body(&mut self, input: &mut BytesMut, answered: bool) -> Step {
        let guard = self.body.get_or_insert_with(|| SmtpGuard::in_body(self.bare_newline));
        let mut out = Vec::new();
        let scan = guard.scan(input, &mut out, true);
        if let Some(found) = guard.take_finding() {
            self.finding = Some(match self.finding.take() {
                Some(earlier) => Finding { count: earlier.count + found.count, ..found },
                None => found,
            });
        }
        let taken = input.split_to(scan.consumed);
        let to_backend = if scan.changed { out } else { taken.to_vec() };
        if let Some(reply) = scan.refused {
            // Nothing from the offending octet on reaches the backend, which never sees
            // an end of data and drops the unfinished message when we close.
            self.phase = Phase::Over;
            input.clear();
            return Step { to_backend, to_client: reply.to_vec(), next: Next::Close };
        }
        if scan.end_of_data {
            self.body = None;
            self.content_done(answered);
        }
        Step::to_backend(to_backend)
    }

    /// 334 keeps the SASL exchange going, 235 ends negotiation, anything else ends AUTH.
    fn auth_reply(&mut self, reply: &Reply) -> Step {
        let step = Step::to_client(reply.raw.to_vec());
        if reply.is(b"334") {
            self.phase = Phase::SaslResponse;
            step
        } else if reply.is(b"235") {
            self.phase = Phase::Over;
            step.then(Next::Relay)
        } else {
            self.phase = Phase::Idle;
            step
        }
    }

    /// The reply to the replayed EHLO/HELO; the client already had mailtls's.
    fn replay_reply(&mut self, reply: &Reply) -> Step {
        self.chunking = announces_chunking(reply);
        if self.mode == Mode::PlaintextOpaque {
            self.phase = Phase::Over;
            return Step::to_client(Vec::new()).then(Next::Relay);
        }
        self.phase = Phase::Idle;
        Step::to_client(Vec::new())
    }
}

impl SmtpNegotiation {
    /// The backend has greeted (and accepted XCLIENT, if sent): replay the client's HELO on
    /// the plaintext path; relay the greeting on implicit TLS; swallow it after STARTTLS.
    fn greeted(&mut self, greeting: Vec<u8>) -> Step {
        if let Some(replay) = self.replay.take() {
            self.phase = Phase::Replay;
            return Step::to_backend(replay);
        }
        self.phase = Phase::Idle;
        if self.entry_is_implicit {
            Step::to_client(greeting)
        } else {
            Step::to_client(Vec::new())
        }
    }

    /// Postfix answers a successful XCLIENT with a new 220 greeting. Anything else (550 for
    /// an unauthorised mailtls, 501 for a syntax it does not know) means the backend would
    /// log mailtls's address as the client's: the session ends as if the backend were down,
    /// and the client sees the original greeting only when all went well.
    fn xclient_reply(&mut self, reply: &Reply, greeting: Vec<u8>) -> Step {
        if reply.is(b"220") {
            self.greeted(greeting)
        } else {
            self.backend_unavailable()
        }
    }
}

impl Negotiation for SmtpNegotiation {
    fn client_guard(&self) -> Option<Box<dyn ClientGuard>> {
        // Every relay point (the first MAIL, a 235, the replayed EHLO's reply) is at the
        // start of a command line.
        Some(Box::new(SmtpGuard::new(self.bare_newline, self.chunking)))
    }

    fn take_finding(&mut self) -> Option<Finding> {
        self.finding.take()
    }

    fn on_greeting(&mut self, input: &mut BytesMut) -> Option<Step> {
        if self.phase != Phase::Greeting {
            return None;
        }
        let greeting = match take_reply(input, self.max_line, self.max_reply) {
            Frame::Incomplete => return None,
            Frame::Bad(_) => return Some(self.backend_unavailable()),
            Frame::Complete(greeting) => greeting,
        };
        if !greeting.is_positive() {
            return Some(self.backend_unavailable());
        }
        if let Some(xclient) = self.xclient.take() {
            self.phase = Phase::Xclient { greeting: greeting.raw.to_vec() };
            return Some(Step::to_backend(xclient));
        }
        Some(self.greeted(greeting.raw.to_vec()))
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<Step> {
        match self.phase {
            Phase::DataBody { .. } | Phase::Chunk { .. } => return self.stream(input),
            Phase::Idle | Phase::SaslResponse => {}
            _ => return None,
        }
        let line = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(self.close(LINE_TOO_LONG.to_vec())),
            Line::Complete(line) => line,
        };
        if self.phase == Phase::SaslResponse {
            // Base64 or `*`: the backend's business, never a command of ours.
            return Some(self.forward(&line, Pending::Auth));
        }
        Some(self.command(&line))
    }

    fn on_backend(&mut self, input: &mut BytesMut) -> Option<Step> {
        if matches!(self.phase, Phase::Greeting | Phase::Over) {
            return None;
        }
        let reply = match take_reply(input, self.max_line, self.max_reply) {
            Frame::Incomplete => return None,
            Frame::Bad(_) => return Some(self.backend_unavailable()),
            Frame::Complete(reply) => reply,
        };
        if let Phase::Xclient { greeting } = &mut self.phase {
            let greeting = std::mem::take(greeting);
            return Some(self.xclient_reply(&reply, greeting));
        }
        let hidden = self.hidden();
        let step = match &mut self.phase {
            Phase::Replay => self.replay_reply(&reply),
            Phase::Awaiting(Pending::Auth) | Phase::SaslResponse => self.auth_reply(&reply),
            Phase::Awaiting(Pending::Ehlo) => {
                self.phase = Phase::Idle;
                self.chunking = announces_chunking(&reply);
                Step::to_client(filter_capabilities(&reply, hidden))
            }
            Phase::Awaiting(Pending::Data) => {
                // The CRLF ending the DATA line is the start of the end-of-data marker.
                self.phase = if reply.is(b"354") { Phase::DataBody { answered: false } } else { Phase::Idle };
                Step::to_client(reply.raw.to_vec())
            }
            Phase::Awaiting(Pending::Other) => {
                self.phase = Phase::Idle;
                Step::to_client(reply.raw.to_vec())
            }
            // A reply before the content is complete (a 552 for a chunk too large, a 421
            // before closing) is the content's reply: relayed, and none is awaited after it.
            Phase::DataBody { answered, .. } | Phase::Chunk { answered, .. } => {
                *answered = true;
                Step::to_client(filter_capabilities(&reply, hidden))
            }
            // Unsolicited (a 421 before closing, say): relayed, capabilities filtered.
            Phase::Idle | Phase::Greeting | Phase::Xclient { .. } | Phase::Over => {
                Step::to_client(filter_capabilities(&reply, hidden))
            }
        };
        Some(step)
    }
}

// ---------------------------------------------------------------------------------------
// Backend probe

/// What the session does after feeding a probe the backend's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeStep {
    /// Write these bytes (possibly none) to the backend and keep reading.
    Send(Vec<u8>),
    /// The backend's EHLO extensions, one keyword with its parameters each. Send
    /// [`PROBE_QUIT`] and close.
    Done(Vec<String>),
    /// The backend refused or spoke nonsense; close and report the reason.
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeState {
    Greeting,
    Ehlo,
    Finished,
}

/// Learns the extensions a backend announces, for the EHLO reply of an opportunistic
/// listener (static lists drift from the truth).
pub struct Probe {
    hostname: String,
    state: ProbeState,
}

impl Probe {
    pub fn new(hostname: &str) -> Self {
        Probe { hostname: hostname.to_owned(), state: ProbeState::Greeting }
    }

    /// Consumes at most one backend reply; `None` means more bytes are needed (or the probe
    /// is already over).
    pub fn on_backend(&mut self, input: &mut BytesMut) -> Option<ProbeStep> {
        if self.state == ProbeState::Finished {
            return None;
        }
        let reply = match take_reply(input, PROBE_MAX_LINE, PROBE_MAX_REPLY) {
            Frame::Incomplete => return None,
            Frame::Bad(why) => return Some(self.fail(why.to_owned())),
            Frame::Complete(reply) => reply,
        };
        let step = match self.state {
            ProbeState::Greeting if reply.is_positive() => {
                self.state = ProbeState::Ehlo;
                return Some(ProbeStep::Send(format!("EHLO {}\r\n", self.hostname).into_bytes()));
            }
            ProbeState::Greeting => self.fail(format!("greeting refused: {}", reply.first_line())),
            ProbeState::Ehlo if reply.is(b"250") => {
                ProbeStep::Done(reply.texts().skip(1).filter_map(extension_text).collect())
            }
            ProbeState::Ehlo => self.fail(format!("EHLO refused: {}", reply.first_line())),
            ProbeState::Finished => return None,
        };
        self.state = ProbeState::Finished;
        Some(step)
    }

    fn fail(&mut self, why: String) -> ProbeStep {
        self.state = ProbeState::Finished;
        ProbeStep::Failed(why)
    }
}

impl super::CapabilityProbe for Probe {
    fn on_backend(&mut self, input: &mut BytesMut) -> Option<ProbeStep> {
        Probe::on_backend(self, input)
    }

    fn quit(&self) -> &'static [u8] {
        PROBE_QUIT
    }
}

/// An extension line as text, or `None` when it is empty or not plain ASCII.
fn extension_text(text: &[u8]) -> Option<String> {
    let text = text.trim_ascii();
    let plain = !text.is_empty() && text.iter().all(|&b| b.is_ascii_graphic() || b == b' ');
    plain.then(|| std::str::from_utf8(text).ok().map(str::to_owned)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings { hostname: "mx.test".to_owned(), ..Settings::default() }
    }

    #[test]
    fn only_login_attempts_count_as_refused_logins() {
        // The session counts these in metrics; other refusals must not inflate them.
        let mut pre = SmtpPreTls::new(&settings());
        for command in [
            &b"EHLO x\r\n"[..],
            &b"AUTH PLAIN eHh4\r\n"[..],
            &b"MAIL FROM:<a@b>\r\n"[..],
            &b"auth login\r\n"[..],
            &b"BOGUS\r\n"[..],
        ] {
            assert!(pre.on_client(&mut BytesMut::from(command)).is_some(), "{command:?}");
        }
        assert_eq!(pre.refused_logins(), 2);
    }

    fn opportunistic() -> Settings {
        Settings {
            require_tls: false,
            backend_extensions: Arc::from(vec![
                "PIPELINING".to_owned(),
                "SIZE 10240000".to_owned(),
                "AUTH PLAIN LOGIN".to_owned(),
                "auth=login".to_owned(),
                "STARTTLS".to_owned(),
                "XCLIENT NAME ADDR".to_owned(),
                "xforward name".to_owned(),
                "8BITMIME".to_owned(),
                "SMTPUTF8".to_owned(),
                "CHUNKING".to_owned(),
            ]),
            ..settings()
        }
    }

    fn buf(bytes: &[u8]) -> BytesMut {
        BytesMut::from(bytes)
    }

    fn reply(pre: &mut SmtpPreTls, bytes: &[u8]) -> PreTlsStep {
        let mut input = buf(bytes);
        pre.on_client(&mut input).expect("a whole line was sent")
    }

    fn text(step: &PreTlsStep) -> String {
        match step {
            PreTlsStep::Reply(b) | PreTlsStep::StartTls(b) | PreTlsStep::Close(b) => {
                String::from_utf8_lossy(b).into_owned()
            }
            PreTlsStep::Plaintext { replay } => String::from_utf8_lossy(replay).into_owned(),
        }
    }

    // --- before TLS -------------------------------------------------------------------

    #[test]
    fn greeting_names_the_host() {
        assert_eq!(SmtpPreTls::new(&settings()).greeting(), b"220 mx.test ESMTP\r\n");
    }

    #[test]
    fn required_tls_ehlo_offers_only_starttls() {
        // Row 13.
        let mut pre = SmtpPreTls::new(&Settings {
            backend_extensions: opportunistic().backend_extensions,
            ..settings()
        });
        assert_eq!(
            reply(&mut pre, b"EHLO t\r\n"),
            PreTlsStep::Reply(b"250-mx.test\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n".to_vec())
        );
    }

    #[test]
    fn opportunistic_ehlo_mirrors_backend_without_auth_or_proxy_extensions() {
        let mut pre = SmtpPreTls::new(&opportunistic());
        assert_eq!(
            text(&reply(&mut pre, b"ehlo client.example\r\n")),
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n\
             250-SMTPUTF8\r\n250-CHUNKING\r\n250 STARTTLS\r\n"
        );
    }

    #[test]
    fn opportunistic_ehlo_without_known_extensions_offers_starttls() {
        let mut pre = SmtpPreTls::new(&Settings { require_tls: false, ..settings() });
        assert_eq!(text(&reply(&mut pre, b"EHLO t\r\n")), "250-mx.test\r\n250 STARTTLS\r\n");
    }

    #[test]
    fn helo_gets_a_single_line() {
        let mut pre = SmtpPreTls::new(&settings());
        assert_eq!(text(&reply(&mut pre, b"HELO t\n")), "250 mx.test\r\n");
    }

    #[test]
    fn ehlo_and_helo_without_domain_get_501() {
        let mut pre = SmtpPreTls::new(&settings());
        assert_eq!(text(&reply(&mut pre, b"EHLO\r\n")), "501 5.5.4 Syntax: EHLO hostname\r\n");
        assert_eq!(text(&reply(&mut pre, b"EHLO  \r\n")), "501 5.5.4 Syntax: EHLO hostname\r\n");
        assert_eq!(text(&reply(&mut pre, b"helo\r\n")), "501 5.5.4 Syntax: HELO hostname\r\n");
        assert_eq!(pre.errors, 3);
    }

    #[test]
    fn starttls_answers_220_and_stops_reading_lines() {
        // Rows 1, 2, 6: everything behind STARTTLS stays for rustls, byte for byte.
        let tail = b"EHLO inj\r\nAUTH PLAIN AGEAYg==\r\nMAIL FROM:<a@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n";
        for settings in [settings(), opportunistic()] {
            let mut pre = SmtpPreTls::new(&settings);
            let mut input = buf(b"STARTTLS\r\n");
            input.extend_from_slice(tail);
            assert_eq!(
                pre.on_client(&mut input),
                Some(PreTlsStep::StartTls(b"220 2.0.0 Ready to start TLS\r\n".to_vec()))
            );
            assert_eq!(&input[..], &tail[..]);
            assert_eq!(pre.on_client(&mut input), None);
            assert_eq!(&input[..], &tail[..], "never looked at again");
        }
    }

    #[test]
    fn bytes_arriving_after_starttls_are_never_read() {
        // Row 8: a second quick segment.
        let mut pre = SmtpPreTls::new(&settings());
        let mut input = buf(b"STARTTLS\r\n");
        assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
        input.extend_from_slice(b"EHLO inj\r\n");
        assert_eq!(pre.on_client(&mut input), None);
        assert_eq!(&input[..], b"EHLO inj\r\n");
    }

    #[test]
    fn starttls_case_and_framing_variants_stop_reading_lines() {
        // Row 9.
        for first in [&b"starttls\r\n"[..], b"StartTLS\n", b"STARTTLS \r\n", b"sTaRtTlS\n"] {
            let mut pre = SmtpPreTls::new(&settings());
            let mut input = buf(first);
            input.extend_from_slice(b"ehlo inj\n");
            assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
            assert_eq!(&input[..], b"ehlo inj\n");
        }
    }

    #[test]
    fn pipelined_ehlo_then_starttls_both_answered() {
        // Row 11.
        let mut pre = SmtpPreTls::new(&settings());
        let mut input = buf(b"EHLO t\r\nSTARTTLS\r\n");
        assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Reply(r)) if r.starts_with(b"250-")));
        assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
        assert!(input.is_empty());
    }

    #[test]
    fn starttls_with_argument_is_501() {
        // Row 24.
        let mut pre = SmtpPreTls::new(&settings());
        let mut input = buf(b"STARTTLS x\r\nNOOP\r\n");
        assert_eq!(
            pre.on_client(&mut input),
            Some(PreTlsStep::Reply(b"501 5.5.4 Syntax error (no parameters allowed)\r\n".to_vec()))
        );
        assert_eq!(pre.on_client(&mut input), Some(PreTlsStep::Reply(OK.to_vec())));
    }

    #[test]
    fn auth_before_tls_is_refused_with_530() {
        // Rows 14 and 16: never 334, on either kind of listener.
        for settings in [settings(), opportunistic()] {
            let mut pre = SmtpPreTls::new(&settings);
            for auth in [&b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"[..], b"auth login\r\n", b"AUTH\r\n"] {
                assert_eq!(text(&reply(&mut pre, auth)), "530 5.7.0 Must issue a STARTTLS command first\r\n");
            }
        }
    }

    #[test]
    fn required_tls_refuses_mail_transaction_commands_with_530() {
        // Row 15.
        let mut pre = SmtpPreTls::new(&settings());
        reply(&mut pre, b"EHLO t\r\n");
        for command in
            ["MAIL FROM:<a@b>", "RCPT TO:<a@b>", "DATA", "BDAT 10 LAST", "VRFY a", "EXPN a", "ETRN x"]
        {
            let step = reply(&mut pre, format!("{command}\r\n").as_bytes());
            assert_eq!(text(&step), "530 5.7.0 Must issue a STARTTLS command first\r\n", "{command}");
        }
        assert_eq!(reply(&mut pre, b"NOOP\r\n"), PreTlsStep::Reply(OK.to_vec()));
        assert_eq!(reply(&mut pre, b"QUIT\r\n"), PreTlsStep::Close(BYE.to_vec()));
    }

    #[test]
    fn opportunistic_mail_needs_helo_first() {
        let mut pre = SmtpPreTls::new(&opportunistic());
        assert_eq!(
            text(&reply(&mut pre, b"MAIL FROM:<a@b>\r\n")),
            "503 5.5.1 Error: send HELO/EHLO first\r\n"
        );
    }

    #[test]
    fn opportunistic_mail_switches_to_plaintext_without_consuming_it() {
        // Row 16: AUTH refused, then MAIL accepted (by the backend, replayed EHLO first).
        let mut pre = SmtpPreTls::new(&opportunistic());
        reply(&mut pre, b"EHLO first\r\n");
        let mut input = buf(b"EHLO client.example\nAUTH LOGIN\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Reply(_))));
        assert!(text(&pre.on_client(&mut input).unwrap()).starts_with("530 "));
        assert_eq!(
            pre.on_client(&mut input),
            Some(PreTlsStep::Plaintext { replay: b"EHLO client.example\r\n".to_vec() })
        );
        assert_eq!(&input[..], b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        assert_eq!(pre.on_client(&mut input), None);
    }

    #[test]
    fn opportunistic_mail_accepts_utf8_addresses() {
        let mut pre = SmtpPreTls::new(&opportunistic());
        reply(&mut pre, b"HELO t\r\n");
        let mail = "MAIL FROM:<jos\u{e9}@exampl\u{e9}.test> SMTPUTF8\r\n".as_bytes();
        assert_eq!(reply(&mut pre, mail), PreTlsStep::Plaintext { replay: b"HELO t\r\n".to_vec() });
    }

    #[test]
    fn opportunistic_transaction_commands_before_mail_are_refused() {
        let mut pre = SmtpPreTls::new(&opportunistic());
        reply(&mut pre, b"EHLO t\r\n");
        for command in [&b"RCPT TO:<a@b>\r\n"[..], b"DATA\r\n", b"BDAT 1 LAST\r\n"] {
            assert_eq!(text(&reply(&mut pre, command)), "503 5.5.1 Error: need MAIL command\r\n");
        }
        assert_eq!(text(&reply(&mut pre, b"VRFY a\r\n")), "252 2.0.0 Cannot VRFY user\r\n");
        assert_eq!(text(&reply(&mut pre, b"EXPN a\r\n")), "502 5.5.1 Command not implemented\r\n");
    }

    #[test]
    fn noop_rset_help_quit_answer_locally() {
        let mut pre = SmtpPreTls::new(&settings());
        assert_eq!(reply(&mut pre, b"noop\r\n"), PreTlsStep::Reply(OK.to_vec()));
        assert_eq!(reply(&mut pre, b"RSET\r\n"), PreTlsStep::Reply(OK.to_vec()));
        assert_eq!(text(&reply(&mut pre, b"HELP\r\n")), "214 2.0.0 See RFC 5321\r\n");
        assert_eq!(reply(&mut pre, b"quit\n"), PreTlsStep::Close(b"221 2.0.0 Bye\r\n".to_vec()));
        assert_eq!(pre.errors, 0);
    }

    #[test]
    fn unknown_and_hostile_commands_get_500() {
        // Rows 42, 46: a PROXY line or XCLIENT is just a bad command here.
        let mut pre = SmtpPreTls::new(&Settings { max_errors: 100, ..settings() });
        for line in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..],
            b"XCLIENT ADDR=1.2.3.4\r\n",
            b"XFORWARD ADDR=1.2.3.4\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\r\n",
            b"NO\0OP\r\n",
            b"NOOP\rSTARTTLS\r\n",
            "\u{e9}HLO t\r\n".as_bytes(),
            b"\x16\x03\x01\x00\xa5\n",
        ] {
            assert_eq!(text(&reply(&mut pre, line)), "500 5.5.2 Error: command not recognized\r\n");
        }
        assert_eq!(pre.errors, 9);
    }

    #[test]
    fn overlong_line_closes_and_is_never_split() {
        // Rows 34, 35.
        for l in [512usize, 1000, 2048, 4096, 8192] {
            let mut pre = SmtpPreTls::new(&settings());
            let mut input = buf(b"NOOP ");
            input.extend(std::iter::repeat_n(b'A', l - 5));
            input.extend_from_slice(b"STARTTLS\r\n");
            assert_eq!(
                pre.on_client(&mut input),
                Some(PreTlsStep::Close(b"500 5.5.2 Error: line too long\r\n".to_vec()))
            );
            assert_eq!(pre.on_client(&mut input), None);
        }
        let mut pre = SmtpPreTls::new(&settings());
        let mut input = buf(&[b'x'; 10_000]);
        assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Close(_))));
    }

    #[test]
    fn partial_line_waits_for_more() {
        let mut pre = SmtpPreTls::new(&settings());
        let mut input = buf(b"STARTT");
        assert_eq!(pre.on_client(&mut input), None);
        assert_eq!(&input[..], b"STARTT");
    }

    #[test]
    fn too_many_errors_closes_with_421() {
        let mut pre = SmtpPreTls::new(&Settings { max_errors: 2, ..settings() });
        assert!(matches!(reply(&mut pre, b"BOGUS\r\n"), PreTlsStep::Reply(_)));
        assert!(matches!(reply(&mut pre, b"AUTH PLAIN\r\n"), PreTlsStep::Reply(_)));
        assert_eq!(
            reply(&mut pre, b"MAIL FROM:<>\r\n"),
            PreTlsStep::Close(b"421 4.7.0 mx.test Error: too many errors\r\n".to_vec())
        );
    }

    #[test]
    fn too_many_commands_closes_with_421() {
        let mut pre = SmtpPreTls::new(&Settings { max_pre_tls_commands: 3, ..settings() });
        let mut input = buf(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
        for _ in 0..3 {
            assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Reply(_))));
        }
        assert_eq!(
            pre.on_client(&mut input),
            Some(PreTlsStep::Close(b"421 4.7.0 mx.test Error: too many commands\r\n".to_vec()))
        );
        assert_eq!(pre.on_client(&mut input), None);
    }

    // --- negotiation ------------------------------------------------------------------

    const EHLO_REPLY: &[u8] = b"250-backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
        250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n";

    fn negotiating(entry: Entry) -> SmtpNegotiation {
        let mut neg = SmtpNegotiation::new(&settings(), entry);
        let mut greeting = buf(b"220 backend.test ESMTP\r\n");
        assert!(neg.on_greeting(&mut greeting).is_some());
        neg
    }

    fn client(neg: &mut SmtpNegotiation, bytes: &[u8]) -> Step {
        neg.on_client(&mut buf(bytes)).expect("a whole line was sent")
    }

    fn backend(neg: &mut SmtpNegotiation, bytes: &[u8]) -> Step {
        neg.on_backend(&mut buf(bytes)).expect("a whole reply was sent")
    }

    #[test]
    fn implicit_entry_relays_multiline_greeting_verbatim() {
        // Row 29.
        let mut neg = SmtpNegotiation::new(&settings(), Entry::Implicit);
        let greeting = b"220-backend.test ESMTP\r\n220 welcome\r\n";
        let mut input = buf(b"220-backend.test ESMTP\r\n");
        assert_eq!(neg.on_greeting(&mut input), None);
        input.extend_from_slice(b"220 welcome\r\nextra");
        assert_eq!(neg.on_greeting(&mut input), Some(Step::to_client(greeting.to_vec())));
        assert_eq!(&input[..], b"extra");
    }

    #[test]
    fn after_starttls_greeting_is_swallowed() {
        // Row 25: nothing unsolicited.
        let mut neg = SmtpNegotiation::new(&settings(), Entry::AfterStartTls);
        let mut input = buf(b"220 backend.test ESMTP\r\n");
        assert_eq!(neg.on_greeting(&mut input), Some(Step::to_client(Vec::new())));
    }

    #[test]
    fn negative_or_malformed_greeting_closes_with_421() {
        for greeting in [&b"554 go away\r\n"[..], b"hello\r\n", b"220-a\r\n250 b\r\n"] {
            let mut neg = SmtpNegotiation::new(&settings(), Entry::Implicit);
            assert_eq!(
                neg.on_greeting(&mut buf(greeting)),
                Some(Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable))
            );
        }
    }

    // --- XCLIENT -----------------------------------------------------------------------

    #[test]
    fn xtext_escapes_plus_equals_and_non_printables() {
        assert_eq!(xtext(b"client.example"), b"client.example");
        assert_eq!(xtext(b"[UNAVAILABLE]"), b"[UNAVAILABLE]");
        assert_eq!(xtext(b"a+b=c"), b"a+2Bb+3Dc");
        assert_eq!(xtext(b"x y\r\nXCLIENT"), b"x+20y+0D+0AXCLIENT");
        assert_eq!(xtext(b"\x7f\x00\xff~!"), b"+7F+00+FF~!");
        assert_eq!(xtext(b""), b"");
    }

    #[test]
    fn xclient_command_names_address_port_and_helo() {
        let v4: SocketAddr = "192.0.2.7:50123".parse().unwrap();
        assert_eq!(
            xclient_command(v4, None),
            b"XCLIENT ADDR=192.0.2.7 PORT=50123 NAME=[UNAVAILABLE]\r\n".to_vec()
        );
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:25".parse().unwrap();
        assert_eq!(
            xclient_command(mapped, None),
            b"XCLIENT ADDR=192.0.2.7 PORT=25 NAME=[UNAVAILABLE]\r\n".to_vec()
        );
        let v6: SocketAddr = "[2001:db8::1]:587".parse().unwrap();
        assert_eq!(
            xclient_command(v6, Some(b"h=x+y")),
            b"XCLIENT ADDR=IPV6:2001:db8::1 PORT=587 NAME=[UNAVAILABLE] HELO=h+3Dx+2By\r\n".to_vec()
        );
        assert_eq!(helo_name(b"EHLO client.example\r\n"), Some(&b"client.example"[..]));
        assert_eq!(helo_name(b"helo  [192.0.2.1] junk\r\n"), Some(&b"[192.0.2.1]"[..]));
        assert_eq!(helo_name(b"EHLO\r\n"), None);
    }

    fn with_xclient(base: Settings) -> Settings {
        Settings { xclient: true, client: Some("192.0.2.7:4242".parse().unwrap()), ..base }
    }

    const XCLIENT_LINE: &[u8] = b"XCLIENT ADDR=192.0.2.7 PORT=4242 NAME=[UNAVAILABLE]\r\n";

    #[test]
    fn implicit_xclient_then_220_relays_the_original_greeting() {
        let mut neg = SmtpNegotiation::new(&with_xclient(settings()), Entry::Implicit);
        let mut input = buf(b"220 backend.test ESMTP first\r\n");
        assert_eq!(neg.on_greeting(&mut input), Some(Step::to_backend(XCLIENT_LINE.to_vec())));
        // The client's early command waits until the backend has accepted XCLIENT.
        assert_eq!(neg.on_client(&mut buf(b"EHLO c\r\n")), None);
        let step = backend(&mut neg, b"220 backend.test ESMTP second\r\n");
        assert_eq!(step, Step::to_client(b"220 backend.test ESMTP first\r\n".to_vec()));
        assert_eq!(client(&mut neg, b"EHLO c\r\n"), Step::to_backend(b"EHLO c\r\n".to_vec()));
    }

    #[test]
    fn after_starttls_xclient_reply_is_swallowed_like_the_greeting() {
        let mut neg = SmtpNegotiation::new(&with_xclient(settings()), Entry::AfterStartTls);
        assert_eq!(
            neg.on_greeting(&mut buf(b"220-backend.test\r\n220 ESMTP\r\n")),
            Some(Step::to_backend(XCLIENT_LINE.to_vec()))
        );
        assert_eq!(backend(&mut neg, b"220-again\r\n220 ESMTP\r\n"), Step::to_client(Vec::new()));
        assert_eq!(neg.phase, Phase::Idle);
    }

    #[test]
    fn refused_xclient_ends_the_session_with_421() {
        for refusal in
            [&b"550 5.7.0 Error: insufficient authorization\r\n"[..], b"501 5.5.4 Bad attribute\r\n"]
        {
            let mut neg = SmtpNegotiation::new(&with_xclient(settings()), Entry::Implicit);
            neg.on_greeting(&mut buf(b"220 b\r\n"));
            assert_eq!(
                backend(&mut neg, refusal),
                Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
            );
            assert_eq!(neg.on_client(&mut buf(b"EHLO c\r\n")), None);
        }
    }

    #[test]
    fn plaintext_xclient_carries_the_replayed_helo_then_replays_it() {
        let replay = b"EHLO client.example\r\n".to_vec();
        let mut neg =
            SmtpNegotiation::new(&with_xclient(safe_backend()), Entry::Plaintext { replay: replay.clone() });
        let xclient = b"XCLIENT ADDR=192.0.2.7 PORT=4242 NAME=[UNAVAILABLE] HELO=client.example\r\n";
        assert_eq!(neg.on_greeting(&mut buf(b"220 b\r\n")), Some(Step::to_backend(xclient.to_vec())));
        assert_eq!(backend(&mut neg, b"220 b\r\n"), Step::to_backend(replay));
        assert_eq!(
            backend(&mut neg, b"250-b\r\n250 SIZE 1\r\n"),
            Step::to_client(Vec::new()).then(Next::Relay)
        );
    }

    #[test]
    fn no_xclient_without_the_setting_or_the_address() {
        let no_address = Settings { client: None, ..with_xclient(settings()) };
        let not_enabled = Settings { xclient: false, ..with_xclient(settings()) };
        for s in [no_address, not_enabled] {
            let mut neg = SmtpNegotiation::new(&s, Entry::Implicit);
            assert_eq!(neg.on_greeting(&mut buf(b"220 b\r\n")), Some(Step::to_client(b"220 b\r\n".to_vec())));
        }
    }

    /// A backend the probe showed to offer no AUTH, XCLIENT or XFORWARD.
    fn safe_backend() -> Settings {
        Settings {
            require_tls: false,
            backend_extensions: Arc::from(vec!["PIPELINING".to_owned(), "SIZE 10240000".to_owned()]),
            ..settings()
        }
    }

    #[test]
    fn plaintext_entry_replays_helo_swallows_reply_then_relays() {
        let replay = b"EHLO client.example\r\n".to_vec();
        let mut neg = SmtpNegotiation::new(&safe_backend(), Entry::Plaintext { replay: replay.clone() });
        let mut mail = buf(b"MAIL FROM:<a@b>\r\n");
        assert_eq!(neg.on_client(&mut mail), None, "nothing before the replay is answered");
        assert_eq!(neg.on_greeting(&mut buf(b"220 backend ESMTP\r\n")), Some(Step::to_backend(replay)));
        assert_eq!(neg.on_client(&mut mail), None);
        assert_eq!(neg.on_backend(&mut buf(EHLO_REPLY)), Some(Step::to_client(Vec::new()).then(Next::Relay)));
        assert_eq!(&mail[..], b"MAIL FROM:<a@b>\r\n", "left for the relay");
    }

    #[test]
    fn plaintext_entry_relays_even_after_negative_replay_reply() {
        let mut neg =
            SmtpNegotiation::new(&safe_backend(), Entry::Plaintext { replay: b"HELO x\r\n".to_vec() });
        neg.on_greeting(&mut buf(b"220 b\r\n"));
        assert_eq!(backend(&mut neg, b"501 no\r\n").next, Next::Relay);
    }

    #[test]
    fn ehlo_reply_loses_starttls_and_proxy_extensions_keeps_auth() {
        // Rows 25, 47.
        let mut neg = negotiating(Entry::AfterStartTls);
        assert_eq!(client(&mut neg, b"EHLO post\r\n"), Step::to_backend(b"EHLO post\r\n".to_vec()));
        let step = backend(
            &mut neg,
            b"250-backend.test\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250-XCLIENT ADDR\r\n250-xforward name\r\n250 8BITMIME\r\n",
        );
        assert_eq!(step, Step::to_client(b"250-backend.test\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n".to_vec()));
    }

    #[test]
    fn ehlo_filter_moves_last_line_marker_when_last_line_dropped() {
        let mut neg = negotiating(Entry::Implicit);
        client(&mut neg, b"ehlo t\r\n");
        assert_eq!(
            backend(&mut neg, b"250-b\r\n250-SIZE 1\r\n250 STARTTLS\r\n"),
            Step::to_client(b"250-b\r\n250 SIZE 1\r\n".to_vec())
        );
        client(&mut neg, b"EHLO t\r\n");
        assert_eq!(backend(&mut neg, b"250-b\n250 STARTTLS\n"), Step::to_client(b"250 b\r\n".to_vec()));
    }

    #[test]
    fn ehlo_reply_without_hidden_extensions_is_unchanged() {
        let mut neg = negotiating(Entry::Implicit);
        client(&mut neg, b"EHLO t\r\n");
        assert_eq!(backend(&mut neg, EHLO_REPLY), Step::to_client(EHLO_REPLY.to_vec()));
    }

    #[test]
    fn starttls_after_tls_is_refused_locally() {
        // Row 30.
        let mut neg = negotiating(Entry::AfterStartTls);
        for line in [&b"STARTTLS\r\n"[..], b"starttls x\n"] {
            assert_eq!(
                client(&mut neg, line),
                Step::to_client(b"503 5.5.1 Error: TLS already active\r\n".to_vec())
            );
        }
        assert_eq!(client(&mut neg, b"NOOP\r\n"), Step::to_backend(b"NOOP\r\n".to_vec()));
    }

    #[test]
    fn xclient_and_xforward_are_never_forwarded() {
        // Row 46.
        let mut neg = negotiating(Entry::Implicit);
        for line in [&b"XCLIENT ADDR=6.6.6.6\r\n"[..], b"xforward ADDR=6.6.6.6\r\n"] {
            assert_eq!(
                client(&mut neg, line),
                Step::to_client(b"550 5.7.0 Error: not authorized\r\n".to_vec())
            );
        }
    }

    #[test]
    fn lock_step_holds_next_command_until_reply() {
        let mut neg = negotiating(Entry::AfterStartTls);
        let mut input = buf(b"NOOP\r\nSTARTTLS\r\n");
        assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"NOOP\r\n".to_vec())));
        assert_eq!(neg.on_client(&mut input), None, "STARTTLS refusal would overtake the 250");
        let mut reply = buf(b"250 2.0.0 Ok\r\n");
        assert_eq!(neg.on_backend(&mut reply), Some(Step::to_client(b"250 2.0.0 Ok\r\n".to_vec())));
        assert_eq!(neg.on_client(&mut input).map(|s| s.to_client), Some(TLS_ALREADY_ACTIVE.to_vec()));
    }

    #[test]
    fn auth_exchange_forwards_sasl_responses_and_relays_on_235() {
        let mut neg = negotiating(Entry::AfterStartTls);
        assert_eq!(client(&mut neg, b"AUTH LOGIN\r\n"), Step::to_backend(b"AUTH LOGIN\r\n".to_vec()));
        assert_eq!(
            backend(&mut neg, b"334 VXNlcm5hbWU6\r\n"),
            Step::to_client(b"334 VXNlcm5hbWU6\r\n".to_vec())
        );
        // A response that looks like a command is still a SASL response.
        assert_eq!(client(&mut neg, b"STARTTLS\r\n"), Step::to_backend(b"STARTTLS\r\n".to_vec()));
        assert_eq!(backend(&mut neg, b"334 UGFzc3dvcmQ6\r\n").next, Next::Negotiate);
        assert_eq!(client(&mut neg, b"c2VjcmV0\n"), Step::to_backend(b"c2VjcmV0\r\n".to_vec()));
        assert_eq!(
            backend(&mut neg, b"235 2.7.0 Authentication successful\r\n"),
            Step::to_client(b"235 2.7.0 Authentication successful\r\n".to_vec()).then(Next::Relay)
        );
        assert_eq!(neg.on_client(&mut buf(b"MAIL FROM:<a@b>\r\n")), None, "the relay owns it now");
    }

    #[test]
    fn auth_cancel_or_failure_returns_to_commands() {
        let mut neg = negotiating(Entry::AfterStartTls);
        client(&mut neg, b"AUTH PLAIN\r\n");
        backend(&mut neg, b"334 \r\n");
        assert_eq!(client(&mut neg, b"*\r\n"), Step::to_backend(b"*\r\n".to_vec()));
        assert_eq!(backend(&mut neg, b"501 5.7.0 Authentication aborted\r\n").next, Next::Negotiate);
        assert_eq!(client(&mut neg, b"STARTTLS\r\n").to_client, TLS_ALREADY_ACTIVE.to_vec());
        client(&mut neg, b"AUTH PLAIN AGEAYg==\r\n");
        assert_eq!(backend(&mut neg, b"535 5.7.8 bad\r\n").next, Next::Negotiate);
        assert_eq!(client(&mut neg, b"NOOP\r\n"), Step::to_backend(b"NOOP\r\n".to_vec()));
    }

    #[test]
    fn rfc4954_long_auth_line_is_forwarded_intact() {
        // Row 33.
        let mut neg = negotiating(Entry::AfterStartTls);
        let mut line = b"AUTH PLAIN ".to_vec();
        line.extend(std::iter::repeat_n(b'Q', 12_000));
        line.extend_from_slice(b"\r\n");
        assert_eq!(client(&mut neg, &line), Step::to_backend(line.clone()));
    }

    #[test]
    fn mail_ends_negotiation_at_once() {
        let mut neg = negotiating(Entry::Implicit);
        let mut input = buf(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        assert_eq!(
            neg.on_client(&mut input),
            Some(Step::to_backend(b"MAIL FROM:<a@b>\r\n".to_vec()).then(Next::Relay))
        );
        assert_eq!(&input[..], b"RCPT TO:<c@d>\r\n");
    }

    #[test]
    fn negotiation_overlong_line_closes() {
        // Row 35 at the negotiation bound: never split into a STARTTLS.
        let mut neg = SmtpNegotiation::new(&Settings { max_line: 64, ..settings() }, Entry::AfterStartTls);
        neg.on_greeting(&mut buf(b"220 b\r\n"));
        let mut input = buf(b"NOOP ");
        input.extend(std::iter::repeat_n(b'A', 64));
        input.extend_from_slice(b"STARTTLS\r\n");
        assert_eq!(
            neg.on_client(&mut input),
            Some(Step::to_client(LINE_TOO_LONG.to_vec()).then(Next::Close))
        );
    }

    #[test]
    fn negotiation_too_many_errors_closes() {
        let mut neg = SmtpNegotiation::new(&Settings { max_errors: 1, ..settings() }, Entry::AfterStartTls);
        neg.on_greeting(&mut buf(b"220 b\r\n"));
        assert_eq!(client(&mut neg, b"STARTTLS\r\n").next, Next::Negotiate);
        assert_eq!(
            client(&mut neg, b"XCLIENT ADDR=1.2.3.4\r\n"),
            Step::to_client(b"421 4.7.0 mx.test Error: too many errors\r\n".to_vec()).then(Next::Close)
        );
    }

    #[test]
    fn malformed_or_overlong_backend_reply_closes() {
        let mut neg = negotiating(Entry::AfterStartTls);
        client(&mut neg, b"NOOP\r\n");
        assert_eq!(
            backend(&mut neg, b"2x0 what\r\n"),
            Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
        );
        let mut neg = SmtpNegotiation::new(&Settings { max_line: 32, ..settings() }, Entry::Implicit);
        neg.on_greeting(&mut buf(b"220 b\r\n"));
        let mut long = buf(b"250 ");
        long.extend(std::iter::repeat_n(b'x', 40));
        assert_eq!(neg.on_backend(&mut long).map(|s| s.next), Some(Next::Unavailable));
    }

    #[test]
    fn multiline_reply_waits_until_complete() {
        let mut neg = negotiating(Entry::AfterStartTls);
        client(&mut neg, b"HELP\r\n");
        let mut input = buf(b"214-a\r\n214-b\r\n");
        assert_eq!(neg.on_backend(&mut input), None);
        assert_eq!(input.len(), 14, "nothing consumed");
        input.extend_from_slice(b"214\r\n");
        assert_eq!(neg.on_backend(&mut input).map(|s| s.to_client.len()), Some(19));
    }

    #[test]
    fn unsolicited_backend_reply_is_relayed_filtered() {
        let mut neg = negotiating(Entry::AfterStartTls);
        assert_eq!(
            backend(&mut neg, b"421 4.4.2 timeout\r\n"),
            Step::to_client(b"421 4.4.2 timeout\r\n".to_vec())
        );
        assert_eq!(backend(&mut neg, b"250-x\r\n250 STARTTLS\r\n"), Step::to_client(b"250 x\r\n".to_vec()));
    }

    #[test]
    fn farewells_are_421() {
        assert_eq!(
            farewell(Farewell::BackendUnavailable),
            b"421 4.3.2 Service not available, closing transmission channel\r\n"
        );
        assert_eq!(farewell(Farewell::Timeout), b"421 4.4.2 Error: timeout exceeded\r\n");
        assert_eq!(farewell(Farewell::ShuttingDown), b"421 4.3.2 Server shutting down\r\n");
    }

    // --- guarded plaintext ------------------------------------------------------------

    const GUARDED_EHLO: &[u8] = b"250-backend.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n\
        250-AUTH PLAIN LOGIN\r\n250-auth=login\r\n250-XCLIENT NAME ADDR\r\n250-CHUNKING\r\n250 xforward name\r\n";

    /// A plaintext session in front of `settings`'s backend, past the replayed EHLO (its
    /// reply `replay_reply`), ready for the client's commands.
    fn plaintext_with(settings: &Settings, replay_reply: &[u8]) -> SmtpNegotiation {
        let mut neg = SmtpNegotiation::new(settings, Entry::Plaintext { replay: b"EHLO c\r\n".to_vec() });
        assert_eq!(
            neg.on_greeting(&mut buf(b"220 b ESMTP\r\n")),
            Some(Step::to_backend(b"EHLO c\r\n".to_vec()))
        );
        assert_eq!(neg.on_backend(&mut buf(replay_reply)), Some(Step::to_client(Vec::new())), "guarded");
        assert_eq!(neg.phase, Phase::Idle);
        neg
    }

    /// Guarded: the backend offers AUTH (and CHUNKING, for BDAT).
    fn guarded() -> SmtpNegotiation {
        plaintext_with(&opportunistic(), GUARDED_EHLO)
    }

    /// Guarded, with `bare_newline = "reject"`.
    fn guarded_rejecting() -> SmtpNegotiation {
        plaintext_with(&Settings { bare_newline: BareNewline::Reject, ..opportunistic() }, GUARDED_EHLO)
    }

    /// Feeds `pieces` one at a time as they would arrive, collecting every step; the input
    /// buffer is left as it ends.
    fn feed(neg: &mut SmtpNegotiation, input: &mut BytesMut, pieces: &[&[u8]]) -> Vec<Step> {
        let mut steps = Vec::new();
        for piece in pieces {
            input.extend_from_slice(piece);
            while let Some(step) = neg.on_client(input) {
                steps.push(step);
            }
        }
        steps
    }

    fn sent_to_backend(steps: &[Step]) -> Vec<u8> {
        steps.iter().flat_map(|s| s.to_backend.iter().copied()).collect()
    }

    #[test]
    fn plaintext_mode_choice_follows_backend_extensions() {
        // Opaque only when the backend is known and offers none of AUTH, XCLIENT, XFORWARD.
        let relay = |extensions: &[&str]| {
            let settings = Settings {
                require_tls: false,
                backend_extensions: Arc::from(extensions.iter().map(|e| e.to_string()).collect::<Vec<_>>()),
                ..settings()
            };
            let mut neg =
                SmtpNegotiation::new(&settings, Entry::Plaintext { replay: b"EHLO c\r\n".to_vec() });
            neg.on_greeting(&mut buf(b"220 b\r\n"));
            neg.on_backend(&mut buf(b"250 b\r\n")).map(|step| step.next)
        };
        assert_eq!(relay(&["SIZE 1", "8BITMIME", "STARTTLS", "CHUNKING"]), Some(Next::Relay));
        assert_eq!(relay(&["SIZE 1", "AUTHX"]), Some(Next::Relay), "not an AUTH keyword");
        for guarded in [
            &[][..],
            &["SIZE 1", "AUTH PLAIN"][..],
            &["auth=login"][..],
            &["AUTH"][..],
            &["8BITMIME", "xclient ADDR"][..],
            &["XFORWARD NAME"][..],
        ] {
            assert_eq!(relay(guarded), Some(Next::Negotiate), "{guarded:?}");
        }
    }

    #[test]
    fn guarded_refuses_auth_starttls_xclient_locally() {
        let mut neg = guarded();
        for line in [&b"AUTH PLAIN AGxhdGVtYXJrZXIAc2VjcmV0\r\n"[..], b"auth login\n", b"AUTH\r\n"] {
            assert_eq!(client(&mut neg, line), Step::to_client(TLS_FIRST.to_vec()), "{line:?}");
        }
        assert_eq!(
            client(&mut neg, b"STARTTLS\r\n"),
            Step::to_client(b"454 4.7.0 TLS not available now\r\n".to_vec())
        );
        for line in [&b"XCLIENT ADDR=6.6.6.6\r\n"[..], b"xforward ADDR=6.6.6.6\r\n"] {
            assert_eq!(client(&mut neg, line), Step::to_client(NOT_AUTHORIZED.to_vec()));
        }
        assert_eq!(neg.errors, 6, "each refusal counts");
        assert_eq!(client(&mut neg, b"NOOP\r\n"), Step::to_backend(b"NOOP\r\n".to_vec()));
    }

    #[test]
    fn guarded_auth_refusals_are_bounded() {
        let settings = Settings { max_errors: 2, ..opportunistic() };
        let mut neg = plaintext_with(&settings, GUARDED_EHLO);
        client(&mut neg, b"AUTH LOGIN\r\n");
        client(&mut neg, b"AUTH LOGIN\r\n");
        assert_eq!(client(&mut neg, b"AUTH LOGIN\r\n").next, Next::Close);
    }

    #[test]
    fn guarded_ehlo_reply_loses_auth_starttls_and_proxy_extensions() {
        let mut neg = guarded();
        assert_eq!(client(&mut neg, b"EHLO again\r\n"), Step::to_backend(b"EHLO again\r\n".to_vec()));
        assert_eq!(
            backend(&mut neg, GUARDED_EHLO),
            Step::to_client(b"250-backend.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n".to_vec())
        );
        // The last line dropped: the marker moves; nothing left but the name.
        client(&mut neg, b"EHLO again\r\n");
        assert_eq!(
            backend(&mut neg, b"250-b\r\n250-AUTH=PLAIN\r\n250 AUTH PLAIN\r\n"),
            Step::to_client(b"250 b\r\n".to_vec())
        );
        // Unsolicited replies are filtered the same way.
        assert_eq!(backend(&mut neg, b"250-b\r\n250 AUTH X\r\n"), Step::to_client(b"250 b\r\n".to_vec()));
    }

    #[test]
    fn guarded_never_relays_and_forwards_commands_lock_step() {
        let mut neg = guarded();
        let mut input = buf(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nAUTH PLAIN x\r\nRSET\r\n");
        let mail = neg.on_client(&mut input);
        assert_eq!(mail, Some(Step::to_backend(b"MAIL FROM:<a@b>\r\n".to_vec())), "no Next::Relay");
        assert_eq!(neg.on_client(&mut input), None, "RCPT waits for MAIL's reply");
        assert_eq!(backend(&mut neg, b"250 2.1.0 Ok\r\n"), Step::to_client(b"250 2.1.0 Ok\r\n".to_vec()));
        assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"RCPT TO:<c@d>\r\n".to_vec())));
        assert_eq!(neg.on_client(&mut input), None, "the AUTH refusal would overtake RCPT's reply");
        assert_eq!(backend(&mut neg, b"250 2.1.5 Ok\r\n").next, Next::Negotiate);
        assert_eq!(neg.on_client(&mut input), Some(Step::to_client(TLS_FIRST.to_vec())));
        assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"RSET\r\n".to_vec())));
        assert_eq!(backend(&mut neg, b"250 2.0.0 Ok\r\n").next, Next::Negotiate);
        for line in [&b"QUIT\r\n"[..], b"NOOP\r\n", b"VRFY a\r\n", b"HELP\r\n", b"BOGUS x\r\n"] {
            assert_eq!(client(&mut neg, line), Step::to_backend(line.to_vec()));
            assert_eq!(backend(&mut neg, b"250 ok\r\n"), Step::to_client(b"250 ok\r\n".to_vec()));
        }
    }

    #[test]
    fn guarded_after_negative_replay_reply_still_guards() {
        let mut neg = plaintext_with(&opportunistic(), b"554 5.7.1 go away\r\n");
        assert_eq!(client(&mut neg, b"MAIL FROM:<a@b>\r\n").next, Next::Negotiate);
        assert_eq!(backend(&mut neg, b"503 5.5.1 no\r\n").next, Next::Negotiate);
        assert_eq!(client(&mut neg, b"AUTH PLAIN x\r\n").to_client, TLS_FIRST.to_vec());
    }

    /// DATA through to the 354, ready for the body.
    fn in_data(neg: &mut SmtpNegotiation) {
        assert_eq!(client(neg, b"DATA\r\n"), Step::to_backend(b"DATA\r\n".to_vec()));
        assert_eq!(backend(neg, b"354 go ahead\r\n"), Step::to_client(b"354 go ahead\r\n".to_vec()));
        assert_eq!(neg.phase, Phase::DataBody { answered: false });
    }

    #[test]
    fn guarded_data_body_is_streamed_unexamined_up_to_the_marker() {
        let body: &[u8] = b"Subject: x\r\n\r\nAUTH PLAIN eHh4\r\nXCLIENT ADDR=6.6.6.6\r\n..\r\n.dot\r\n\
            STARTTLS\r\n.\r\n";
        let after: &[u8] = b"QUIT\r\n";
        let mut whole = body.to_vec();
        whole.extend_from_slice(after);
        // Every split of body+QUIT into two pieces, the marker's five octets included.
        for cut in 0..=whole.len() {
            let mut neg = guarded();
            in_data(&mut neg);
            let mut input = BytesMut::new();
            let steps = feed(&mut neg, &mut input, &[&whole[..cut], &whole[cut..]]);
            assert!(steps.iter().all(|s| s.to_client.is_empty() && s.next == Next::Negotiate), "cut {cut}");
            assert_eq!(sent_to_backend(&steps), body, "cut {cut}");
            assert_eq!(&input[..], after, "cut {cut}: QUIT waits for the reply to the body");
            assert_eq!(neg.phase, Phase::Awaiting(Pending::Other), "cut {cut}");
            assert_eq!(backend(&mut neg, b"250 queued\r\n"), Step::to_client(b"250 queued\r\n".to_vec()));
            assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(after.to_vec())), "cut {cut}");
        }
    }

    #[test]
    fn guarded_data_body_streamed_octet_by_octet() {
        let body: &[u8] = b"a\r\n..\r\n\r\n.x\r\n.\r\n";
        let mut neg = guarded();
        in_data(&mut neg);
        let pieces: Vec<&[u8]> = body.chunks(1).chain([&b"NOOP\r\n"[..]]).collect();
        let mut input = BytesMut::new();
        let steps = feed(&mut neg, &mut input, &pieces);
        assert_eq!(steps.len(), body.len(), "one step per octet: nothing held back");
        assert_eq!(sent_to_backend(&steps), body);
        assert_eq!(&input[..], b"NOOP\r\n");
    }

    /// The smuggling forms, with what would follow as commands to a lenient backend.
    const SMUGGLES: [&[u8]; 6] = [
        b"x\n.\nAUTH PLAIN eHh4\r\n",
        b"x\r\n.\nAUTH PLAIN eHh4\r\n",
        b"x\n.\r\nAUTH PLAIN eHh4\r\n",
        b"x\r.\rAUTH PLAIN eHh4\r\n",
        b"x\r\n.\r\r\nAUTH PLAIN eHh4\r\n",
        b"\n.\r\nXCLIENT ADDR=1.2.3.4\r\n",
    ];

    #[test]
    fn guarded_data_with_bare_newline_is_normalized_and_stays_in_the_body() {
        for smuggle in SMUGGLES {
            for octet_by_octet in [false, true] {
                let mut neg = guarded();
                in_data(&mut neg);
                let mut input = BytesMut::new();
                let whole = [smuggle, b"\r\n.\r\nNOOP\r\n"].concat();
                let pieces: Vec<&[u8]> =
                    if octet_by_octet { whole.chunks(1).collect() } else { vec![&whole] };
                let steps = feed(&mut neg, &mut input, &pieces);
                assert!(
                    steps.iter().all(|s| s.to_client.is_empty() && s.next == Next::Negotiate),
                    "{smuggle:?}"
                );
                let sent = sent_to_backend(&steps);
                let bare = sent.windows(2).any(|w| (w[0] == b'\r') != (w[1] == b'\n'));
                assert!(
                    !bare && !sent.starts_with(b"\n"),
                    "{smuggle:?}: {:?}",
                    String::from_utf8_lossy(&sent)
                );
                assert!(sent.ends_with(b"\r\n.\r\n"), "{smuggle:?}");
                assert_eq!(&input[..], b"NOOP\r\n", "{smuggle:?}: the body ended only at CRLF.CRLF");
                assert_eq!(neg.phase, Phase::Awaiting(Pending::Other), "{smuggle:?}");
                assert_eq!(neg.take_finding().map(|f| f.action), Some(super::super::Action::Normalized));
            }
        }
    }

    #[test]
    fn guarded_data_with_bare_newline_closes_before_the_backend_could_end_the_message() {
        // Each of these is an end of data to some lenient server (SMTP smuggling); under
        // `reject` none may reach the backend with what follows it, in one piece or octet by octet.
        for smuggle in SMUGGLES {
            for octet_by_octet in [false, true] {
                let mut neg = guarded_rejecting();
                in_data(&mut neg);
                let mut input = BytesMut::new();
                let pieces: Vec<&[u8]> =
                    if octet_by_octet { smuggle.chunks(1).collect() } else { vec![smuggle] };
                let steps = feed(&mut neg, &mut input, &pieces);
                let sent = sent_to_backend(&steps);
                let last = steps.last().expect("a closing step");
                assert_eq!(last.next, Next::Close, "{smuggle:?}");
                assert_eq!(last.to_client, super::super::smtp_guard::BARE_NEWLINE, "{smuggle:?}");
                let text = String::from_utf8_lossy(&sent);
                assert!(!text.contains("AUTH") && !text.contains("XCLIENT"), "{smuggle:?} sent {text:?}");
                assert!(
                    !sent.ends_with(b"\n"),
                    "no line end after the bare octet: {smuggle:?} sent {text:?}"
                );
                assert_eq!(neg.on_client(&mut buf(b"NOOP\r\n")), None, "nothing read after the close");
            }
        }
    }

    #[test]
    fn guarded_data_marker_right_after_354_and_dot_stuffing() {
        // An empty body: the DATA line's CRLF begins the marker.
        let mut neg = guarded();
        in_data(&mut neg);
        let mut input = buf(b".\r\nAUTH PLAIN x\r\n");
        assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b".\r\n".to_vec())));
        assert_eq!(neg.on_client(&mut input), None);
        assert_eq!(backend(&mut neg, b"250 ok\r\n").next, Next::Negotiate);
        assert_eq!(neg.on_client(&mut input), Some(Step::to_client(TLS_FIRST.to_vec())));

        // "..": a dot-stuffed line, not the end; ".\r\n" split after the dot.
        let mut neg = guarded();
        in_data(&mut neg);
        let mut input = BytesMut::new();
        let steps = feed(&mut neg, &mut input, &[b"..\r\nAUTH PLAIN x\r\n", b"..", b"\r\n.", b"\r\n"]);
        assert_eq!(sent_to_backend(&steps), b"..\r\nAUTH PLAIN x\r\n..\r\n.\r\n");
        assert!(steps.iter().all(|s| s.to_client.is_empty()), "nothing in the body was answered");
        assert_eq!(neg.phase, Phase::Awaiting(Pending::Other));
    }

    #[test]
    fn guarded_data_refused_by_backend_ends_the_command() {
        let mut neg = guarded();
        client(&mut neg, b"DATA\r\n");
        assert_eq!(backend(&mut neg, b"503 5.5.1 need RCPT\r\n").next, Next::Negotiate);
        assert_eq!(neg.phase, Phase::Idle);
        assert_eq!(client(&mut neg, b"AUTH PLAIN x\r\n").to_client, TLS_FIRST.to_vec());
    }

    #[test]
    fn guarded_body_longer_than_any_line_bound_is_streamed() {
        let settings = Settings { max_line: 64, ..opportunistic() };
        let mut neg = plaintext_with(&settings, GUARDED_EHLO);
        in_data(&mut neg);
        let mut input = BytesMut::new();
        let long = vec![b'x'; 10_000];
        let steps = feed(&mut neg, &mut input, &[&long, &long, b"\r\n.\r\n"]);
        assert_eq!(sent_to_backend(&steps).len(), 20_005);
        assert!(input.is_empty());
        assert_eq!(neg.phase, Phase::Awaiting(Pending::Other));
    }

    #[test]
    fn guarded_early_reply_inside_content_is_the_contents_reply() {
        let mut neg = guarded();
        in_data(&mut neg);
        let mut input = buf(b"part");
        neg.on_client(&mut input);
        assert_eq!(backend(&mut neg, b"554 5.6.0 no\r\n"), Step::to_client(b"554 5.6.0 no\r\n".to_vec()));
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"\r\n.\r\n".to_vec())));
        assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"NOOP\r\n".to_vec())), "no reply owed");
    }

    #[test]
    fn guarded_bdat_chunk_is_never_interpreted() {
        let chunk: &[u8] = b"Subject: x\r\n\r\n.\r\nAUTH PLAIN x\r\n";
        let line = format!("BDAT {} LAST\r\n", chunk.len());
        for cut in 0..=chunk.len() {
            let mut neg = guarded();
            let mut input = BytesMut::new();
            let mut first = line.as_bytes().to_vec();
            first.extend_from_slice(&chunk[..cut]);
            let mut second = chunk[cut..].to_vec();
            second.extend_from_slice(b"AUTH PLAIN y\r\n");
            let steps = feed(&mut neg, &mut input, &[&first, &second]);
            let mut expected = line.as_bytes().to_vec();
            expected.extend_from_slice(chunk);
            assert_eq!(sent_to_backend(&steps), expected, "cut {cut}");
            assert!(steps.iter().all(|s| s.to_client.is_empty()), "cut {cut}: nothing answered locally");
            assert_eq!(&input[..], b"AUTH PLAIN y\r\n", "cut {cut}: held until the chunk's reply");
            assert_eq!(backend(&mut neg, b"250 2.0.0 queued\r\n").next, Next::Negotiate);
            assert_eq!(neg.on_client(&mut input), Some(Step::to_client(TLS_FIRST.to_vec())), "cut {cut}");
        }
    }

    #[test]
    fn guarded_bdat_sizes_and_syntax() {
        assert_eq!(bdat_size(Some(b"0")), Some(0));
        assert_eq!(bdat_size(Some(b"12 last")), Some(12));
        assert_eq!(bdat_size(Some(b"18446744073709551615")), Some(u64::MAX));
        for bad in [
            &b"18446744073709551616"[..],
            b"",
            b"-1",
            b"+1",
            b"1 LAST x",
            b"1  LAST",
            b"1 MORE",
            b" 1",
            b"0x10",
        ] {
            assert_eq!(bdat_size(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(bdat_size(None), None);

        let mut neg = guarded();
        assert_eq!(client(&mut neg, b"BDAT x\r\n"), Step::to_client(BDAT_SYNTAX.to_vec()));
        assert_eq!(client(&mut neg, b"BDAT 99999999999999999999\r\n"), Step::to_client(BDAT_SYNTAX.to_vec()));
        // An empty last chunk: the line alone, then its reply.
        assert_eq!(client(&mut neg, b"BDAT 0 LAST\r\n"), Step::to_backend(b"BDAT 0 LAST\r\n".to_vec()));
        assert_eq!(neg.phase, Phase::Awaiting(Pending::Other));
        // A huge chunk streams whatever comes, never buffered.
        backend(&mut neg, b"250 ok\r\n");
        client(&mut neg, b"BDAT 18446744073709551615\r\n");
        let mut input = buf(&[b'z'; 5000]);
        assert_eq!(neg.on_client(&mut input).map(|s| s.to_backend.len()), Some(5000));
        assert!(input.is_empty());
        assert_eq!(neg.phase, Phase::Chunk { remaining: u64::MAX - 5000, answered: false });
    }

    #[test]
    fn guarded_bdat_only_when_the_backend_announced_chunking() {
        // Without CHUNKING the backend would read the chunk as commands: refused here.
        let mut neg = plaintext_with(&opportunistic(), b"250-b\r\n250 AUTH PLAIN\r\n");
        assert_eq!(client(&mut neg, b"BDAT 14 LAST\r\n"), Step::to_client(NOT_IMPLEMENTED.to_vec()));
        assert_eq!(client(&mut neg, b"AUTH PLAIN x\r\n"), Step::to_client(TLS_FIRST.to_vec()));
        // A later EHLO reply decides anew; HELO's announces nothing.
        client(&mut neg, b"EHLO c\r\n");
        backend(&mut neg, b"250-b\r\n250 CHUNKING\r\n");
        assert_eq!(client(&mut neg, b"BDAT 1\r\n").to_backend, b"BDAT 1\r\n".to_vec());
        assert_eq!(neg.on_client(&mut buf(b"x")).map(|s| s.to_backend), Some(b"x".to_vec()));
        backend(&mut neg, b"250 ok\r\n");
        client(&mut neg, b"HELO c\r\n");
        backend(&mut neg, b"250 b\r\n");
        assert_eq!(client(&mut neg, b"BDAT 1\r\n").to_client, NOT_IMPLEMENTED.to_vec());
    }

    #[test]
    fn guarded_command_line_bound_still_applies() {
        let settings = Settings { max_line: 64, ..opportunistic() };
        let mut neg = plaintext_with(&settings, GUARDED_EHLO);
        let mut input = buf(&[b'A'; 100]);
        assert_eq!(
            neg.on_client(&mut input),
            Some(Step::to_client(LINE_TOO_LONG.to_vec()).then(Next::Close))
        );
    }

    // --- probe ------------------------------------------------------------------------

    #[test]
    fn probe_learns_backend_extensions() {
        let mut probe = Probe::new("mailtls.test");
        let mut input = buf(b"220-backend ESMTP\r\n");
        assert_eq!(probe.on_backend(&mut input), None);
        input.extend_from_slice(b"220 hi\r\n");
        assert_eq!(probe.on_backend(&mut input), Some(ProbeStep::Send(b"EHLO mailtls.test\r\n".to_vec())));
        let mut ehlo = buf(EHLO_REPLY);
        assert_eq!(
            probe.on_backend(&mut ehlo),
            Some(ProbeStep::Done(
                ["PIPELINING", "SIZE 10240000", "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES", "8BITMIME"]
                    .map(String::from)
                    .to_vec()
            ))
        );
        assert_eq!(probe.on_backend(&mut buf(b"221 bye\r\n")), None);
        assert_eq!(PROBE_QUIT, b"QUIT\r\n");
    }

    #[test]
    fn probe_fails_on_refusal_or_nonsense() {
        let mut probe = Probe::new("m");
        assert!(matches!(probe.on_backend(&mut buf(b"554 no\r\n")), Some(ProbeStep::Failed(_))));
        let mut probe = Probe::new("m");
        probe.on_backend(&mut buf(b"220 ok\r\n"));
        assert!(matches!(probe.on_backend(&mut buf(b"502 no EHLO\r\n")), Some(ProbeStep::Failed(_))));
        let mut probe = Probe::new("m");
        assert!(matches!(probe.on_backend(&mut buf(b"SSH-2.0-OpenSSH\r\n")), Some(ProbeStep::Failed(_))));
        let mut probe = Probe::new("m");
        assert!(matches!(probe.on_backend(&mut buf(&[b'2'; 70_000])), Some(ProbeStep::Failed(_))));
    }

    // --- hostile input ----------------------------------------------------------------

    use crate::protocol::testing::XorShift;

    impl XorShift {
        /// Mostly SMTP-shaped pieces, so the fuzzing reaches past the parsers.
        fn chunk(&mut self) -> Vec<u8> {
            const PIECES: [&[u8]; 25] = [
                b"EHLO x",
                b"HELO",
                b"STARTTLS",
                b"AUTH PLAIN",
                b"MAIL FROM:<>",
                b"RCPT",
                b"250-",
                b"250 ",
                b"334 ",
                b"235 ",
                b"220 ",
                b"220-",
                b"\r\n",
                b"\n",
                b"\r",
                b"\0",
                b" ",
                b"XCLIENT",
                b"*",
                b"\xff\xfe",
                b"DATA",
                b"BDAT 7",
                b"BDAT 3 LAST",
                b".",
                b"\r\n.\r\n",
            ];
            let mut out = Vec::new();
            for _ in 0..self.below(8) {
                if self.below(3) == 0 {
                    out.extend((0..self.below(40)).map(|_| self.next() as u8));
                } else {
                    out.extend_from_slice(PIECES[self.below(PIECES.len())]);
                }
            }
            out
        }
    }

    impl XorShift {
        /// Client bytes for the negotiation: sometimes whole commands, so the guarded
        /// session's DATA bodies and BDAT chunks are reached too.
        fn client_chunk(&mut self) -> Vec<u8> {
            const LINES: [&[u8]; 6] = [
                b"DATA\r\n",
                b"BDAT 7\r\n",
                b"BDAT 3 LAST\r\n",
                b"MAIL FROM:<>\r\n",
                b"x\r\n.\r\n",
                b"AUTH PLAIN eHh4\r\n",
            ];
            match self.below(3) {
                0 => LINES[self.below(LINES.len())].to_vec(),
                _ => self.chunk(),
            }
        }

        /// Backend bytes: mostly well-formed replies, so sessions live long enough to matter.
        fn backend_chunk(&mut self) -> Vec<u8> {
            const REPLIES: [&[u8]; 10] = [
                b"250-b\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n",
                b"250-b\r\n250 XCLIENT\r\n",
                b"250 ok\r\n",
                b"334 \r\n",
                b"334 VXNlcg==\n",
                b"235 2.7.0 ok\r\n",
                b"535 no\r\n",
                b"214-a\r\n",
                b"354 go ahead\r\n",
                b"250-b\r\n250-CHUNKING\r\n250 AUTH LOGIN\r\n",
            ];
            match self.below(4) {
                0 => self.chunk(),
                _ => REPLIES[self.below(REPLIES.len())].to_vec(),
            }
        }
    }

    fn fuzz_settings(rng: &mut XorShift) -> Settings {
        // Guarded (AUTH offered, or nothing known) and opaque plaintext sessions alike.
        let backend_extensions: &[&str] = match rng.below(3) {
            0 => &["SIZE 1", "AUTH X"],
            1 => &["SIZE 1", "CHUNKING"],
            _ => &[],
        };
        Settings {
            require_tls: rng.below(2) == 0,
            max_pre_tls_line: 64,
            max_line: 96,
            max_pre_tls_commands: 20,
            max_errors: 5,
            backend_extensions: Arc::from(
                backend_extensions.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            ),
            client: Some("192.0.2.9:1".parse().expect("address")),
            ..settings()
        }
    }

    #[test]
    fn random_bytes_never_panic_and_buffers_stay_bounded() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut guarded_sessions, mut bodies, mut chunks) = (0, 0, 0);
        for iteration in 0..3000 {
            // Every fifth session also sends XCLIENT; decided apart from the generator, so
            // the byte sequences stay the ones the coverage bounds below were tuned on.
            let settings = Settings { xclient: iteration % 5 == 0, ..fuzz_settings(&mut rng) };

            let mut pre = SmtpPreTls::new(&settings);
            let mut input = BytesMut::new();
            for _ in 0..10 {
                input.extend_from_slice(&rng.chunk());
                while pre.on_client(&mut input).is_some() {}
                assert!(pre.finished || input.len() < settings.max_pre_tls_line);
            }

            let entry = match rng.below(3) {
                0 => Entry::Implicit,
                1 => Entry::AfterStartTls,
                _ => Entry::Plaintext { replay: b"EHLO x\r\n".to_vec() },
            };
            let mut neg = SmtpNegotiation::new(&settings, entry);
            let (mut from_client, mut from_backend) = (BytesMut::new(), BytesMut::new());
            let reply_bound = settings.max_line * 4;
            for round in 0..20 {
                if round == 0 && rng.below(4) != 0 {
                    from_backend.extend_from_slice(b"220 ok\r\n");
                }
                from_backend.extend_from_slice(&rng.backend_chunk());
                from_client.extend_from_slice(&rng.client_chunk());
                while neg.on_greeting(&mut from_backend).is_some() {}
                while neg.on_backend(&mut from_backend).is_some() {}
                while neg.on_client(&mut from_client).is_some() {}
                guarded_sessions += usize::from(round == 0 && neg.mode == Mode::PlaintextGuarded);
                bodies += usize::from(matches!(neg.phase, Phase::DataBody { .. }));
                chunks += usize::from(matches!(neg.phase, Phase::Chunk { .. }));
                if neg.phase == Phase::Over {
                    break;
                }
                assert!(from_backend.len() < reply_bound);
                if matches!(neg.phase, Phase::Idle | Phase::SaslResponse) {
                    assert!(from_client.len() < settings.max_line);
                }
                if matches!(neg.phase, Phase::DataBody { .. } | Phase::Chunk { .. }) {
                    assert!(from_client.is_empty(), "content is streamed, never held");
                }
            }

            let mut probe = Probe::new("p");
            let mut input = BytesMut::new();
            for _ in 0..10 {
                input.extend_from_slice(&rng.chunk());
                while probe.on_backend(&mut input).is_some() {}
            }
        }
        assert!(guarded_sessions > 100 && bodies > 5 && chunks > 5, "{guarded_sessions} {bodies} {chunks}");
    }
}
