//! Inbound SMTP routed by recipient (`routes = "PATH"` on an SMTP listener): mailtls answers
//! the client itself until a transaction's first RCPT, which chooses the backend.
//!
//! Before any RCPT, EHLO/HELO, MAIL, NOOP, RSET, VRFY, HELP and QUIT are answered here (EHLO
//! with the default backend's extensions as the probe learned them, filtered as on the
//! plaintext path). The first RCPT of a transaction asks the session to route it
//! ([`Next::Recipient`]); the session connects the chosen backend and this machine replays
//! the client's EHLO and MAIL through a guarded leg ([`SmtpNegotiation::routed_leg`]), then
//! relays that RCPT and its reply. Later recipients for the same backend are relayed; those
//! for another get `452 4.5.3`, which RFC 5321 (4.5.3.1.10) tells a sending MTA to retry in
//! a later transaction, so each server sees only its own recipients and nothing is lost or
//! duplicated. The reply to the end of the message (or RSET, or a new EHLO) ends the
//! transaction: the backend gets QUIT and the next MAIL may go elsewhere.
//!
//! Decisions: a backend holds a transaction only once it accepted a recipient (a refused
//! first recipient or a refused replayed MAIL releases it, so the next recipient is routed
//! afresh); a backend that is down gets the client `451 4.4.1` for that recipient and the
//! session goes on; AUTH is never offered or relayed on a routed listener (a routed
//! listener receives mail for its own users; submission has one backend).

use super::*;

const MAIL_OK: &[u8] = b"250 2.1.0 Ok\r\n";
const NESTED_MAIL: &[u8] = b"503 5.5.1 Error: nested MAIL command\r\n";
const RCPT_FIRST: &[u8] = b"503 5.5.1 Error: need RCPT command\r\n";
const BAD_RECIPIENT: &[u8] = b"501 5.1.3 Bad recipient address syntax\r\n";
const NO_VALID_RECIPIENTS: &[u8] = b"554 5.5.1 Error: no valid recipients\r\n";
/// RFC 5321 4.5.3.1.10: the sender retries these recipients in a later transaction.
const DEFERRED: &[u8] = b"452 4.5.3 Too many recipients for this transaction, send the rest again\r\n";
/// The recipient's server could not be reached: a temporary failure for it alone.
const BACKEND_DOWN: &[u8] = b"451 4.4.1 Mailbox server for this recipient not reachable, try again later\r\n";
/// The backend of the accepted recipients broke before the message: all of them retry.
const BACKEND_LOST: &[u8] = b"451 4.4.1 Mailbox server connection lost, try again later\r\n";
const QUIT: &[u8] = b"QUIT\r\n";

/// Where the routed session stands; every stage but `Idle`, `Content` and `Discard` waits
/// for the backend or the session, and reads nothing from the client.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// The next client line is a command.
    Idle,
    /// A RCPT line was handed to the session for routing ([`Next::Recipient`]).
    Routing { rcpt: Vec<u8> },
    /// A backend is being greeted for `rcpt`: the leg replays EHLO (after XCLIENT).
    Opening { rcpt: Vec<u8> },
    /// The replayed MAIL's reply is awaited; `rcpt` follows it if it is positive.
    MailReplay { rcpt: Vec<u8> },
    /// A relayed RCPT's reply is awaited.
    Rcpt,
    /// Message content is with the leg (DATA and its body, or a BDAT chunk). `last`: its
    /// reply ends the transaction (DATA, BDAT LAST); `started`: the body began (354);
    /// `replied`: that reply came before the client finished sending.
    Content { last: bool, started: bool, replied: bool },
    /// A BDAT chunk nobody will receive: its octets are read and dropped, then `reply`.
    Discard { remaining: u64, reply: &'static [u8] },
    /// Closed.
    Over,
}

