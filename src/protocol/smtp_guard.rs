//! The SMTP smuggling guard: every client byte bound for an SMTP backend passes through
//! it, so no backend ever receives a bare CR or bare LF outside a BDAT chunk.
//!
//! SMTP smuggling (CVE-2023-51764 for Postfix; Exim and Sendmail had the same) hides a
//! non-standard end of data (`<LF>.<CR><LF>`, `<CR><LF>.<LF>`, `<LF>.<LF>`, `<CR>.<CR>`...)
//! inside a message. An upstream server passes it on as content; a lenient receiver ends
//! the message there and reads what follows as a second, forged transaction. The old
//! backends mailtls fronts will never be patched, so the front door neutralises it.
//!
//! Policies, as Postfix 3.9 names them (`smtpd_forbid_bare_newline`):
//! - [`BareNewline::Normalize`]: a bare LF or bare CR becomes CRLF. The end of data is
//!   only CRLF "." CRLF as the client sent it: a line that starts with "." after a
//!   normalized line ending, and a "." line whose own ending was normalized, get one more
//!   "." (dot-stuffing, which the backend removes again), so the backend can never see an
//!   end of data mailtls did not see. A smuggling attempt stays text inside the message.
//! - [`BareNewline::Reject`]: nothing from the offending octet on reaches the backend,
//!   which then drops the unfinished message; the client gets a 521 and both sides close.
//!
//! Why this needs no backend replies: the transformation is the same in command mode and
//! in a DATA body (command lines are normalized too), so whatever the backend made of a
//! DATA command (354, or a refusal after which "body" lines are commands to it), it sees
//! CRLF lines only, and CRLF "." CRLF exactly where the client sent one. Modes matter only
//! for BDAT (RFC 3030), whose chunk is `n` octets of content that must pass unchanged (a
//! normalized chunk would be longer than announced and its tail would become commands):
//! - a window is opened only for `BDAT <n>[ LAST]` in command mode, and only while the
//!   backend is known to do CHUNKING (its EHLO reply in this session said so, no HELO
//!   since). Any other line whose first word is BDAT ends the session before its line
//!   ending reaches the backend, so the backend can never open a window mailtls did not;
//! - a body line whose first word is BDAT (harmless as content, but a command to a backend
//!   that refused the DATA) switches windows off for the rest of the session;
//! - every DATA command line starts a body, whatever the backend answers, so a session
//!   cannot move from BDAT to an unexamined DATA.
//!
//! State is a few dozen bytes (the first bytes of the current line, to recognise the
//! command); an idle session holds no buffer. Clean input costs one memchr2 pass and no copy.

use memchr::memchr2;
use serde::Deserialize;

use super::{Action, Finding};
use crate::relay::{ClientFilter, Verdict};

/// What to do with a bare CR or bare LF from an SMTP client (`bare_newline` in the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    /// Turn it into CRLF and dot-stuff what could otherwise end the message (the default).
    #[default]
    Normalize,
    /// Close the session before the octet reaches the backend.
    Reject,
}

impl BareNewline {
    pub fn name(self) -> &'static str {
        match self {
            BareNewline::Normalize => "normalize",
            BareNewline::Reject => "reject",
        }
    }
}

/// Sent before closing when a client sends a bare CR or LF under [`BareNewline::Reject`].
pub(super) const BARE_NEWLINE: &[u8] = b"521 5.5.2 Error: bare <CR> or <LF> in message content; closing\r\n";
/// Sent before closing when a BDAT line could open a chunk mailtls cannot frame.
const BDAT_REFUSED: &[u8] = b"503 5.5.1 Error: BDAT not accepted in this session; closing\r\n";

/// What a guard found, worst last (the log line names the worst one of a session).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    BareLf,
    BareCr,
    /// A bare line ending next to a "." line: a non-standard end of data, the smuggling form.
    EndOfData,
    /// A BDAT line the guard could not frame safely.
    UnsafeBdat,
}

