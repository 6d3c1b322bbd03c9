//! POP3 (RFC 1939, 2449, 2595, 3206, 5034): the dialogue mailtls speaks itself before STLS,
//! and the lock-step relay after TLS that hides STLS and ends at PASS, APOP or AUTH `+OK`.
//!
//! On routed listeners, [`Pop3Routed`] answers for the backend until USER or AUTH PLAIN
//! names the user, and [`Pop3Probe`] learns the default backend's CAPA list.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::BytesMut;

use super::line::{self, Line};
use super::trusted_proxy::is_proxy_command;
use super::{
    sasl, Entry, Farewell, Negotiation, Next, PreTls, PreTlsStep, ProbeStep, Protocol, Settings, Step,
};

// RESP-CODES and AUTH-RESP-CODE are advertised so clients may rely on the `[AUTH]` code of
// our refusals (RFC 2449, RFC 3206). USER and SASL are absent: no login before TLS.
const CAPA_BEFORE_TLS: &[u8] =
    b"+OK Capability list follows\r\nSTLS\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n.\r\n";
const TLS_GO_AHEAD: &[u8] = b"+OK Begin TLS negotiation\r\n";
const STLS_TAKES_NO_ARGUMENTS: &[u8] = b"-ERR STLS takes no arguments\r\n";
const PLAINTEXT_AUTH_DISABLED: &[u8] =
    b"-ERR [AUTH] Plaintext authentication is disabled, use STLS first\r\n";
const BYE: &[u8] = b"+OK Bye\r\n";
const UNKNOWN_COMMAND: &[u8] = b"-ERR Unknown command\r\n";
const LINE_TOO_LONG: &[u8] = b"-ERR Line too long\r\n";
const TOO_MANY_ERRORS: &[u8] = b"-ERR Too many errors\r\n";
const TOO_MANY_COMMANDS: &[u8] = b"-ERR Too many commands\r\n";
const TLS_ALREADY_ACTIVE: &[u8] = b"-ERR TLS already active\r\n";
/// The answer to XCLIENT, XOIP and the like from a client (see `trusted_proxy`): only
/// mailtls may speak for its clients, and the backend must never hear a client try.
const PROXY_ONLY: &[u8] = b"-ERR Command not permitted: only the proxy may name the client\r\n";

/// mailtls's last words to a POP3 client when it ends the session itself.
pub fn farewell(why: Farewell) -> Vec<u8> {
    let words: &[u8] = match why {
        Farewell::BackendUnavailable => b"-ERR [SYS/TEMP] Backend server unavailable\r\n",
        Farewell::Timeout => b"-ERR Timeout, closing connection\r\n",
        Farewell::ShuttingDown => b"-ERR [SYS/TEMP] Server shutting down\r\n",
        Farewell::TooManyConnections => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    };
    words.to_vec()
}

fn verb_is(verb: &[u8], name: &str) -> bool {
    verb.eq_ignore_ascii_case(name.as_bytes())
}

/// The command name as the backend reads it: Dovecot ends it at a CR as at a space and takes
/// the rest of the line as arguments, so `XCLIENT\rADDR=...` is an XCLIENT. Any blank or
/// control byte ends it here.
fn verb_of(command: &[u8]) -> &[u8] {
    let command = line::trim_eol(command);
    let end = command.iter().position(|&b| b <= b' ' || b == 0x7f).unwrap_or(command.len());
    command.get(..end).unwrap_or_default()
}

/// Trailing blanks are not an argument: `STLS \r\n` is still a plain STLS.
fn has_argument(rest: Option<&[u8]>) -> bool {
    rest.is_some_and(|rest| rest.iter().any(|&b| b != b' ' && b != b'\t'))
}

/// What mailtls answers to one command before TLS.
enum PreTlsAnswer {
    Reply(&'static [u8]),
    Refuse(&'static [u8]),
    StartTls,
    Quit,
}

fn answer_before_tls(command: &[u8]) -> PreTlsAnswer {
    let (verb, rest) = line::split_word(command);
    if verb_is(verb, "CAPA") {
        PreTlsAnswer::Reply(CAPA_BEFORE_TLS)
    } else if verb_is(verb, "STLS") {
        if has_argument(rest) {
            PreTlsAnswer::Refuse(STLS_TAKES_NO_ARGUMENTS)
        } else {
            PreTlsAnswer::StartTls
        }
    } else if ["USER", "PASS", "APOP", "AUTH"].iter().any(|v| verb_is(verb, v)) {
        PreTlsAnswer::Refuse(PLAINTEXT_AUTH_DISABLED)
    } else if verb_is(verb, "QUIT") {
        PreTlsAnswer::Quit
    } else if is_proxy_command(Protocol::Pop3, verb_of(command)) {
        PreTlsAnswer::Refuse(PROXY_ONLY)
    } else {
        PreTlsAnswer::Refuse(UNKNOWN_COMMAND)
    }
}

/// The plaintext POP3 dialogue on port 110, up to STLS.
pub struct Pop3PreTls {
    hostname: String,
    max_line: usize,
    max_commands: u32,
    max_errors: u32,
    commands: u32,
    errors: u32,
    /// Set once STLS was accepted or the session closed: the buffer is no longer ours.
    finished: bool,
    refused_logins: u32,
}

impl Pop3PreTls {
    pub fn new(settings: &Settings) -> Self {
        Pop3PreTls {
            hostname: settings.hostname.clone(),
            max_line: settings.max_pre_tls_line,
            max_commands: settings.max_pre_tls_commands,
            max_errors: settings.max_errors,
            commands: 0,
            errors: 0,
            finished: false,
            refused_logins: 0,
        }
    }

    fn close(&mut self, reply: &[u8]) -> PreTlsStep {
        self.finished = true;
        PreTlsStep::Close(reply.to_vec())
    }

    fn refuse(&mut self, reply: &'static [u8]) -> PreTlsStep {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            self.close(TOO_MANY_ERRORS)
        } else {
            PreTlsStep::Reply(reply.to_vec())
        }
    }
}

impl PreTls for Pop3PreTls {
    fn refused_logins(&self) -> u32 {
        self.refused_logins
    }

    // No APOP timestamp: APOP must not look usable before TLS (RFC 2595 section 4).
    fn greeting(&self) -> Vec<u8> {
        format!("+OK {} POP3 ready\r\n", self.hostname).into_bytes()
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<PreTlsStep> {
        if self.finished {
            return None;
        }
        let command = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(self.close(LINE_TOO_LONG)),
            Line::Complete(command) => command,
        };
        self.commands = self.commands.saturating_add(1);
        if self.commands > self.max_commands {
            return Some(self.close(TOO_MANY_COMMANDS));
        }
        Some(match answer_before_tls(&command) {
            PreTlsAnswer::Reply(reply) => PreTlsStep::Reply(reply.to_vec()),
            PreTlsAnswer::Refuse(reply) => {
                if reply == PLAINTEXT_AUTH_DISABLED {
                    self.refused_logins = self.refused_logins.saturating_add(1);
                }
                self.refuse(reply)
            }
            PreTlsAnswer::Quit => self.close(BYE),
            PreTlsAnswer::StartTls => {
                // Whatever follows the STLS line belongs to the TLS handshake, not to us.
                self.finished = true;
                PreTlsStep::StartTls(TLS_GO_AHEAD.to_vec())
            }
        })
    }
}

/// The client command a backend response answers; POP3 responses do not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    /// Multi-line on `+OK`; STLS lines are removed.
    Capa,
    /// Other commands whose `+OK` starts a dot-terminated list (mechanisms, RFC 1939 lists).
    Listing,
    /// `AUTH <mechanism>`: may answer with `+ ` continuations.
    AuthMechanism,
    /// PASS and APOP: `+OK` means authenticated.
    Login,
    /// The backend hangs up after answering.
    Quit,
    /// One status line, whatever it says.
    Simple,
}

fn classify(command: &[u8]) -> Command {
    let (_, rest) = line::split_word(command);
    let verb = verb_of(command);
    let argument = has_argument(rest);
    if verb_is(verb, "CAPA") {
        Command::Capa
    } else if verb_is(verb, "AUTH") {
        if argument {
            Command::AuthMechanism
        } else {
            Command::Listing
        }
    } else if verb_is(verb, "PASS") || verb_is(verb, "APOP") {
        Command::Login
    } else if verb_is(verb, "QUIT") {
        Command::Quit
    } else if ((verb_is(verb, "LIST") || verb_is(verb, "UIDL")) && !argument)
        || verb_is(verb, "RETR")
        || verb_is(verb, "TOP")
    {
        // Refused before login by any sane backend, but if one says +OK the list must be
        // consumed as one response or its lines would be taken for later responses.
        Command::Listing
    } else {
        Command::Simple
    }
}

/// The status indicator that starts a backend response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    Err,
    /// `+ ` or a bare `+`: a SASL challenge (RFC 5034), never to be read as `+OK`.
    Continuation,
    Malformed,
}

fn status_of(response: &[u8]) -> Status {
    let (indicator, _) = line::split_word(response);
    if indicator.eq_ignore_ascii_case(b"+OK") {
        Status::Ok
    } else if indicator.eq_ignore_ascii_case(b"-ERR") {
        Status::Err
    } else if indicator == b"+" {
        Status::Continuation
    } else {
        Status::Malformed
    }
}

/// A lone `.` ends a multi-line response; `..` and other dot-stuffed lines are data.
fn is_terminator(response_line: &[u8]) -> bool {
    line::trim_eol(response_line) == b"."
}

/// CAPA lines the client must not see: STLS (the TLS is mailtls's) and the commands by
/// which a trusted proxy names its client (that trust is mailtls's alone).
fn is_hidden_capability(capability: &[u8]) -> bool {
    let (keyword, _) = line::split_word(capability);
    verb_is(keyword, "STLS") || is_proxy_command(Protocol::Pop3, keyword)
}

