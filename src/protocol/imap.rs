//! IMAP: the plaintext dialogue mailtls speaks itself on port 143 (LOGINDISABLED, STARTTLS)
//! and the post-TLS negotiation that hides STARTTLS until LOGIN/AUTHENTICATE succeeds.
//!
//! On routed listeners, [`ImapRouted`] answers for the backend until LOGIN or AUTHENTICATE
//! PLAIN names the user, and [`ImapProbe`] learns the default backend's capabilities.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::BytesMut;

use super::line::{self, Line};
use super::trusted_proxy::{id_may_speak_for_client, is_proxy_command};
use super::{
    sasl, Entry, Farewell, Negotiation, Next, PreTls, PreTlsStep, ProbeStep, Protocol, Settings, Step,
};

/// What mailtls announces before TLS: no AUTH= at all, so no client tries to log in.
const PRE_TLS_CAPABILITIES: &str = "IMAP4rev1 STARTTLS LOGINDISABLED";

/// Capabilities that are false once the client's TLS is up, whatever the backend says.
const HIDDEN_CAPABILITIES: [&[u8]; 2] = [b"STARTTLS", b"LOGINDISABLED"];

/// What the client must not be shown: what TLS made false, and the commands by which a
/// trusted proxy names its client (`trusted_proxy`), whose trust is mailtls's alone.
fn is_hidden_capability(token: &[u8]) -> bool {
    HIDDEN_CAPABILITIES.iter().any(|h| token.eq_ignore_ascii_case(h))
        || is_proxy_command(Protocol::Imap, token)
}

/// The tag of the commands mailtls itself sends to a backend (probe, ID naming the client).
const OWN_TAG: &[u8] = b"mailtls";

/// mailtls's own ID naming the client to a backend that trusts it (Dovecot's
/// `x-originating-ip` and `x-originating-port`, `xclient = true`).
fn naming_id(client: SocketAddr) -> Vec<u8> {
    format!(
        "mailtls ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\")\r\n",
        client.ip().to_canonical(),
        client.port()
    )
    .into_bytes()
}

/// What a backend answered to mailtls's naming ID, one line at a time.
#[derive(Debug, PartialEq, Eq)]
enum Naming {
    /// An untagged line (`* ID ...`): swallowed, the client never asked.
    More,
    Accepted,
    /// NO, BAD, a literal, or a line that is no IMAP response.
    Refused,
}

fn naming_answer(line: &[u8]) -> Naming {
    if literal_marker(line) != Marker::None {
        return Naming::Refused;
    }
    match classify_response(line) {
        Response::Untagged => Naming::More,
        Response::Tagged { tag, ok: true } if tag == OWN_TAG => Naming::Accepted,
        Response::Tagged { .. } | Response::Continuation => Naming::Refused,
    }
}

/// RFC 3501 caps a literal size at a 32-bit number; anything larger is a lie or an attack.
const LARGEST_LITERAL_NUMBER: u64 = u32::MAX as u64;

/// The protocol's last words when mailtls ends a session itself.
pub fn farewell(why: Farewell) -> Vec<u8> {
    match why {
        Farewell::BackendUnavailable => b"* BYE [UNAVAILABLE] Backend server unavailable\r\n".to_vec(),
        Farewell::Timeout => b"* BYE Autologout; idle for too long\r\n".to_vec(),
        Farewell::ShuttingDown => b"* BYE Server shutting down\r\n".to_vec(),
        Farewell::TooManyConnections => {
            b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n".to_vec()
        }
    }
}

const BYE_LINE_TOO_LONG: &[u8] = b"* BYE Line too long\r\n";
const BYE_LITERAL_TOO_LARGE: &[u8] = b"* BYE Literal too large\r\n";
const BYE_TOO_MANY_ERRORS: &[u8] = b"* BYE Too many errors\r\n";
const BYE_TOO_MANY_COMMANDS: &[u8] = b"* BYE Too many commands\r\n";
const BAD_TAG: &[u8] = b"* BAD Invalid tag\r\n";
/// The answer to XCLIENT from a client (see `trusted_proxy`).
const PROXY_ONLY: &str = "BAD Command not permitted: only the proxy may name the client";

// ---------------------------------------------------------------------------------------
// Framing shared by both phases
// ---------------------------------------------------------------------------------------

/// A literal announced at the end of a line: `{n}` (synchronizing) or `{n+}` (LITERAL+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Literal {
    size: u64,
    sync: bool,
}

/// What the end of a line says about the bytes that follow it.
#[derive(Debug, PartialEq, Eq)]
enum Marker {
    None,
    Literal(Literal),
    /// A literal whose size does not even parse as an IMAP number.
    Unparseable,
}

/// Finds a literal marker at the end of a line. Quoted strings are tracked so that a
/// `{5}` inside an (unterminated) quoted string is not mistaken for one.
fn literal_marker(line: &[u8]) -> Marker {
    let body = line::trim_eol(line);
    let mut in_quote = false;
    let mut escaped = false;
    let mut last_open = None;
    for (i, &b) in body.iter().enumerate() {
        if in_quote {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_quote = false,
                _ => {}
            }
        } else if b == b'"' {
            in_quote = true;
        } else if b == b'{' {
            last_open = Some(i);
        }
    }
    if in_quote || body.last() != Some(&b'}') {
        return Marker::None;
    }
    let Some(open) = last_open else { return Marker::None };
    let inner = body.get(open + 1..body.len() - 1).unwrap_or_default();
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Marker::None;
    }
    match parse_literal_size(digits) {
        Some(size) => Marker::Literal(Literal { size, sync }),
        None => Marker::Unparseable,
    }
}

/// Parses ASCII digits without overflow; `None` above the IMAP number range.
fn parse_literal_size(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        let n = acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        (n <= LARGEST_LITERAL_NUMBER).then_some(n)
    })
}

/// One piece of a client command, as the framer cut it.
#[derive(Debug)]
enum Unit {
    /// A line segment; `first` when it starts a new command. `literal` is what it announces.
    Line {
        line: BytesMut,
        first: bool,
        literal: Option<Literal>,
    },
    /// Literal bytes as far as they have arrived (never more than announced).
    LiteralBytes(BytesMut),
    TooLong,
    LiteralTooLarge,
}

/// Cuts a client byte stream into command line segments and literal data, so that literal
/// bytes are never mistaken for a command. Holds counts only, never a literal's bytes.
#[derive(Debug)]
struct Framer {
    max_line: usize,
    max_literal: u64,
    literal_left: u64,
    in_command: bool,
}

impl Framer {
    fn new(max_line: usize, max_literal: u64) -> Self {
        Framer { max_line, max_literal, literal_left: 0, in_command: false }
    }

    fn next(&mut self, input: &mut BytesMut) -> Option<Unit> {
        if self.literal_left > 0 {
            return self.take_literal_bytes(input).map(Unit::LiteralBytes);
        }
        let line = match line::take_line(input, self.max_line) {
            Line::Complete(line) => line,
            Line::Incomplete => return None,
            Line::TooLong => return Some(Unit::TooLong),
        };
        let first = !self.in_command;
        let literal = match literal_marker(&line) {
            Marker::None => None,
            Marker::Unparseable => return Some(Unit::LiteralTooLarge),
            Marker::Literal(l) if l.size > self.max_literal => return Some(Unit::LiteralTooLarge),
            Marker::Literal(l) => Some(l),
        };
        self.in_command = literal.is_some();
        if let Some(Literal { size, sync: false }) = literal {
            self.literal_left = size;
        }
        Some(Unit::Line { line, first, literal })
    }

    fn take_literal_bytes(&mut self, input: &mut BytesMut) -> Option<BytesMut> {
        if input.is_empty() {
            return None;
        }
        let wanted = usize::try_from(self.literal_left).unwrap_or(usize::MAX);
        let chunk = input.split_to(wanted.min(input.len()));
        self.literal_left -= chunk.len() as u64;
        Some(chunk)
    }

    /// The peer agreed (`+`) to a synchronizing literal: its bytes come next.
    fn accept_literal(&mut self, size: u64) {
        self.literal_left = size;
    }

    /// The command ended before its synchronizing literal: the client sends no literal.
    fn abandon_command(&mut self) {
        self.literal_left = 0;
        self.in_command = false;
    }
}

/// RFC 3501 `tag = 1*<any ASTRING-CHAR except "+">`.
fn is_valid_tag(tag: &[u8]) -> bool {
    !tag.is_empty() && tag.iter().all(|&b| is_tag_char(b))
}

fn is_tag_char(b: u8) -> bool {
    let atom_special = matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\');
    b > b' ' && b < 0x7f && !atom_special && b != b'+'
}

/// Tag, command name and arguments of a command's first line.
fn parse_command(line: &[u8]) -> (&[u8], &[u8], Option<&[u8]>) {
    let (tag, rest) = line::split_word(line);
    let (name, args) = line::split_word(rest.unwrap_or_default());
    (tag, name, args)
}

fn tagged(tag: &[u8], text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + text.len() + 3);
    out.extend_from_slice(tag);
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------------------
// Before TLS
// ---------------------------------------------------------------------------------------

/// How mailtls answers one pre-TLS command once all of it has been read.
#[derive(Debug)]
enum Verdict {
    Reply(Vec<u8>),
    /// A NO or BAD: counts against `max_errors`.
    Error(Vec<u8>),
    /// LOGIN or AUTHENTICATE before TLS: an error that is also a refused login.
    LoginRefused(Vec<u8>),
    Close(Vec<u8>),
    StartTls(Vec<u8>),
}

/// The plaintext dialogue of an IMAP STARTTLS listener. Nothing here reaches a backend.
pub struct ImapPreTls {
    hostname: String,
    max_commands: u32,
    max_errors: u32,
    /// Every line counts, continuation lines included, so an endless chain of literals
    /// cannot keep a session alive without spending its budget.
    lines: u32,
    errors: u32,
    framer: Framer,
    /// The answer to the command whose literals are still being skipped.
    pending: Option<Verdict>,
    refused_logins: u32,
}

impl ImapPreTls {
    pub fn new(settings: &Settings) -> Self {
        // The hostname lands inside a protocol line: a control byte would end it early.
        let hostname = settings.hostname.chars().filter(|c| !c.is_control()).collect();
        ImapPreTls {
            hostname,
            max_commands: settings.max_pre_tls_commands,
            max_errors: settings.max_errors,
            lines: 0,
            errors: 0,
            framer: Framer::new(settings.max_pre_tls_line, settings.max_literal),
            pending: None,
            refused_logins: 0,
        }
    }

    fn judge(line: &[u8]) -> Verdict {
        let (tag, name, args) = parse_command(line);
        if !is_valid_tag(tag) {
            return Verdict::Error(BAD_TAG.to_vec());
        }
        let is = |verb: &str| name.eq_ignore_ascii_case(verb.as_bytes());
        if is("CAPABILITY") {
            let mut out = format!("* CAPABILITY {PRE_TLS_CAPABILITIES}\r\n").into_bytes();
            out.extend(tagged(tag, "OK CAPABILITY completed"));
            Verdict::Reply(out)
        } else if is("NOOP") {
            Verdict::Reply(tagged(tag, "OK NOOP completed"))
        } else if is("LOGOUT") {
            let mut out = b"* BYE Logging out\r\n".to_vec();
            out.extend(tagged(tag, "OK LOGOUT completed"));
            Verdict::Close(out)
        } else if is("ID") {
            let mut out = b"* ID NIL\r\n".to_vec();
            out.extend(tagged(tag, "OK ID completed"));
            Verdict::Reply(out)
        } else if is("STARTTLS") {
            match args {
                None => Verdict::StartTls(tagged(tag, "OK Begin TLS negotiation now")),
                Some(_) => Verdict::Error(tagged(tag, "BAD STARTTLS takes no arguments")),
            }
        } else if is("LOGIN") || is("AUTHENTICATE") {
            Verdict::LoginRefused(tagged(
                tag,
                "NO [PRIVACYREQUIRED] Plaintext authentication is disabled, use STARTTLS first",
            ))
        } else {
            Verdict::Error(tagged(tag, "BAD Command not permitted before STARTTLS"))
        }
    }

    fn deliver(&mut self, verdict: Verdict) -> PreTlsStep {
        match verdict {
            Verdict::Reply(bytes) => PreTlsStep::Reply(bytes),
            Verdict::Close(bytes) => PreTlsStep::Close(bytes),
            Verdict::StartTls(bytes) => PreTlsStep::StartTls(bytes),
            Verdict::LoginRefused(bytes) => {
                self.refused_logins = self.refused_logins.saturating_add(1);
                self.deliver(Verdict::Error(bytes))
            }
            Verdict::Error(bytes) => {
                self.errors = self.errors.saturating_add(1);
                if self.errors > self.max_errors {
                    PreTlsStep::Close(BYE_TOO_MANY_ERRORS.to_vec())
                } else {
                    PreTlsStep::Reply(bytes)
                }
            }
        }
    }
}

impl PreTls for ImapPreTls {
    fn refused_logins(&self) -> u32 {
        self.refused_logins
    }