impl Variant {
    fn describe(self) -> &'static str {
        match self {
            Variant::BareLf => "bare LF",
            Variant::BareCr => "bare CR",
            Variant::EndOfData => "non-standard end of data",
            Variant::UnsafeBdat => "BDAT without a safe chunk frame",
        }
    }
}

/// Where in the SMTP stream the guard is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Command lines: recognised by their first word (DATA, BDAT, HELO, EHLO).
    Command,
    /// A DATA body, until CRLF "." CRLF.
    Body,
    /// The remaining octets of a BDAT chunk: passed unchanged and unexamined.
    Chunk(u64),
    /// A refusal was given; nothing more passes.
    Closed,
}

/// First bytes of a line kept to recognise its first word; longer than any command
/// mailtls must recognise (`BDAT` + 20 digits + ` LAST`).
const HEAD: usize = 32;

/// What of a body line's head is kept: enough for "BDAT" and the blank after it.
const BODY_HEAD: usize = 5;

/// The head of the current line: its first [`HEAD`] octets after any leading blanks.
#[derive(Clone, Copy, Debug)]
struct Head {
    bytes: [u8; HEAD],
    len: u8,
    /// More octets followed the ones kept.
    overflow: bool,
    /// The line began with blanks (SP or HTAB), which some servers skip before a command.
    blanks: bool,
}

impl Head {
    const EMPTY: Head = Head { bytes: [0; HEAD], len: 0, overflow: false, blanks: false };

    /// Keeps the first octets of `text` (after leading blanks), up to `cap` in all.
    fn push(&mut self, text: &[u8], cap: usize) {
        let mut text = text;
        if self.len == 0 && !self.overflow {
            let lead = text.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
            self.blanks |= lead > 0;
            text = &text[lead..];
        }
        let len = usize::from(self.len);
        let take = text.len().min(cap.saturating_sub(len));
        self.bytes[len..len + take].copy_from_slice(&text[..take]);
        self.len += take as u8;
        self.overflow |= take < text.len();
    }

    fn text(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The first word, up to a blank.
    fn word(&self) -> &[u8] {
        let text = self.text();
        let end = text.iter().position(|&b| b == b' ' || b == b'\t').unwrap_or(text.len());
        &text[..end]
    }

    fn is(&self, verb: &[u8]) -> bool {
        self.word().eq_ignore_ascii_case(verb)
    }

    /// The chunk size of a strictly written `BDAT <n>[ LAST]`, the form every RFC 3030
    /// server reads the same way; `None` for anything else.
    fn bdat_size(&self) -> Option<u64> {
        if self.blanks || self.overflow {
            return None;
        }
        let argument = self.text().get(5..).filter(|_| self.text().get(4) == Some(&b' '));
        super::smtp::bdat_size(argument)
    }
}

/// The line being scanned.
#[derive(Clone, Copy, Debug)]
struct Line {
    /// No octet of this line seen yet.
    start: bool,
    /// The previous line's ending was a normalized bare CR or LF.
    after_bare: bool,
    /// The line so far is exactly "." and began after a real CRLF: CRLF ends the data.
    dot_only: bool,
    head: Head,
}

impl Line {
    fn fresh(after_bare: bool) -> Line {
        Line { start: true, after_bare, dot_only: false, head: Head::EMPTY }
    }
}

/// How a line ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Crlf,
    Bare(Variant),
}

/// What to do with a line ending, decided before any of it is written.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Pass it as the client sent it (a real CRLF).
    Keep,
    /// Write these octets in its place.
    Replace(&'static [u8]),
    /// Write nothing more; refuse with this reply.
    Refuse(&'static [u8]),
}

/// Output built lazily: nothing is copied until the first change, so clean input passes
/// as the caller's own buffer.
struct Emit<'a> {
    input: &'a [u8],
    out: &'a mut Vec<u8>,
    from: usize,
    changed: bool,
}

impl Emit<'_> {
    /// Writes `with` in place of `input[at..at + width]`.
    fn replace(&mut self, at: usize, width: usize, with: &[u8]) {
        self.out.extend_from_slice(&self.input[self.from..at]);
        self.out.extend_from_slice(with);
        self.from = at + width;
        self.changed = true;
    }

    /// Everything up to `end` is output (`end` short of the input's end: a DATA body
    /// ended for a caller that wants to stop there).
    fn finish(&mut self, end: usize) {
        if self.changed {
            self.out.extend_from_slice(&self.input[self.from..end]);
        }
    }
}

