//! One of each kind of session the metrics count, driven against a running mailtls: the
//! observability and contrib tests both need a scrape that has seen them all.

use super::process::local;
use super::*;

/// The listeners' ports: an implicit-TLS IMAP listener with a working backend, an SMTP
/// STARTTLS listener, and an implicit-TLS POP3 listener whose backend is down.
pub struct Roles {
    pub imaps: u16,
    pub submission: u16,
    pub pop3s_down: u16,
}

/// A relayed IMAP session with bytes both ways, a failed handshake, a refused plaintext
/// AUTH, a STARTTLS with plaintext injected behind it, and a backend that is down.
pub async fn one_of_each(roles: &Roles, certs: &Certs) {
    let tcp = TcpStream::connect(local(roles.imaps)).await.unwrap();
    let mut imap = Conn::new(tls_handshake(tcp, certs).await.unwrap());
    assert!(imap.line().await.starts_with("* OK"));
    imap.send("a LOGIN echo x\r\n").await;
    assert!(imap.line().await.starts_with("a OK"));
    imap.send("ping\r\n").await;
    assert_eq!(imap.line().await, "ping\r\n");
    drop(imap);
    let mut junk = Conn::new(TcpStream::connect(local(roles.imaps)).await.unwrap());
    junk.send("this is not TLS\r\n").await;
    assert!(junk.closed_within(PATIENCE).await);
    let mut smtp = Conn::new(TcpStream::connect(local(roles.submission)).await.unwrap());
    assert!(smtp.line().await.starts_with("220 "));
    smtp.send("AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n").await;
    assert!(smtp.line().await.starts_with("530 "));
    smtp.send("STARTTLS\r\nMAIL FROM:<x@y>\r\n").await;
    assert!(smtp.line().await.starts_with("220 "));
    assert!(smtp.closed_within(PATIENCE).await);
    let tcp = TcpStream::connect(local(roles.pop3s_down)).await.unwrap();
    let mut pop = Conn::new(tls_handshake(tcp, certs).await.unwrap());
    assert!(pop.line().await.starts_with("-ERR [SYS/TEMP]"));
}