/// The routed SMTP session: mailtls's own dialogue, and one guarded leg per transaction.
pub struct SmtpRouted {
    settings: Settings,
    greet: bool,
    /// The client's last EHLO/HELO line, replayed to each backend.
    helo: Option<Vec<u8>>,
    /// The open transaction's MAIL line, replayed to its backend.
    mail: Option<Vec<u8>>,
    /// The connection to the transaction's backend, once one was chosen.
    leg: Option<SmtpNegotiation>,
    /// Recipients the leg's backend accepted in this transaction, and those tried at all.
    accepted: u32,
    tried: u32,
    /// The backend of accepted recipients broke before the message: nothing more may be
    /// accepted or sent in this transaction (another backend's 250 to the DATA would look,
    /// to the sender, like delivery to those recipients too).
    lost: bool,
    /// The session is inside TLS (implicit, or after STARTTLS): not the plaintext path.
    in_tls: bool,
    pub(super) stage: Stage,
    errors: u32,
}

impl SmtpRouted {
    pub fn new(settings: &Settings, greet: bool, helo: Option<Vec<u8>>) -> Self {
        SmtpRouted {
            settings: settings.clone(),
            greet,
            // Only the plaintext path comes with the client's EHLO already given.
            in_tls: helo.is_none(),
            helo,
            tried: 0,
            lost: false,
            mail: None,
            leg: None,
            accepted: 0,
            stage: Stage::Idle,
            errors: 0,
        }
    }

    fn close(&mut self, to_client: Vec<u8>) -> Step {
        let to_backend = self.end_transaction();
        self.stage = Stage::Over;
        Step { to_backend, to_client, next: Next::Close }
    }

    fn refuse(&mut self, reply: &[u8]) -> Step {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.settings.max_errors {
            let reply = too_many(&self.settings.hostname, "errors");
            return self.close(reply);
        }
        Step::to_client(reply)
    }

    /// Forgets the transaction; the QUIT its backend (if any) is owed.
    fn end_transaction(&mut self) -> Vec<u8> {
        self.mail = None;
        self.accepted = 0;
        self.tried = 0;
        self.lost = false;
        match self.leg.take() {
            Some(_) => QUIT.to_vec(),
            None => Vec::new(),
        }
    }

    /// `reply` to the client, and the transaction over: the backend (if any) gets QUIT and
    /// the session lets it go ([`Next::Detach`]).
    fn finish(&mut self, to_client: Vec<u8>) -> Step {
        self.stage = Stage::Idle;
        let to_backend = self.end_transaction();
        let next = if to_backend.is_empty() { Next::Negotiate } else { Next::Detach };
        Step { to_backend, to_client, next }
    }

    /// Releases the backend of a transaction that has no accepted recipient (so the next
    /// recipient is routed afresh), keeping the transaction itself.
    fn release(&mut self, to_client: Vec<u8>) -> Step {
        self.stage = Stage::Idle;
        let had_leg = self.leg.take().is_some();
        let to_backend = if had_leg { QUIT.to_vec() } else { Vec::new() };
        Step { to_backend, to_client, next: if had_leg { Next::Detach } else { Next::Negotiate } }
    }

    fn ehlo_reply(&self) -> Vec<u8> {
        let mut texts: Vec<&[u8]> = vec![self.settings.hostname.as_bytes()];
        texts.extend(
            self.settings
                .backend_extensions
                .iter()
                .map(|extension| extension.trim_ascii().as_bytes())
                .filter(|extension| offered_before_tls(extension) && !is_keyword(extension, &[b"STARTTLS"])),
        );
        multiline(b"250", &texts)
    }

    /// Hands `line` to the leg as a client command; the leg forwards it.
    fn through_leg(&mut self, line: &[u8]) -> Option<Step> {
        let leg = self.leg.as_mut()?;
        leg.on_client(&mut BytesMut::from(&with_crlf(line)[..]))
    }