/// The greeting without a leading response code that announces a proxy command: Dovecot
/// greets a trusted peer (every client, seen through mailtls) with `+OK [XCLIENT] ...`.
fn without_proxy_code(greeting: &[u8]) -> Vec<u8> {
    let Some(text) =
        greeting.get(4..).filter(|_| greeting.get(..4).is_some_and(|s| s.eq_ignore_ascii_case(b"+OK ")))
    else {
        return greeting.to_vec();
    };
    let Some(code) =
        text.strip_prefix(b"[").and_then(|rest| rest.get(..rest.iter().position(|&b| b == b']')?))
    else {
        return greeting.to_vec();
    };
    if !is_proxy_command(Protocol::Pop3, code) {
        return greeting.to_vec();
    }
    let after = text.get(code.len() + 2..).unwrap_or_default();
    let mut out = b"+OK ".to_vec();
    out.extend_from_slice(after.strip_prefix(b" ").unwrap_or(after));
    out
}

/// Whether the greeting offers Dovecot's XCLIENT, i.e. the backend trusts mailtls.
fn offers_xclient(greeting: &[u8]) -> bool {
    without_proxy_code(greeting) != greeting
}

/// mailtls's own XCLIENT naming the client (Dovecot pop3-login's ADDR and PORT fields).
fn xclient_command(client: SocketAddr) -> Vec<u8> {
    format!("XCLIENT ADDR={} PORT={}\r\n", client.ip().to_canonical(), client.port()).into_bytes()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The backend's greeting is outstanding.
    Greeting,
    /// Nothing outstanding: the next client line is a command.
    Idle,
    /// The first line of the response to this command is outstanding.
    Awaiting(Command),
    /// Inside a dot-terminated response; `capa`: hidden capabilities are removed.
    MultiLine { capa: bool },
    /// mailtls's own XCLIENT was sent after the backend's positive greeting (kept in
    /// `Pop3Negotiation::greeting`); its answer is awaited before the greeting goes on.
    Xclient,
    /// The backend sent a SASL challenge: the client's next line is SASL data.
    SaslResponse,
    /// Relay or close was decided; nothing more is examined.
    Done,
}

/// The POP3 negotiation after TLS, until the backend accepts the client's credentials.
pub struct Pop3Negotiation {
    entry: Entry,
    /// The XCLIENT to send after the greeting (`xclient = true` listeners).
    xclient: Option<Vec<u8>>,
    /// The greeting held back while XCLIENT is answered.
    greeting: Vec<u8>,
    max_line: usize,
    max_errors: u32,
    errors: u32,
    state: State,
}

impl Pop3Negotiation {
    pub fn new(settings: &Settings, entry: Entry) -> Self {
        Pop3Negotiation {
            entry,
            xclient: settings.client.filter(|_| settings.xclient).map(xclient_command),
            greeting: Vec::new(),
            max_line: settings.max_line,
            max_errors: settings.max_errors,
            errors: 0,
            state: State::Greeting,
        }
    }

    fn backend_unavailable(&mut self) -> Step {
        self.state = State::Done;
        Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
    }

    fn close_client(&mut self, reply: &[u8]) -> Step {
        self.state = State::Done;
        Step::to_client(reply).then(Next::Close)
    }

    /// One backend line, or the step that ends the session when the line outgrows its bound.
    fn take_backend_line(&mut self, input: &mut BytesMut) -> Option<Result<BytesMut, Step>> {
        match line::take_line(input, self.max_line) {
            Line::Incomplete => None,
            Line::TooLong => Some(Err(self.backend_unavailable())),
            Line::Complete(response) => Some(Ok(response)),
        }
    }

    fn take_client_line(&mut self, input: &mut BytesMut) -> Option<Result<BytesMut, Step>> {
        match line::take_line(input, self.max_line) {
            Line::Incomplete => None,
            Line::TooLong => Some(Err(self.close_client(LINE_TOO_LONG))),
            Line::Complete(command) => Some(Ok(command)),
        }
    }

    fn client_command(&mut self, input: &mut BytesMut) -> Option<Step> {
        let command = match self.take_client_line(input)? {
            Ok(command) => command,
            Err(step) => return Some(step),
        };
        let verb = verb_of(&command);
        if verb_is(verb, "STLS") {
            return Some(self.refuse(TLS_ALREADY_ACTIVE));
        }
        if is_proxy_command(Protocol::Pop3, verb) {
            return Some(self.refuse(PROXY_ONLY));
        }
        self.state = State::Awaiting(classify(&command));
        Some(Step::to_backend(command.to_vec()))
    }

    /// A second STLS inside TLS, or a client trying to name itself, is answered here: the
    /// backend must never see either.
    fn refuse(&mut self, reply: &[u8]) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            self.close_client(TOO_MANY_ERRORS)
        } else {
            Step::to_client(reply)
        }
    }

    /// SASL data is forwarded verbatim, never read as a command (`STLS` here is base64).
    fn sasl_response(&mut self, input: &mut BytesMut) -> Option<Step> {
        let data = match self.take_client_line(input)? {
            Ok(data) => data,
            Err(step) => return Some(step),
        };
        self.state = State::Awaiting(Command::AuthMechanism);
        Some(Step::to_backend(data.to_vec()))
    }

    fn response(&mut self, command: Command, input: &mut BytesMut) -> Option<Step> {
        let first = match self.take_backend_line(input)? {
            Ok(first) => first,
            Err(step) => return Some(step),
        };
        let relayed = first.to_vec();
        let step = match (command, status_of(&first)) {
            (_, Status::Malformed) => self.backend_unavailable(),
            (Command::AuthMechanism, Status::Continuation) => {
                self.state = State::SaslResponse;
                Step::to_client(relayed)
            }
            (_, Status::Continuation) => self.backend_unavailable(),
            (Command::Quit, _) => {
                self.state = State::Done;
                Step::to_client(relayed).then(Next::Close)
            }
            (Command::AuthMechanism | Command::Login, Status::Ok) => {
                self.state = State::Done;
                Step::to_client(relayed).then(Next::Relay)
            }
            (Command::Capa | Command::Listing, Status::Ok) => {
                let capa = command == Command::Capa;
                self.state = State::MultiLine { capa };
                return self.relay_list(capa, input, relayed);
            }
            (_, Status::Ok | Status::Err) => {
                self.state = State::Idle;
                Step::to_client(relayed)
            }
        };
        Some(step)
    }

    /// Relays the list lines buffered so far, up to and including the terminating `.`.
    /// Memory stays bounded by what is already buffered: the list is never held whole.
    fn relay_list(&mut self, capa: bool, input: &mut BytesMut, mut relayed: Vec<u8>) -> Option<Step> {
        let mut consumed = !relayed.is_empty();
        loop {
            match line::take_line(input, self.max_line) {
                Line::Incomplete => break,
                // Relay what came before the bad line first; the next call ends the session.
                Line::TooLong if consumed => break,
                Line::TooLong => return Some(self.backend_unavailable()),
                Line::Complete(list_line) => {
                    consumed = true;
                    if is_terminator(&list_line) {
                        self.state = State::Idle;
                        relayed.extend_from_slice(&list_line);
                        break;
                    }
                    if !(capa && is_hidden_capability(&list_line)) {
                        relayed.extend_from_slice(&list_line);
                    }
                }
            }
        }
        consumed.then(|| Step::to_client(relayed))
    }

    /// The backend's greeting as the client may see it: relayed without its `[XCLIENT]`
    /// code on implicit TLS; swallowed after STLS, since the client already has mailtls's
    /// greeting and a second one would be unsolicited data in the TLS session.
    fn greet(&self, greeting: &[u8]) -> Step {
        match self.entry {
            Entry::Implicit => Step::to_client(without_proxy_code(greeting)),
            Entry::AfterStartTls | Entry::Plaintext { .. } | Entry::Routed { .. } => {
                Step::to_client(Vec::new())
            }
        }
    }

    /// Dovecot answers a trusted XCLIENT with `+OK Updated`; anything else leaves the
    /// backend believing the client is mailtls, so the session ends as unavailable.
    fn xclient_reply(&mut self, input: &mut BytesMut) -> Option<Step> {
        let reply = match self.take_backend_line(input)? {
            Ok(reply) => reply,
            Err(step) => return Some(step),
        };
        if status_of(&reply) != Status::Ok {
            return Some(self.backend_unavailable());
        }
        self.state = State::Idle;
        let greeting = std::mem::take(&mut self.greeting);
        Some(self.greet(&greeting))
    }

    /// A status line nobody asked for (e.g. an idle timeout notice) is passed on; anything
    /// else means the two sides no longer agree on where responses begin.
    fn unsolicited(&mut self, input: &mut BytesMut) -> Option<Step> {
        let notice = match self.take_backend_line(input)? {
            Ok(notice) => notice,
            Err(step) => return Some(step),
        };
        Some(match status_of(&notice) {
            Status::Ok | Status::Err => Step::to_client(notice.to_vec()),
            Status::Continuation | Status::Malformed => self.backend_unavailable(),
        })
    }
}