    fn greeting(&self) -> Vec<u8> {
        format!("* OK [CAPABILITY {PRE_TLS_CAPABILITIES}] {} ready\r\n", self.hostname).into_bytes()
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<PreTlsStep> {
        loop {
            let (line, first, literal) = match self.framer.next(input)? {
                // Literal data before TLS goes nowhere; only its length matters.
                Unit::LiteralBytes(_) => continue,
                Unit::TooLong => return Some(PreTlsStep::Close(BYE_LINE_TOO_LONG.to_vec())),
                Unit::LiteralTooLarge => return Some(PreTlsStep::Close(BYE_LITERAL_TOO_LARGE.to_vec())),
                Unit::Line { line, first, literal } => (line, first, literal),
            };
            self.lines = self.lines.saturating_add(1);
            if self.lines > self.max_commands {
                return Some(PreTlsStep::Close(BYE_TOO_MANY_COMMANDS.to_vec()));
            }
            if first {
                self.pending = Some(Self::judge(&line));
            }
            match literal {
                Some(Literal { sync: false, .. }) => continue,
                // Never a `+` before TLS: answering now means the client sends no literal.
                Some(Literal { sync: true, .. }) => self.framer.abandon_command(),
                None => {}
            }
            if let Some(verdict) = self.pending.take() {
                // A StartTls verdict returns here, before the buffer is looked at again.
                return Some(self.deliver(verdict));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// After TLS
// ---------------------------------------------------------------------------------------

/// Whose move it is on the client side.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// Reading a command (its first line, or the rest of one being forwarded).
    Command,
    /// Reading the rest of a command that is answered locally, never forwarded.
    Refusing(Vec<u8>),
    /// Reading the rest of a command that is never forwarded as sent: once it is whole,
    /// `command` goes to the backend in its place and its tagged reply is awaited.
    Replacing { tag: Vec<u8>, command: Vec<u8> },
    /// The command was forwarded whole; its tagged response is awaited.
    Waiting,
    /// A synchronizing literal was announced; the backend's `+` or tagged reply is awaited.
    Continuation(u64),
    /// The backend sent `+` to an outstanding command: the next client line is its data.
    Sasl,
}

/// The command forwarded to the backend whose tagged response has not come yet.
#[derive(Debug)]
struct Outstanding {
    tag: Vec<u8>,
    authenticates: bool,
}

/// What the backend response being read is.
#[derive(Debug)]
enum Response {
    Untagged,
    Continuation,
    Tagged { tag: Vec<u8>, ok: bool },
}

/// The lock-step relay between an IMAP client inside TLS and the cleartext backend.
pub struct ImapNegotiation {
    entry: Entry,
    /// The ID naming the client, sent after the greeting (`xclient = true` listeners).
    naming: Option<Vec<u8>>,
    /// The greeting's step, held back until the backend has answered that ID.
    held: Option<Step>,
    max_line: usize,
    max_literal: u64,
    max_errors: u32,
    errors: u32,
    client: Framer,
    turn: Turn,
    outstanding: Option<Outstanding>,
    /// Server literal bytes still to forward, and the response they belong to.
    backend_literal_left: u64,
    response: Option<Response>,
}

impl ImapNegotiation {
    pub fn new(settings: &Settings, entry: Entry) -> Self {
        ImapNegotiation {
            entry,
            naming: settings.client.filter(|_| settings.xclient).map(naming_id),
            held: None,
            max_line: settings.max_line,
            max_literal: settings.max_literal,
            max_errors: settings.max_errors,
            errors: 0,
            client: Framer::new(settings.max_line, settings.max_literal),
            turn: Turn::Command,
            outstanding: None,
            backend_literal_left: 0,
            response: None,
        }
    }

    /// Decides on a command's first line whether it is forwarded or answered locally.
    fn begin_command(&mut self, line: &[u8]) {
        let (tag, name, _) = parse_command(line);
        // As a backend may read it: a blank or control byte ends a command name, not only a
        // space (`a ID\r(...)` must not pass as something other than ID).
        let name = name.split(|&b| b <= b' ' || b == 0x7f).next().unwrap_or_default();
        if !is_valid_tag(tag) {
            self.turn = Turn::Refusing(BAD_TAG.to_vec());
        } else if name.eq_ignore_ascii_case(b"STARTTLS") {
            self.turn = Turn::Refusing(tagged(tag, "BAD TLS is already active"));
        } else if is_proxy_command(Protocol::Imap, name) {
            self.turn = Turn::Refusing(tagged(tag, PROXY_ONLY));
        } else if name.eq_ignore_ascii_case(b"ID") && id_may_speak_for_client(line) {
            // Dovecot takes the client's address (and more: `trusted_proxy`) from ID fields
            // when the connection counts as trusted; mailtls's own connection must never
            // lend that trust to a client. The backend still answers an ID, with none:
            // rewriting the list without those fields would need a parser that agrees with
            // every backend's on every escape, and a client loses only its name and version.
            self.turn = Turn::Replacing { tag: tag.to_vec(), command: tagged(tag, "ID NIL") };
        } else {
            let authenticates =
                name.eq_ignore_ascii_case(b"LOGIN") || name.eq_ignore_ascii_case(b"AUTHENTICATE");
            self.outstanding = Some(Outstanding { tag: tag.to_vec(), authenticates });
        }
    }

    /// One line of the backend's answer to mailtls's naming ID. Its tagged OK releases the
    /// held greeting; a refusal leaves the backend believing the client is mailtls, so the
    /// session ends as unavailable.
    fn naming_reply(&mut self, input: &mut BytesMut) -> Option<Step> {
        let reply = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(backend_unavailable()),
            Line::Complete(reply) => reply,
        };
        match naming_answer(&reply) {
            Naming::More => Some(Step::to_client(Vec::new())),
            Naming::Accepted => self.held.take(),
            Naming::Refused => {
                self.held = None;
                Some(backend_unavailable())
            }
        }
    }

    fn local_error(&mut self, reply: Vec<u8>) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            Step::to_client(BYE_TOO_MANY_ERRORS).then(Next::Close)
        } else {
            Step::to_client(reply)
        }
    }

    /// After a forwarded line segment: what the client may send next.
    fn after_forwarded_segment(&mut self, literal: Option<Literal>) {
        match literal {
            None if self.outstanding.is_some() => self.turn = Turn::Waiting,
            // Answered early by the backend: nothing left to wait for.
            None => self.turn = Turn::Command,
            Some(Literal { size, sync: true }) => self.turn = Turn::Continuation(size),
            Some(Literal { sync: false, .. }) => {}
        }
    }

    fn forward_sasl_line(&mut self, input: &mut BytesMut) -> Option<Step> {
        match line::take_line(input, self.max_line) {
            Line::Incomplete => None,
            Line::TooLong => Some(Step::to_client(BYE_LINE_TOO_LONG).then(Next::Close)),
            Line::Complete(data) => {
                self.turn = Turn::Waiting;
                Some(Step::to_backend(data.to_vec()))
            }
        }
    }

    fn forward_backend_literal(&mut self, input: &mut BytesMut) -> Option<Step> {
        if input.is_empty() {
            return None;
        }
        let wanted = usize::try_from(self.backend_literal_left).unwrap_or(usize::MAX);
        let chunk = input.split_to(wanted.min(input.len()));
        self.backend_literal_left -= chunk.len() as u64;
        Some(Step::to_client(chunk.to_vec()))
    }

    /// The backend said `+`: it wants the literal, or the next SASL line.
    fn on_continuation(&mut self) {
        match self.turn {
            Turn::Continuation(size) => {
                self.client.accept_literal(size);
                self.turn = Turn::Command;
            }
            Turn::Waiting if self.outstanding.is_some() => self.turn = Turn::Sasl,
            _ => {}
        }
    }

    /// A tagged response ended; returns what the session does next.
    fn on_tagged(&mut self, tag: &[u8], ok: bool) -> Next {
        let matches = match &self.outstanding {
            Some(outstanding) => outstanding.tag == tag,
            // A command answered early that then announced a synchronizing literal.
            None => matches!(self.turn, Turn::Continuation(_)),
        };
        if !matches {
            return Next::Negotiate;
        }
        let authenticates = self.outstanding.take().is_some_and(|o| o.authenticates);
        match self.turn {
            Turn::Continuation(_) => {
                self.client.abandon_command();
                self.turn = Turn::Command;
            }
            Turn::Waiting | Turn::Sasl => self.turn = Turn::Command,
            // Mid-command (LITERAL+ data still coming): keep framing the client's bytes.
            Turn::Command | Turn::Refusing(_) | Turn::Replacing { .. } => {}
        }
        if ok && authenticates {
            Next::Relay
        } else {
            Next::Negotiate
        }
    }
}

fn backend_unavailable() -> Step {
    Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
}

fn classify_response(line: &[u8]) -> Response {
    let (tag, rest) = line::split_word(line);
    if tag.first() == Some(&b'+') {
        Response::Continuation
    } else if tag == b"*" {
        Response::Untagged
    } else {
        let (status, _) = line::split_word(rest.unwrap_or_default());
        Response::Tagged { tag: tag.to_vec(), ok: status.eq_ignore_ascii_case(b"OK") }
    }
}

impl Negotiation for ImapNegotiation {
    fn on_greeting(&mut self, input: &mut BytesMut) -> Option<Step> {
        let greeting = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(backend_unavailable()),
            Line::Complete(greeting) => greeting,
        };
        let (star, rest) = line::split_word(&greeting);
        let (status, _) = line::split_word(rest.unwrap_or_default());
        let next = if star != b"*" {
            return Some(backend_unavailable());
        } else if status.eq_ignore_ascii_case(b"OK") {
            Next::Negotiate
        } else if status.eq_ignore_ascii_case(b"PREAUTH") {
            Next::Relay
        } else {
            return Some(backend_unavailable());
        };
        let to_client = match self.entry {
            Entry::Implicit => filter_capabilities(&greeting),
            // The client already had mailtls's own greeting.
            Entry::AfterStartTls | Entry::Plaintext { .. } | Entry::Routed { .. } => Vec::new(),
        };
        let greeting = Step::to_client(to_client).then(next);
        // PREAUTH leaves no login phase in which an ID would count.
        match self.naming.take().filter(|_| greeting.next == Next::Negotiate) {
            Some(id) => {
                self.held = Some(greeting);
                Some(Step::to_backend(id))
            }
            None => Some(greeting),
        }
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<Step> {
        // A backend response is half-relayed (its literal still coming): a local reply now
        // would land inside it, and the client would read it as literal data and the rest
        // of the response as new lines. The client's turn comes when the response ends.
        // Nor does the client have a turn before the backend has answered mailtls's ID.
        if self.response.is_some() || self.backend_literal_left > 0 || self.held.is_some() {
            return None;
        }
        loop {
            match self.turn {
                Turn::Waiting | Turn::Continuation(_) => return None,
                Turn::Sasl => return self.forward_sasl_line(input),
                Turn::Command | Turn::Refusing(_) | Turn::Replacing { .. } => {}
            }
            let (line, first, literal) = match self.client.next(input)? {
                Unit::TooLong => return Some(Step::to_client(BYE_LINE_TOO_LONG).then(Next::Close)),
                Unit::LiteralTooLarge => {
                    return Some(Step::to_client(BYE_LITERAL_TOO_LARGE).then(Next::Close))
                }
                Unit::LiteralBytes(bytes) => match self.turn {
                    Turn::Refusing(_) | Turn::Replacing { .. } => continue,
                    _ => return Some(Step::to_backend(bytes.to_vec())),
                },
                Unit::Line { line, first, literal } => (line, first, literal),
            };
            if first {
                self.begin_command(&line);
            }
            if let Turn::Refusing(_) | Turn::Replacing { .. } = self.turn {
                match literal {
                    Some(Literal { sync: false, .. }) => continue,
                    Some(Literal { sync: true, .. }) => self.client.abandon_command(),
                    None => {}
                }
                match std::mem::replace(&mut self.turn, Turn::Command) {
                    Turn::Refusing(reply) => return Some(self.local_error(reply)),
                    Turn::Replacing { tag, command } => {
                        self.outstanding = Some(Outstanding { tag, authenticates: false });
                        self.turn = Turn::Waiting;
                        return Some(Step::to_backend(command));
                    }
                    _ => continue,
                }
            }
            self.after_forwarded_segment(literal);
            return Some(Step::to_backend(line.to_vec()));
        }
    }

    fn on_backend(&mut self, input: &mut BytesMut) -> Option<Step> {
        if self.held.is_some() {
            return self.naming_reply(input);
        }
        if self.backend_literal_left > 0 {
            return self.forward_backend_literal(input);
        }
        let segment = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(backend_unavailable()),
            Line::Complete(segment) => segment,
        };
        let first = self.response.is_none();
        let response = match self.response.take() {
            Some(response) => response,
            None => classify_response(&segment),
        };
        let to_client = if first { filter_capabilities(&segment) } else { segment.to_vec() };
        let marker = match response {
            // A continuation carries text or base64, never a literal.
            Response::Continuation => Marker::None,
            _ => literal_marker(&segment),
        };
        match marker {
            Marker::Unparseable => return Some(backend_unavailable()),
            Marker::Literal(l) if l.size > self.max_literal => return Some(backend_unavailable()),
            Marker::Literal(l) => {
                self.backend_literal_left = l.size;
                self.response = Some(response);
                return Some(Step::to_client(to_client));
            }
            Marker::None => {}
        }
        let next = match response {
            Response::Untagged => Next::Negotiate,
            Response::Continuation => {
                self.on_continuation();
                Next::Negotiate
            }
            Response::Tagged { tag, ok } => self.on_tagged(&tag, ok),
        };
        Some(Step::to_client(to_client).then(next))
    }
}

// ---------------------------------------------------------------------------------------
// Routed listeners: mailtls answers until LOGIN / AUTHENTICATE PLAIN names the user
// ---------------------------------------------------------------------------------------

/// The only SASL mechanism a routed listener can read a user name from.
const ROUTABLE_MECHANISM: &[u8] = b"PLAIN";
const LITERAL_GO_AHEAD: &[u8] = b"+ Ready for literal data\r\n";
const SASL_GO_AHEAD: &[u8] = b"+ \r\n";

/// The capabilities a routed listener announces before login: the default backend's,
/// learned by [`ImapProbe`], minus what TLS made false and minus SASL mechanisms other
/// than PLAIN, from which mailtls could not learn whom to route. Before anything was
/// learned, the bare protocol name: LOGIN works everywhere.
fn routed_capabilities(learned: &[String]) -> String {
    let kept: Vec<&str> = learned
        .iter()
        .map(String::as_str)
        .filter(|c| !is_hidden_capability(c.as_bytes()))
        .filter(|c| match c.as_bytes().get(..5) {
            Some(prefix) if prefix.eq_ignore_ascii_case(b"AUTH=") => {
                c.as_bytes().get(5..).is_some_and(|m| m.eq_ignore_ascii_case(ROUTABLE_MECHANISM))
            }
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        "IMAP4rev1".to_owned()
    } else {
        kept.join(" ")
    }
}

/// A piece of a command as the client sent it: line text (terminator and literal marker
/// removed) or the bytes of a literal.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Text(Vec<u8>),
    Literal(Vec<u8>),
}

/// RFC 3501 `ASTRING-CHAR`: an atom character or `]`. Bytes above 127 are let through, as
/// Dovecot does, for UTF-8 user names.
fn is_astring_char(b: u8) -> bool {
    let atom_special = matches!(b, b'(' | b')' | b'{' | b' ' | b'%' | b'*' | b'"' | b'\\');
    b > b' ' && b != 0x7f && !atom_special
}

