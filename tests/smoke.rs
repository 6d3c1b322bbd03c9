//! End-to-end smoke tests: one happy path per port role through a real proxy.

mod common;

use common::*;

#[tokio::test]
async fn submission_starttls_auth_and_mail_reach_backend() {
    let backend = Backend::start(Script::Smtp).await;
    let proxy = Proxy::start(&[Listener::new("submission", "smtp", "starttls", backend.addr)]).await;
    let mut c = proxy.tcp("submission").await;
    assert_eq!(c.line().await, "220 mx.test ESMTP\r\n");
    c.send("EHLO client.test\r\n").await;
    let ehlo = c.smtp_reply().await;
    assert!(ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    c.send("STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("220 "));
    let mut t = c.upgrade(&proxy.certs).await;
    t.send("EHLO client.test\r\n").await;
    let ehlo = t.smtp_reply().await;
    assert!(ehlo.iter().any(|l| l.contains("AUTH PLAIN")), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    t.send("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
    assert!(t.line().await.starts_with("235 "));
    t.send("MAIL FROM:<a@test>\r\n").await;
    assert!(t.line().await.starts_with("250 "));
    t.send("QUIT\r\n").await;
    assert!(t.line().await.starts_with("221 "));
    assert_eq!(backend.connections(), 1);
    let seen = backend.seen(0);
    assert!(seen.header.starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
    assert_eq!(
        seen.text(),
        "EHLO client.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@test>\r\nQUIT\r\n"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn imaps_greeting_login_and_echo_relay() {
    let backend = Backend::start(Script::Imap).await;
    let proxy = Proxy::start(&[Listener::new("imaps", "imap", "implicit", backend.addr)]).await;
    let mut c = proxy.tls("imaps").await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("* OK [CAPABILITY IMAP4rev1"), "{greeting}");
    assert!(!greeting.contains("STARTTLS"), "{greeting}");
    c.send("a LOGIN echo secret\r\n").await;
    assert!(c.line().await.starts_with("a OK"));
    c.send("hello through the relay\r\n").await;
    assert_eq!(c.line().await, "hello through the relay\r\n");
    proxy.stop().await;
}

#[tokio::test]
async fn pop3_stls_then_login() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = Proxy::start(&[Listener::new("pop3", "pop3", "starttls", backend.addr)]).await;
    let mut c = proxy.tcp("pop3").await;
    assert!(c.line().await.starts_with("+OK"));
    c.send("STLS\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    let mut t = c.upgrade(&proxy.certs).await;
    t.send("USER alice\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
    t.send("PASS secret\r\n").await;
    assert!(t.line().await.starts_with("+OK Logged in"));
    t.send("STAT\r\n").await;
    assert_eq!(t.line().await, "+OK 0 0\r\n");
    proxy.stop().await;
}