impl Negotiation for Pop3Negotiation {
    fn on_greeting(&mut self, input: &mut BytesMut) -> Option<Step> {
        if self.state != State::Greeting {
            return None;
        }
        let greeting = match self.take_backend_line(input)? {
            Ok(greeting) => greeting,
            Err(step) => return Some(step),
        };
        if status_of(&greeting) != Status::Ok {
            return Some(self.backend_unavailable());
        }
        if let Some(xclient) = self.xclient.take() {
            // A backend that does not offer XCLIENT does not trust mailtls: it would ignore
            // the command and log mailtls's address for every client. Better said at once.
            if !offers_xclient(&greeting) {
                return Some(self.backend_unavailable());
            }
            self.state = State::Xclient;
            self.greeting = greeting.to_vec();
            return Some(Step::to_backend(xclient));
        }
        self.state = State::Idle;
        Some(self.greet(&greeting))
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<Step> {
        match self.state {
            State::Idle => self.client_command(input),
            State::SaslResponse => self.sasl_response(input),
            _ => None,
        }
    }

    fn on_backend(&mut self, input: &mut BytesMut) -> Option<Step> {
        match self.state {
            State::Greeting => self.on_greeting(input),
            State::Idle => self.unsolicited(input),
            State::Awaiting(command) => self.response(command, input),
            // The backend may end a SASL exchange before the client answers (e.g. timeout).
            State::SaslResponse => self.response(Command::AuthMechanism, input),
            State::MultiLine { capa } => self.relay_list(capa, input, Vec::new()),
            State::Xclient => self.xclient_reply(input),
            State::Done => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Routed listeners: mailtls answers until USER / AUTH PLAIN names the user
// ---------------------------------------------------------------------------------------

const SASL_GO_AHEAD: &[u8] = b"+ \r\n";
const MECHANISMS: &[u8] = b"+OK\r\nPLAIN\r\n.\r\n";
const NOT_BEFORE_LOGIN: &[u8] = b"-ERR Unknown command or not before login\r\n";
const USER_FIRST: &[u8] = b"-ERR No user name given (USER first)\r\n";
const NO_USER_NAME: &[u8] = b"-ERR Missing user name\r\n";
const NO_APOP: &[u8] = b"-ERR APOP is not available here\r\n";
const UNSUPPORTED_MECHANISM: &[u8] = b"-ERR Unsupported authentication mechanism\r\n";
const BAD_PLAIN: &[u8] = b"-ERR Invalid SASL PLAIN response\r\n";
const SASL_CANCELLED: &[u8] = b"-ERR Authentication cancelled\r\n";
const ROUTE_FAILED: &[u8] = b"-ERR [SYS/TEMP] Backend server unavailable, try again later\r\n";

/// The CAPA lines a routed listener announces before login: the default backend's, learned
/// by [`Pop3Probe`], minus STLS, with the SASL line cut down to PLAIN (the only mechanism
/// mailtls can read a user name from). Before anything was learned: USER alone.
fn routed_capabilities(learned: &[String]) -> Vec<u8> {
    let mut out = b"+OK Capability list follows\r\n".to_vec();
    let mut kept = 0;
    for capability in learned {
        let (keyword, mechanisms) = line::split_word(capability.as_bytes());
        if is_hidden_capability(capability.as_bytes()) {
            continue;
        }
        if verb_is(keyword, "SASL") {
            let plain = mechanisms
                .unwrap_or_default()
                .split(|&b| b == b' ')
                .any(|m| m.eq_ignore_ascii_case(b"PLAIN"));
            if plain {
                out.extend_from_slice(b"SASL PLAIN\r\n");
                kept += 1;
            }
            continue;
        }
        out.extend_from_slice(capability.as_bytes());
        out.extend_from_slice(b"\r\n");
        kept += 1;
    }
    if kept == 0 {
        out.extend_from_slice(b"USER\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Which identification is being replayed to the routed backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Identification {
    /// `USER name`: its `+OK` leads to PASS, which the ordinary negotiation forwards.
    User,
    /// `AUTH PLAIN`: its `+OK` is the login.
    AuthPlain,
}

/// Where a routed POP3 session stands.
#[derive(Debug)]
enum Routing {
    /// No backend: mailtls answers commands itself.
    Unrouted,
    /// `+ ` was sent for AUTH PLAIN; the client's response line comes next.
    SaslResponse,
    /// [`Next::Route`] was given; the session is connecting the backend.
    Connecting { what: Identification, replay: VecDeque<Vec<u8>> },
    /// mailtls's own XCLIENT went to the routed backend; the replay follows its `+OK`.
    Naming { what: Identification, replay: VecDeque<Vec<u8>> },
    /// The identification went to the backend; `rest` goes after each of its `+`.
    Replaying { what: Identification, rest: VecDeque<Vec<u8>> },
    /// The backend accepted USER: the ordinary negotiation carries on (PASS, CAPA...).
    /// `login` is set while the answer to a forwarded PASS is outstanding.
    Connected { login: bool },
    /// Relay or close was decided.
    Done,
}

/// The negotiation of a routed POP3 listener: mailtls's own dialogue until USER or AUTH
/// PLAIN, then the replay to the backend chosen for that user, then the ordinary
/// negotiation (PASS) and relay.
pub struct Pop3Routed {
    greet: bool,
    /// The XCLIENT each routed backend gets before the replay (`xclient = true`).
    xclient: Option<Vec<u8>>,
    hostname: String,
    capabilities: Vec<u8>,
    max_line: usize,
    max_errors: u32,
    errors: u32,
    state: Routing,
    /// The ordinary negotiation with the routed backend, once USER was accepted.
    connected: Pop3Negotiation,
}

impl Pop3Routed {
    pub fn new(settings: &Settings, greet: bool) -> Self {
        let mut connected = Pop3Negotiation::new(settings, Entry::AfterStartTls);
        // The routed backend's greeting is consumed by this machine, never by that one.
        connected.state = State::Idle;
        Pop3Routed {
            greet,
            xclient: connected.xclient.take(),
            hostname: settings.hostname.chars().filter(|c| !c.is_control()).collect(),
            capabilities: routed_capabilities(&settings.backend_extensions),
            max_line: settings.max_line,
            max_errors: settings.max_errors,
            errors: 0,
            state: Routing::Unrouted,
            connected,
        }
    }

    fn error(&mut self, reply: &[u8]) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            self.close(TOO_MANY_ERRORS)
        } else {
            Step::to_client(reply)
        }
    }

    fn close(&mut self, reply: &[u8]) -> Step {
        self.state = Routing::Done;
        Step::to_client(reply).then(Next::Close)
    }

    fn backend_unavailable(&mut self) -> Step {
        self.state = Routing::Done;
        Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
    }

    fn route(&mut self, what: Identification, user: String, replay: VecDeque<Vec<u8>>) -> Step {
        self.state = Routing::Connecting { what, replay };
        Step::to_client(Vec::new()).then(Next::Route { user })
    }

    /// One command while no backend is chosen (or, for USER and AUTH, while one is: every
    /// identification is routed afresh).
    fn command(&mut self, command: &[u8]) -> Step {
        let (verb, rest) = line::split_word(command);
        let argument = rest.filter(|_| has_argument(rest)).unwrap_or_default();
        if verb_is(verb, "USER") {
            if argument.is_empty() {
                return self.error(NO_USER_NAME);
            }
            let mut replay = b"USER ".to_vec();
            replay.extend_from_slice(argument);
            replay.extend_from_slice(b"\r\n");
            let user = String::from_utf8_lossy(argument).into_owned();
            return self.route(Identification::User, user, VecDeque::from([replay]));
        }
        if verb_is(verb, "AUTH") {
            let (mechanism, initial) = line::split_word(argument);
            if mechanism.is_empty() {
                return Step::to_client(MECHANISMS);
            }
            if !verb_is(mechanism, "PLAIN") {
                return self.error(UNSUPPORTED_MECHANISM);
            }
            return match initial.filter(|r| !r.is_empty()) {
                // RFC 5034's initial response, on the command line.
                Some(response) => self.plain_response(response),
                None => {
                    self.state = Routing::SaslResponse;
                    Step::to_client(SASL_GO_AHEAD)
                }
            };
        }
        if verb_is(verb, "CAPA") {
            Step::to_client(self.capabilities.clone())
        } else if verb_is(verb, "NOOP") {
            Step::to_client(b"+OK\r\n".to_vec())
        } else if verb_is(verb, "QUIT") {
            self.close(BYE)
        } else if verb_is(verb, "STLS") {
            self.error(TLS_ALREADY_ACTIVE)
        } else if is_proxy_command(Protocol::Pop3, verb_of(command)) {
            self.error(PROXY_ONLY)
        } else if verb_is(verb, "PASS") {
            self.error(USER_FIRST)
        } else if verb_is(verb, "APOP") {
            // APOP names its user too, but its digest needs the timestamp of a greeting
            // the routed backend never sent to this client.
            self.error(NO_APOP)
        } else {
            self.error(NOT_BEFORE_LOGIN)
        }
    }

    /// Routes by the PLAIN response; the backend gets `AUTH PLAIN` without an initial
    /// response and the client's base64 text after its `+`.
    fn plain_response(&mut self, response: &[u8]) -> Step {
        self.state = Routing::Unrouted;
        match sasl::plain_user(response) {
            Ok(user) => {
                let mut data = response.to_vec();
                data.extend_from_slice(b"\r\n");
                let replay = VecDeque::from([b"AUTH PLAIN\r\n".to_vec(), data]);
                self.route(Identification::AuthPlain, user, replay)
            }
            Err(_) => self.error(BAD_PLAIN),
        }
    }

    fn take_client_line(&mut self, input: &mut BytesMut) -> Option<Result<BytesMut, Step>> {
        match line::take_line(input, self.max_line) {
            Line::Incomplete => None,
            Line::TooLong => Some(Err(self.close(LINE_TOO_LONG))),
            Line::Complete(command) => Some(Ok(command)),
        }
    }

    /// A client line while the routed backend holds the session before login.
    fn connected_command(&mut self, input: &mut BytesMut) -> Option<Step> {
        if self.connected.state != State::Idle {
            return None;
        }
        let command = match self.take_client_line(input)? {
            Ok(command) => command,
            Err(step) => return Some(step),
        };
        let (verb, _) = line::split_word(&command);
        if ["USER", "AUTH", "APOP"].iter().any(|v| verb_is(verb, v)) {
            self.state = Routing::Unrouted;
            return Some(self.command(&command));
        }
        let login = verb_is(verb, "PASS");
        self.state = Routing::Connected { login };
        let mut one = command;
        self.connected.on_client(&mut one)
    }

    /// A backend response while the routed backend holds the session before login.
    fn connected_response(&mut self, login: bool, input: &mut BytesMut) -> Option<Step> {
        let step = self.connected.on_backend(input)?;
        if step.next == Next::Relay {
            self.state = Routing::Done;
            return Some(step);
        }
        if step.next != Next::Negotiate {
            self.state = Routing::Done;
            return Some(step);
        }
        self.state = Routing::Connected { login: false };
        if login && step.to_client.starts_with(b"-ERR") {
            return Some(self.refused_login(step.to_client));
        }
        Some(step)
    }

    /// The routed backend refused the login: forget it, so the next try is routed afresh;
    /// count it, so a client cannot guess passwords without bound.
    fn refused_login(&mut self, answer: Vec<u8>) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            self.state = Routing::Done;
            let mut both = answer;
            both.extend_from_slice(TOO_MANY_ERRORS);
            return Step::to_client(both).then(Next::Close);
        }
        self.state = Routing::Unrouted;
        Step::to_client(answer).then(Next::Detach)
    }

    /// Sends the first segment of the identification; the rest follows the backend's `+`.
    fn replay(&mut self, what: Identification, mut replay: VecDeque<Vec<u8>>) -> Step {
        let first = replay.pop_front().unwrap_or_default();
        self.state = Routing::Replaying { what, rest: replay };
        Step::to_backend(first)
    }

    /// The routed backend's answer to mailtls's XCLIENT: `+OK`, or the session cannot name
    /// its client and ends as unavailable.
    fn naming_reply(&mut self, input: &mut BytesMut) -> Option<Step> {
        let reply = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(self.backend_unavailable()),
            Line::Complete(reply) => reply,
        };
        let Routing::Naming { what, replay } = std::mem::replace(&mut self.state, Routing::Done) else {
            return None;
        };
        if status_of(&reply) != Status::Ok {
            return Some(self.backend_unavailable());
        }
        Some(self.replay(what, replay))
    }

    /// A backend line while the identification is being replayed.
    fn replay_response(&mut self, what: Identification, input: &mut BytesMut) -> Option<Step> {
        let response = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(self.backend_unavailable()),
            Line::Complete(response) => response,
        };
        let Routing::Replaying { rest, .. } = &mut self.state else { return None };
        Some(match status_of(&response) {
            Status::Continuation => match rest.pop_front() {
                // The `+` was for mailtls's replay; the client had its own already.
                Some(segment) => Step::to_backend(segment),
                None => self.backend_unavailable(),
            },
            Status::Ok => match what {
                Identification::User => {
                    self.state = Routing::Connected { login: false };
                    Step::to_client(response.to_vec())
                }
                Identification::AuthPlain => {
                    self.state = Routing::Done;
                    Step::to_client(response.to_vec()).then(Next::Relay)
                }
            },
            Status::Err => self.refused_login(response.to_vec()),
            Status::Malformed => self.backend_unavailable(),
        })
    }
}