    fn command(&mut self, line: &[u8]) -> Step {
        let command = Command::parse(line);
        if command.has_control_bytes {
            return self.refuse(UNRECOGNIZED);
        }
        let in_tls = self.in_tls;
        match command.verb {
            Verb::Ehlo | Verb::Helo => self.greet_back(&command, line),
            Verb::Mail => self.mail(line),
            Verb::Rcpt => self.rcpt(&command, line),
            Verb::Data => self.data(line),
            Verb::Bdat => self.bdat(&command, line),
            Verb::Rset => self.finish(OK.to_vec()),
            Verb::Noop => Step::to_client(OK),
            Verb::Help => Step::to_client(HELP),
            Verb::Vrfy => Step::to_client(CANNOT_VRFY),
            Verb::Quit => {
                let to_backend = self.end_transaction();
                self.stage = Stage::Over;
                Step { to_backend, to_client: BYE.to_vec(), next: Next::Close }
            }
            Verb::Auth if in_tls => self.refuse(NOT_IMPLEMENTED),
            Verb::Auth => self.refuse(TLS_FIRST),
            Verb::StartTls if in_tls => self.refuse(TLS_ALREADY_ACTIVE),
            Verb::StartTls => self.refuse(TLS_NOT_AVAILABLE),
            Verb::ProxyOnly => self.refuse(NOT_AUTHORIZED),
            Verb::Expn | Verb::Etrn => self.refuse(NOT_IMPLEMENTED),
            Verb::Unknown => self.refuse(UNRECOGNIZED),
        }
    }

    /// RFC 5321 4.1.4: EHLO/HELO resets the transaction.
    fn greet_back(&mut self, command: &Command, line: &[u8]) -> Step {
        if !command.has_argument() {
            let usage = if command.verb == Verb::Helo { HELO_WITHOUT_DOMAIN } else { EHLO_WITHOUT_DOMAIN };
            return self.refuse(usage);
        }
        self.helo = Some(with_crlf(line));
        let reply = match command.verb {
            Verb::Helo => format!("250 {}\r\n", self.settings.hostname).into_bytes(),
            _ => self.ehlo_reply(),
        };
        self.finish(reply)
    }

    fn mail(&mut self, line: &[u8]) -> Step {
        if self.helo.is_none() {
            return self.refuse(HELO_FIRST);
        }
        if self.mail.is_some() {
            return self.refuse(NESTED_MAIL);
        }
        self.mail = Some(with_crlf(line));
        Step::to_client(MAIL_OK)
    }

    fn rcpt(&mut self, command: &Command, line: &[u8]) -> Step {
        if self.mail.is_none() {
            return self.refuse(MAIL_FIRST);
        }
        let Some(address) = recipient(command.argument) else { return self.refuse(BAD_RECIPIENT) };
        if self.lost {
            return Step::to_client(BACKEND_LOST);
        }
        self.tried += 1;
        self.stage = Stage::Routing { rcpt: with_crlf(line) };
        Step::to_client(Vec::new()).then(Next::Recipient { address })
    }

    fn data(&mut self, line: &[u8]) -> Step {
        if self.mail.is_none() {
            return self.refuse(MAIL_FIRST);
        }
        if self.lost {
            return Step::to_client(BACKEND_LOST);
        }
        if self.accepted == 0 {
            return self.refuse(if self.tried == 0 { RCPT_FIRST } else { NO_VALID_RECIPIENTS });
        }
        match self.through_leg(line) {
            Some(step) => {
                self.stage = Stage::Content { last: true, started: false, replied: false };
                step
            }
            None => self.refuse(NO_VALID_RECIPIENTS),
        }
    }

