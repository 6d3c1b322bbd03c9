//! The SMTP line-by-line phase between client and backend after TLS or on the
//! opportunistic plaintext path: EHLO filter, local refusals, the point where it ends.

use super::*;

/// Which kind of reply the backend owes, so it is treated right when it comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    Ehlo,
    Auth,
    /// Guarded plaintext only: 354 starts the body, anything else ends the command.
    Data,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Phase {
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
pub(super) enum Mode {
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
    pub(super) hostname: String,
    pub(super) max_line: usize,
    pub(super) max_reply: usize,
    pub(super) max_errors: u32,
    pub(super) replay: Option<Vec<u8>>,
    /// The XCLIENT command to send after the greeting (`xclient = true` listeners).
    pub(super) xclient: Option<Vec<u8>>,
    pub(super) entry_is_implicit: bool,
    pub(super) mode: Mode,
    /// The backend's last EHLO reply in this session announced CHUNKING. Guarded plaintext
    /// forwards BDAT only then: a backend without it would answer the BDAT line with an
    /// error and read the chunk's bytes as commands (XCLIENT, AUTH...) mailtls never saw.
    /// The relay's guard is told the same, for the same reason.
    pub(super) chunking: bool,
    pub(super) phase: Phase,
    pub(super) errors: u32,
    pub(super) bare_newline: BareNewline,
    /// Guarded plaintext, inside a DATA body: the guard scanning it.
    pub(super) body: Option<SmtpGuard>,
    /// What the body guards found and the session has not yet been told.
    pub(super) finding: Option<Finding>,
}

impl SmtpNegotiation {
    pub fn new(settings: &Settings, entry: Entry) -> Self {
        let (replay, entry_is_implicit, mode) = match entry {
            Entry::Implicit => (None, true, Mode::Tls),
            Entry::AfterStartTls => (None, false, Mode::Tls),
            // A routed listener's machine is `SmtpRouted`; its legs to the backends are
            // built with `SmtpNegotiation::routed_leg`. Were this one built, it would
            // behave as its TLS mode says.
            Entry::Routed { greet, .. } => (None, greet, Mode::Tls),
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

    /// The leg of a routed session to one backend, for one transaction: the client's
    /// `helo` is replayed (after XCLIENT when configured), then the routed machine feeds it
    /// the transaction's commands. Always guarded, inside TLS too: the routed machine must
    /// see every reply to tell where a transaction ends, and no AUTH reaches a backend.
    pub(super) fn routed_leg(settings: &Settings, helo: Vec<u8>) -> Self {
        let mut leg = SmtpNegotiation::new(settings, Entry::Plaintext { replay: helo });
        leg.mode = Mode::PlaintextGuarded;
        leg
    }

    pub(super) fn close(&mut self, to_client: Vec<u8>) -> Step {
        self.phase = Phase::Over;
        Step::to_client(to_client).then(Next::Close)
    }

    pub(super) fn backend_unavailable(&mut self) -> Step {
        self.close(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
    }

    pub(super) fn refuse(&mut self, reply: &[u8]) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            let reply = too_many(&self.hostname, "errors");
            return self.close(reply);
        }
        Step::to_client(reply)
    }

    pub(super) fn forward(&mut self, line: &[u8], pending: Pending) -> Step {
        self.phase = Phase::Awaiting(pending);
        Step::to_backend(with_crlf(line))
    }

    pub(super) fn relay_from(&mut self, line: &[u8]) -> Step {
        self.phase = Phase::Over;
        Step::to_backend(with_crlf(line)).then(Next::Relay)
    }

    /// What a capability reply may show the client in this mode.
    pub(super) fn hidden(&self) -> fn(&[u8]) -> bool {
        match self.mode {
            Mode::Tls => hidden_after_tls,
            Mode::PlaintextOpaque | Mode::PlaintextGuarded => hidden_in_plaintext,
        }
    }

    pub(super) fn command(&mut self, line: &[u8]) -> Step {
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

    /// 334 keeps the SASL exchange going, 235 ends negotiation, anything else ends AUTH.
    pub(super) fn auth_reply(&mut self, reply: &Reply) -> Step {
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
    pub(super) fn replay_reply(&mut self, reply: &Reply) -> Step {
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
    pub(super) fn greeted(&mut self, greeting: Vec<u8>) -> Step {
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
    pub(super) fn xclient_reply(&mut self, reply: &Reply, greeting: Vec<u8>) -> Step {
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