/// The pieces of a command as one stream: a byte of line text, or a whole literal.
#[derive(Debug, PartialEq, Eq)]
enum Item<'a> {
    Byte(u8),
    Literal(&'a [u8]),
}

/// Parses `astring SP astring` (LOGIN's arguments) from the pieces of the command after
/// `LOGIN `; each astring is an atom, a quoted string or a literal. `None`: malformed.
fn login_arguments(pieces: &[Piece]) -> Option<(Vec<u8>, Vec<u8>)> {
    let items: Vec<Item<'_>> = pieces
        .iter()
        .flat_map(|p| match p {
            Piece::Text(t) => t.iter().map(|&b| Item::Byte(b)).collect::<Vec<_>>(),
            Piece::Literal(l) => vec![Item::Literal(l)],
        })
        .collect();
    let mut pos = 0;
    let user = astring(&items, &mut pos)?;
    if items.get(pos) != Some(&Item::Byte(b' ')) {
        return None;
    }
    pos += 1;
    let password = astring(&items, &mut pos)?;
    (pos == items.len()).then_some((user, password))
}

/// One astring at `pos`, which is moved past it.
fn astring(items: &[Item<'_>], pos: &mut usize) -> Option<Vec<u8>> {
    let mut next = || {
        let item = items.get(*pos);
        *pos += 1;
        item
    };
    let mut out = Vec::new();
    match next()? {
        Item::Literal(l) => Some(l.to_vec()),
        Item::Byte(b'"') => loop {
            match next()? {
                Item::Byte(b'"') => return Some(out),
                Item::Byte(b'\\') => match next()? {
                    Item::Byte(e @ (b'"' | b'\\')) => out.push(*e),
                    _ => return None,
                },
                Item::Byte(b'\r' | b'\n' | 0) | Item::Literal(_) => return None,
                Item::Byte(b) => out.push(*b),
            }
        },
        Item::Byte(b) if is_astring_char(*b) => {
            out.push(*b);
            while let Some(Item::Byte(b)) =
                items.get(*pos).filter(|i| matches!(i, Item::Byte(b) if is_astring_char(*b)))
            {
                out.push(*b);
                *pos += 1;
            }
            Some(out)
        }
        Item::Byte(_) => None,
    }
}

/// An IMAP string the plainest way every IMAP4rev1 server accepts: quoted when it can be,
/// else a synchronizing literal (the caller cuts the replay there and waits for `+`).
fn astring_for_replay(value: &[u8]) -> Vec<u8> {
    let quotable = value.iter().all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80);
    if quotable {
        let mut out = Vec::with_capacity(value.len() + 2);
        out.push(b'"');
        for &b in value {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
        out
    } else {
        format!("{{{}}}\r\n", value.len()).into_bytes()
    }
}

/// The LOGIN command for the backend, in segments: after every segment but the last the
/// backend's `+` is awaited (a synchronizing literal). Tag and credentials are the
/// client's own bytes; only the framing is mailtls's, so no backend needs LITERAL+.
fn login_replay(tag: &[u8], user: &[u8], password: &[u8]) -> VecDeque<Vec<u8>> {
    let mut segments = VecDeque::new();
    let mut current = tag.to_vec();
    current.extend_from_slice(b" LOGIN");
    for value in [user, password] {
        current.push(b' ');
        let encoded = astring_for_replay(value);
        let literal = encoded.last() == Some(&b'\n');
        current.extend_from_slice(&encoded);
        if literal {
            segments.push_back(std::mem::take(&mut current));
            current.extend_from_slice(value);
        }
    }
    current.extend_from_slice(b"\r\n");
    segments.push_back(current);
    segments
}

/// Where a routed IMAP session stands.
#[derive(Debug)]
enum Routing {
    /// No backend: mailtls answers commands itself.
    Unrouted,
    /// Reading the rest of a LOGIN whose arguments come as literals.
    Login { tag: Vec<u8>, pieces: Vec<Piece> },
    /// Reading the rest of a command answered locally (its LITERAL+ bytes are skipped).
    Refusing(Vec<u8>),
    /// `+ ` was sent for AUTHENTICATE PLAIN; the client's response line comes next.
    SaslResponse { tag: Vec<u8> },
    /// [`Next::Route`] was given; the session is connecting the backend.
    Connecting { tag: Vec<u8>, replay: VecDeque<Vec<u8>> },
    /// mailtls's naming ID went to the routed backend; the replay follows its tagged OK.
    Naming { tag: Vec<u8>, replay: VecDeque<Vec<u8>> },
    /// The identification went to the backend; `rest` goes after each of its `+`.
    Replaying { tag: Vec<u8>, rest: VecDeque<Vec<u8>> },
    /// Relay or close was decided.
    Done,
}

/// The negotiation of a routed IMAP listener: mailtls's own dialogue until LOGIN or
/// AUTHENTICATE PLAIN, then the replay to the backend chosen for that user, then relay.
pub struct ImapRouted {
    greet: bool,
    /// The ID naming the client that each routed backend gets first (`xclient = true`).
    naming: Option<Vec<u8>>,
    hostname: String,
    capabilities: String,
    max_line: usize,
    max_errors: u32,
    errors: u32,
    client: Framer,
    state: Routing,
}

impl ImapRouted {
    pub fn new(settings: &Settings, greet: bool) -> Self {
        ImapRouted {
            greet,
            naming: settings.client.filter(|_| settings.xclient).map(naming_id),
            hostname: settings.hostname.chars().filter(|c| !c.is_control()).collect(),
            capabilities: routed_capabilities(&settings.backend_extensions),
            max_line: settings.max_line,
            max_errors: settings.max_errors,
            errors: 0,
            client: Framer::new(settings.max_line, settings.max_literal),
            state: Routing::Unrouted,
        }
    }

    fn error(&mut self, reply: Vec<u8>) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            self.state = Routing::Done;
            Step::to_client(BYE_TOO_MANY_ERRORS).then(Next::Close)
        } else {
            Step::to_client(reply)
        }
    }

    fn close(&mut self, reply: &[u8]) -> Step {
        self.state = Routing::Done;
        Step::to_client(reply).then(Next::Close)
    }

    fn route(&mut self, tag: Vec<u8>, user: String, replay: VecDeque<Vec<u8>>) -> Step {
        self.state = Routing::Connecting { tag, replay };
        Step::to_client(Vec::new()).then(Next::Route { user })
    }

    /// The first line of a command, marker and terminator removed. Returns the step when the
    /// command is answered now; `None` when more of it must be read first.
    fn begin(&mut self, body: &[u8], literal: Option<Literal>) -> Option<Step> {
        let (tag, name, args) = parse_command(body);
        if !is_valid_tag(tag) {
            return self.refuse(BAD_TAG.to_vec(), literal);
        }
        let is = |verb: &str| name.eq_ignore_ascii_case(verb.as_bytes());
        if is("LOGIN") {
            let pieces = vec![Piece::Text(args.unwrap_or_default().to_vec())];
            self.state = Routing::Login { tag: tag.to_vec(), pieces };
            return self.login_segment(literal);
        }
        if literal.is_some() {
            // No other command mailtls answers takes a literal.
            return self.refuse(tagged(tag, "BAD Command not permitted before login"), literal);
        }
        if is("AUTHENTICATE") {
            return Some(self.authenticate(tag, args.unwrap_or_default()));
        }
        let (reply, error) = if is("CAPABILITY") {
            let mut out = format!("* CAPABILITY {}\r\n", self.capabilities).into_bytes();
            out.extend(tagged(tag, "OK CAPABILITY completed"));
            (out, false)
        } else if is("NOOP") {
            (tagged(tag, "OK NOOP completed"), false)
        } else if is("ID") {
            let mut out = b"* ID NIL\r\n".to_vec();
            out.extend(tagged(tag, "OK ID completed"));
            (out, false)
        } else if is("LOGOUT") {
            let mut out = b"* BYE Logging out\r\n".to_vec();
            out.extend(tagged(tag, "OK LOGOUT completed"));
            return Some(self.close(&out));
        } else if is("STARTTLS") {
            (tagged(tag, "BAD TLS is already active"), true)
        } else {
            (tagged(tag, "BAD Command not permitted before login"), true)
        };
        Some(if error { self.error(reply) } else { Step::to_client(reply) })
    }

    /// Refuses a command once all of it is read: now, when it ends here or announces a
    /// synchronizing literal (which, unanswered by `+`, the client never sends); after its
    /// LITERAL+ bytes otherwise. Counts as an error.
    fn refuse(&mut self, reply: Vec<u8>, literal: Option<Literal>) -> Option<Step> {
        match literal {
            Some(Literal { sync: false, .. }) => {
                self.state = Routing::Refusing(reply);
                None
            }
            sync_or_none => {
                if sync_or_none.is_some() {
                    self.client.abandon_command();
                }
                self.state = Routing::Unrouted;
                Some(self.error(reply))
            }
        }
    }

    /// After a LOGIN line segment: a literal to collect (with mailtls's own `+` when it is
    /// synchronizing), or the end of the command.
    fn login_segment(&mut self, literal: Option<Literal>) -> Option<Step> {
        let Routing::Login { tag, pieces } = &mut self.state else { return None };
        let Some(literal) = literal else {
            let (tag, pieces) = (std::mem::take(tag), std::mem::take(pieces));
            return Some(self.login(tag, &pieces));
        };
        // User and password: two literals at most, or it is no LOGIN.
        if pieces.iter().filter(|p| matches!(p, Piece::Literal(_))).count() >= 2 {
            let reply = tagged(tag, "BAD Invalid arguments to LOGIN");
            return self.refuse(reply, Some(literal));
        }
        pieces.push(Piece::Literal(Vec::with_capacity(usize::try_from(literal.size).unwrap_or(0))));
        if literal.sync {
            self.client.accept_literal(literal.size);
            return Some(Step::to_client(LITERAL_GO_AHEAD));
        }
        None
    }

    fn login(&mut self, tag: Vec<u8>, pieces: &[Piece]) -> Step {
        self.state = Routing::Unrouted;
        match login_arguments(pieces) {
            Some((user, password)) => {
                let replay = login_replay(&tag, &user, &password);
                self.route(tag, String::from_utf8_lossy(&user).into_owned(), replay)
            }
            None => self.error(tagged(&tag, "BAD Invalid arguments to LOGIN")),
        }
    }

    fn authenticate(&mut self, tag: &[u8], args: &[u8]) -> Step {
        let (mechanism, initial) = line::split_word(args);
        if mechanism.is_empty() {
            return self.error(tagged(tag, "BAD Missing authentication mechanism"));
        }
        if !mechanism.eq_ignore_ascii_case(ROUTABLE_MECHANISM) {
            return self.error(tagged(tag, "NO Unsupported authentication mechanism"));
        }
        match initial {
            // SASL-IR (RFC 4959): the response is on the command line.
            Some(response) => self.plain_response(tag.to_vec(), response),
            None => {
                self.state = Routing::SaslResponse { tag: tag.to_vec() };
                Step::to_client(SASL_GO_AHEAD)
            }
        }
    }

    /// Routes by the PLAIN response; the backend gets the command without SASL-IR (every
    /// server supports that) and the client's base64 text after its `+`.
    fn plain_response(&mut self, tag: Vec<u8>, response: &[u8]) -> Step {
        self.state = Routing::Unrouted;
        match sasl::plain_user(response) {
            Ok(user) => {
                let mut command = tag.clone();
                command.extend_from_slice(b" AUTHENTICATE PLAIN\r\n");
                let mut data = response.to_vec();
                data.extend_from_slice(b"\r\n");
                self.route(tag, user, VecDeque::from([command, data]))
            }
            Err(_) => self.error(tagged(&tag, "BAD Invalid SASL PLAIN response")),
        }
    }

    fn sasl_line(&mut self, input: &mut BytesMut) -> Option<Step> {
        let Routing::SaslResponse { tag } = &mut self.state else { return None };
        let tag = std::mem::take(tag);
        let response = match line::take_line(input, self.max_line) {
            Line::Incomplete => {
                self.state = Routing::SaslResponse { tag };
                return None;
            }
            Line::TooLong => return Some(self.close(BYE_LINE_TOO_LONG)),
            Line::Complete(response) => response,
        };
        let response = line::trim_eol(&response);
        if response == b"*" {
            self.state = Routing::Unrouted;
            return Some(Step::to_client(tagged(&tag, "BAD Authentication aborted by client")));
        }
        Some(self.plain_response(tag, response))
    }

    /// Sends the first segment of the identification; the rest follows the backend's `+`.
    fn replay(&mut self, tag: Vec<u8>, mut replay: VecDeque<Vec<u8>>) -> Step {
        let first = replay.pop_front().unwrap_or_default();
        self.state = Routing::Replaying { tag, rest: replay };
        Step::to_backend(first)
    }

    /// One line of the routed backend's answer to mailtls's naming ID.
    fn naming_reply(&mut self, input: &mut BytesMut) -> Option<Step> {
        let reply = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(self.backend_unavailable()),
            Line::Complete(reply) => reply,
        };
        match naming_answer(&reply) {
            Naming::More => Some(Step::to_client(Vec::new())),
            Naming::Refused => Some(self.backend_unavailable()),
            Naming::Accepted => {
                let Routing::Naming { tag, replay } = std::mem::replace(&mut self.state, Routing::Done)
                else {
                    return None;
                };
                Some(self.replay(tag, replay))
            }
        }
    }

    /// A backend line while the identification is being replayed.
    fn replay_response(&mut self, input: &mut BytesMut) -> Option<Step> {
        let response = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(self.backend_unavailable()),
            Line::Complete(response) => response,
        };
        // Literals in answers to a login are unheard of; refusing them keeps framing simple.
        if literal_marker(&response) != Marker::None {
            return Some(self.backend_unavailable());
        }
        let Routing::Replaying { tag, rest } = &mut self.state else { return None };
        match classify_response(&response) {
            Response::Continuation => match rest.pop_front() {
                // The `+` was for mailtls's replay; the client never asked for it.
                Some(segment) => Some(Step::to_backend(segment)),
                None => Some(self.backend_unavailable()),
            },
            Response::Untagged => Some(Step::to_client(filter_capabilities(&response))),
            Response::Tagged { tag: answered, ok } if answered == *tag => {
                let answer = filter_capabilities(&response);
                if ok {
                    self.state = Routing::Done;
                    return Some(Step::to_client(answer).then(Next::Relay));
                }
                // A refused login forgets this backend: the next try is routed afresh. It
                // counts as an error, so a client cannot guess passwords without bound
                // (each backend sees one try per connection, so its own limit never bites).
                self.errors = self.errors.saturating_add(1);
                if self.errors > self.max_errors {
                    self.state = Routing::Done;
                    let mut both = answer;
                    both.extend_from_slice(BYE_TOO_MANY_ERRORS);
                    return Some(Step::to_client(both).then(Next::Close));
                }
                self.state = Routing::Unrouted;
                Some(Step::to_client(answer).then(Next::Detach))
            }
            Response::Tagged { .. } => Some(Step::to_client(filter_capabilities(&response))),
        }
    }

    fn backend_unavailable(&mut self) -> Step {
        self.state = Routing::Done;
        backend_unavailable()
    }
}