/// What one pass over some input did.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Scan {
    /// Input octets consumed (all of them unless the body ended or a refusal came).
    pub consumed: usize,
    /// `out` holds the output; otherwise the consumed input is the output.
    pub changed: bool,
    /// A DATA body ended (only reported when the caller asked to stop there).
    pub end_of_data: bool,
    /// Refused: write `out`, then this reply to the client, and close.
    pub refused: Option<&'static [u8]>,
}

/// The guard; see the module documentation.
#[derive(Debug)]
pub struct SmtpGuard {
    policy: BareNewline,
    mode: Mode,
    /// BDAT windows may open: the backend announced CHUNKING in its last EHLO reply.
    chunking: bool,
    /// The backend announced CHUNKING in this session; a later EHLO brings it back.
    backend_chunking: bool,
    /// A body line began with BDAT: windows never open again in this session.
    poisoned: bool,
    line: Line,
    /// The last octet seen was a CR, held back until the next one says whether it is
    /// part of a CRLF.
    cr_pending: bool,
    worst: Option<Variant>,
    action: Action,
    count: u64,
}

impl SmtpGuard {
    /// A guard for a session in command mode, at the start of a line. `chunking`: the
    /// backend's last EHLO reply in this session announced CHUNKING.
    pub fn new(policy: BareNewline, chunking: bool) -> SmtpGuard {
        SmtpGuard {
            policy,
            mode: Mode::Command,
            chunking,
            backend_chunking: chunking,
            poisoned: false,
            line: Line::fresh(false),
            cr_pending: false,
            worst: None,
            action: Action::Normalized,
            count: 0,
        }
    }

    /// A guard inside a DATA body, right after the CRLF of the DATA command (the guarded
    /// negotiation, which knows the backend's 354).
    pub(super) fn in_body(policy: BareNewline) -> SmtpGuard {
        SmtpGuard { mode: Mode::Body, ..SmtpGuard::new(policy, false) }
    }

    /// What was found since the last call (for the log line and the metric).
    pub fn take_finding(&mut self) -> Option<Finding> {
        let worst = self.worst?;
        if self.count == 0 {
            return None;
        }
        let finding = Finding {
            about: "SMTP smuggling defence",
            what: worst.describe(),
            action: self.action,
            count: self.count,
        };
        self.count = 0;
        Some(finding)
    }

    fn note(&mut self, variant: Variant, action: Action) {
        self.worst = self.worst.max(Some(variant));
        if action == Action::Refused {
            self.action = Action::Refused;
        }
        self.count += 1;
    }

