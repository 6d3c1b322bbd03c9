//! Everything mailtls knows about SMTP, IMAP and POP3 lives under this module.
//! The session drives phases; these state machines decide what each byte means.
//!
//! A session meets a protocol twice:
//! - [`PreTls`]: on a STARTTLS listener, mailtls itself speaks the plaintext dialogue
//!   (greeting, capabilities, refusals) until the client asks for TLS. No backend yet.
//! - [`Negotiation`]: after TLS (or on the opportunistic plaintext SMTP path), client and
//!   backend talk through mailtls line by line. The state machine filters capability
//!   replies, answers a repeated STARTTLS itself, and says when the client is
//!   authenticated, at which point the session hands both sockets to the opaque relay.
//! - On a routed IMAP/POP3 listener ([`Entry::Routed`]) the negotiation starts with no
//!   backend: the state machine answers the client itself until the client names its user
//!   (LOGIN, AUTHENTICATE PLAIN, USER, AUTH PLAIN), then asks the session to connect the
//!   backend for that user ([`Next::Route`]) and replays the identification to it.
//! - On a routed SMTP listener the recipient decides instead: the first RCPT of each mail
//!   transaction asks the session to route it ([`Next::Recipient`]), and the machine
//!   replays EHLO and MAIL to the backend chosen (`smtp/routed.rs`).
//!
//! The state machines do no I/O. They are fed the bytes buffered so far and return a step;
//! the session performs the writes. Every call consumes at most one unit (one command or
//! one response) from the front of the buffer and leaves the rest untouched.

pub mod imap;
pub mod line;
pub mod pop3;
pub mod sasl;
pub mod smtp;
pub mod smtp_guard;
#[cfg(test)]
mod testing;
pub mod trusted_proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use serde::Deserialize;

use crate::relay::ClientFilter;

pub use smtp_guard::BareNewline;

/// The mail protocol a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }
}

/// What a dialogue needs to know about its listener. Built once per listener.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Used in greetings and EHLO replies.
    pub hostname: String,
    /// `true` on 587/143/110: no mail transaction and no login before TLS. `false` only on
    /// SMTP (port 25): plaintext mail transfer is allowed, AUTH still never.
    pub require_tls: bool,
    /// Longest command line accepted before TLS, terminator included (SMTP: 512).
    pub max_pre_tls_line: usize,
    /// Longest line accepted during the negotiation phase after TLS; large enough for
    /// RFC 4954's 12,288-octet AUTH lines.
    pub max_line: usize,
    /// Commands a client may send before TLS; the next one ends the session.
    pub max_pre_tls_commands: u32,
    /// Errors (unknown commands, refusals, bad syntax) a client may cause in one phase
    /// before the session is ended.
    pub max_errors: u32,
    /// Largest IMAP literal accepted before authentication (`{n}` / `{n+}`), in bytes.
    pub max_literal: u64,
    /// What the backend announced, learned by a [`CapabilityProbe`]; empty when not (yet)
    /// known. SMTP (opportunistic listeners): its EHLO extensions, keywords with their
    /// parameters ("SIZE 10240000"), for the pre-TLS EHLO reply. IMAP and POP3 (routed
    /// listeners): the default backend's CAPABILITY atoms or CAPA lines, for the answers
    /// mailtls gives before any backend is chosen.
    pub backend_extensions: Arc<[String]>,
    /// `xclient = true`: tell the backend who the client is after its greeting, for
    /// backends that take no PROXY header, with the command it trusts mailtls for: SMTP
    /// XCLIENT (Postfix), POP3 XCLIENT (Dovecot), IMAP ID `x-originating-ip` (Dovecot).
    pub xclient: bool,
    /// The client's address, filled in per session (the listener's copy has `None`).
    /// Naming the client needs it; without it nothing is sent.
    pub client: Option<SocketAddr>,
    /// SMTP only: what happens to a bare CR or bare LF from the client (the smuggling guard).
    pub bare_newline: BareNewline,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            hostname: "localhost".to_owned(),
            require_tls: true,
            max_pre_tls_line: 512,
            max_line: 16 * 1024,
            max_pre_tls_commands: 100,
            max_errors: 10,
            max_literal: 64 * 1024,
            backend_extensions: Arc::from(Vec::new()),
            xclient: false,
            client: None,
            bare_newline: BareNewline::default(),
        }
    }
}