impl Negotiation for ImapRouted {
    fn opening(&mut self) -> Option<Step> {
        let greeting = if self.greet {
            format!("* OK [CAPABILITY {}] {} ready\r\n", self.capabilities, self.hostname).into_bytes()
        } else {
            Vec::new()
        };
        Some(Step::to_client(greeting))
    }

    fn on_greeting(&mut self, input: &mut BytesMut) -> Option<Step> {
        let Routing::Connecting { .. } = self.state else { return None };
        let greeting = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(backend_unavailable()),
            Line::Complete(greeting) => greeting,
        };
        let (star, rest) = line::split_word(&greeting);
        let (status, _) = line::split_word(rest.unwrap_or_default());
        // PREAUTH would leave the replayed login nothing to do: not a server to route to.
        if star != b"*" || !status.eq_ignore_ascii_case(b"OK") {
            return Some(backend_unavailable());
        }
        let Routing::Connecting { tag, replay } = std::mem::replace(&mut self.state, Routing::Done) else {
            return None;
        };
        // The client had mailtls's greeting (or the STARTTLS one): this one is swallowed.
        if let Some(id) = &self.naming {
            self.state = Routing::Naming { tag, replay };
            return Some(Step::to_backend(id.clone()));
        }
        Some(self.replay(tag, replay))
    }

    fn on_route_failed(&mut self) -> Step {
        let tag = match std::mem::replace(&mut self.state, Routing::Unrouted) {
            Routing::Connecting { tag, .. }
            | Routing::Naming { tag, .. }
            | Routing::Replaying { tag, .. } => tag,
            _ => b"*".to_vec(),
        };
        Step::to_client(tagged(&tag, "NO [UNAVAILABLE] Backend server unavailable, try again later"))
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<Step> {
        loop {
            match self.state {
                Routing::Unrouted | Routing::Login { .. } | Routing::Refusing(_) => {}
                Routing::SaslResponse { .. } => return self.sasl_line(input),
                // Lock-step: nothing is read while the backend has the word.
                Routing::Connecting { .. }
                | Routing::Naming { .. }
                | Routing::Replaying { .. }
                | Routing::Done => return None,
            }
            let (line, first, literal) = match self.client.next(input)? {
                Unit::TooLong => return Some(self.close(BYE_LINE_TOO_LONG)),
                Unit::LiteralTooLarge => return Some(self.close(BYE_LITERAL_TOO_LARGE)),
                Unit::LiteralBytes(bytes) => {
                    if let Routing::Login { pieces, .. } = &mut self.state {
                        if let Some(Piece::Literal(l)) = pieces.last_mut() {
                            l.extend_from_slice(&bytes);
                        }
                    }
                    continue;
                }
                Unit::Line { line, first, literal } => (line, first, literal),
            };
            let mut body = line::trim_eol(&line);
            if literal.is_some() {
                let open = body.iter().rposition(|&b| b == b'{').unwrap_or(body.len());
                body = body.get(..open).unwrap_or_default();
            }
            let step = if first {
                self.begin(body, literal)
            } else {
                match &mut self.state {
                    Routing::Login { pieces, .. } => {
                        pieces.push(Piece::Text(body.to_vec()));
                        self.login_segment(literal)
                    }
                    Routing::Refusing(reply) => {
                        let reply = std::mem::take(reply);
                        self.refuse(reply, literal)
                    }
                    _ => None,
                }
            };
            if let Some(step) = step {
                return Some(step);
            }
        }
    }

    fn on_backend(&mut self, input: &mut BytesMut) -> Option<Step> {
        match self.state {
            Routing::Naming { .. } => self.naming_reply(input),
            Routing::Replaying { .. } => self.replay_response(input),
            _ => None,
        }
    }
}

/// Learns an IMAP backend's pre-login capabilities: greeting, `CAPABILITY`, tagged OK.
#[derive(Debug, Default)]
pub struct ImapProbe {
    asked: bool,
    learned: Vec<String>,
}

/// Tag of the probe's commands.
const PROBE_TAG: &[u8] = OWN_TAG;
/// The probe's goodbye.
pub const PROBE_LOGOUT: &[u8] = b"mailtls LOGOUT\r\n";
/// Lines in a probe answer are short; anything longer is not an IMAP server talking.
const PROBE_MAX_LINE: usize = 8 * 1024;

impl super::CapabilityProbe for ImapProbe {
    fn on_backend(&mut self, input: &mut BytesMut) -> Option<ProbeStep> {
        let response = match line::take_line(input, PROBE_MAX_LINE) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(ProbeStep::Failed("response line too long".to_owned())),
            Line::Complete(response) => response,
        };
        let shown = String::from_utf8_lossy(line::trim_eol(&response)).into_owned();
        if !self.asked {
            let (star, rest) = line::split_word(&response);
            let (status, _) = line::split_word(rest.unwrap_or_default());
            if star != b"*" || !status.eq_ignore_ascii_case(b"OK") {
                return Some(ProbeStep::Failed(format!("greeting refused: {shown}")));
            }
            self.asked = true;
            return Some(ProbeStep::Send(b"mailtls CAPABILITY\r\n".to_vec()));
        }
        let body = line::trim_eol(&response);
        let (tag, rest) = line::split_word(body);
        let (word, list) = line::split_word(rest.unwrap_or_default());
        if tag == b"*" && word.eq_ignore_ascii_case(b"CAPABILITY") {
            self.learned = list
                .unwrap_or_default()
                .split(|&b| b == b' ')
                .filter(|c| !c.is_empty() && c.iter().all(|&b| b.is_ascii_graphic()))
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            return Some(ProbeStep::Send(Vec::new()));
        }
        if tag != PROBE_TAG {
            return Some(ProbeStep::Send(Vec::new()));
        }
        if word.eq_ignore_ascii_case(b"OK") && !self.learned.is_empty() {
            return Some(ProbeStep::Done(std::mem::take(&mut self.learned)));
        }
        Some(ProbeStep::Failed(format!("CAPABILITY refused: {shown}")))
    }

    fn quit(&self) -> &'static [u8] {
        PROBE_LOGOUT
    }
}

// ---------------------------------------------------------------------------------------
// Capability filtering
// ---------------------------------------------------------------------------------------

/// Removes the hidden capabilities (STARTTLS, LOGINDISABLED, XCLIENT) from an untagged CAPABILITY response or from a
/// `[CAPABILITY ...]` response code; every other byte of the line is kept as it was.
fn filter_capabilities(line: &[u8]) -> Vec<u8> {
    let body = line::trim_eol(line);
    match capability_list_range(body) {
        Some((start, end)) => {
            let mut out = Vec::with_capacity(line.len());
            out.extend_from_slice(body.get(..start).unwrap_or_default());
            out.extend(without_hidden_capabilities(body.get(start..end).unwrap_or_default()));
            out.extend_from_slice(line.get(end..).unwrap_or_default());
            out
        }
        None => match find_word_ignore_case(body, b"CAPABILITY") {
            // Not capability data in IMAP's grammar, but it names capabilities: a lenient
            // client might still read it as such (junk before the tag, say), so the hidden
            // ones go from it too. Only text after the word changes.
            Some(at) => {
                let start = at + b"CAPABILITY".len();
                let mut out = Vec::with_capacity(line.len());
                out.extend_from_slice(body.get(..start).unwrap_or_default());
                out.extend(without_hidden_words(body.get(start..).unwrap_or_default()));
                out.extend_from_slice(line.get(body.len()..).unwrap_or_default());
                out
            }
            None => line.to_vec(),
        },
    }
}

/// Where `word` stands as a word of its own (not `CAPABILITYX`), in any case.
fn find_word_ignore_case(haystack: &[u8], word: &[u8]) -> Option<usize> {
    let is_word = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'=');
    haystack.windows(word.len()).enumerate().position(|(i, w)| {
        w.eq_ignore_ascii_case(word)
            && !is_word(i.checked_sub(1).and_then(|p| haystack.get(p)))
            && !is_word(haystack.get(i + word.len()))
    })
}

/// Like [`without_hidden_capabilities`] for free text, where a hidden name may carry the
/// code's closing bracket (`STARTTLS]`): the name goes, the bracket stays.
fn without_hidden_words(text: &[u8]) -> Vec<u8> {
    let kept: Vec<&[u8]> = text
        .split(is_blank)
        .map(|word| {
            let name = word.iter().position(|&b| b == b']' || b == b')').map_or(word, |i| &word[..i]);
            if is_hidden_capability(name) {
                &word[name.len()..]
            } else {
                word
            }
        })
        .collect();
    kept.join(&b' ')
}

/// A space or a tab: the grammar says SP, but a lenient client splits on either, so a
/// line a client would read as capabilities must be read that way here too.
fn is_blank(b: &u8) -> bool {
    matches!(b, b' ' | b'\t')
}

/// Where the capability tokens of a response line are: from the blank before the first
/// token to the end of the last one. Blanks before the tag are skipped, as lenient
/// clients skip them (a backend line starting with a space used to pass unfiltered).
fn capability_list_range(body: &[u8]) -> Option<(usize, usize)> {
    let indent = body.iter().take_while(|b| is_blank(b)).count();
    let (start, end) = capability_list_range_unindented(body.get(indent..)?)?;
    Some((indent + start, indent + end))
}

fn capability_list_range_unindented(body: &[u8]) -> Option<(usize, usize)> {
    let first_space = body.iter().position(is_blank)?;
    let tag = body.get(..first_space)?;
    let after_tag = first_space + 1;
    let rest = body.get(after_tag..)?;
    let (word, text) = match rest.iter().position(is_blank) {
        Some(sp) => (rest.get(..sp)?, Some(after_tag + sp)),
        None => (rest, None),
    };
    if tag == b"*" && word.eq_ignore_ascii_case(b"CAPABILITY") {
        return text.map(|start| (start, body.len()));
    }
    let is_status = [&b"OK"[..], b"NO", b"BAD", b"PREAUTH", b"BYE"]
        .iter()
        .any(|status| word.eq_ignore_ascii_case(status));
    if !is_status {
        return None;
    }
    let text_start = text? + 1;
    let code = body.get(text_start..)?.strip_prefix(b"[")?;
    let close = code.iter().position(|&b| b == b']')?;
    let name = code.get(..10)?;
    if !name.eq_ignore_ascii_case(b"CAPABILITY") || !matches!(code.get(10), Some(b' ' | b'\t' | b']')) {
        return None;
    }
    Some((text_start + 1 + 10, text_start + 1 + close))
}