    /// Scans `input`; with `stop_at_end_of_data`, stops right after the end of a DATA body.
    pub(super) fn scan(&mut self, input: &[u8], out: &mut Vec<u8>, stop_at_end_of_data: bool) -> Scan {
        let mut emit = Emit { input, out, from: 0, changed: false };
        let mut i = 0;
        while i < input.len() {
            match self.mode {
                Mode::Closed => return self.refused(&mut emit, i, BARE_NEWLINE),
                Mode::Chunk(remaining) => {
                    let take = usize::try_from(remaining).map_or(input.len() - i, |r| r.min(input.len() - i));
                    i += take;
                    let left = remaining - take as u64;
                    if left == 0 {
                        self.mode = Mode::Command;
                        self.line = Line::fresh(false);
                    } else {
                        self.mode = Mode::Chunk(left);
                    }
                    continue;
                }
                Mode::Body if !self.cr_pending && self.line.start && !self.line.after_bare => {
                    i = skip_plain_body_lines(input, i);
                    if i == input.len() {
                        break;
                    }
                }
                Mode::Command | Mode::Body => {}
            }
            if self.cr_pending {
                // The CR at the end of the previous input was held back; `i` is the octet
                // after it, and the CR itself is not in this input (width 0).
                self.cr_pending = false;
                let (ending, width) =
                    if input[i] == b'\n' { (Ending::Crlf, 1) } else { (Ending::Bare(Variant::BareCr), 0) };
                let peek = &input[i + width..];
                let in_body = self.mode == Mode::Body;
                let decision = self.line_end(ending, peek);
                match decision {
                    Decision::Keep => emit.replace(i, 0, b"\r"),
                    Decision::Replace(with) => emit.replace(i, 0, with),
                    Decision::Refuse(reply) => return self.refused(&mut emit, i, reply),
                }
                i += width;
                if stop_at_end_of_data && in_body && self.mode == Mode::Command {
                    return self.stop(&mut emit, i);
                }
                continue;
            }
            if self.line.start {
                self.line.start = false;
                if input[i] == b'.' {
                    self.line.head.push(b".", HEAD);
                    if self.line.after_bare {
                        // "<LF>." : the backend must not see CRLF "." here.
                        self.note(Variant::EndOfData, Action::Normalized);
                        emit.replace(i, 0, b".");
                    } else {
                        self.line.dot_only = true;
                    }
                    i += 1;
                    continue;
                }
            }
            let Some(k) = memchr2(b'\r', b'\n', &input[i..]) else {
                self.text(&input[i..]);
                break;
            };
            let j = i + k;
            self.text(&input[i..j]);
            let (ending, width) = match (input[j], input.get(j + 1)) {
                (b'\n', _) => (Ending::Bare(Variant::BareLf), 1),
                (_, Some(b'\n')) => (Ending::Crlf, 2),
                (_, Some(_)) => (Ending::Bare(Variant::BareCr), 1),
                (_, None) => {
                    // A CR as the last octet: whether it is bare depends on the next read.
                    emit.replace(j, 1, b"");
                    self.cr_pending = true;
                    break;
                }
            };
            let in_body = self.mode == Mode::Body;
            match self.line_end(ending, &input[j + width..]) {
                Decision::Keep => {}
                Decision::Replace(with) => emit.replace(j, width, with),
                Decision::Refuse(reply) => return self.refused(&mut emit, j, reply),
            }
            i = j + width;
            if stop_at_end_of_data && in_body && self.mode == Mode::Command {
                return self.stop(&mut emit, i);
            }
        }
        emit.finish(input.len());
        Scan { consumed: input.len(), changed: emit.changed, end_of_data: false, refused: None }
    }

    fn stop(&mut self, emit: &mut Emit<'_>, at: usize) -> Scan {
        emit.finish(at);
        Scan { consumed: at, changed: emit.changed, end_of_data: true, refused: None }
    }

    fn refused(&mut self, emit: &mut Emit<'_>, at: usize, reply: &'static [u8]) -> Scan {
        self.mode = Mode::Closed;
        emit.out.extend_from_slice(&emit.input[emit.from..at]);
        Scan { consumed: emit.input.len(), changed: true, end_of_data: false, refused: Some(reply) }
    }

    /// Octets inside a line (no CR or LF among them).
    fn text(&mut self, text: &[u8]) {
        if text.is_empty() {
            return;
        }
        self.line.start = false;
        self.line.dot_only = false;
        if !self.line.head.overflow {
            // A body line is only checked for a first word of BDAT: five octets do.
            let cap = if self.mode == Mode::Body { BODY_HEAD } else { HEAD };
            self.line.head.push(text, cap);
        }
    }

