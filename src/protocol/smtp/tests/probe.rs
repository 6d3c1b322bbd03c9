//! The capability probe.

use super::*;

#[test]
fn probe_learns_backend_extensions() {
    let mut probe = Probe::new("mailtls.test");
    let mut input = buf(b"220-backend ESMTP\r\n");
    assert_eq!(probe.on_backend(&mut input), None);
    input.extend_from_slice(b"220 hi\r\n");
    assert_eq!(probe.on_backend(&mut input), Some(ProbeStep::Send(b"EHLO mailtls.test\r\n".to_vec())));
    let mut ehlo = buf(EHLO_REPLY);
    assert_eq!(
        probe.on_backend(&mut ehlo),
        Some(ProbeStep::Done(
            ["PIPELINING", "SIZE 10240000", "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES", "8BITMIME"]
                .map(String::from)
                .to_vec()
        ))
    );
    assert_eq!(probe.on_backend(&mut buf(b"221 bye\r\n")), None);
    assert_eq!(PROBE_QUIT, b"QUIT\r\n");
}

#[test]
fn probe_fails_on_refusal_or_nonsense() {
    let mut probe = Probe::new("m");
    assert!(matches!(probe.on_backend(&mut buf(b"554 no\r\n")), Some(ProbeStep::Failed(_))));
    let mut probe = Probe::new("m");
    probe.on_backend(&mut buf(b"220 ok\r\n"));
    assert!(matches!(probe.on_backend(&mut buf(b"502 no EHLO\r\n")), Some(ProbeStep::Failed(_))));
    let mut probe = Probe::new("m");
    assert!(matches!(probe.on_backend(&mut buf(b"SSH-2.0-OpenSSH\r\n")), Some(ProbeStep::Failed(_))));
    let mut probe = Probe::new("m");
    assert!(matches!(probe.on_backend(&mut buf(&[b'2'; 70_000])), Some(ProbeStep::Failed(_))));
}