    /// BDAT: the chunk goes to the transaction's backend, or is read and dropped (no
    /// recipient, or a backend without CHUNKING: never parsed as commands).
    fn bdat(&mut self, command: &Command, line: &[u8]) -> Step {
        let Some(size) = bdat_size(command.argument) else { return self.refuse(BDAT_SYNTAX) };
        let last = command.argument.is_some_and(|a| {
            a.trim_ascii().rsplit(|&b| b == b' ').next().is_some_and(|w| w.eq_ignore_ascii_case(b"LAST"))
        });
        let chunking = self.leg.as_ref().is_some_and(|leg| leg.chunking);
        let refusal = match (&self.mail, self.accepted) {
            (None, _) => Some(MAIL_FIRST),
            _ if self.lost => Some(BACKEND_LOST),
            (Some(_), 0) => Some(NO_VALID_RECIPIENTS),
            _ if !chunking => Some(NOT_IMPLEMENTED),
            _ => None,
        };
        if let Some(reply) = refusal {
            if size == 0 {
                return self.refuse(reply);
            }
            self.stage = Stage::Discard { remaining: size, reply };
            return Step::to_client(Vec::new());
        }
        match self.through_leg(line) {
            Some(step) => {
                self.stage = Stage::Content { last, started: true, replied: false };
                step
            }
            None => self.refuse(NO_VALID_RECIPIENTS),
        }
    }

    /// Drops the octets of a refused BDAT chunk, then answers it.
    fn discard(&mut self, input: &mut BytesMut) -> Option<Step> {
        let Stage::Discard { remaining, reply } = &mut self.stage else { return None };
        if input.is_empty() {
            return None;
        }
        let taken = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
        let _ = input.split_to(taken);
        *remaining -= taken as u64;
        if *remaining > 0 {
            return Some(Step::to_client(Vec::new()));
        }
        let reply = *reply;
        self.stage = Stage::Idle;
        Some(Step::to_client(reply))
    }

    /// A step of the leg while message content flows: the reply to the content ends the
    /// transaction once the client has finished sending it.
    fn content_step(&mut self, mut step: Step, from_backend: bool) -> Step {
        let Stage::Content { last, started, replied } = &mut self.stage else { return step };
        let Some(leg) = self.leg.as_ref() else { return step };
        if from_backend {
            // The 354 starts the body; any other reply is the content's own.
            match leg.phase {
                Phase::DataBody { answered: false } => *started = true,
                _ => *replied = true,
            }
        }
        let leg_idle = leg.phase == Phase::Idle;
        if !(leg_idle && *replied) || step.next != Next::Negotiate {
            return step;
        }
        let ends = *last && *started;
        self.stage = Stage::Idle;
        if !ends {
            return step;
        }
        let done = self.finish(Vec::new());
        step.to_backend.extend_from_slice(&done.to_backend);
        step.next = done.next;
        step
    }

    /// A reply of the backend while the transaction's first recipient is being set up.
    fn setup_step(&mut self, step: Step) -> Step {
        if step.next == Next::Unavailable || step.next == Next::Close {
            // A backend that broke its protocol fails this recipient, not the session; if
            // it had accepted others, the whole transaction is to be retried.
            self.lost = self.accepted > 0;
            return self.release(BACKEND_DOWN.to_vec());
        }
        let stage = std::mem::replace(&mut self.stage, Stage::Idle);
        match stage {
            Stage::Opening { rcpt } if self.leg.as_ref().is_some_and(|leg| leg.phase == Phase::Idle) => {
                let mail = self.mail.clone().unwrap_or_default();
                self.stage = Stage::MailReplay { rcpt };
                joined(step, self.through_leg(&mail))
            }
            Stage::MailReplay { rcpt } if is_positive(&step.to_client) => {
                self.stage = Stage::Rcpt;
                joined(Step::to_client(Vec::new()), self.through_leg(&rcpt))
            }
            // The sender refused there: this recipient's answer, and the backend released.
            Stage::MailReplay { .. } => self.release(step.to_client),
            Stage::Rcpt if is_positive(&step.to_client) => {
                self.accepted += 1;
                step
            }
            Stage::Rcpt if self.accepted == 0 => self.release(step.to_client),
            // Refused, with others accepted: the transaction goes on at this backend.
            Stage::Rcpt => step,
            stage => {
                self.stage = stage;
                step
            }
        }
    }
}

fn is_positive(reply: &[u8]) -> bool {
    reply.first() == Some(&b'2')
}

