//! SMTP command lines: the verbs mailtls treats differently and how a line is split into
//! what mailtls needs to decide on it.

use super::*;

/// The SMTP verbs mailtls treats differently; everything else is `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verb {
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
    pub(super) fn of(word: &[u8]) -> Verb {
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
    pub(super) fn needs_tls_when_required(self) -> bool {
        matches!(
            self,
            Verb::Mail | Verb::Rcpt | Verb::Data | Verb::Bdat | Verb::Vrfy | Verb::Expn | Verb::Etrn
        )
    }
}

/// One command line, split into what mailtls needs to decide on it.
pub(super) struct Command<'a> {
    pub(super) verb: Verb,
    pub(super) argument: Option<&'a [u8]>,
    /// NUL, bare CR and other control bytes: no valid command contains them, and a backend
    /// that split on them could be fed a command mailtls never saw.
    pub(super) has_control_bytes: bool,
}

impl<'a> Command<'a> {
    pub(super) fn parse(line: &'a [u8]) -> Command<'a> {
        let (word, argument) = line::split_word(line);
        Command { verb: Verb::of(word), argument, has_control_bytes: has_control_bytes(line::trim_eol(line)) }
    }

    /// `STARTTLS ` with only trailing blanks is how some clients write a bare STARTTLS.
    pub(super) fn has_argument(&self) -> bool {
        self.argument.is_some_and(|arg| arg.iter().any(|b| !b.is_ascii_whitespace()))
    }
}

pub(super) fn has_control_bytes(text: &[u8]) -> bool {
    text.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

pub(super) fn with_crlf(line: &[u8]) -> Vec<u8> {
    let mut out = line::trim_eol(line).to_vec();
    out.extend_from_slice(b"\r\n");
    out
}

/// Gives a line taken by `take_line` back to the front of the buffer. `line` was split off
/// `input`, so the two halves are adjacent and `unsplit` joins them without copying.
pub(super) fn put_back(input: &mut BytesMut, mut line: BytesMut) {
    line.unsplit(input.split());
    *input = line;
}