/// What the session must do after a client command before TLS.
#[derive(Debug, PartialEq, Eq)]
pub enum PreTlsStep {
    /// Send these bytes to the client and keep reading commands.
    Reply(Vec<u8>),
    /// Send these bytes (the go-ahead, e.g. `220 2.0.0 Ready to start TLS`), then start the
    /// TLS handshake. Read no further lines: whatever is still buffered is handed to rustls
    /// as the first bytes of the handshake.
    StartTls(Vec<u8>),
    /// Send these bytes (may be empty) and close the connection.
    Close(Vec<u8>),
    /// Opportunistic SMTP only: the client began a mail transaction (MAIL) in plaintext.
    /// The command that triggered this was NOT consumed and stays at the front of the
    /// buffer. The session connects the backend with a PROXY header that carries no SSL
    /// facts and continues with [`Negotiation`] entered as [`Entry::Plaintext`].
    Plaintext { replay: Vec<u8> },
}

/// The mailtls side of the plaintext dialogue on a STARTTLS listener.
pub trait PreTls: Send {
    /// The greeting sent as soon as the connection is accepted.
    fn greeting(&self) -> Vec<u8>;
    /// Consumes at most one command from the front of `input`; `None` means more bytes are
    /// needed. Enforces the line, command-count and error bounds of [`Settings`] itself
    /// (answering with a `Close` step when one is exceeded).
    fn on_client(&mut self, input: &mut BytesMut) -> Option<PreTlsStep>;
    /// Plaintext login attempts refused so far (AUTH, LOGIN, AUTHENTICATE, USER, PASS,
    /// APOP): the state machine knows which refusals they are; the session counts them.
    fn refused_logins(&self) -> u32;
}

/// How the session reached the negotiation phase; decides what happens to the greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Implicit TLS (465/993/995): the backend's greeting is relayed, capabilities filtered.
    Implicit,
    /// After STARTTLS: the client already had mailtls's greeting, so the backend's is
    /// swallowed and nothing unsolicited reaches the client.
    AfterStartTls,
    /// Opportunistic plaintext SMTP: the greeting is swallowed, `replay` (the client's own
    /// EHLO/HELO line, from [`PreTlsStep::Plaintext`]) is sent to the backend and its reply
    /// swallowed. Then the session relays opaquely ([`Next::Relay`]) only if the backend is
    /// known to offer no AUTH, XCLIENT or XFORWARD; otherwise the session stays in a guarded
    /// negotiation for its whole life, so that no plaintext AUTH or forged client address
    /// can reach the backend after the first transaction.
    Plaintext { replay: Vec<u8> },
    /// A routed IMAP/POP3 listener (`routes = "PATH"`): there is no backend yet. The session
    /// writes [`Negotiation::opening`] (mailtls's own greeting when `greet`, i.e. implicit
    /// TLS; nothing after STARTTLS) and negotiates with the client alone until the state
    /// machine says [`Next::Route`].
    ///
    /// A routed SMTP listener routes each mail transaction by its recipients instead
    /// ([`Next::Recipient`]); `helo` is the client's EHLO/HELO line when it was given before
    /// (the opportunistic plaintext path), to be replayed to every backend connected.
    Routed { greet: bool, helo: Option<Vec<u8>> },
}

/// What the session does after a [`Step`] has been written out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Stay in the negotiation phase.
    Negotiate,
    /// Negotiation is over (authenticated, or a mail transaction began where nothing more
    /// needs watching): relay opaquely.
    /// Bytes still buffered on either side are relayed first, unexamined.
    Relay,
    /// Close both connections.
    Close,
    /// The backend refused service or broke its protocol (negative greeting, refused
    /// XCLIENT, a malformed reply): `to_client` is the protocol's "unavailable" reply; the
    /// session closes both connections and counts a backend failure.
    Unavailable,
    /// Routed listeners: the client identified itself as `user` (the name is for choosing
    /// the backend and for logs; the credentials stay inside the state machine). The session
    /// drops any backend it still holds, chooses the backend for `user`, connects (PROXY
    /// header as usual) and feeds its greeting to [`Negotiation::on_greeting`], whose step
    /// starts the replay of the identification. If that fails the session writes
    /// [`Negotiation::on_route_failed`] instead and stays in the negotiation phase.
    Route { user: String },
    /// Routed listeners: the routed backend refused the login (its answer is in this step's
    /// `to_client`). The session closes the backend connection and negotiates with the
    /// client alone again, so the next identification is routed afresh.
    Detach,
    /// Routed SMTP listeners: a recipient (`address`, for choosing the backend and for logs)
    /// was given. The session decides with the map it took at the transaction's first
    /// recipient: with no backend attached, it connects the chosen one as for
    /// [`Next::Route`] (on failure [`Negotiation::on_route_failed`]); with one attached, it
    /// writes [`Negotiation::on_recipient`] told whether the recipient belongs there.
    /// [`Next::Detach`] ends the transaction and releases that map.
    Recipient { address: String },
}