/// `first` then `second` (if any), written in that order; `second` says what comes next.
fn joined(mut first: Step, second: Option<Step>) -> Step {
    if let Some(second) = second {
        first.to_backend.extend_from_slice(&second.to_backend);
        first.to_client.extend_from_slice(&second.to_client);
        first.next = second.next;
    }
    first
}

/// The address of `TO:<address> [parameters]` (a source route dropped), for routing;
/// `None` when it is not of that shape or empty.
pub(super) fn recipient(argument: Option<&[u8]>) -> Option<String> {
    let argument = argument?.trim_ascii();
    let rest = argument.get(..3).filter(|to| to.eq_ignore_ascii_case(b"TO:")).map(|_| &argument[3..])?;
    let rest = rest.trim_ascii_start().strip_prefix(b"<")?;
    let end = rest.iter().position(|&b| b == b'>')?;
    let path = &rest[..end];
    // RFC 5321 4.1.2's obsolete source route ("@a,@b:user@d"): the mailbox is after ':'.
    let mailbox = match path.first() {
        Some(b'@') => &path[path.iter().position(|&b| b == b':')? + 1..],
        _ => path,
    };
    if mailbox.is_empty() {
        return None;
    }
    std::str::from_utf8(mailbox).ok().map(str::to_owned)
}

impl Negotiation for SmtpRouted {
    fn opening(&mut self) -> Option<Step> {
        let greeting = if self.greet {
            format!("220 {} ESMTP\r\n", self.settings.hostname).into_bytes()
        } else {
            Vec::new()
        };
        Some(Step::to_client(greeting))
    }

    fn on_greeting(&mut self, input: &mut BytesMut) -> Option<Step> {
        match std::mem::replace(&mut self.stage, Stage::Idle) {
            Stage::Routing { rcpt } | Stage::Opening { rcpt } => self.stage = Stage::Opening { rcpt },
            other => {
                self.stage = other;
                return None;
            }
        }
        let helo = self.helo.clone()?;
        let leg = self.leg.get_or_insert_with(|| SmtpNegotiation::routed_leg(&self.settings, helo));
        leg.on_greeting(input)
    }

    fn on_client(&mut self, input: &mut BytesMut) -> Option<Step> {
        match self.stage {
            Stage::Discard { .. } => return self.discard(input),
            Stage::Content { .. } => {
                let step = self.leg.as_mut()?.on_client(input)?;
                return Some(self.content_step(step, false));
            }
            Stage::Idle => {}
            _ => return None,
        }
        let line = match line::take_line(input, self.settings.max_line) {
            Line::Incomplete => return None,
            Line::TooLong => return Some(self.close(LINE_TOO_LONG.to_vec())),
            Line::Complete(line) => line,
        };
        Some(self.command(&line))
    }

    fn on_backend(&mut self, input: &mut BytesMut) -> Option<Step> {
        let step = self.leg.as_mut()?.on_backend(input)?;
        Some(match self.stage {
            Stage::Content { .. } => self.content_step(step, true),
            Stage::Opening { .. } | Stage::MailReplay { .. } | Stage::Rcpt => self.setup_step(step),
            _ => step,
        })
    }

    fn on_route_failed(&mut self) -> Step {
        self.leg = None;
        self.stage = Stage::Idle;
        Step::to_client(BACKEND_DOWN)
    }

    fn on_recipient(&mut self, destination: Destination) -> Step {
        let Stage::Routing { rcpt } = std::mem::replace(&mut self.stage, Stage::Idle) else {
            return self.close(Vec::new());
        };
        match destination {
            Destination::Other => Step::to_client(DEFERRED),
            Destination::Current => {
                self.stage = Stage::Rcpt;
                self.through_leg(&rcpt).unwrap_or_else(|| Step::to_client(BACKEND_DOWN))
            }
        }
    }

    fn take_finding(&mut self) -> Option<Finding> {
        self.leg.as_mut().and_then(|leg| leg.take_finding())
    }
}
