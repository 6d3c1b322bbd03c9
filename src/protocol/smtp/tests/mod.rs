//! Unit tests of the SMTP state machines, one file per part; shared helpers here.

use super::negotiation::Mode;
use super::*;

mod negotiation;
mod pre_tls;

mod fuzz;
mod guarded;
mod probe;
mod routed;

pub(super) fn settings() -> Settings {
    Settings { hostname: "mx.test".to_owned(), ..Settings::default() }
}

#[test]
fn only_login_attempts_count_as_refused_logins() {
    // The session counts these in metrics; other refusals must not inflate them.
    let mut pre = SmtpPreTls::new(&settings());
    for command in [
        &b"EHLO x\r\n"[..],
        &b"AUTH PLAIN eHh4\r\n"[..],
        &b"MAIL FROM:<a@b>\r\n"[..],
        &b"auth login\r\n"[..],
        &b"BOGUS\r\n"[..],
    ] {
        assert!(pre.on_client(&mut BytesMut::from(command)).is_some(), "{command:?}");
    }
    assert_eq!(pre.refused_logins(), 2);
}

pub(super) fn opportunistic() -> Settings {
    Settings {
        require_tls: false,
        backend_extensions: Arc::from(vec![
            "PIPELINING".to_owned(),
            "SIZE 10240000".to_owned(),
            "AUTH PLAIN LOGIN".to_owned(),
            "auth=login".to_owned(),
            "STARTTLS".to_owned(),
            "XCLIENT NAME ADDR".to_owned(),
            "xforward name".to_owned(),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "CHUNKING".to_owned(),
        ]),
        ..settings()
    }
}

pub(super) fn buf(bytes: &[u8]) -> BytesMut {
    BytesMut::from(bytes)
}

pub(super) fn reply(pre: &mut SmtpPreTls, bytes: &[u8]) -> PreTlsStep {
    let mut input = buf(bytes);
    pre.on_client(&mut input).expect("a whole line was sent")
}

pub(super) fn text(step: &PreTlsStep) -> String {
    match step {
        PreTlsStep::Reply(b) | PreTlsStep::StartTls(b) | PreTlsStep::Close(b) => {
            String::from_utf8_lossy(b).into_owned()
        }
        PreTlsStep::Plaintext { replay } => String::from_utf8_lossy(replay).into_owned(),
    }
}

pub(super) const EHLO_REPLY: &[u8] = b"250-backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
    250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n";

pub(super) fn negotiating(entry: Entry) -> SmtpNegotiation {
    let mut neg = SmtpNegotiation::new(&settings(), entry);
    let mut greeting = buf(b"220 backend.test ESMTP\r\n");
    assert!(neg.on_greeting(&mut greeting).is_some());
    neg
}

pub(super) fn client(neg: &mut SmtpNegotiation, bytes: &[u8]) -> Step {
    neg.on_client(&mut buf(bytes)).expect("a whole line was sent")
}

pub(super) fn backend(neg: &mut SmtpNegotiation, bytes: &[u8]) -> Step {
    neg.on_backend(&mut buf(bytes)).expect("a whole reply was sent")
}