    /// A line ended; `after` is what follows the ending in this input (for naming what
    /// was found). Decides what the backend gets for the ending and what comes next.
    fn line_end(&mut self, ending: Ending, after: &[u8]) -> Decision {
        let dot_only = self.line.dot_only;
        let decision = match ending {
            Ending::Bare(variant) => {
                // "<CR><LF>.<LF>" (a dot line with a bare ending) and "<LF>.<LF>" (a bare
                // ending before a dot line) are the smuggling forms.
                let dot_line_follows =
                    after.first() == Some(&b'.') && matches!(after.get(1), None | Some(b'\r' | b'\n'));
                let variant = if dot_only || dot_line_follows { Variant::EndOfData } else { variant };
                if self.policy == BareNewline::Reject {
                    self.note(variant, Action::Refused);
                    return Decision::Refuse(BARE_NEWLINE);
                }
                self.note(variant, Action::Normalized);
                if dot_only {
                    Decision::Replace(b".\r\n")
                } else {
                    Decision::Replace(b"\r\n")
                }
            }
            Ending::Crlf => Decision::Keep,
        };
        match self.mode {
            Mode::Body if dot_only && ending == Ending::Crlf => self.mode = Mode::Command,
            Mode::Body => self.body_line(),
            Mode::Command => {
                if let Some(reply) = self.command_line() {
                    self.note(Variant::UnsafeBdat, Action::Refused);
                    return Decision::Refuse(reply);
                }
            }
            Mode::Chunk(_) | Mode::Closed => {}
        }
        let after_bare = matches!(ending, Ending::Bare(_));
        self.line = Line::fresh(after_bare);
        decision
    }

    /// A command line is complete: what it starts. `Some(reply)`: refuse it.
    fn command_line(&mut self) -> Option<&'static [u8]> {
        let head = &self.line.head;
        if head.is(b"DATA") {
            self.mode = Mode::Body;
        } else if head.is(b"BDAT") {
            match head.bdat_size() {
                Some(size) if self.chunking => {
                    if size > 0 {
                        self.mode = Mode::Chunk(size);
                    }
                }
                _ => return Some(BDAT_REFUSED),
            }
        } else if head.is(b"EHLO") {
            self.chunking = self.backend_chunking && !self.poisoned;
        } else if head.is(b"HELO") {
            // A HELO session has no extensions; the backend may treat BDAT as unknown.
            self.chunking = false;
        }
        None
    }

    /// A body line is complete.
    fn body_line(&mut self) {
        if self.line.head.is(b"BDAT") {
            // Content to a backend in DATA, but a command to one that refused the DATA:
            // from here on mailtls could no longer be sure where the backend's chunks end.
            self.poisoned = true;
            self.chunking = false;
        }
    }

    /// The client closed its side: a CR still held is bare.
    pub(super) fn end_of_input(&mut self, out: &mut Vec<u8>) -> Verdict {
        if !self.cr_pending {
            return Verdict::Clean;
        }
        self.cr_pending = false;
        match self.line_end(Ending::Bare(Variant::BareCr), &[]) {
            Decision::Keep => out.extend_from_slice(b"\r"),
            Decision::Replace(with) => out.extend_from_slice(with),
            Decision::Refuse(reply) => {
                self.mode = Mode::Closed;
                return Verdict::Refuse(reply.to_vec());
            }
        }
        Verdict::Changed
    }
}

/// The fast path through a DATA body, from the start of a line after a real CRLF: skips
/// whole CRLF lines that cannot matter (not starting with ".", a blank, "B"/"b" or a line
/// ending), which leave the guard's state exactly as it was. Returns where the slow path
/// must continue: the start of the first line that needs looking at, or of an incomplete one.
fn skip_plain_body_lines(input: &[u8], mut i: usize) -> usize {
    loop {
        match input.get(i) {
            None | Some(b'.' | b' ' | b'\t' | b'B' | b'b' | b'\r' | b'\n') => return i,
            Some(_) => {}
        }
        let Some(k) = memchr2(b'\r', b'\n', &input[i..]) else { return i };
        let end = i + k;
        if input[end] != b'\r' || input.get(end + 1) != Some(&b'\n') {
            return i;
        }
        i = end + 2;
    }
}