/// Where a later recipient of a routed SMTP transaction belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The backend the transaction already uses: relay the recipient.
    Current,
    /// Another backend: defer the recipient to another transaction.
    Other,
}

/// One step of the negotiation phase: bytes for each side and what comes next.
/// The session writes `to_backend` first, then `to_client`.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    pub to_backend: Vec<u8>,
    pub to_client: Vec<u8>,
    pub next: Next,
}

impl Step {
    /// Pass bytes from the client to the backend unchanged.
    pub fn to_backend(bytes: impl Into<Vec<u8>>) -> Step {
        Step { to_backend: bytes.into(), to_client: Vec::new(), next: Next::Negotiate }
    }
    /// Send bytes to the client (a relayed and possibly rewritten response, or a local reply).
    pub fn to_client(bytes: impl Into<Vec<u8>>) -> Step {
        Step { to_backend: Vec::new(), to_client: bytes.into(), next: Next::Negotiate }
    }
    /// The same step, followed by `next`.
    pub fn then(mut self, next: Next) -> Step {
        self.next = next;
        self
    }
}

/// The line-by-line phase between the client (inside TLS, or opportunistic plaintext) and
/// the backend, until authentication. Lock-step: after forwarding a client command the
/// state machine returns `None` from [`Negotiation::on_client`] until the backend's
/// response to it is complete, so local replies (a refused STARTTLS) are never reordered
/// with relayed ones and the meaning of every client line (command, SASL response, literal
/// data) is known.
pub trait Negotiation: Send {
    /// Consumes the backend's greeting once it is complete. A positive greeting gives a
    /// step whose `to_client` is the greeting rewritten ([`Entry::Implicit`]) or empty;
    /// a negative or malformed one gives a [`Next::Unavailable`] step whose `to_client` is
    /// the protocol's "service unavailable" reply. IMAP PREAUTH gives [`Next::Relay`].
    fn on_greeting(&mut self, input: &mut BytesMut) -> Option<Step>;
    /// Consumes at most one client unit (command line, literal, SASL response).
    fn on_client(&mut self, input: &mut BytesMut) -> Option<Step>;
    /// Consumes at most one backend unit (a whole response, multi-line ones included).
    fn on_backend(&mut self, input: &mut BytesMut) -> Option<Step>;
    /// A machine that starts without a backend ([`Entry::Routed`]) gives its first step
    /// here: mailtls's own greeting, or an empty step. `None` (every other machine): the
    /// session connects the backend first and starts with its greeting.
    fn opening(&mut self) -> Option<Step> {
        None
    }
    /// After [`Next::Route`]: the chosen backend was unreachable or refused service. The
    /// step answers the identifying command with the protocol's "try again later" (IMAP
    /// `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`); the machine is back in its state before
    /// the identification, so the client may retry. Machines that never route close.
    fn on_route_failed(&mut self) -> Step {
        Step::to_client(Vec::new()).then(Next::Close)
    }
    /// After [`Next::Recipient`] with a backend attached: the step for that recipient.
    /// Machines that never route recipients close.
    fn on_recipient(&mut self, _destination: Destination) -> Step {
        Step::to_client(Vec::new()).then(Next::Close)
    }
    /// After [`Next::Relay`]: the filter every client byte must pass on its way to the
    /// backend during the relay (SMTP: the smuggling guard, in the state the negotiation
    /// left the session in). `None`: the relay may stay opaque.
    fn client_guard(&self) -> Option<Box<dyn ClientGuard>> {
        None
    }
    /// What the machine's own guard changed or refused since the last call (SMTP's
    /// guarded plaintext path scans DATA bodies itself), for the session to log and count.
    fn take_finding(&mut self) -> Option<Finding> {
        None
    }
}

