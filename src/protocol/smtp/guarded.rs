//! Guarded plaintext: a port-25 session in front of a backend that offers what a plaintext
//! client must not reach never leaves the negotiation; message content is streamed.

use super::*;

impl SmtpNegotiation {
    /// A command of a guarded plaintext session: everything the backend may see goes to it
    /// one command at a time; what it must never see is answered here.
    pub(super) fn guarded_command(&mut self, command: &Command, line: &[u8]) -> Step {
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
    pub(super) fn bdat(&mut self, command: &Command, line: &[u8]) -> Step {
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
    pub(super) fn stream(&mut self, input: &mut BytesMut) -> Option<Step> {
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
    pub(super) fn content_done(&mut self, answered: bool) {
        self.phase = if answered { Phase::Idle } else { Phase::Awaiting(Pending::Other) };
    }

    /// A piece of a DATA body, through the smuggling guard, up to the end of data.
    pub(super) fn body(&mut self, input: &mut BytesMut, answered: bool) -> Step {
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
}
