//! The plaintext dialogue mailtls speaks itself on an SMTP STARTTLS listener (587, or 25
//! with require_tls false), until STARTTLS, a plaintext MAIL, or the end.

use super::*;

fn reply(text: &[u8]) -> PreTlsStep {
    PreTlsStep::Reply(text.to_vec())
}

/// The plaintext dialogue on an SMTP STARTTLS listener (587, or 25 with require_tls false).
pub struct SmtpPreTls {
    pub(super) hostname: String,
    pub(super) require_tls: bool,
    pub(super) max_line: usize,
    pub(super) max_commands: u32,
    pub(super) max_errors: u32,
    pub(super) extensions: Arc<[String]>,
    /// The client's last accepted EHLO/HELO, replayed to the backend on the plaintext path.
    pub(super) helo: Option<Vec<u8>>,
    pub(super) commands: u32,
    pub(super) errors: u32,
    /// Set once a step hands the connection on (TLS, plaintext relay, close): from then on
    /// the buffer belongs to someone else and is never read again.
    pub(super) finished: bool,
    pub(super) refused_logins: u32,
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

    pub(super) fn ehlo_reply(&self) -> Vec<u8> {
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
    pub(super) fn refuse(&mut self, text: &[u8]) -> PreTlsStep {
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.max_errors {
            return PreTlsStep::Close(too_many(&self.hostname, "errors"));
        }
        reply(text)
    }

    pub(super) fn greet_back(&mut self, command: &Command, line: &[u8]) -> PreTlsStep {
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

    pub(super) fn answer(&mut self, line: &[u8]) -> PreTlsStep {
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