/// What a client guard did about something it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Rewritten into a harmless form and passed on.
    Normalized,
    /// Refused: the session was closed before it reached the backend.
    Refused,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Normalized => "normalized",
            Action::Refused => "refused",
        }
    }
}

/// A guard's report, logged once per session and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What the guard defends against, for the log line ("SMTP smuggling defence").
    pub about: &'static str,
    /// The worst kind found (for SMTP: "bare LF", "non-standard end of data"...).
    pub what: &'static str,
    pub action: Action,
    /// Occurrences since the last report.
    pub count: u64,
}

/// A relay filter that also says what it found.
pub trait ClientGuard: ClientFilter {
    fn take_finding(&mut self) -> Option<Finding>;
}

/// What a [`CapabilityProbe`] wants next.
pub use smtp::ProbeStep;

/// mailtls's own short conversation with a backend to learn what it offers (SMTP EHLO
/// extensions, IMAP CAPABILITY, POP3 CAPA), so mailtls can answer for it truthfully while
/// no backend is connected. No I/O: fed the backend's bytes, it says what to send.
pub trait CapabilityProbe: Send {
    /// Consumes at most one backend reply; `None` means more bytes are needed.
    fn on_backend(&mut self, input: &mut BytesMut) -> Option<ProbeStep>;
    /// The goodbye to send after [`ProbeStep::Done`].
    fn quit(&self) -> &'static [u8];
}

/// The capability probe for `protocol`.
pub fn probe(protocol: Protocol, settings: &Settings) -> Box<dyn CapabilityProbe> {
    match protocol {
        Protocol::Smtp => Box::new(smtp::Probe::new(&settings.hostname)),
        Protocol::Imap => Box::new(imap::ImapProbe::default()),
        Protocol::Pop3 => Box::new(pop3::Pop3Probe::default()),
    }
}

/// Why mailtls itself ends a session; each protocol has its own words for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Farewell {
    /// The backend could not be reached or did not greet positively.
    BackendUnavailable,
    /// The client was idle for too long.
    Timeout,
    /// mailtls is shutting down.
    ShuttingDown,
    /// A connection limit turned the client away before its session began.
    TooManyConnections,
}

/// The dialogue before TLS on a STARTTLS listener.
pub fn pre_tls(protocol: Protocol, settings: &Settings) -> Box<dyn PreTls> {
    match protocol {
        Protocol::Smtp => Box::new(smtp::SmtpPreTls::new(settings)),
        Protocol::Imap => Box::new(imap::ImapPreTls::new(settings)),
        Protocol::Pop3 => Box::new(pop3::Pop3PreTls::new(settings)),
    }
}

/// The negotiation phase, entered as `entry` says.
pub fn negotiation(protocol: Protocol, settings: &Settings, entry: Entry) -> Box<dyn Negotiation> {
    match protocol {
        Protocol::Smtp => match entry {
            Entry::Routed { greet, helo } => Box::new(smtp::SmtpRouted::new(settings, greet, helo)),
            entry => Box::new(smtp::SmtpNegotiation::new(settings, entry)),
        },
        Protocol::Imap => match entry {
            Entry::Routed { greet, .. } => Box::new(imap::ImapRouted::new(settings, greet)),
            entry => Box::new(imap::ImapNegotiation::new(settings, entry)),
        },
        Protocol::Pop3 => match entry {
            Entry::Routed { greet, .. } => Box::new(pop3::Pop3Routed::new(settings, greet)),
            entry => Box::new(pop3::Pop3Negotiation::new(settings, entry)),
        },
    }
}

/// The protocol's last words when mailtls ends a session itself.
pub fn farewell(protocol: Protocol, why: Farewell) -> Vec<u8> {
    match protocol {
        Protocol::Smtp => smtp::farewell(why),
        Protocol::Imap => imap::farewell(why),
        Protocol::Pop3 => pop3::farewell(why),
    }
}