fn without_hidden_capabilities(list: &[u8]) -> Vec<u8> {
    let kept: Vec<&[u8]> = list.split(is_blank).filter(|token| !is_hidden_capability(token)).collect();
    kept.join(&b' ')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn settings() -> Settings {
        Settings { hostname: "mail.example.org".to_owned(), ..Settings::default() }
    }

    #[test]
    fn capability_words_after_junk_before_the_tag_are_filtered_too() {
        // Found by tests/protocol_fuzz.rs: a NUL and a tab before the tag made the line no
        // IMAP response, so it passed whole, though a lenient client could read it.
        let out = filter_capabilities(b"\0\t* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n");
        assert_eq!(out, b"\0\t* OK [CAPABILITY IMAP4rev1 ] hi\r\n".to_vec());
        let out = filter_capabilities(b"\0* CAPABILITY IMAP4rev1 LOGINDISABLED XCLIENT\r\n");
        assert_eq!(out, b"\0* CAPABILITY IMAP4rev1  \r\n".to_vec());
        assert_eq!(filter_capabilities(b"* OK ready\r\n"), b"* OK ready\r\n".to_vec());
    }

    #[test]
    fn only_login_attempts_count_as_refused_logins() {
        // The session counts these in metrics; other refusals must not inflate them.
        let mut pre = ImapPreTls::new(&settings());
        for command in [
            &b"a CAPABILITY\r\n"[..],
            &b"b LOGIN u p\r\n"[..],
            &b"c SELECT INBOX\r\n"[..],
            &b"d authenticate PLAIN\r\n"[..],
            &b"e STARTTLS x\r\n"[..],
        ] {
            assert!(pre.on_client(&mut BytesMut::from(command)).is_some(), "{command:?}");
        }
        assert_eq!(pre.refused_logins(), 2);
    }

    fn buf(bytes: &[u8]) -> BytesMut {
        BytesMut::from(bytes)
    }

    fn pre_tls() -> ImapPreTls {
        ImapPreTls::new(&settings())
    }

    fn reply(bytes: &str) -> Option<PreTlsStep> {
        Some(PreTlsStep::Reply(bytes.as_bytes().to_vec()))
    }

    fn privacy(tag: &str) -> Option<PreTlsStep> {
        reply(&format!(
            "{tag} NO [PRIVACYREQUIRED] Plaintext authentication is disabled, use STARTTLS first\r\n"
        ))
    }

    fn starttls_ok(tag: &str) -> Option<PreTlsStep> {
        Some(PreTlsStep::StartTls(format!("{tag} OK Begin TLS negotiation now\r\n").into_bytes()))
    }

    // ---- framing ----

    #[test]
    fn literal_markers_are_parsed_without_overflow() {
        assert_eq!(literal_marker(b"a LOGIN {5}\r\n"), Marker::Literal(Literal { size: 5, sync: true }));
        assert_eq!(literal_marker(b"a LOGIN {5+}\n"), Marker::Literal(Literal { size: 5, sync: false }));
        assert_eq!(literal_marker(b"a LOGIN ~{0}\r\n"), Marker::Literal(Literal { size: 0, sync: true }));
        assert_eq!(literal_marker(b"a LOGIN {4294967296}\r\n"), Marker::Unparseable);
        assert_eq!(literal_marker(b"a LOGIN {99999999999999999999}\r\n"), Marker::Unparseable);
        assert_eq!(literal_marker(b"a LOGIN {}\r\n"), Marker::None);
        assert_eq!(literal_marker(b"a LOGIN {+}\r\n"), Marker::None);
        assert_eq!(literal_marker(b"a LOGIN {5x}\r\n"), Marker::None);
        assert_eq!(literal_marker(b"a LOGIN \"x {5}\r\n"), Marker::None);
        assert_eq!(
            literal_marker(b"a LOGIN \"x\\\"\" {5}\r\n"),
            Marker::Literal(Literal { size: 5, sync: true })
        );
        assert_eq!(literal_marker(b"}"), Marker::None);
    }

    #[test]
    fn tags_follow_rfc_3501() {
        for good in [&b"a"[..], b"A001", b"a.b]1", b"x-y_z"] {
            assert!(is_valid_tag(good), "{good:?}");
        }
        for bad in [&b""[..], b"+", b"*", b"a+", b"a{", b"a(", b"a\"", b"a%", b"a\x01", b"\xc3\xa9"] {
            assert!(!is_valid_tag(bad), "{bad:?}");
        }
    }

    // ---- before TLS ----

    #[test]
    fn greeting_offers_starttls_and_logindisabled_without_preauth_or_alert() {
        let greeting = pre_tls().greeting();
        assert_eq!(
            greeting,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] mail.example.org ready\r\n"
        );
    }

    #[test]
    fn greeting_hostname_cannot_break_the_line() {
        let s = Settings { hostname: "evil\r\n* PREAUTH".to_owned(), ..Settings::default() };
        let greeting = ImapPreTls::new(&s).greeting();
        assert_eq!(greeting.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn capability_lists_starttls_and_logindisabled_and_no_auth() {
        let mut p = pre_tls();
        let mut input = buf(b"a CAPABILITY\r\n");
        assert_eq!(
            p.on_client(&mut input),
            reply("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\na OK CAPABILITY completed\r\n")
        );
        assert!(input.is_empty());
    }

    #[test]
    fn noop_is_answered() {
        assert_eq!(pre_tls().on_client(&mut buf(b"x1 noop\r\n")), reply("x1 OK NOOP completed\r\n"));
    }

    #[test]
    fn logout_says_bye_and_closes() {
        assert_eq!(
            pre_tls().on_client(&mut buf(b"z LOGOUT\r\n")),
            Some(PreTlsStep::Close(b"* BYE Logging out\r\nz OK LOGOUT completed\r\n".to_vec()))
        );
    }

    #[test]
    fn id_is_answered_with_nil_even_with_literals() {
        let mut p = pre_tls();
        assert_eq!(
            p.on_client(&mut buf(b"a ID (\"name\" \"x\")\r\n")),
            reply("* ID NIL\r\na OK ID completed\r\n")
        );
        let mut input = buf(b"b ID (\"name\" {4+}\r\nb OK \"v\" \"1\")\r\nc NOOP\r\n");
        assert_eq!(p.on_client(&mut input), reply("* ID NIL\r\nb OK ID completed\r\n"));
        assert_eq!(p.on_client(&mut input), reply("c OK NOOP completed\r\n"));
    }

    #[test]
    fn starttls_leaves_the_bytes_behind_it_untouched() {
        // Matrix rows 3, 4 and 7: the injected commands stay for rustls to reject.
        for (tail, tag) in [
            (&b"QZXKP NOOP\r\n"[..], "A"),
            (b"AB12CD34 NOOP\r\n\r\n", "A"),
            (b"b LOGIN evil pw\r\nc APPEND INBOX {500}\r\n", "a"),
        ] {
            let mut p = pre_tls();
            let mut input = buf(format!("{tag} STARTTLS\r\n").as_bytes());
            input.extend_from_slice(tail);
            assert_eq!(p.on_client(&mut input), starttls_ok(tag));
            assert_eq!(&input[..], tail);
        }
    }

    #[test]
    fn starttls_with_a_client_hello_behind_it_hands_the_hello_over() {
        // Matrix row 10: RFC 9051 6.2.1 allows the ClientHello in the same write.
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, b'\r', b'\n', 0x00, 0xff];
        let mut input = buf(b"a STARTTLS\r\n");
        input.extend_from_slice(&hello);
        assert_eq!(pre_tls().on_client(&mut input), starttls_ok("a"));
        assert_eq!(&input[..], &hello);
    }

    #[test]
    fn starttls_in_a_second_segment_is_the_only_line_taken() {
        // Matrix row 8: the race where the injection arrives after the STARTTLS line.
        let mut p = pre_tls();
        let mut input = buf(b"a STARTT");
        assert_eq!(p.on_client(&mut input), None);
        input.extend_from_slice(b"LS\r\n");
        assert_eq!(p.on_client(&mut input), starttls_ok("a"));
        input.extend_from_slice(b"b CAPABILITY\r\n");
        assert_eq!(&input[..], b"b CAPABILITY\r\n");
    }

    #[test]
    fn starttls_case_and_line_end_variants_are_recognised() {
        // Matrix row 9.
        for (line, tag) in [
            (&b"a starttls\n"[..], "a"),
            (b"A StartTLS\r\n", "A"),
            (b"x.y]1 STARTTLS\r\n", "x.y]1"),
            (b"0 STARTTLS\r\n", "0"),
        ] {
            let mut input = buf(line);
            input.extend_from_slice(b"b NOOP\n");
            assert_eq!(pre_tls().on_client(&mut input), starttls_ok(tag));
            assert_eq!(&input[..], b"b NOOP\n");
        }
    }

    #[test]
    fn pipelined_capability_then_starttls_are_both_answered() {
        // Matrix row 12.
        let mut p = pre_tls();
        let mut input = buf(b"a CAPABILITY\r\nb STARTTLS\r\n");
        assert!(matches!(p.on_client(&mut input), Some(PreTlsStep::Reply(_))));
        assert_eq!(p.on_client(&mut input), starttls_ok("b"));
        assert!(input.is_empty());
    }

    #[test]
    fn starttls_with_arguments_is_bad() {
        // Matrix row 24.
        let mut p = pre_tls();
        assert_eq!(
            p.on_client(&mut buf(b"a STARTTLS x\r\n")),
            reply("a BAD STARTTLS takes no arguments\r\n")
        );
        assert_eq!(p.on_client(&mut buf(b"b STARTTLS \r\n")), reply("b BAD STARTTLS takes no arguments\r\n"));
    }

    #[test]
    fn login_before_tls_is_refused_with_privacyrequired() {
        // Matrix row 18.
        assert_eq!(pre_tls().on_client(&mut buf(b"a LOGIN alice secret\r\n")), privacy("a"));
    }

    #[test]
    fn authenticate_before_tls_never_gets_a_continuation() {
        // Matrix row 19, with and without SASL-IR.
        let mut p = pre_tls();
        assert_eq!(p.on_client(&mut buf(b"a AUTHENTICATE PLAIN\r\n")), privacy("a"));
        assert_eq!(p.on_client(&mut buf(b"b authenticate PLAIN AGFsaWNlAHNlY3JldA==\r\n")), privacy("b"));
    }

    #[test]
    fn login_with_literal_plus_is_skipped_and_refused_once() {
        // Matrix row 20.
        let mut p = pre_tls();
        let mut input = buf(b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n");
        assert_eq!(p.on_client(&mut input), privacy("a"));
        assert!(input.is_empty());
        assert_eq!(p.on_client(&mut input), None);
    }

    #[test]
    fn literal_bytes_are_never_parsed_as_commands_before_tls() {
        let mut p = pre_tls();
        let mut input = buf(b"a LOGIN {12+}\r\nb STARTTLS\r\n\r\nc NOOP\r\n");
        assert_eq!(p.on_client(&mut input), privacy("a"));
        assert_eq!(p.on_client(&mut input), reply("c OK NOOP completed\r\n"));
    }

    #[test]
    fn literal_arriving_in_pieces_is_skipped_across_calls() {
        let mut p = pre_tls();
        let mut input = buf(b"a ID {10+}\r\nb STAR");
        assert_eq!(p.on_client(&mut input), None);
        assert!(input.is_empty(), "literal bytes are discarded as they arrive");
        input.extend_from_slice(b"TTLS\r\n");
        assert_eq!(p.on_client(&mut input), reply("* ID NIL\r\na OK ID completed\r\n"));
    }

    #[test]
    fn synchronizing_literal_is_answered_at_once_without_continuation() {
        let mut p = pre_tls();
        let mut input = buf(b"a LOGIN {5}\r\n");
        assert_eq!(p.on_client(&mut input), privacy("a"));
        assert_eq!(
            p.on_client(&mut buf(b"b SELECT {5}\r\n")),
            reply("b BAD Command not permitted before STARTTLS\r\n")
        );
        // Mid-command: the pending verdict is given as soon as a sync literal shows up.
        let mut input = buf(b"c LOGIN {5+}\r\nalice {6}\r\nd NOOP\r\n");
        assert_eq!(p.on_client(&mut input), privacy("c"));
        assert_eq!(p.on_client(&mut input), reply("d OK NOOP completed\r\n"));
    }

    #[test]
    fn other_commands_before_tls_are_bad() {
        // Matrix row 23.
        let mut p = pre_tls();
        for line in [&b"a SELECT INBOX\r\n"[..], b"a XYZZY\r\n", b"a\r\n"] {
            assert_eq!(p.on_client(&mut buf(line)), reply("a BAD Command not permitted before STARTTLS\r\n"));
        }
    }

    #[test]
    fn bad_tags_are_rejected() {
        let mut p = pre_tls();
        for line in [&b"+ NOOP\r\n"[..], b"* NOOP\r\n", b"\r\n", b"a{ NOOP\r\n", b" NOOP\r\n"] {
            assert_eq!(p.on_client(&mut buf(line)), reply("* BAD Invalid tag\r\n"), "{line:?}");
        }
    }

    #[test]
    fn bad_tag_line_still_skips_its_literal() {
        let mut p = pre_tls();
        let mut input = buf(b"+ X {12+}\r\na STARTTLS\r\n\r\n");
        assert_eq!(p.on_client(&mut input), reply("* BAD Invalid tag\r\n"));
        assert!(input.is_empty());
    }

    #[test]
    fn huge_or_unparseable_literal_closes() {
        // Matrix row 36.
        for line in [
            &b"a LOGIN {4294967296}\r\n"[..],
            b"a LOGIN {99999999999999999999}\r\n",
            b"a LOGIN {99999999999999999999+}\r\n",
            b"a ID {65537+}\r\n",
            b"a LOGIN {65537}\r\n",
        ] {
            assert_eq!(
                pre_tls().on_client(&mut buf(line)),
                Some(PreTlsStep::Close(b"* BYE Literal too large\r\n".to_vec())),
                "{line:?}"
            );
        }
    }

    #[test]
    fn overlong_line_closes_and_is_never_split() {
        // Matrix row 35.
        for l in [512, 1000, 2048, 4096, 8192] {
            let mut input = buf(b"NOOP ");
            input.extend(std::iter::repeat_n(b'A', l - 5));
            input.extend_from_slice(b"STARTTLS\r\n");
            assert_eq!(
                pre_tls().on_client(&mut input),
                Some(PreTlsStep::Close(b"* BYE Line too long\r\n".to_vec()))
            );
        }
    }

    #[test]
    fn too_many_errors_close() {
        let mut p = pre_tls();
        for _ in 0..10 {
            assert!(matches!(p.on_client(&mut buf(b"a SELECT x\r\n")), Some(PreTlsStep::Reply(_))));
        }
        assert_eq!(
            p.on_client(&mut buf(b"a SELECT x\r\n")),
            Some(PreTlsStep::Close(b"* BYE Too many errors\r\n".to_vec()))
        );
    }

    #[test]
    fn too_many_commands_close() {
        let mut p = pre_tls();
        for _ in 0..100 {
            assert_eq!(p.on_client(&mut buf(b"a NOOP\r\n")), reply("a OK NOOP completed\r\n"));
        }
        assert_eq!(
            p.on_client(&mut buf(b"a NOOP\r\n")),
            Some(PreTlsStep::Close(b"* BYE Too many commands\r\n".to_vec()))
        );
    }

    #[test]
    fn endless_literal_chain_spends_the_command_budget() {
        let mut p = pre_tls();
        let mut input = buf(b"a ID {0+}\r\n");
        for _ in 0..200 {
            input.extend_from_slice(b" {0+}\r\n");
        }
        assert_eq!(p.on_client(&mut input), Some(PreTlsStep::Close(b"* BYE Too many commands\r\n".to_vec())));
    }

    // ---- after TLS ----

    fn negotiation(entry: Entry) -> ImapNegotiation {
        ImapNegotiation::new(&settings(), entry)
    }

    fn greeted(entry: Entry) -> ImapNegotiation {
        let mut n = negotiation(entry);
        let step = n.on_greeting(&mut buf(b"* OK Dovecot ready.\r\n"));
        assert!(matches!(step, Some(Step { next: Next::Negotiate, .. })));
        n
    }

    fn to_backend(bytes: &[u8]) -> Option<Step> {
        Some(Step::to_backend(bytes))
    }

    fn to_client(bytes: &[u8]) -> Option<Step> {
        Some(Step::to_client(bytes))
    }

    const DOVECOT_GREETING: &[u8] =
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ STARTTLS AUTH=PLAIN LOGINDISABLED] Dovecot ready.\r\n";

    #[test]
    fn implicit_greeting_is_relayed_without_starttls() {
        // Matrix row 29.
        let mut n = negotiation(Entry::Implicit);
        assert_eq!(
            n.on_greeting(&mut buf(DOVECOT_GREETING)),
            to_client(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n")
        );
    }

    #[test]
    fn greeting_after_starttls_is_swallowed() {
        // Matrix row 27: no greeting replay.
        let mut n = negotiation(Entry::AfterStartTls);
        let mut input = buf(DOVECOT_GREETING);
        assert_eq!(n.on_greeting(&mut input), to_client(b""));
        assert!(input.is_empty());
    }

    #[test]
    fn incomplete_greeting_waits() {
        assert_eq!(negotiation(Entry::Implicit).on_greeting(&mut buf(b"* OK hel")), None);
    }

    #[test]
    fn preauth_greeting_goes_straight_to_relay() {
        let mut n = negotiation(Entry::Implicit);
        assert_eq!(
            n.on_greeting(&mut buf(b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")),
            Some(Step::to_client(b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n").then(Next::Relay))
        );
        let mut n = negotiation(Entry::AfterStartTls);
        assert_eq!(
            n.on_greeting(&mut buf(b"* PREAUTH hi\r\n")),
            Some(Step::to_client(b"").then(Next::Relay))
        );
    }

    #[test]
    fn negative_or_malformed_greeting_closes_with_unavailable() {
        let bye = Some(
            Step::to_client(b"* BYE [UNAVAILABLE] Backend server unavailable\r\n").then(Next::Unavailable),
        );
        for greeting in [&b"* BYE go away\r\n"[..], b"+OK pop3\r\n", b"220 smtp\r\n", b"\r\n", b"*\r\n"] {
            assert_eq!(negotiation(Entry::Implicit).on_greeting(&mut buf(greeting)), bye);
        }
        let mut long = buf(b"* OK ");
        long.extend(std::iter::repeat_n(b'x', 20_000));
        assert_eq!(negotiation(Entry::Implicit).on_greeting(&mut long), bye);
    }

    #[test]
    fn capability_reply_hides_starttls_and_logindisabled() {
        // Matrix rows 27 and 47.
        let mut n = greeted(Entry::AfterStartTls);
        assert_eq!(n.on_client(&mut buf(b"a CAPABILITY\r\n")), to_backend(b"a CAPABILITY\r\n"));
        assert_eq!(
            n.on_backend(&mut buf(b"* CAPABILITY IMAP4rev1 starttls ID  AUTH=PLAIN LoginDisabled\r\n")),
            to_client(b"* CAPABILITY IMAP4rev1 ID  AUTH=PLAIN\r\n")
        );
        assert_eq!(n.on_backend(&mut buf(b"* CAPABILITY STARTTLS\n")), to_client(b"* CAPABILITY\n"));
        assert_eq!(
            n.on_backend(&mut buf(b"a OK [CAPABILITY IMAP4rev1 STARTTLS] done\r\n")),
            to_client(b"a OK [CAPABILITY IMAP4rev1] done\r\n")
        );
    }

    #[test]
    fn capability_filter_keeps_unrelated_lines() {
        for line in [
            &b"* OK [CAPABILITYX STARTTLS] x\r\n"[..],
            b"* LIST () \"/\" STARTTLS\r\n",
            b"a NO STARTTLS is not a code\r\n",
            b"* OK [ALERT] STARTTLS\r\n",
            b"* 3 EXISTS\r\n",
        ] {
            assert_eq!(filter_capabilities(line), line.to_vec());
        }
        assert_eq!(filter_capabilities(b"* ok [capability STARTTLS]\r\n"), b"* ok [capability]\r\n".to_vec());
    }

    #[test]
    fn capability_filter_reads_indented_and_tab_separated_lines() {
        assert_eq!(
            filter_capabilities(b" * CAPABILITY IMAP4rev1 STARTTLS\r\n"),
            b" * CAPABILITY IMAP4rev1\r\n".to_vec()
        );
        assert_eq!(
            filter_capabilities(b"\t* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] hi\r\n"),
            b"\t* OK [CAPABILITY IMAP4rev1] hi\r\n".to_vec()
        );
        assert_eq!(
            filter_capabilities(b"*\tCAPABILITY\tIMAP4rev1\tSTARTTLS\r\n"),
            b"*\tCAPABILITY IMAP4rev1\r\n".to_vec()
        );
        assert_eq!(
            filter_capabilities(b"a OK [CAPABILITY\tSTARTTLS] x\r\n"),
            b"a OK [CAPABILITY] x\r\n".to_vec()
        );
    }

    #[test]
    fn repeated_starttls_is_refused_locally() {
        // Matrix row 31.
        let mut n = greeted(Entry::Implicit);
        assert_eq!(n.on_client(&mut buf(b"a STARTTLS\r\n")), to_client(b"a BAD TLS is already active\r\n"));
        assert_eq!(
            n.on_client(&mut buf(b"b starttls extra\n")),
            to_client(b"b BAD TLS is already active\r\n")
        );
        // A STARTTLS with a literal is still never forwarded, literal included.
        let mut input = buf(b"c STARTTLS {5+}\r\nhello\r\nd NOOP\r\n");
        assert_eq!(n.on_client(&mut input), to_client(b"c BAD TLS is already active\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"d NOOP\r\n"));
    }

    #[test]
    fn id_naming_an_origin_reaches_the_backend_as_id_nil() {
        // Matrix row 46: a client must not lend itself mailtls's trust with Dovecot.
        let mut n = greeted(Entry::Implicit);
        let mut input = buf(b"a ID (\"name\" \"x\" \"X-Originating-IP\" \"192.0.2.9\")\r\nb NOOP\r\n");
        assert_eq!(n.on_client(&mut input), to_backend(b"a ID NIL\r\n"));
        assert_eq!(n.on_client(&mut input), None, "lock-step: a's reply is awaited");
        let mut reply = buf(b"* ID (\"name\" \"Dovecot\")\r\na OK ID completed\r\n");
        assert_eq!(n.on_backend(&mut reply), to_client(b"* ID (\"name\" \"Dovecot\")\r\n"));
        assert_eq!(n.on_backend(&mut reply), to_client(b"a OK ID completed\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"b NOOP\r\n"));

        // A literal could hide the key: replaced too, its bytes never forwarded.
        let mut n = greeted(Entry::Implicit);
        let mut input = buf(b"c ID ({16+}\r\nx-originating-ip \"192.0.2.9\")\r\n");
        assert_eq!(n.on_client(&mut input), to_backend(b"c ID NIL\r\n"));
        assert!(input.is_empty(), "the whole command was consumed");

        // An ID that names only the client program is forwarded as sent.
        let mut n = greeted(Entry::Implicit);
        let id = b"d ID (\"name\" \"Thunderbird\" \"version\" \"128\")\r\n";
        assert_eq!(n.on_client(&mut buf(id)), to_backend(id));
    }

    #[test]
    fn id_with_any_trusted_proxy_field_reaches_the_backend_as_id_nil() {
        for id in [
            &b"a ID (\"x-forward-user\" \"root\")\r\n"[..],
            b"a ID (\"X-SESSION-EXT-ID\" \"x\")\r\n",
            b"a ID (\"x-proxy-ttl\" \"9\")\r\n",
            b"a ID (\"x-client-transport\" \"TLS\")\r\n",
            b"a ID (\"x-originating\\-ip\" \"203.0.113.77\")\r\n",
            b"a id (x-connected-ip 127.0.0.1)\r\n",
            b"a ID\r(\"x-originating-ip\" \"203.0.113.77\")\r\n",
        ] {
            let mut n = greeted(Entry::Implicit);
            assert_eq!(n.on_client(&mut buf(id)), to_backend(b"a ID NIL\r\n"), "{id:?}");
        }
    }

    #[test]
    fn client_xclient_after_tls_is_answered_locally_never_forwarded() {
        let mut n = greeted(Entry::Implicit);
        let mut input = buf(b"a XCLIENT ADDR=203.0.113.77\r\nb NOOP\r\nc XCLIENT\rADDR=1.2.3.4\r\n");
        assert_eq!(n.on_client(&mut input), to_client(&tagged(b"a", PROXY_ONLY)));
        assert_eq!(n.on_client(&mut input), to_backend(b"b NOOP\r\n"));
        n.on_backend(&mut buf(b"b OK NOOP completed\r\n"));
        assert_eq!(n.on_client(&mut input), to_client(&tagged(b"c", PROXY_ONLY)));
    }

    #[test]
    fn capability_reply_and_response_code_hide_xclient() {
        let mut n = greeted(Entry::Implicit);
        n.on_client(&mut buf(b"a CAPABILITY\r\n"));
        assert_eq!(
            n.on_backend(&mut buf(b"* CAPABILITY IMAP4rev1 XCLIENT ID xclient\r\n")),
            to_client(b"* CAPABILITY IMAP4rev1 ID\r\n")
        );
        assert_eq!(
            filter_capabilities(b"* OK [CAPABILITY IMAP4rev1 XCLIENT AUTH=PLAIN] ready\r\n"),
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"
        );
        assert_eq!(routed_capabilities(&["IMAP4rev1".to_owned(), "XCLIENT".to_owned()]), "IMAP4rev1");
    }

    fn naming() -> Settings {
        naming_settings(&settings())
    }

    fn naming_settings(base: &Settings) -> Settings {
        Settings { xclient: true, client: Some("192.0.2.7:4242".parse().unwrap()), ..base.clone() }
    }

    const OWN_ID: &[u8] =
        b"mailtls ID (\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"4242\")\r\n";

    #[test]
    fn own_id_names_the_real_client_before_the_greeting_goes_on() {
        let mut n = ImapNegotiation::new(&naming(), Entry::Implicit);
        assert_eq!(n.on_greeting(&mut buf(DOVECOT_GREETING)), to_backend(OWN_ID));
        assert_eq!(n.on_client(&mut buf(b"a LOGIN u p\r\n")), None, "the client waits for the ID's answer");
        let mut reply = buf(b"* ID (\"name\" \"Dovecot\")\r\nmailtls OK Trusted ID completed.\r\n");
        assert_eq!(n.on_backend(&mut reply), to_client(b""), "the ID's untagged answer is swallowed");
        let greeting = n.on_backend(&mut reply).expect("the held greeting");
        assert_eq!(greeting.to_client, filter_capabilities(DOVECOT_GREETING));
        assert_eq!(greeting.next, Next::Negotiate);
        assert_eq!(n.on_client(&mut buf(b"a LOGIN u p\r\n")), to_backend(b"a LOGIN u p\r\n"));

        let mut n = ImapNegotiation::new(&naming(), Entry::AfterStartTls);
        assert_eq!(n.on_greeting(&mut buf(DOVECOT_GREETING)), to_backend(OWN_ID));
        assert_eq!(n.on_backend(&mut buf(b"mailtls OK ID completed.\r\n")), to_client(b""));
    }

    #[test]
    fn own_id_refused_by_the_backend_is_unavailable() {
        for answer in [&b"mailtls BAD Invalid ID parameters\r\n"[..], b"mailtls NO x\r\n", b"* ID {5}\r\n"] {
            let mut n = ImapNegotiation::new(&naming(), Entry::Implicit);
            n.on_greeting(&mut buf(DOVECOT_GREETING));
            assert_eq!(n.on_backend(&mut buf(answer)), Some(backend_unavailable()), "{answer:?}");
        }
    }

    #[test]
    fn routed_own_id_goes_before_the_replay() {
        let mut n = ImapRouted::new(&naming(), true);
        n.opening();
        // Before routing there is no backend: a client's XCLIENT or ID is answered here.
        let refused = n.on_client(&mut buf(b"x XCLIENT ADDR=203.0.113.77\r\n")).expect("answered");
        assert!(refused.to_client.starts_with(b"x BAD ") && refused.to_backend.is_empty());
        let id =
            n.on_client(&mut buf(b"y ID (\"x-originating-ip\" \"203.0.113.77\")\r\n")).expect("answered");
        assert_eq!(id, Step::to_client(&b"* ID NIL\r\ny OK ID completed\r\n"[..]));
        assert_eq!(n.on_client(&mut buf(b"a LOGIN alice secret\r\n")), route_to("alice"));
        assert_eq!(n.on_greeting(&mut buf(b"* OK Dovecot ready.\r\n")), to_backend(OWN_ID));
        assert_eq!(n.on_backend(&mut buf(b"* ID NIL\r\n")), to_client(b""));
        let replay = n.on_backend(&mut buf(b"mailtls OK Trusted ID completed.\r\n")).expect("replay");
        assert!(replay.to_backend.starts_with(b"a LOGIN "), "{replay:?}");
    }

    #[test]
    fn bad_tag_after_tls_is_answered_locally() {
        let mut n = greeted(Entry::Implicit);
        assert_eq!(n.on_client(&mut buf(b"+ NOOP\r\n")), to_client(b"* BAD Invalid tag\r\n"));
    }

    #[test]
    fn too_many_local_refusals_close() {
        let mut n = greeted(Entry::Implicit);
        for _ in 0..10 {
            assert!(n.on_client(&mut buf(b"a STARTTLS\r\n")).is_some());
        }
        assert_eq!(
            n.on_client(&mut buf(b"a STARTTLS\r\n")),
            Some(Step::to_client(b"* BYE Too many errors\r\n").then(Next::Close))
        );
    }

    #[test]
    fn next_command_waits_for_the_tagged_response() {
        let mut n = greeted(Entry::AfterStartTls);
        let mut input = buf(b"a NOOP\r\nb STARTTLS\r\n");
        assert_eq!(n.on_client(&mut input), to_backend(b"a NOOP\r\n"));
        assert_eq!(n.on_client(&mut input), None, "lock-step: a is outstanding");
        assert_eq!(n.on_backend(&mut buf(b"* 0 EXISTS\r\n")), to_client(b"* 0 EXISTS\r\n"));
        assert_eq!(n.on_client(&mut input), None);
        assert_eq!(n.on_backend(&mut buf(b"a OK NOOP done\r\n")), to_client(b"a OK NOOP done\r\n"));
        assert_eq!(n.on_client(&mut input), to_client(b"b BAD TLS is already active\r\n"));
    }

    #[test]
    fn login_ok_hands_over_to_the_relay() {
        // Matrix row 27: LOGIN works.
        let mut n = greeted(Entry::AfterStartTls);
        assert_eq!(
            n.on_client(&mut buf(b"a login alice secret\r\n")),
            to_backend(b"a login alice secret\r\n")
        );
        assert_eq!(
            n.on_backend(&mut buf(b"a OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] Logged in\r\n")),
            Some(Step::to_client(b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n").then(Next::Relay))
        );
    }

    #[test]
    fn failed_login_keeps_negotiating() {
        let mut n = greeted(Entry::AfterStartTls);
        n.on_client(&mut buf(b"a LOGIN alice wrong\r\n"));
        assert_eq!(
            n.on_backend(&mut buf(b"a NO [AUTHENTICATIONFAILED] no\r\n")),
            to_client(b"a NO [AUTHENTICATIONFAILED] no\r\n")
        );
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), to_backend(b"b NOOP\r\n"));
    }

    #[test]
    fn other_tags_do_not_complete_the_command() {
        let mut n = greeted(Entry::AfterStartTls);
        n.on_client(&mut buf(b"a LOGIN alice secret\r\n"));
        assert_eq!(n.on_backend(&mut buf(b"zz OK whatever\r\n")), to_client(b"zz OK whatever\r\n"));
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), None);
    }

    #[test]
    fn sasl_response_is_forwarded_verbatim_never_as_a_command() {
        let mut n = greeted(Entry::AfterStartTls);
        let mut input = buf(b"a AUTHENTICATE PLAIN\r\na STARTTLS\r\n");
        assert_eq!(n.on_client(&mut input), to_backend(b"a AUTHENTICATE PLAIN\r\n"));
        assert_eq!(n.on_client(&mut input), None);
        assert_eq!(n.on_backend(&mut buf(b"+ \r\n")), to_client(b"+ \r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"a STARTTLS\r\n"));
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), None, "waiting for the tagged reply");
        assert_eq!(
            n.on_backend(&mut buf(b"a OK Logged in\r\n")),
            Some(Step::to_client(b"a OK Logged in\r\n").then(Next::Relay))
        );
    }

    #[test]
    fn sasl_ir_authenticate_ok_hands_over_to_the_relay() {
        let mut n = greeted(Entry::Implicit);
        n.on_client(&mut buf(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"));
        assert_eq!(
            n.on_backend(&mut buf(b"a OK done\r\n")),
            Some(Step::to_client(b"a OK done\r\n").then(Next::Relay))
        );
    }

    #[test]
    fn synchronizing_literal_waits_for_the_backend_continuation() {
        let mut n = greeted(Entry::AfterStartTls);
        let mut input = buf(b"a LOGIN {5}\r\n");
        assert_eq!(n.on_client(&mut input), to_backend(b"a LOGIN {5}\r\n"));
        input.extend_from_slice(b"alice {6}\r\n");
        assert_eq!(n.on_client(&mut input), None);
        assert_eq!(n.on_backend(&mut buf(b"+ Ready\r\n")), to_client(b"+ Ready\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"alice"));
        assert_eq!(n.on_client(&mut input), to_backend(b" {6}\r\n"));
        input.extend_from_slice(b"secret\r\n");
        assert_eq!(n.on_client(&mut input), None);
        assert_eq!(n.on_backend(&mut buf(b"+ OK\r\n")), to_client(b"+ OK\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"secret"));
        assert_eq!(n.on_client(&mut input), to_backend(b"\r\n"));
        assert_eq!(n.on_client(&mut input), None);
        assert_eq!(
            n.on_backend(&mut buf(b"a OK Logged in\r\n")),
            Some(Step::to_client(b"a OK Logged in\r\n").then(Next::Relay))
        );
    }

    #[test]
    fn tagged_reply_instead_of_continuation_ends_the_command() {
        let mut n = greeted(Entry::AfterStartTls);
        n.on_client(&mut buf(b"a LOGIN {5}\r\n"));
        assert_eq!(n.on_backend(&mut buf(b"a NO too big\r\n")), to_client(b"a NO too big\r\n"));
        assert_eq!(
            n.on_client(&mut buf(b"b STARTTLS\r\n")),
            to_client(b"b BAD TLS is already active\r\n"),
            "the next line is a command again, not literal data"
        );
    }

    #[test]
    fn literal_plus_is_forwarded_as_it_arrives() {
        let mut n = greeted(Entry::AfterStartTls);
        let mut input = buf(b"a LOGIN {12+}\r\nb STAR");
        assert_eq!(n.on_client(&mut input), to_backend(b"a LOGIN {12+}\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"b STAR"));
        input.extend_from_slice(b"TTLS\r\n {2+}\r\npw\r\n");
        assert_eq!(n.on_client(&mut input), to_backend(b"TTLS\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b" {2+}\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"pw"));
        assert_eq!(n.on_client(&mut input), to_backend(b"\r\n"));
        assert_eq!(n.on_client(&mut input), None);
    }

    #[test]
    fn early_tagged_reply_does_not_turn_literal_data_into_commands() {
        let mut n = greeted(Entry::AfterStartTls);
        let mut input = buf(b"a LOGIN {12+}\r\n");
        n.on_client(&mut input);
        assert_eq!(n.on_backend(&mut buf(b"a BAD no\r\n")), to_client(b"a BAD no\r\n"));
        input.extend_from_slice(b"b STARTTLS\r\n\r\nc NOOP\r\n");
        assert_eq!(n.on_client(&mut input), to_backend(b"b STARTTLS\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"\r\n"));
        assert_eq!(n.on_client(&mut input), to_backend(b"c NOOP\r\n"));
    }

    #[test]
    fn client_literal_too_large_closes() {
        let mut n = greeted(Entry::AfterStartTls);
        let bye = Some(Step::to_client(b"* BYE Literal too large\r\n").then(Next::Close));
        assert_eq!(n.on_client(&mut buf(b"a APPEND INBOX {65537+}\r\n")), bye);
        let mut n = greeted(Entry::AfterStartTls);
        assert_eq!(n.on_client(&mut buf(b"a LOGIN {4294967296}\r\n")), bye);
    }

    #[test]
    fn client_overlong_line_closes() {
        let mut n = greeted(Entry::AfterStartTls);
        let mut input = buf(b"a NOOP ");
        input.extend(std::iter::repeat_n(b'A', 16 * 1024));
        input.extend_from_slice(b"\r\nb STARTTLS\r\n");
        assert_eq!(
            n.on_client(&mut input),
            Some(Step::to_client(b"* BYE Line too long\r\n").then(Next::Close))
        );
    }

    #[test]
    fn backend_literal_is_forwarded_with_its_response() {
        let mut n = greeted(Entry::AfterStartTls);
        n.on_client(&mut buf(b"a ID NIL\r\n"));
        let mut input = buf(b"* ID (\"name\" {9}\r\nDov");
        assert_eq!(n.on_backend(&mut input), to_client(b"* ID (\"name\" {9}\r\n"));
        assert_eq!(n.on_backend(&mut input), to_client(b"Dov"));
        assert_eq!(n.on_backend(&mut input), None);
        input.extend_from_slice(b"\r\na OK)\r\na OK ID completed\r\n");
        assert_eq!(n.on_backend(&mut input), to_client(b"\r\na OK"));
        assert_eq!(n.on_backend(&mut input), to_client(b")\r\n"), "literal data is no tagged reply");
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), None);
        assert_eq!(n.on_backend(&mut input), to_client(b"a OK ID completed\r\n"));
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), to_backend(b"b NOOP\r\n"));
    }

    #[test]
    fn backend_overlong_or_huge_literal_closes_with_unavailable() {
        let bye = Some(
            Step::to_client(b"* BYE [UNAVAILABLE] Backend server unavailable\r\n").then(Next::Unavailable),
        );
        let mut long = buf(b"* OK ");
        long.extend(std::iter::repeat_n(b'x', 16 * 1024));
        assert_eq!(greeted(Entry::Implicit).on_backend(&mut long), bye);
        assert_eq!(greeted(Entry::Implicit).on_backend(&mut buf(b"* X {999999999}\r\n")), bye);
        assert_eq!(greeted(Entry::Implicit).on_backend(&mut buf(b"* X {99999999999}\r\n")), bye);
    }

    #[test]
    fn unsolicited_backend_responses_are_relayed_filtered() {
        let mut n = greeted(Entry::AfterStartTls);
        assert_eq!(
            n.on_backend(&mut buf(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")),
            to_client(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
        );
        assert_eq!(n.on_backend(&mut buf(b"+ what\r\n")), to_client(b"+ what\r\n"));
        assert_eq!(n.on_client(&mut buf(b"a NOOP\r\n")), to_backend(b"a NOOP\r\n"));
    }

    #[test]
    fn backend_bye_is_relayed() {
        let mut n = greeted(Entry::AfterStartTls);
        n.on_client(&mut buf(b"a LOGOUT\r\n"));
        assert_eq!(n.on_backend(&mut buf(b"* BYE Logging out\r\n")), to_client(b"* BYE Logging out\r\n"));
        assert_eq!(
            n.on_backend(&mut buf(b"a OK Logout completed.\r\n")),
            to_client(b"a OK Logout completed.\r\n")
        );
    }

    #[test]
    fn farewells_have_their_words() {
        assert_eq!(
            farewell(Farewell::BackendUnavailable),
            b"* BYE [UNAVAILABLE] Backend server unavailable\r\n"
        );
        assert_eq!(farewell(Farewell::Timeout), b"* BYE Autologout; idle for too long\r\n");
        assert_eq!(farewell(Farewell::ShuttingDown), b"* BYE Server shutting down\r\n");
    }

    // ---- hostile bytes ----

    use crate::protocol::testing::XorShift;

    impl XorShift {
        /// Random bytes biased towards IMAP syntax so the parsers get past their first checks.
        fn bytes(&mut self) -> Vec<u8> {
            const PIECES: [&[u8]; 14] = [
                b"a ",
                b"* ",
                b"+ ",
                b"STARTTLS",
                b"LOGIN",
                b"AUTHENTICATE",
                b"{5}",
                b"{3+}",
                b"{4294967296}",
                b"\r\n",
                b"\n",
                b"OK ",
                b"[CAPABILITY STARTTLS] ",
                b"\"",
            ];
            let mut out = Vec::new();
            for _ in 0..self.below(12) {
                match self.below(3) {
                    0 => out.extend_from_slice(PIECES[self.below(PIECES.len())]),
                    1 => out.extend(std::iter::repeat_n(b'x', self.below(700))),
                    _ => out.extend((0..self.below(16)).map(|_| self.next() as u8)),
                }
            }
            out
        }
    }

    #[test]
    fn random_bytes_never_panic_and_buffers_stay_bounded() {
        let s = Settings { max_pre_tls_line: 512, max_line: 1024, max_literal: 64, ..settings() };
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..4000 {
            let mut p = ImapPreTls::new(&s);
            let mut input = BytesMut::new();
            'pre: for _ in 0..4 {
                input.extend_from_slice(&rng.bytes());
                loop {
                    match p.on_client(&mut input) {
                        None => break,
                        Some(PreTlsStep::Reply(r)) => assert!(r.len() < 2 * 512),
                        Some(_) => break 'pre,
                    }
                }
                assert!(input.len() < s.max_pre_tls_line, "an unread line stays below the bound");
            }

            let entry = if rng.below(2) == 0 { Entry::Implicit } else { Entry::AfterStartTls };
            // A third of the sessions name their client first (xclient), with a greeting
            // good enough to get there, so the naming ID's answer meets hostile bytes too.
            let naming = rng.below(3) == 0;
            let settings = if naming { Settings { xclient: true, ..naming_settings(&s) } } else { s.clone() };
            let mut n = ImapNegotiation::new(&settings, entry);
            let mut greeting =
                if naming { BytesMut::from(&b"* OK hi\r\n"[..]) } else { BytesMut::from(&rng.bytes()[..]) };
            let _ = n.on_greeting(&mut greeting);
            let (mut client, mut backend) = (BytesMut::new(), BytesMut::new());
            'neg: for _ in 0..8 {
                client.extend_from_slice(&rng.bytes());
                backend.extend_from_slice(&rng.bytes());
                for from_client in [true, false] {
                    let before = if from_client { client.len() } else { backend.len() };
                    let mut steps = 0;
                    loop {
                        let step =
                            if from_client { n.on_client(&mut client) } else { n.on_backend(&mut backend) };
                        let Some(step) = step else { break };
                        steps += 1;
                        assert!(steps <= before + 1, "every step consumes bytes");
                        assert!(step.to_backend.len() <= s.max_line + 8);
                        assert!(step.to_client.len() <= s.max_line + 64);
                        if step.next != Next::Negotiate {
                            break 'neg;
                        }
                    }
                    let reads_client = !matches!(n.turn, Turn::Waiting | Turn::Continuation(_))
                        && n.held.is_none()
                        && n.response.is_none()
                        && n.backend_literal_left == 0;
                    if from_client && reads_client && n.client.literal_left == 0 {
                        assert!(client.len() < s.max_line, "an unread line stays below the bound");
                    }
                }
                assert!(backend.len() < s.max_line || n.backend_literal_left > 0);
            }
        }
    }
    // ---- routed listeners ----

    fn routed(greet: bool) -> ImapRouted {
        let learned: Vec<String> = [
            "IMAP4rev1",
            "SASL-IR",
            "LITERAL+",
            "STARTTLS",
            "AUTH=PLAIN",
            "AUTH=CRAM-MD5",
            "LOGINDISABLED",
            "ID",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        ImapRouted::new(&Settings { backend_extensions: Arc::from(learned), ..settings() }, greet)
    }

    fn route_to(user: &str) -> Option<Step> {
        Some(Step::to_client(Vec::new()).then(Next::Route { user: user.to_owned() }))
    }

    /// Feeds `client` and expects the routing step for `user`; then the backend's greeting,
    /// returning the first replayed segment.
    fn routes(n: &mut ImapRouted, client: &[u8], user: &str) -> Vec<u8> {
        let mut input = buf(client);
        assert_eq!(n.on_client(&mut input), route_to(user));
        assert!(input.is_empty(), "left over: {input:?}");
        let step = n.on_greeting(&mut buf(b"* OK Dovecot ready.\r\n")).expect("greeting step");
        assert!(step.to_client.is_empty(), "the backend greeting is swallowed");
        assert_eq!(step.next, Next::Negotiate);
        step.to_backend
    }

    #[test]
    fn routed_greeting_and_capability_show_the_learned_list_filtered() {
        let caps = "IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN ID";
        let mut n = routed(true);
        assert_eq!(
            n.opening(),
            Some(Step::to_client(format!("* OK [CAPABILITY {caps}] mail.example.org ready\r\n")))
        );
        assert_eq!(routed(false).opening(), Some(Step::to_client(Vec::new())));
        assert_eq!(
            n.on_client(&mut buf(b"a capability\r\n")),
            to_client(format!("* CAPABILITY {caps}\r\na OK CAPABILITY completed\r\n").as_bytes())
        );
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), to_client(b"b OK NOOP completed\r\n"));
        assert_eq!(
            n.on_client(&mut buf(b"c ID (\"name\" \"x\")\r\n")),
            to_client(b"* ID NIL\r\nc OK ID completed\r\n")
        );
        assert_eq!(n.on_client(&mut buf(b"d STARTTLS\r\n")), to_client(b"d BAD TLS is already active\r\n"));
        assert_eq!(
            n.on_client(&mut buf(b"e SELECT INBOX\r\n")),
            to_client(b"e BAD Command not permitted before login\r\n")
        );
        assert_eq!(
            n.on_client(&mut buf(b"f LOGOUT\r\n")),
            Some(Step::to_client(b"* BYE Logging out\r\nf OK LOGOUT completed\r\n").then(Next::Close))
        );
        let bare = ImapRouted::new(&settings(), true);
        assert_eq!(bare.capabilities, "IMAP4rev1", "nothing learned yet");
    }

    #[test]
    fn login_atom_and_quoted_forms_route_and_replay_quoted() {
        let mut n = routed(true);
        assert_eq!(
            routes(&mut n, b"a LOGIN alice@example.org secret\r\n", "alice@example.org"),
            b"a LOGIN \"alice@example.org\" \"secret\"\r\n"
        );
        let mut n = routed(false);
        let replay = routes(&mut n, b"t1 login \"bob \\\"the\\\\ man\\\"\" \"p w\"\n", "bob \"the\\ man\"");
        assert_eq!(replay, b"t1 LOGIN \"bob \\\"the\\\\ man\\\"\" \"p w\"\r\n");
    }

    #[test]
    fn login_synchronizing_literals_get_mailtls_own_go_ahead() {
        let mut n = routed(true);
        let mut input = buf(b"a LOGIN {5}\r\n");
        assert_eq!(n.on_client(&mut input), to_client(b"+ Ready for literal data\r\n"));
        input.extend_from_slice(b"alice {6}\r\n");
        assert_eq!(n.on_client(&mut input), to_client(b"+ Ready for literal data\r\n"));
        input.extend_from_slice(b"se");
        assert_eq!(n.on_client(&mut input), None);
        input.extend_from_slice(b"cret\r\n");
        assert_eq!(n.on_client(&mut input), route_to("alice"));
        assert_eq!(
            n.on_greeting(&mut buf(b"* OK hi\r\n")),
            Some(Step::to_backend(b"a LOGIN \"alice\" \"secret\"\r\n"))
        );
        assert_eq!(
            n.on_backend(&mut buf(b"a OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] Logged in\r\n")),
            Some(Step::to_client(b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n").then(Next::Relay))
        );
    }

    #[test]
    fn login_literal_plus_and_mixed_forms() {
        let mut n = routed(true);
        assert_eq!(
            routes(&mut n, b"a LOGIN {5+}\r\nalice \"pw\"\r\n", "alice"),
            b"a LOGIN \"alice\" \"pw\"\r\n"
        );
        let mut n = routed(true);
        assert_eq!(
            routes(&mut n, b"a LOGIN alice {3+}\r\np w\r\n", "alice"),
            b"a LOGIN \"alice\" \"p w\"\r\n"
        );
        let mut n = routed(true);
        assert_eq!(routes(&mut n, b"a LOGIN {0+}\r\n {0+}\r\n\r\n", ""), b"a LOGIN \"\" \"\"\r\n");
    }

    #[test]
    fn eight_bit_credentials_are_replayed_as_literals_waiting_for_the_backend() {
        let mut n = routed(true);
        let first = routes(&mut n, "a LOGIN j\u{f6}rg {4+}\r\np\u{e4}\r\r\n".as_bytes(), "j\u{f6}rg");
        assert_eq!(first, b"a LOGIN {5}\r\n");
        assert_eq!(
            n.on_backend(&mut buf(b"+ OK\r\n")),
            Some(Step::to_backend("j\u{f6}rg {4}\r\n".as_bytes()))
        );
        assert_eq!(n.on_backend(&mut buf(b"+ OK\r\n")), Some(Step::to_backend("p\u{e4}\r\r\n".as_bytes())));
        assert_eq!(n.on_backend(&mut buf(b"+ OK\r\n")), Some(backend_unavailable()), "no more segments");
    }

    #[test]
    fn login_arguments_parse_every_form_and_refuse_the_rest() {
        let t = |s: &[u8]| vec![Piece::Text(s.to_vec())];
        assert_eq!(login_arguments(&t(b"a b")), Some((b"a".to_vec(), b"b".to_vec())));
        assert_eq!(login_arguments(&t(b"\"a b\" ]x")), Some((b"a b".to_vec(), b"]x".to_vec())));
        let mixed =
            vec![Piece::Text(b"".to_vec()), Piece::Literal(b"u\"".to_vec()), Piece::Text(b" \"\"".to_vec())];
        assert_eq!(login_arguments(&mixed), Some((b"u\"".to_vec(), Vec::new())));
        for bad in [
            &b""[..],
            b"a",
            b"a ",
            b"a  b",
            b"a b c",
            b"a b ",
            b"\"a b",
            b"\"a\\x\" b",
            b"a(b c",
            b"a \"b",
            b"a{ b",
            b"* b",
        ] {
            assert_eq!(login_arguments(&t(bad)), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn malformed_identifications_get_bad_and_stay_unrouted() {
        let mut n = routed(true);
        assert_eq!(
            n.on_client(&mut buf(b"a LOGIN alice\r\n")),
            to_client(b"a BAD Invalid arguments to LOGIN\r\n")
        );
        assert_eq!(n.on_client(&mut buf(b"b LOGIN {1}\r\n")), to_client(b"+ Ready for literal data\r\n"));
        assert_eq!(n.on_client(&mut buf(b"x {1}\r\n")), to_client(b"+ Ready for literal data\r\n"));
        assert_eq!(
            n.on_client(&mut buf(b"y {1}\r\n")),
            to_client(b"b BAD Invalid arguments to LOGIN\r\n"),
            "a third literal"
        );
        assert_eq!(
            n.on_client(&mut buf(b"c AUTHENTICATE PLAIN !!!\r\n")),
            to_client(b"c BAD Invalid SASL PLAIN response\r\n")
        );
        assert_eq!(
            n.on_client(&mut buf(b"d AUTHENTICATE PLAIN =\r\n")),
            to_client(b"d BAD Invalid SASL PLAIN response\r\n")
        );
        assert_eq!(
            n.on_client(&mut buf(b"e AUTHENTICATE CRAM-MD5\r\n")),
            to_client(b"e NO Unsupported authentication mechanism\r\n")
        );
        assert_eq!(
            n.on_client(&mut buf(b"f AUTHENTICATE\r\n")),
            to_client(b"f BAD Missing authentication mechanism\r\n")
        );
        assert_eq!(
            n.on_client(&mut buf(b"g APPEND x {3+}\r\nabc\r\nh NOOP\r\n")),
            to_client(b"g BAD Command not permitted before login\r\n")
        );
        assert_eq!(n.on_client(&mut buf(b"h NOOP\r\n")), to_client(b"h OK NOOP completed\r\n"));
    }

    #[test]
    fn authenticate_plain_with_and_without_sasl_ir_replays_without() {
        let response = b"AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA=="; // \0alice@example.org\0secret
        let mut n = routed(true);
        let mut line = b"a AUTHENTICATE PLAIN ".to_vec();
        line.extend_from_slice(response);
        line.extend_from_slice(b"\r\n");
        assert_eq!(routes(&mut n, &line, "alice@example.org"), b"a AUTHENTICATE PLAIN\r\n");
        let mut expected = response.to_vec();
        expected.extend_from_slice(b"\r\n");
        assert_eq!(n.on_backend(&mut buf(b"+ \r\n")), Some(Step::to_backend(expected.clone())));
        assert_eq!(
            n.on_backend(&mut buf(b"a OK Logged in\r\n")),
            Some(Step::to_client(b"a OK Logged in\r\n").then(Next::Relay))
        );

        let mut n = routed(true);
        assert_eq!(n.on_client(&mut buf(b"b authenticate plain\r\n")), to_client(b"+ \r\n"));
        let mut input = buf(response);
        input.extend_from_slice(b"\r\n");
        assert_eq!(n.on_client(&mut input), route_to("alice@example.org"));
        assert_eq!(n.on_greeting(&mut buf(b"* OK\r\n")), Some(Step::to_backend(b"b AUTHENTICATE PLAIN\r\n")));
        assert_eq!(n.on_backend(&mut buf(b"+\r\n")), Some(Step::to_backend(expected)));

        let mut n = routed(true);
        n.on_client(&mut buf(b"c AUTHENTICATE PLAIN\r\n"));
        assert_eq!(n.on_client(&mut buf(b"*\r\n")), to_client(b"c BAD Authentication aborted by client\r\n"));
        assert_eq!(n.on_client(&mut buf(b"d NOOP\r\n")), to_client(b"d OK NOOP completed\r\n"));
    }

    #[test]
    fn refused_login_detaches_and_the_next_one_routes_afresh() {
        let mut n = routed(true);
        routes(&mut n, b"a LOGIN alice wrong\r\n", "alice");
        assert_eq!(n.on_backend(&mut buf(b"* OK [ALERT] hm\r\n")), to_client(b"* OK [ALERT] hm\r\n"));
        assert_eq!(
            n.on_backend(&mut buf(b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")),
            Some(
                Step::to_client(b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n").then(Next::Detach)
            )
        );
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), to_client(b"b OK NOOP completed\r\n"));
        routes(&mut n, b"c LOGIN bob pw\r\n", "bob");
    }

    #[test]
    fn refused_logins_are_bounded() {
        let mut n = routed(true);
        for _ in 0..10 {
            routes(&mut n, b"a LOGIN alice wrong\r\n", "alice");
            assert_eq!(n.on_backend(&mut buf(b"a NO no\r\n")).map(|s| s.next), Some(Next::Detach));
        }
        routes(&mut n, b"a LOGIN alice wrong\r\n", "alice");
        assert_eq!(
            n.on_backend(&mut buf(b"a NO no\r\n")),
            Some(Step::to_client(b"a NO no\r\n* BYE Too many errors\r\n").then(Next::Close))
        );
    }

    #[test]
    fn unreachable_backend_answers_unavailable_and_the_client_may_retry() {
        let mut n = routed(true);
        assert_eq!(n.on_client(&mut buf(b"a7 LOGIN alice secret\r\n")), route_to("alice"));
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), None, "lock-step while routing");
        assert_eq!(
            n.on_route_failed(),
            Step::to_client(b"a7 NO [UNAVAILABLE] Backend server unavailable, try again later\r\n")
        );
        assert_eq!(n.on_client(&mut buf(b"b NOOP\r\n")), to_client(b"b OK NOOP completed\r\n"));
        routes(&mut n, b"a8 LOGIN alice secret\r\n", "alice");
    }

    #[test]
    fn refusing_or_preauth_greeting_is_unavailable() {
        for greeting in [&b"* BYE go away\r\n"[..], b"* PREAUTH hi\r\n", b"junk\r\n"] {
            let mut n = routed(true);
            n.on_client(&mut buf(b"a LOGIN alice secret\r\n"));
            assert_eq!(n.on_greeting(&mut buf(greeting)).map(|s| s.next), Some(Next::Unavailable));
            assert_eq!(
                n.on_route_failed().to_client,
                b"a NO [UNAVAILABLE] Backend server unavailable, try again later\r\n"
            );
        }
    }

    #[test]
    fn imap_probe_learns_the_capability_list() {
        use super::super::CapabilityProbe;
        let mut p = ImapProbe::default();
        assert_eq!(
            p.on_backend(&mut buf(b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")),
            Some(ProbeStep::Send(b"mailtls CAPABILITY\r\n".to_vec()))
        );
        let mut reply = buf(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\nmailtls OK done\r\n");
        assert_eq!(p.on_backend(&mut reply), Some(ProbeStep::Send(Vec::new())));
        assert_eq!(
            p.on_backend(&mut reply),
            Some(ProbeStep::Done(vec![
                "IMAP4rev1".to_owned(),
                "SASL-IR".to_owned(),
                "AUTH=PLAIN".to_owned()
            ]))
        );
        assert_eq!(p.quit(), b"mailtls LOGOUT\r\n");
        let mut p = ImapProbe::default();
        assert!(matches!(p.on_backend(&mut buf(b"* BYE no\r\n")), Some(ProbeStep::Failed(_))));
        let mut p = ImapProbe::default();
        p.on_backend(&mut buf(b"* OK hi\r\n"));
        assert!(matches!(p.on_backend(&mut buf(b"mailtls BAD no\r\n")), Some(ProbeStep::Failed(_))));
    }

    #[test]
    fn routed_random_bytes_never_panic_and_buffers_stay_bounded() {
        let s = Settings { max_line: 1024, max_literal: 64, ..settings() };
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..4000 {
            let mut n = ImapRouted::new(&s, rng.below(2) == 0);
            let _ = n.opening();
            let (mut client, mut backend) = (BytesMut::new(), BytesMut::new());
            'session: for _ in 0..8 {
                client.extend_from_slice(&rng.bytes());
                backend.extend_from_slice(&rng.bytes());
                for _ in 0..64 {
                    let step = match n.on_client(&mut client) {
                        Some(step) => step,
                        None => match n.on_backend(&mut backend) {
                            Some(step) => step,
                            None => break,
                        },
                    };
                    assert!(step.to_client.len() <= s.max_line + 128);
                    match step.next {
                        Next::Route { .. } => {
                            let step = match rng.below(3) {
                                0 => Some(n.on_route_failed()),
                                _ => n.on_greeting(&mut backend),
                            };
                            if step.as_ref().is_some_and(|s| s.next == Next::Unavailable) {
                                n.on_route_failed();
                            }
                        }
                        Next::Negotiate | Next::Detach => {}
                        Next::Relay | Next::Close | Next::Unavailable | Next::Recipient { .. } => {
                            break 'session
                        }
                    }
                }
                if matches!(n.state, Routing::Unrouted) && n.client.literal_left == 0 {
                    assert!(client.len() < s.max_line, "an unread line stays below the bound");
                }
            }
        }
    }
}