/// Where the first bare CR or bare LF of `bytes` is: the invariant the guard keeps, as a
/// check for tests and diagnostics.
pub fn first_bare_newline(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(k) = memchr2(b'\r', b'\n', &bytes[from..]) {
        let at = from + k;
        let paired = match bytes[at] {
            b'\r' => bytes.get(at + 1) == Some(&b'\n'),
            _ => at > 0 && bytes[at - 1] == b'\r',
        };
        if !paired {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

impl ClientFilter for SmtpGuard {
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Verdict {
        let scan = self.scan(input, out, false);
        match scan.refused {
            Some(reply) => Verdict::Refuse(reply.to_vec()),
            None if scan.changed => Verdict::Changed,
            None => Verdict::Clean,
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Verdict {
        self.end_of_input(out)
    }

    fn name(&self) -> &'static str {
        "smtp"
    }
}

impl super::ClientGuard for SmtpGuard {
    fn take_finding(&mut self) -> Option<Finding> {
        SmtpGuard::take_finding(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the backend receives when `pieces` arrive one read each, and the refusal, if any.
    fn through(guard: &mut SmtpGuard, pieces: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut sent = Vec::new();
        for piece in pieces {
            let mut out = Vec::new();
            match guard.filter(piece, &mut out) {
                Verdict::Clean => sent.extend_from_slice(piece),
                Verdict::Changed => sent.extend_from_slice(&out),
                Verdict::Refuse(reply) => {
                    sent.extend_from_slice(&out);
                    return (sent, Some(reply));
                }
            }
        }
        let mut out = Vec::new();
        match guard.finish(&mut out) {
            Verdict::Refuse(reply) => return (sent, Some(reply)),
            _ => sent.extend_from_slice(&out),
        }
        (sent, None)
    }

    fn normalize() -> SmtpGuard {
        SmtpGuard::new(BareNewline::Normalize, true)
    }

    fn reject() -> SmtpGuard {
        SmtpGuard::new(BareNewline::Reject, true)
    }

    fn has_bare_newline(bytes: &[u8]) -> bool {
        first_bare_newline(bytes).is_some()
    }

    /// The transactions a strict backend (CRLF lines, CRLF "." CRLF ends data) sees: the
    /// MAIL commands it would act on, in order.
    fn mail_commands(stream: &[u8]) -> Vec<String> {
        let mut mails = Vec::new();
        let mut rest = stream;
        let mut in_body = false;
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let line = &rest[..end];
            rest = &rest[end + 2..];
            if in_body {
                in_body = line != b".";
            } else if line.eq_ignore_ascii_case(b"DATA") {
                in_body = true;
            } else if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"MAIL") {
                mails.push(String::from_utf8_lossy(line).into_owned());
            }
        }
        mails
    }

    const MAIL: &[u8] = b"MAIL FROM:<legit@sender.test>\r\nRCPT TO:<alice@mail.test>\r\nDATA\r\n";
    const FORGED: &[u8] =
        b"MAIL FROM:<ceo@mail.test>\r\nRCPT TO:<alice@mail.test>\r\nDATA\r\nFrom: ceo\r\n\r\nforged\r\n";

    /// The smuggling forms of CVE-2023-51764 and its cousins, plus the CR forms.
    const SMUGGLING: &[&[u8]] =
        &[b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n"];

    fn smuggling_session(variant: &[u8]) -> Vec<u8> {
        [MAIL, b"Subject: hi\r\n\r\nfirst", variant, FORGED, b".\r\nQUIT\r\n"].concat()
    }

    fn clean_session() -> Vec<u8> {
        let long_line = vec![b'x'; 100_000];
        [
            MAIL,
            b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n",
            // A dot-stuffed line, a line that is only "..", 8-bit and UTF-8 text.
            b"..leading dot\r\n..\r\n\xe2\x82\xac caf\xc3\xa9 \xff\x00\x7f\r\n",
            &long_line,
            b"\r\n.\r\n",
            // PIPELINING: the next transaction right behind the end of data.
            b"MAIL FROM:<b@c> SMTPUTF8\r\nRCPT TO:<j\xc3\xb6rg@mail.test>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n",
        ]
        .concat()
    }

    #[test]
    fn clean_crlf_session_passes_unchanged_without_a_copy() {
        let session = clean_session();
        let mut out = Vec::new();
        assert_eq!(normalize().filter(&session, &mut out), Verdict::Clean);
        assert!(out.is_empty());
        assert_eq!(through(&mut reject(), &[&session]), (session.clone(), None));
    }

    #[test]
    fn clean_session_cut_at_every_offset_passes_unchanged() {
        let session = clean_session();
        for cut in 0..=session.len().min(400) {
            let (a, b) = session.split_at(cut);
            assert_eq!(through(&mut normalize(), &[a, b]).0, session, "cut at {cut}");
        }
        // And one octet per read, CRLFs split everywhere.
        let octets: Vec<&[u8]> = session[..600].chunks(1).collect();
        assert_eq!(through(&mut normalize(), &octets).0, &session[..600]);
    }

    #[test]
    fn every_smuggling_form_stays_inside_the_first_message_when_normalized() {
        for variant in SMUGGLING {
            let session = smuggling_session(variant);
            let (sent, refused) = through(&mut normalize(), &[&session]);
            assert_eq!(refused, None);
            assert!(!has_bare_newline(&sent), "{variant:?}: {:?}", String::from_utf8_lossy(&sent));
            assert_eq!(mail_commands(&sent), vec!["MAIL FROM:<legit@sender.test>"], "{variant:?}");
            assert!(sent.ends_with(b"\r\n.\r\nQUIT\r\n"), "{variant:?}");
            // The same, one octet per read.
            let octets: Vec<&[u8]> = session.chunks(1).collect();
            assert_eq!(through(&mut normalize(), &octets).0, sent, "{variant:?} octet by octet");
        }
    }

    #[test]
    fn every_smuggling_form_is_refused_before_it_reaches_the_backend() {
        for variant in SMUGGLING {
            let session = smuggling_session(variant);
            let mut guard = reject();
            let (sent, refused) = through(&mut guard, &[&session]);
            assert_eq!(refused.as_deref(), Some(BARE_NEWLINE), "{variant:?}");
            assert!(!has_bare_newline(&sent), "{variant:?}");
            // Nothing from the offending octet on: at most the CRLF "." before a bare one.
            let before = [MAIL, b"Subject: hi\r\n\r\nfirst"].concat();
            assert!(sent.starts_with(&before) && sent.len() <= before.len() + 3, "{variant:?}");
            assert!(!sent.windows(3).any(|w| w == b"ceo"), "{variant:?}");
            let finding = guard.take_finding().unwrap();
            assert_eq!((finding.action, finding.count), (Action::Refused, 1));
        }
    }

    #[test]
    fn smuggling_forms_are_reported_as_non_standard_end_of_data() {
        let mut guard = normalize();
        through(&mut guard, &[&smuggling_session(b"\n.\n")]);
        let finding = guard.take_finding().unwrap();
        assert_eq!(finding.what, "non-standard end of data");
        assert_eq!(finding.action, Action::Normalized);
        assert_eq!(guard.take_finding(), None, "reported once");
        let mut guard = normalize();
        through(&mut guard, &[&[MAIL, b"a\nb\r\n.\r\n"].concat()]);
        assert_eq!(guard.take_finding().unwrap().what, "bare LF");
    }

    #[test]
    fn normalized_dot_lines_are_stuffed_and_content_survives() {
        let (sent, _) = through(&mut normalize(), &[&[MAIL, b"a\n.\nb\r\n.\n\r\n.\r\n"].concat()]);
        assert_eq!(sent, [MAIL, b"a\r\n..\r\nb\r\n..\r\n\r\n.\r\n"].concat());
    }

    #[test]
    fn bare_newlines_in_commands_are_normalized_or_refused() {
        assert_eq!(through(&mut normalize(), &[b"NOOP\nRSET\rQUIT\r\n"]).0, b"NOOP\r\nRSET\r\nQUIT\r\n");
        let (sent, refused) = through(&mut reject(), &[b"NOOP\r\nRSET\nQUIT\r\n"]);
        assert_eq!((sent.as_slice(), refused.as_deref()), (&b"NOOP\r\nRSET"[..], Some(BARE_NEWLINE)));
    }

    #[test]
    fn a_cr_at_a_read_boundary_is_held_until_the_next_octet() {
        let mut guard = normalize();
        let mut out = Vec::new();
        assert_eq!(guard.filter(b"NOOP\r", &mut out), Verdict::Changed);
        assert_eq!(out, b"NOOP");
        assert_eq!(through(&mut guard, &[b"\nQUIT\r"]).0, b"\r\nQUIT\r\n", "a CR at the end is bare");
        assert_eq!(through(&mut reject(), &[b"QUIT\r"]), (b"QUIT".to_vec(), Some(BARE_NEWLINE.to_vec())));
    }

    #[test]
    fn end_of_data_at_a_read_boundary_then_pipelined_transaction_is_scanned_again() {
        let first = [MAIL, b"body\r\n.\r\n"].concat();
        let second = [MAIL, b"x\n.\nMAIL FROM:<ceo@mail.test>\r\n\r\n.\r\n"].concat();
        let (sent, _) = through(&mut normalize(), &[&first, &second]);
        assert!(!has_bare_newline(&sent));
        assert_eq!(mail_commands(&sent).len(), 2);
    }

    #[test]
    fn bdat_chunks_pass_unchanged_and_a_later_data_is_scanned() {
        let chunk: &[u8] = b"a\n.\nb\r\r";
        let framed = [&b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 8\r\n"[..], chunk].concat();
        let session = [
            &framed[..],
            b"BDAT 0 LAST\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\n.\nMAIL FROM:<ceo@x>\r\n\r\n.\r\n",
        ]
        .concat();
        for cut in 0..session.len() {
            let (a, b) = session.split_at(cut);
            let (sent, refused) = through(&mut normalize(), &[a, b]);
            assert_eq!(refused, None);
            let (head, tail) = sent.split_at(framed.len());
            assert_eq!(head, framed, "cut at {cut}: the chunk is unchanged");
            assert!(!has_bare_newline(tail), "cut at {cut}: DATA after BDAT is scanned");
            assert_eq!(mail_commands(tail), vec!["MAIL FROM:<a@b>"], "cut at {cut}");
        }
    }

    #[test]
    fn bdat_without_announced_chunking_is_refused_before_its_line_ends() {
        let mut guard = SmtpGuard::new(BareNewline::Normalize, false);
        let (sent, refused) = through(&mut guard, &[b"MAIL FROM:<a@b>\r\nBDAT 5\r\na\n.\nx"]);
        assert_eq!(sent, b"MAIL FROM:<a@b>\r\nBDAT 5");
        assert_eq!(refused.as_deref(), Some(BDAT_REFUSED));
        assert_eq!(guard.take_finding().unwrap().action, Action::Refused);
    }

    #[test]
    fn bdat_the_guard_cannot_frame_is_refused() {
        for line in [
            &b"BDAT 5 X\r\n"[..],
            b" BDAT 5\r\n",
            b"BDAT  5\r\n",
            b"BDAT\r\n",
            b"bdat 99999999999999999999999\r\n",
        ] {
            let (_, refused) = through(&mut normalize(), &[line]);
            assert_eq!(refused.as_deref(), Some(BDAT_REFUSED), "{line:?}");
        }
        assert_eq!(through(&mut normalize(), &[b"bdat 3 last\r\nabc"]).1, None);
    }

    #[test]
    fn helo_or_a_bdat_line_in_a_body_switch_chunk_windows_off() {
        let (_, refused) = through(&mut normalize(), &[b"HELO x\r\nBDAT 3\r\n"]);
        assert_eq!(refused.as_deref(), Some(BDAT_REFUSED));
        let (_, refused) = through(&mut normalize(), &[b"HELO x\r\nEHLO x\r\nBDAT 3\r\nabc"]);
        assert_eq!(refused, None, "EHLO brings the backend's CHUNKING back");
        let body_then_bdat = [MAIL, b"BDAT 3\r\n.\r\nEHLO x\r\nBDAT 3\r\n"].concat();
        assert_eq!(through(&mut normalize(), &[&body_then_bdat]).1.as_deref(), Some(BDAT_REFUSED));
    }

    #[test]
    fn a_guard_is_small() {
        assert!(std::mem::size_of::<SmtpGuard>() <= 96, "{}", std::mem::size_of::<SmtpGuard>());
    }
}
