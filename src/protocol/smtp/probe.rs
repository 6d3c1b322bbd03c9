//! The probe that learns a backend's EHLO extensions, for the answers mailtls gives before
//! any backend is connected.

use super::*;

/// A probe reads replies from a backend we configured ourselves; these bounds only stop a
/// broken one from growing our memory.
const PROBE_MAX_LINE: usize = 4096;
const PROBE_MAX_REPLY: usize = 64 * 1024;

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

impl CapabilityProbe for Probe {
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