impl Negotiation for Pop3Routed {
    fn opening(&mut self) -> Option<Step> {
        // No APOP timestamp: APOP cannot be routed (see `command`).
        let greeting = if self.greet {
            format!("+OK {} POP3 ready\r\n", self.hostname).into_bytes()
        } else {
            Vec::new()
        };
        Some(Step::to_client(greeting))
    }

    fn on_greeting(&mut self, input: &mut BytesMut) -> Option<Step> {
        let Routing::Connecting { .. } = self.state else { return None };
        let greeting = match line::take_line(input, self.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(Step::to_client(Vec::new()).then(Next::Unavailable)),
            Line::Complete(greeting) => greeting,
        };
        // Without [XCLIENT] the backend does not trust mailtls (see Pop3Negotiation).
        if status_of(&greeting) != Status::Ok || (self.xclient.is_some() && !offers_xclient(&greeting)) {
            return Some(Step::to_client(Vec::new()).then(Next::Unavailable));
        }
        let Routing::Connecting { what, replay } = std::mem::replace(&mut self.state, Routing::Done) else {
            return None;
        };
        // The client had mailtls's greeting (or the STLS one): this one is swallowed.
        if let Some(xclient) = &self.xclient {
            self.state = Routing::Naming { what, replay };
            return Some(Step::to_backend(xclient.clone()));
        }
        Some(self.replay(what, replay))
    }

    fn on_route_failed(&mut self) -> Step {
        self.state = Routing::Unrouted;
        Step::to_client(ROUTE_FAILED)
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<Step> {
        match self.state {
            Routing::Unrouted => {}
            Routing::SaslResponse => {
                let response = match self.take_client_line(input)? {
                    Ok(response) => response,
                    Err(step) => return Some(step),
                };
                let response = line::trim_eol(&response);
                if response == b"*" {
                    self.state = Routing::Unrouted;
                    return Some(Step::to_client(SASL_CANCELLED));
                }
                return Some(self.plain_response(response));
            }
            Routing::Connected { login: false } => return self.connected_command(input),
            Routing::Connected { login: true }
            | Routing::Connecting { .. }
            | Routing::Naming { .. }
            | Routing::Replaying { .. }
            | Routing::Done => return None,
        }
        let command = match self.take_client_line(input)? {
            Ok(command) => command,
            Err(step) => return Some(step),
        };
        Some(self.command(&command))
    }

    fn on_backend(&mut self, input: &mut BytesMut) -> Option<Step> {
        match self.state {
            Routing::Naming { .. } => self.naming_reply(input),
            Routing::Replaying { what, .. } => self.replay_response(what, input),
            Routing::Connected { login } => self.connected_response(login, input),
            _ => None,
        }
    }
}

/// Learns a POP3 backend's capabilities before login: greeting, `CAPA`, the list.
#[derive(Debug, Default)]
pub struct Pop3Probe {
    asked: bool,
    listing: bool,
    learned: Vec<String>,
}

/// Lines in a probe answer are short; anything longer is not a POP3 server talking.
const PROBE_MAX_LINE: usize = 8 * 1024;

impl super::CapabilityProbe for Pop3Probe {
    fn on_backend(&mut self, input: &mut BytesMut) -> Option<ProbeStep> {
        let response = match line::take_line(input, PROBE_MAX_LINE) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(ProbeStep::Failed("response line too long".to_owned())),
            Line::Complete(response) => response,
        };
        let body = line::trim_eol(&response);
        let shown = String::from_utf8_lossy(body).into_owned();
        if self.listing {
            if body == b"." {
                return Some(ProbeStep::Done(std::mem::take(&mut self.learned)));
            }
            if !body.is_empty() && body.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
                self.learned.push(shown);
            }
            return Some(ProbeStep::Send(Vec::new()));
        }
        if status_of(&response) != Status::Ok {
            let what = if self.asked { "CAPA refused" } else { "greeting refused" };
            return Some(ProbeStep::Failed(format!("{what}: {shown}")));
        }
        if self.asked {
            self.listing = true;
            return Some(ProbeStep::Send(Vec::new()));
        }
        self.asked = true;
        Some(ProbeStep::Send(b"CAPA\r\n".to_vec()))
    }

    fn quit(&self) -> &'static [u8] {
        b"QUIT\r\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings { hostname: "mail.example.org".to_owned(), ..Settings::default() }
    }

    #[test]
    fn only_login_attempts_count_as_refused_logins() {
        // The session counts these in metrics; other refusals must not inflate them.
        let mut pre = Pop3PreTls::new(&settings());
        for command in [
            &b"CAPA\r\n"[..],
            &b"USER u\r\n"[..],
            &b"PASS p\r\n"[..],
            &b"STAT\r\n"[..],
            &b"APOP u d\r\n"[..],
            &b"AUTH PLAIN\r\n"[..],
            &b"STLS x\r\n"[..],
        ] {
            assert!(pre.on_client(&mut BytesMut::from(command)).is_some(), "{command:?}");
        }
        assert_eq!(pre.refused_logins(), 4);
    }

    fn pre_tls() -> Pop3PreTls {
        Pop3PreTls::new(&settings())
    }

    fn buf(bytes: &[u8]) -> BytesMut {
        BytesMut::from(bytes)
    }

    fn reply(bytes: &[u8]) -> Option<PreTlsStep> {
        Some(PreTlsStep::Reply(bytes.to_vec()))
    }

    /// A negotiation whose greeting has been consumed.
    fn negotiating(entry: Entry) -> Pop3Negotiation {
        let mut n = Pop3Negotiation::new(&settings(), entry);
        let mut greeting = buf(b"+OK Dovecot ready.\r\n");
        assert!(n.on_greeting(&mut greeting).is_some());
        n
    }

    fn forwarded(n: &mut Pop3Negotiation, command: &[u8]) {
        let mut input = buf(command);
        assert_eq!(n.on_client(&mut input), Some(Step::to_backend(command)));
        assert!(input.is_empty());
    }

    fn from_backend(n: &mut Pop3Negotiation, bytes: &[u8]) -> Option<Step> {
        let mut input = buf(bytes);
        let step = n.on_backend(&mut input);
        assert!(input.is_empty(), "left over: {:?}", input);
        step
    }

    // ---- before TLS ----

    #[test]
    fn greeting_names_host_and_carries_no_apop_timestamp() {
        let greeting = pre_tls().greeting();
        assert_eq!(greeting, b"+OK mail.example.org POP3 ready\r\n");
        assert!(!greeting.contains(&b'<'));
    }

    #[test]
    fn capa_before_tls_lists_stls_and_no_login() {
        let mut p = pre_tls();
        let mut input = buf(b"capa\r\n");
        assert_eq!(p.on_client(&mut input), reply(CAPA_BEFORE_TLS));
        let text = String::from_utf8_lossy(CAPA_BEFORE_TLS).to_string();
        assert!(text.contains("\r\nSTLS\r\n"));
        assert!(!text.contains("USER") && !text.contains("SASL"));
    }

    #[test]
    fn stls_starts_tls_and_leaves_following_bytes_untouched() {
        let mut p = pre_tls();
        let mut input = buf(b"STLS\r\nCAPA\r\n");
        assert_eq!(
            p.on_client(&mut input),
            Some(PreTlsStep::StartTls(b"+OK Begin TLS negotiation\r\n".to_vec()))
        );
        assert_eq!(&input[..], b"CAPA\r\n");
    }

    #[test]
    fn stls_stops_reading_lines_even_when_more_arrive() {
        let mut p = pre_tls();
        let mut input = buf(b"STLS\r\n");
        assert!(matches!(p.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
        input.extend_from_slice(b"USER evil\r\n");
        assert_eq!(p.on_client(&mut input), None);
        assert_eq!(&input[..], b"USER evil\r\n");
    }

    #[test]
    fn stls_accepts_lower_case_bare_lf_and_trailing_blank() {
        for command in [&b"stls\n"[..], b"StLs\r\n", b"STLS \r\n"] {
            let mut input = buf(command);
            input.extend_from_slice(b"\x16\x03\x01");
            assert!(matches!(pre_tls().on_client(&mut input), Some(PreTlsStep::StartTls(_))));
            assert_eq!(&input[..], b"\x16\x03\x01");
        }
    }

    #[test]
    fn stls_with_argument_is_refused() {
        let mut input = buf(b"STLS x\r\n");
        assert_eq!(pre_tls().on_client(&mut input), reply(b"-ERR STLS takes no arguments\r\n"));
    }

    #[test]
    fn login_commands_before_tls_are_refused_without_continuation() {
        let mut p = pre_tls();
        for command in [
            &b"USER alice\r\n"[..],
            b"PASS secret\r\n",
            b"APOP alice 0123456789abcdef0123456789abcdef\r\n",
            b"AUTH PLAIN\r\n",
            b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
            b"AUTH\r\n",
            b"user alice\n",
        ] {
            let mut input = buf(command);
            assert_eq!(p.on_client(&mut input), reply(PLAINTEXT_AUTH_DISABLED));
            assert!(input.is_empty());
        }
    }

    #[test]
    fn quit_before_tls_says_bye_and_closes() {
        let mut input = buf(b"QUIT\r\n");
        assert_eq!(pre_tls().on_client(&mut input), Some(PreTlsStep::Close(b"+OK Bye\r\n".to_vec())));
    }

    #[test]
    fn unknown_command_before_tls_is_an_error() {
        let mut p = pre_tls();
        for command in [&b"NOOP\r\n"[..], b"\r\n", b"STARTTLS\r\n", b" STLS\r\n"] {
            let mut input = buf(command);
            assert_eq!(p.on_client(&mut input), reply(b"-ERR Unknown command\r\n"));
        }
    }

    #[test]
    fn incomplete_command_waits_for_more() {
        let mut p = pre_tls();
        let mut input = buf(b"STL");
        assert_eq!(p.on_client(&mut input), None);
        assert_eq!(&input[..], b"STL");
    }

    #[test]
    fn pipelined_commands_are_answered_one_per_call() {
        let mut p = pre_tls();
        let mut input = buf(b"CAPA\r\nSTLS\r\nX");
        assert_eq!(p.on_client(&mut input), reply(CAPA_BEFORE_TLS));
        assert!(matches!(p.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
        assert_eq!(&input[..], b"X");
    }

    #[test]
    fn overlong_line_closes_without_splitting() {
        for total in [512usize, 1000, 2048, 4096, 8192] {
            for tail in [&b"STLS\r\n"[..], b"STARTTLS\r\n"] {
                let mut bytes = b"NOOP ".to_vec();
                bytes.resize(total, b'A');
                bytes.extend_from_slice(tail);
                let mut p = pre_tls();
                let mut input = buf(&bytes);
                assert_eq!(p.on_client(&mut input), Some(PreTlsStep::Close(LINE_TOO_LONG.to_vec())));
                assert_eq!(p.on_client(&mut input), None, "no line after the close");
            }
        }
    }

    #[test]
    fn endless_line_without_terminator_closes() {
        let mut input = buf(&[b'A'; 10_000]);
        assert_eq!(pre_tls().on_client(&mut input), Some(PreTlsStep::Close(LINE_TOO_LONG.to_vec())));
    }

    #[test]
    fn too_many_errors_before_tls_closes() {
        let mut p = pre_tls();
        let allowed = settings().max_errors;
        for _ in 0..allowed {
            let mut input = buf(b"USER a\r\n");
            assert_eq!(p.on_client(&mut input), reply(PLAINTEXT_AUTH_DISABLED));
        }
        let mut input = buf(b"BOGUS\r\n");
        assert_eq!(p.on_client(&mut input), Some(PreTlsStep::Close(TOO_MANY_ERRORS.to_vec())));
    }

    #[test]
    fn too_many_commands_before_tls_closes() {
        let mut p = Pop3PreTls::new(&Settings { max_pre_tls_commands: 3, ..settings() });
        for _ in 0..3 {
            let mut input = buf(b"CAPA\r\n");
            assert_eq!(p.on_client(&mut input), reply(CAPA_BEFORE_TLS));
        }
        let mut input = buf(b"STLS\r\n");
        assert_eq!(p.on_client(&mut input), Some(PreTlsStep::Close(TOO_MANY_COMMANDS.to_vec())));
    }

    // ---- after TLS ----

    #[test]
    fn implicit_tls_relays_backend_greeting_verbatim() {
        let mut n = Pop3Negotiation::new(&settings(), Entry::Implicit);
        let greeting = b"+OK Dovecot ready. <1.2@host>\r\n";
        let mut input = buf(greeting);
        assert_eq!(n.on_greeting(&mut input), Some(Step::to_client(&greeting[..])));
    }

    #[test]
    fn greeting_after_stls_is_swallowed() {
        let mut n = Pop3Negotiation::new(&settings(), Entry::AfterStartTls);
        let mut input = buf(b"+OK Dovecot ready.\r\n");
        assert_eq!(n.on_greeting(&mut input), Some(Step::to_client(Vec::new())));
        assert!(input.is_empty());
    }

    #[test]
    fn client_waits_for_backend_greeting() {
        let mut n = Pop3Negotiation::new(&settings(), Entry::AfterStartTls);
        let mut input = buf(b"USER u\r\n");
        assert_eq!(n.on_client(&mut input), None);
        assert_eq!(&input[..], b"USER u\r\n");
    }

    #[test]
    fn negative_or_malformed_greeting_closes_as_backend_unavailable() {
        for greeting in [&b"-ERR go away\r\n"[..], b"220 smtp.example ESMTP\r\n", b"+ \r\n"] {
            let mut n = Pop3Negotiation::new(&settings(), Entry::Implicit);
            let mut input = buf(greeting);
            assert_eq!(
                n.on_greeting(&mut input),
                Some(
                    Step::to_client(b"-ERR [SYS/TEMP] Backend server unavailable\r\n".to_vec())
                        .then(Next::Unavailable)
                )
            );
        }
    }

    #[test]
    fn stls_injected_before_tls_never_reaches_backend() {
        // Matrix row 5: `STLS\r\nCAPA\r\n` in one write, TLS, then `USER u`.
        let mut p = pre_tls();
        let mut plaintext = buf(b"STLS\r\nCAPA\r\n");
        assert!(matches!(p.on_client(&mut plaintext), Some(PreTlsStep::StartTls(_))));
        assert_eq!(&plaintext[..], b"CAPA\r\n", "handed to rustls, not to us");

        let mut n = Pop3Negotiation::new(&settings(), Entry::AfterStartTls);
        let mut backend = buf(b"+OK ready\r\n");
        assert_eq!(n.on_greeting(&mut backend), Some(Step::to_client(Vec::new())));
        forwarded(&mut n, b"USER u\r\n");
        assert_eq!(from_backend(&mut n, b"+OK\r\n"), Some(Step::to_client(&b"+OK\r\n"[..])));
    }

    #[test]
    fn capa_after_tls_drops_stls_and_keeps_the_rest() {
        let mut n = negotiating(Entry::AfterStartTls);
        forwarded(&mut n, b"CAPA\r\n");
        let response = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\nstls\r\nSTLS x\r\n.\r\n";
        let expected = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
        assert_eq!(from_backend(&mut n, response), Some(Step::to_client(&expected[..])));
        forwarded(&mut n, b"USER u\r\n");
    }

    #[test]
    fn capa_is_relayed_in_pieces_as_it_arrives() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"CAPA\r\n");
        let mut input = buf(b"+OK list\r\nUSER\r\nST");
        assert_eq!(n.on_backend(&mut input), Some(Step::to_client(&b"+OK list\r\nUSER\r\n"[..])));
        assert_eq!(n.on_backend(&mut input), None);
        let mut idle = buf(b"NOOP\r\n");
        assert_eq!(n.on_client(&mut idle), None, "list still outstanding");
        input.extend_from_slice(b"LS\r\n");
        assert_eq!(n.on_backend(&mut input), Some(Step::to_client(Vec::new())));
        input.extend_from_slice(b".\r\n");
        assert_eq!(n.on_backend(&mut input), Some(Step::to_client(&b".\r\n"[..])));
        assert_eq!(n.on_client(&mut idle), Some(Step::to_backend(&b"NOOP\r\n"[..])));
    }

    #[test]
    fn dot_stuffed_line_does_not_end_a_list() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"CAPA\r\n");
        let step = from_backend(&mut n, b"+OK\r\n..\r\n.X\r\n");
        assert_eq!(step, Some(Step::to_client(&b"+OK\r\n..\r\n.X\r\n"[..])));
        assert_eq!(from_backend(&mut n, b"STLS\r\n.\n"), Some(Step::to_client(&b".\n"[..])));
        forwarded(&mut n, b"USER u\r\n");
    }

    #[test]
    fn list_response_stops_at_terminator_and_leaves_next_response() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"CAPA\r\n");
        let mut input = buf(b"+OK\r\nUSER\r\n.\r\n-ERR later\r\n");
        assert_eq!(n.on_backend(&mut input), Some(Step::to_client(&b"+OK\r\nUSER\r\n.\r\n"[..])));
        assert_eq!(&input[..], b"-ERR later\r\n");
    }

    #[test]
    fn capa_error_is_single_line() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"CAPA\r\n");
        assert_eq!(from_backend(&mut n, b"-ERR no\r\n"), Some(Step::to_client(&b"-ERR no\r\n"[..])));
        forwarded(&mut n, b"USER u\r\n");
    }

    #[test]
    fn stls_after_tls_is_refused_locally() {
        let mut n = negotiating(Entry::Implicit);
        for command in [&b"STLS\r\n"[..], b"stls x\n"] {
            let mut input = buf(command);
            assert_eq!(n.on_client(&mut input), Some(Step::to_client(&b"-ERR TLS already active\r\n"[..])));
            assert!(input.is_empty());
        }
        forwarded(&mut n, b"CAPA\r\n");
    }

    #[test]
    fn repeated_stls_after_tls_closes_as_too_many_errors() {
        let mut n = negotiating(Entry::Implicit);
        for _ in 0..settings().max_errors {
            let mut input = buf(b"STLS\r\n");
            assert_eq!(n.on_client(&mut input), Some(Step::to_client(TLS_ALREADY_ACTIVE)));
        }
        let mut input = buf(b"STLS\r\n");
        assert_eq!(
            n.on_client(&mut input),
            Some(Step::to_client(&b"-ERR Too many errors\r\n"[..]).then(Next::Close))
        );
    }

    #[test]
    fn client_waits_while_a_response_is_outstanding() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"USER u\r\n");
        let mut input = buf(b"STLS\r\nPASS p\r\n");
        assert_eq!(n.on_client(&mut input), None, "no local reply may overtake the +OK");
        assert_eq!(from_backend(&mut n, b"+OK\r\n"), Some(Step::to_client(&b"+OK\r\n"[..])));
        assert_eq!(n.on_client(&mut input), Some(Step::to_client(TLS_ALREADY_ACTIVE)));
        assert_eq!(n.on_client(&mut input), Some(Step::to_backend(&b"PASS p\r\n"[..])));
    }

    #[test]
    fn pass_accepted_switches_to_relay() {
        let mut n = negotiating(Entry::AfterStartTls);
        forwarded(&mut n, b"USER alice\r\n");
        assert_eq!(from_backend(&mut n, b"+OK\r\n"), Some(Step::to_client(&b"+OK\r\n"[..])));
        forwarded(&mut n, b"PASS secret\r\n");
        let mut input = buf(b"+OK Logged in.\r\n+OK 2 messages\r\n");
        assert_eq!(
            n.on_backend(&mut input),
            Some(Step::to_client(&b"+OK Logged in.\r\n"[..]).then(Next::Relay))
        );
        assert_eq!(&input[..], b"+OK 2 messages\r\n", "left for the opaque relay");
        assert_eq!(n.on_backend(&mut input), None);
    }

    #[test]
    fn apop_accepted_switches_to_relay() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"apop alice 0123456789abcdef0123456789abcdef\r\n");
        assert_eq!(
            from_backend(&mut n, b"+OK\r\n"),
            Some(Step::to_client(&b"+OK\r\n"[..]).then(Next::Relay))
        );
    }

    #[test]
    fn failed_login_keeps_negotiating() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"PASS wrong\r\n");
        let failure = b"-ERR [AUTH] Authentication failed.\r\n";
        assert_eq!(from_backend(&mut n, failure), Some(Step::to_client(&failure[..])));
        forwarded(&mut n, b"PASS right\r\n");
    }

    #[test]
    fn auth_without_mechanism_lists_mechanisms() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"AUTH\r\n");
        let list = b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n";
        assert_eq!(from_backend(&mut n, list), Some(Step::to_client(&list[..])));
        forwarded(&mut n, b"USER u\r\n");
    }

    #[test]
    fn sasl_response_is_forwarded_verbatim_never_interpreted() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"AUTH LOGIN\r\n");
        assert_eq!(
            from_backend(&mut n, b"+ VXNlcm5hbWU6\r\n"),
            Some(Step::to_client(&b"+ VXNlcm5hbWU6\r\n"[..]))
        );
        // The client's answer happens to read STLS: it is SASL data, not a command.
        forwarded(&mut n, b"STLS\r\n");
        assert_eq!(from_backend(&mut n, b"+\r\n"), Some(Step::to_client(&b"+\r\n"[..])));
        forwarded(&mut n, b"c2VjcmV0\r\n");
        assert_eq!(
            from_backend(&mut n, b"+OK Logged in.\r\n"),
            Some(Step::to_client(&b"+OK Logged in.\r\n"[..]).then(Next::Relay))
        );
    }

    #[test]
    fn sasl_cancel_is_forwarded_and_negotiation_continues() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"AUTH PLAIN\r\n");
        assert!(from_backend(&mut n, b"+ \r\n").is_some());
        forwarded(&mut n, b"*\r\n");
        let cancelled = b"-ERR [AUTH] Authentication aborted\r\n";
        assert_eq!(from_backend(&mut n, cancelled), Some(Step::to_client(&cancelled[..])));
        let mut input = buf(b"STLS\r\n");
        assert_eq!(n.on_client(&mut input), Some(Step::to_client(TLS_ALREADY_ACTIVE)));
    }

    #[test]
    fn auth_with_initial_response_accepted_switches_to_relay() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        assert_eq!(
            from_backend(&mut n, b"+OK\r\n"),
            Some(Step::to_client(&b"+OK\r\n"[..]).then(Next::Relay))
        );
    }

    #[test]
    fn continuation_is_not_taken_for_ok_outside_auth() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"USER u\r\n");
        assert_eq!(
            from_backend(&mut n, b"+ OK\r\n"),
            Some(Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable))
        );
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"PASS p\r\n");
        assert_eq!(from_backend(&mut n, b"+OKAY\r\n").map(|s| s.next), Some(Next::Unavailable));
    }

    #[test]
    fn user_response_is_a_single_line() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"USER u\r\n");
        let mut input = buf(b"+OK\r\n.\r\n");
        assert_eq!(n.on_backend(&mut input), Some(Step::to_client(&b"+OK\r\n"[..])));
        assert_eq!(&input[..], b".\r\n");
    }

    #[test]
    fn quit_response_ends_the_session() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"QUIT\r\n");
        assert_eq!(
            from_backend(&mut n, b"+OK Logging out\r\n"),
            Some(Step::to_client(&b"+OK Logging out\r\n"[..]).then(Next::Close))
        );
    }

    #[test]
    fn unsolicited_status_line_is_relayed() {
        let mut n = negotiating(Entry::Implicit);
        let notice = b"-ERR Disconnected for inactivity.\r\n";
        assert_eq!(from_backend(&mut n, notice), Some(Step::to_client(&notice[..])));
        forwarded(&mut n, b"USER u\r\n");
    }

    #[test]
    fn overlong_client_line_after_tls_closes() {
        let mut n = negotiating(Entry::Implicit);
        let mut bytes = b"USER ".to_vec();
        bytes.resize(settings().max_line, b'A');
        bytes.extend_from_slice(b"STLS\r\n");
        let mut input = buf(&bytes);
        assert_eq!(n.on_client(&mut input), Some(Step::to_client(LINE_TOO_LONG).then(Next::Close)));
    }

    #[test]
    fn long_sasl_line_within_bound_is_forwarded_intact() {
        let mut n = negotiating(Entry::Implicit);
        let mut command = b"AUTH PLAIN ".to_vec();
        command.resize(12_000, b'Q');
        command.extend_from_slice(b"\r\n");
        forwarded(&mut n, &command);
    }

    #[test]
    fn overlong_backend_line_closes_as_backend_unavailable() {
        let closing = Some(Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable));
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"USER u\r\n");
        let mut input = buf(&vec![b'+'; settings().max_line]);
        assert_eq!(n.on_backend(&mut input), closing);

        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"CAPA\r\n");
        let mut input = buf(b"+OK\r\nUSER\r\n");
        input.extend_from_slice(&vec![b'A'; settings().max_line]);
        assert_eq!(n.on_backend(&mut input), Some(Step::to_client(&b"+OK\r\nUSER\r\n"[..])));
        assert_eq!(n.on_backend(&mut input), closing);
    }

    #[test]
    fn farewells_have_pop3_words() {
        assert_eq!(farewell(Farewell::BackendUnavailable), b"-ERR [SYS/TEMP] Backend server unavailable\r\n");
        assert_eq!(farewell(Farewell::Timeout), b"-ERR Timeout, closing connection\r\n");
        assert_eq!(farewell(Farewell::ShuttingDown), b"-ERR [SYS/TEMP] Server shutting down\r\n");
    }

    // ---- commands by which a trusted proxy names its client (trusted_proxy) ----

    #[test]
    fn xclient_and_xoip_before_tls_are_refused_as_proxy_only() {
        let mut p = pre_tls();
        for command in [&b"XCLIENT ADDR=203.0.113.77 PORT=4343\r\n"[..], b"xoip 203.0.113.77\r\n"] {
            assert_eq!(p.on_client(&mut buf(command)), reply(PROXY_ONLY));
        }
        assert_eq!(p.refused_logins(), 0, "not a login attempt");
    }

    #[test]
    fn client_xclient_and_xoip_after_tls_are_answered_locally_never_forwarded() {
        for entry in [Entry::Implicit, Entry::AfterStartTls] {
            let mut n = negotiating(entry);
            for command in [
                &b"XCLIENT ADDR=203.0.113.77 PORT=4343\r\n"[..],
                b"xclient addr=203.0.113.77\n",
                b"XCLIENT\r\n",
                b"XOIP 203.0.113.77\r\n",
                // Dovecot reads these as XCLIENT with ADDR=... (its name ends at a CR too).
                b"XCLIENT\rADDR=203.0.113.77\r\n",
                b"XCLIENT\tADDR=203.0.113.77\r\n",
            ] {
                let mut input = buf(command);
                assert_eq!(n.on_client(&mut input), Some(Step::to_client(PROXY_ONLY)), "{command:?}");
                assert!(input.is_empty());
            }
            forwarded(&mut n, b"USER alice\r\n");
        }
    }

    #[test]
    fn repeated_client_xclient_counts_as_errors_and_closes() {
        let mut n = negotiating(Entry::Implicit);
        for _ in 0..settings().max_errors {
            assert_eq!(n.on_client(&mut buf(b"XCLIENT ADDR=1.2.3.4\r\n")), Some(Step::to_client(PROXY_ONLY)));
        }
        assert_eq!(
            n.on_client(&mut buf(b"XCLIENT ADDR=1.2.3.4\r\n")),
            Some(Step::to_client(TOO_MANY_ERRORS).then(Next::Close))
        );
    }

    #[test]
    fn implicit_greeting_loses_the_xclient_code() {
        let mut n = Pop3Negotiation::new(&settings(), Entry::Implicit);
        assert_eq!(
            n.on_greeting(&mut buf(b"+OK [XCLIENT] Dovecot (Debian) ready.\r\n")),
            Some(Step::to_client(b"+OK Dovecot (Debian) ready.\r\n"))
        );
        for kept in
            [&b"+OK Dovecot ready. <1.2.3@host>\r\n"[..], b"+OK [SYS/TEMP] x\r\n", b"+OK [XCLIENTS] x\r\n"]
        {
            assert_eq!(without_proxy_code(kept), kept);
        }
        assert_eq!(without_proxy_code(b"+ok [xoip] hi\r\n"), b"+OK hi\r\n");
    }

    #[test]
    fn capa_loses_xclient_and_xoip_lines() {
        let mut n = negotiating(Entry::Implicit);
        forwarded(&mut n, b"CAPA\r\n");
        assert_eq!(
            from_backend(&mut n, b"+OK\r\nTOP\r\nXCLIENT\r\nSTLS\r\nxoip\r\nUSER\r\n.\r\n"),
            Some(Step::to_client(&b"+OK\r\nTOP\r\nUSER\r\n.\r\n"[..]))
        );
        let learned = ["TOP".to_owned(), "XCLIENT".to_owned(), "USER".to_owned()];
        assert_eq!(routed_capabilities(&learned), b"+OK Capability list follows\r\nTOP\r\nUSER\r\n.\r\n");
    }

    #[test]
    fn routed_client_xclient_is_refused_before_and_after_routing() {
        let mut n = routed();
        assert_eq!(
            n.on_client(&mut buf(b"XCLIENT ADDR=203.0.113.77\r\n")),
            Some(Step::to_client(PROXY_ONLY))
        );
        routes(&mut n, b"USER alice\r\n", "alice");
        n.on_backend(&mut buf(b"+OK\r\n"));
        assert_eq!(
            n.on_client(&mut buf(b"XCLIENT ADDR=203.0.113.77\r\n")),
            Some(Step::to_client(PROXY_ONLY))
        );
        forwarded_routed(&mut n, b"PASS secret\r\n");
    }

    fn naming() -> Settings {
        Settings { xclient: true, client: Some("192.0.2.7:4242".parse().unwrap()), ..settings() }
    }

    const OWN_XCLIENT: &[u8] = b"XCLIENT ADDR=192.0.2.7 PORT=4242\r\n";
    const TRUSTING_GREETING: &[u8] = b"+OK [XCLIENT] Dovecot (Debian) ready.\r\n";

    #[test]
    fn own_xclient_names_the_real_client_before_the_greeting_goes_on() {
        let mut n = Pop3Negotiation::new(&naming(), Entry::Implicit);
        assert_eq!(n.on_greeting(&mut buf(TRUSTING_GREETING)), Some(Step::to_backend(OWN_XCLIENT)));
        assert_eq!(n.on_client(&mut buf(b"USER alice\r\n")), None, "the client waits for XCLIENT's answer");
        assert_eq!(
            from_backend(&mut n, b"+OK Updated\r\n"),
            Some(Step::to_client(&b"+OK Dovecot (Debian) ready.\r\n"[..]))
        );
        forwarded(&mut n, b"USER alice\r\n");

        let mut n = Pop3Negotiation::new(&naming(), Entry::AfterStartTls);
        assert_eq!(n.on_greeting(&mut buf(TRUSTING_GREETING)), Some(Step::to_backend(OWN_XCLIENT)));
        assert_eq!(from_backend(&mut n, b"+OK Updated\r\n"), Some(Step::to_client(Vec::new())));

        let v6 = Settings { client: Some("[::ffff:192.0.2.7]:25".parse().unwrap()), ..naming() };
        let mut n = Pop3Negotiation::new(&v6, Entry::Implicit);
        assert_eq!(
            n.on_greeting(&mut buf(TRUSTING_GREETING)),
            Some(Step::to_backend(b"XCLIENT ADDR=192.0.2.7 PORT=25\r\n"))
        );
    }

    #[test]
    fn own_xclient_to_an_untrusting_or_refusing_backend_is_unavailable() {
        let unavailable =
            Some(Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable));
        let mut n = Pop3Negotiation::new(&naming(), Entry::Implicit);
        assert_eq!(
            n.on_greeting(&mut buf(b"+OK Dovecot ready.\r\n")),
            unavailable,
            "no [XCLIENT]: not trusted"
        );
        let mut n = Pop3Negotiation::new(&naming(), Entry::Implicit);
        n.on_greeting(&mut buf(TRUSTING_GREETING));
        assert_eq!(from_backend(&mut n, b"-ERR Invalid parameters\r\n"), unavailable);
        let no_setting = Settings { xclient: false, ..naming() };
        let mut n = Pop3Negotiation::new(&no_setting, Entry::Implicit);
        assert_eq!(
            n.on_greeting(&mut buf(TRUSTING_GREETING)),
            Some(Step::to_client(&b"+OK Dovecot (Debian) ready.\r\n"[..]))
        );
    }

    #[test]
    fn routed_own_xclient_goes_before_the_replay() {
        let mut n = Pop3Routed::new(&naming(), true);
        assert_eq!(n.on_client(&mut buf(b"USER alice\r\n")), route_to("alice"));
        assert_eq!(
            n.on_greeting(&mut buf(b"+OK Dovecot ready.\r\n")).map(|s| s.next),
            Some(Next::Unavailable)
        );
        assert_eq!(n.on_route_failed(), Step::to_client(ROUTE_FAILED));
        assert_eq!(n.on_client(&mut buf(b"USER alice\r\n")), route_to("alice"));
        assert_eq!(n.on_greeting(&mut buf(TRUSTING_GREETING)), Some(Step::to_backend(OWN_XCLIENT)));
        assert_eq!(
            n.on_backend(&mut buf(b"+OK Updated\r\n")),
            Some(Step::to_backend(&b"USER alice\r\n"[..]))
        );
        assert_eq!(n.on_backend(&mut buf(b"+OK\r\n")), Some(Step::to_client(b"+OK\r\n")));
    }

    // ---- hostile input ----

    use crate::protocol::testing::XorShift;

    /// Random bytes salted with the tokens the state machines react to.
    fn hostile_chunk(rng: &mut XorShift) -> Vec<u8> {
        const TOKENS: &[&[u8]] = &[
            b"STLS",
            b"CAPA",
            b"USER ",
            b"PASS ",
            b"APOP ",
            b"AUTH",
            b" PLAIN",
            b"QUIT",
            b"LIST",
            b"RETR 1",
            b"XCLIENT ",
            b"[XCLIENT] ",
            b"+OK",
            b"-ERR",
            b"+ ",
            b"+",
            b".",
            b"..",
            b"\r\n",
            b"\n",
            b" ",
            b"*",
        ];
        let mut chunk = Vec::new();
        for _ in 0..rng.below(12) {
            if rng.below(3) == 0 {
                for _ in 0..rng.below(40) {
                    chunk.push(rng.next() as u8);
                }
            } else {
                chunk.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
            }
        }
        if rng.below(50) == 0 {
            chunk.resize(chunk.len() + 700, b'A');
        }
        chunk
    }

    #[test]
    fn hostile_bytes_never_panic_and_stay_bounded() {
        let small = Settings { max_pre_tls_line: 64, max_line: 256, ..settings() };
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..4000 {
            let mut p = Pop3PreTls::new(&small);
            let mut client = BytesMut::new();
            'pre: for _ in 0..8 {
                client.extend_from_slice(&hostile_chunk(&mut rng));
                loop {
                    let before = client.clone();
                    let Some(step) = p.on_client(&mut client) else {
                        break;
                    };
                    if let PreTlsStep::StartTls(_) = step {
                        assert!(before.ends_with(&client), "bytes behind STLS were touched");
                    }
                    if !matches!(step, PreTlsStep::Reply(_)) {
                        break 'pre;
                    }
                }
                assert!(client.len() < small.max_pre_tls_line, "an undecided line outgrew its bound");
            }

            let entry = if round % 2 == 0 { Entry::Implicit } else { Entry::AfterStartTls };
            // Every third session names its client first (xclient): XCLIENT's answer then
            // meets hostile bytes too.
            let names_client = round % 3 == 0;
            let settings = if names_client {
                Settings { client: naming().client, xclient: true, ..small.clone() }
            } else {
                small.clone()
            };
            let mut n = Pop3Negotiation::new(&settings, entry);
            let mut client = BytesMut::new();
            let greeting: &[u8] = if names_client { b"+OK [XCLIENT] hi\r\n" } else { b"+OK hi\r\n" };
            let mut backend = BytesMut::from(greeting);
            if round % 7 == 0 {
                backend = BytesMut::from(&hostile_chunk(&mut rng)[..]);
            }
            let Some(step) = n.on_greeting(&mut backend) else {
                continue;
            };
            if step.next != Next::Negotiate {
                continue;
            }
            'negotiate: for _ in 0..16 {
                client.extend_from_slice(&hostile_chunk(&mut rng));
                backend.extend_from_slice(&hostile_chunk(&mut rng));
                for _ in 0..10_000 {
                    let before = (client.len(), backend.len());
                    let from_client = n.on_client(&mut client);
                    let from_backend = n.on_backend(&mut backend);
                    for step in [&from_client, &from_backend].into_iter().flatten() {
                        assert!(step.to_backend.len() <= small.max_line);
                        assert!(step.to_client.len() <= before.1.max(64));
                        if step.next != Next::Negotiate {
                            break 'negotiate;
                        }
                    }
                    if from_client.is_none() && from_backend.is_none() {
                        break;
                    }
                }
                assert!(backend.len() < small.max_line, "an undecided response outgrew its bound");
                if n.state == State::Idle || n.state == State::SaslResponse {
                    assert!(client.len() < small.max_line, "an undecided command outgrew its bound");
                }
            }
        }
    }
    // ---- routed listeners ----

    fn routed() -> Pop3Routed {
        let learned: Vec<String> = ["TOP", "UIDL", "STLS", "USER", "SASL PLAIN LOGIN CRAM-MD5", "RESP-CODES"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Pop3Routed::new(&Settings { backend_extensions: std::sync::Arc::from(learned), ..settings() }, true)
    }

    fn route_to(user: &str) -> Option<Step> {
        Some(Step::to_client(Vec::new()).then(Next::Route { user: user.to_owned() }))
    }

    /// Routes with `client`, greets, and returns the first replayed segment.
    fn routes(n: &mut Pop3Routed, client: &[u8], user: &str) -> Vec<u8> {
        let mut input = buf(client);
        assert_eq!(n.on_client(&mut input), route_to(user));
        assert!(input.is_empty());
        let step = n.on_greeting(&mut buf(b"+OK Dovecot ready.\r\n")).expect("greeting step");
        assert!(step.to_client.is_empty());
        step.to_backend
    }

    #[test]
    fn routed_greeting_capa_and_local_commands() {
        let mut n = routed();
        assert_eq!(n.opening(), Some(Step::to_client(b"+OK mail.example.org POP3 ready\r\n")));
        assert_eq!(
            n.on_client(&mut buf(b"capa\r\n")),
            Some(Step::to_client(
                b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\n.\r\n"
            ))
        );
        assert_eq!(n.on_client(&mut buf(b"NOOP\r\n")), Some(Step::to_client(b"+OK\r\n")));
        assert_eq!(n.on_client(&mut buf(b"AUTH\r\n")), Some(Step::to_client(MECHANISMS)));
        assert_eq!(n.on_client(&mut buf(b"STLS\r\n")), Some(Step::to_client(TLS_ALREADY_ACTIVE)));
        assert_eq!(n.on_client(&mut buf(b"PASS x\r\n")), Some(Step::to_client(USER_FIRST)));
        assert_eq!(n.on_client(&mut buf(b"APOP a b\r\n")), Some(Step::to_client(NO_APOP)));
        assert_eq!(n.on_client(&mut buf(b"USER\r\n")), Some(Step::to_client(NO_USER_NAME)));
        assert_eq!(n.on_client(&mut buf(b"AUTH CRAM-MD5\r\n")), Some(Step::to_client(UNSUPPORTED_MECHANISM)));
        assert_eq!(n.on_client(&mut buf(b"AUTH PLAIN !!\r\n")), Some(Step::to_client(BAD_PLAIN)));
        assert_eq!(n.on_client(&mut buf(b"QUIT\r\n")), Some(Step::to_client(BYE).then(Next::Close)));
        let bare = Pop3Routed::new(&settings(), false);
        assert_eq!(bare.capabilities, b"+OK Capability list follows\r\nUSER\r\n.\r\n");
    }

    #[test]
    fn user_routes_then_pass_goes_through_the_ordinary_negotiation() {
        let mut n = routed();
        assert_eq!(
            routes(&mut n, b"USER alice@example.org\r\n", "alice@example.org"),
            b"USER alice@example.org\r\n"
        );
        assert_eq!(n.on_backend(&mut buf(b"+OK\r\n")), Some(Step::to_client(b"+OK\r\n")));
        forwarded_routed(&mut n, b"CAPA\r\n");
        assert_eq!(
            n.on_backend(&mut buf(b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")),
            Some(Step::to_client(b"+OK\r\nUSER\r\n.\r\n"))
        );
        forwarded_routed(&mut n, b"PASS secret\r\n");
        assert_eq!(n.on_client(&mut buf(b"STAT\r\n")), None, "lock-step");
        assert_eq!(
            n.on_backend(&mut buf(b"+OK Logged in.\r\n")),
            Some(Step::to_client(b"+OK Logged in.\r\n").then(Next::Relay))
        );
    }

    fn forwarded_routed(n: &mut Pop3Routed, command: &[u8]) {
        let mut input = buf(command);
        assert_eq!(n.on_client(&mut input), Some(Step::to_backend(command)));
        assert!(input.is_empty());
    }

    #[test]
    fn refused_pass_or_user_detaches_and_a_new_user_routes_afresh() {
        let mut n = routed();
        routes(&mut n, b"USER alice\r\n", "alice");
        n.on_backend(&mut buf(b"+OK\r\n"));
        forwarded_routed(&mut n, b"PASS wrong\r\n");
        assert_eq!(
            n.on_backend(&mut buf(b"-ERR [AUTH] Authentication failed.\r\n")),
            Some(Step::to_client(b"-ERR [AUTH] Authentication failed.\r\n").then(Next::Detach))
        );
        assert_eq!(n.on_client(&mut buf(b"NOOP\r\n")), Some(Step::to_client(b"+OK\r\n")), "unrouted again");
        routes(&mut n, b"USER bob\r\n", "bob");
        assert_eq!(
            n.on_backend(&mut buf(b"-ERR no\r\n")),
            Some(Step::to_client(b"-ERR no\r\n").then(Next::Detach))
        );
        // A second USER while the first backend holds the session is routed afresh too.
        routes(&mut n, b"USER carol\r\n", "carol");
        n.on_backend(&mut buf(b"+OK\r\n"));
        assert_eq!(n.on_client(&mut buf(b"USER dave\r\n")), route_to("dave"));
    }

    #[test]
    fn auth_plain_with_and_without_initial_response_replays_without() {
        let response = b"AGFsaWNlAHNlY3JldA=="; // \0alice\0secret
        let mut line = b"AUTH PLAIN ".to_vec();
        line.extend_from_slice(response);
        line.extend_from_slice(b"\r\n");
        let mut data = response.to_vec();
        data.extend_from_slice(b"\r\n");
        let mut n = routed();
        assert_eq!(routes(&mut n, &line, "alice"), b"AUTH PLAIN\r\n");
        assert_eq!(n.on_backend(&mut buf(b"+ \r\n")), Some(Step::to_backend(data.clone())));
        assert_eq!(
            n.on_backend(&mut buf(b"+OK Logged in.\r\n")),
            Some(Step::to_client(b"+OK Logged in.\r\n").then(Next::Relay))
        );

        let mut n = routed();
        assert_eq!(n.on_client(&mut buf(b"auth plain\r\n")), Some(Step::to_client(SASL_GO_AHEAD)));
        assert_eq!(n.on_client(&mut buf(&data)), route_to("alice"));
        assert_eq!(n.on_greeting(&mut buf(b"+OK hi\r\n")), Some(Step::to_backend(b"AUTH PLAIN\r\n")));
        assert_eq!(n.on_backend(&mut buf(b"+ \r\n")), Some(Step::to_backend(data)));
        assert_eq!(
            n.on_backend(&mut buf(b"-ERR [AUTH] no\r\n")),
            Some(Step::to_client(b"-ERR [AUTH] no\r\n").then(Next::Detach))
        );

        let mut n = routed();
        n.on_client(&mut buf(b"AUTH PLAIN\r\n"));
        assert_eq!(n.on_client(&mut buf(b"*\r\n")), Some(Step::to_client(SASL_CANCELLED)));
    }

    #[test]
    fn unreachable_backend_answers_sys_temp_and_the_client_may_retry() {
        let mut n = routed();
        assert_eq!(n.on_client(&mut buf(b"USER alice\r\n")), route_to("alice"));
        assert_eq!(n.on_route_failed(), Step::to_client(ROUTE_FAILED));
        assert!(ROUTE_FAILED.starts_with(b"-ERR [SYS/TEMP] "));
        routes(&mut n, b"USER alice\r\n", "alice");
        let mut n = routed();
        n.on_client(&mut buf(b"USER alice\r\n"));
        assert_eq!(n.on_greeting(&mut buf(b"-ERR busy\r\n")).map(|s| s.next), Some(Next::Unavailable));
    }

    #[test]
    fn pop3_probe_learns_the_capa_list() {
        use super::super::CapabilityProbe;
        let mut p = Pop3Probe::default();
        assert_eq!(p.on_backend(&mut buf(b"+OK ready\r\n")), Some(ProbeStep::Send(b"CAPA\r\n".to_vec())));
        let mut list = buf(b"+OK\r\nTOP\r\nSASL PLAIN\r\n.\r\n");
        while let Some(step) = p.on_backend(&mut list) {
            if let ProbeStep::Done(learned) = step {
                assert_eq!(learned, vec!["TOP".to_owned(), "SASL PLAIN".to_owned()]);
                return;
            }
        }
        panic!("no Done");
    }

    #[test]
    fn routed_hostile_bytes_never_panic() {
        let mut rng = XorShift(0x51_7cc1_b727_220a);
        for _ in 0..3000 {
            let mut n = Pop3Routed::new(&Settings { max_line: 512, ..settings() }, true);
            let (mut client, mut backend) = (BytesMut::new(), BytesMut::new());
            'session: for _ in 0..8 {
                client.extend_from_slice(&hostile_chunk(&mut rng));
                backend.extend_from_slice(&hostile_chunk(&mut rng));
                for _ in 0..64 {
                    let step = match n.on_client(&mut client) {
                        Some(step) => step,
                        None => match n.on_backend(&mut backend) {
                            Some(step) => step,
                            None => break,
                        },
                    };
                    match step.next {
                        Next::Route { .. } => {
                            if rng.below(3) == 0
                                || n.on_greeting(&mut backend).is_none_or(|s| s.next == Next::Unavailable)
                            {
                                n.on_route_failed();
                            }
                        }
                        Next::Negotiate | Next::Detach => {}
                        Next::Relay | Next::Close | Next::Unavailable | Next::Recipient { .. } => {
                            break 'session
                        }
                    }
                }
                assert!(client.len() < 512 + 64 || !matches!(n.state, Routing::Unrouted));
            }
        }
    }
}
