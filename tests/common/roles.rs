//! The seven port roles as tests drive them: open a session on a role's listener and log
//! in (or start the mail transaction) so the scripted backend echoes every further byte;
//! deterministic payloads and their end-to-end comparison.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Backend, Conn, Listener, Proxy, Script, TlsClient};

pub const MIB: usize = 1 << 20;
/// How long one bulk exchange may take, however slow the build.
pub const BULK_PATIENCE: Duration = Duration::from_secs(30);

/// Any byte stream a session may end up on: TLS or (plaintext MX) bare TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type Stream = Box<dyn Io>;

/// The seven port roles (port 25 twice: with STARTTLS and in plaintext).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// 465: implicit TLS, AUTH, then MAIL.
    Submissions,
    /// 587: STARTTLS required, AUTH, then MAIL.
    Submission,
    /// 25 with STARTTLS: no AUTH, MAIL ends negotiation.
    MxStarttls,
    /// 25 in plaintext: EHLO answered locally, MAIL connects the backend.
    MxPlaintext,
    /// 993
    Imaps,
    /// 143
    Imap,
    /// 995
    Pop3s,
    /// 110
    Pop3,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Submissions => "submissions",
            Role::Submission => "submission",
            Role::MxStarttls | Role::MxPlaintext => "mx",
            Role::Imaps => "imaps",
            Role::Imap => "imap",
            Role::Pop3s => "pop3s",
            Role::Pop3 => "pop3",
        }
    }

    pub fn script(self) -> Script {
        match self {
            Role::Submissions | Role::Submission | Role::MxStarttls => Script::Smtp,
            // An MX smtpd offers no AUTH: only then is the plaintext path an opaque relay.
            Role::MxPlaintext => Script::SmtpNoAuth,
            Role::Imaps | Role::Imap => Script::Imap,
            Role::Pop3s | Role::Pop3 => Script::Pop3,
        }
    }

    pub fn listener(self, backend: &Backend) -> Listener {
        let (protocol, tls) = match self {
            Role::Submissions => ("smtp", "implicit"),
            Role::Submission | Role::MxStarttls | Role::MxPlaintext => ("smtp", "starttls"),
            Role::Imaps => ("imap", "implicit"),
            Role::Imap => ("imap", "starttls"),
            Role::Pop3s => ("pop3", "implicit"),
            Role::Pop3 => ("pop3", "starttls"),
        };
        let l = Listener::new(self.name(), protocol, tls, backend.addr);
        match self {
            Role::MxStarttls | Role::MxPlaintext => l.opportunistic(),
            _ => l,
        }
    }
}

/// Opens a session on `role`'s listener and logs in (or starts the transaction) so the
/// backend echoes every further byte; returns the bare stream, nothing left unread.
pub async fn open_echo(proxy: &Proxy, role: Role) -> Stream {
    let name = role.name();
    match role {
        Role::Submissions => {
            let mut c = proxy.tls(name).await;
            assert!(c.smtp_reply().await[0].starts_with("220 "));
            smtp_auth_and_echo_mail(c).await
        }
        Role::Submission => {
            let c = smtp_starttls(proxy, name).await;
            smtp_auth_and_echo_mail(c).await
        }
        Role::MxStarttls => {
            let mut c = smtp_starttls(proxy, name).await;
            c.send("EHLO client.test\r\n").await;
            assert!(c.smtp_reply().await.last().unwrap().starts_with("250 "));
            c.send("MAIL FROM:<echo@test>\r\n").await;
            assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
            Box::new(c.into_inner())
        }
        Role::MxPlaintext => {
            // Until the start-up probe has learned the backend's extensions the proxy
            // cannot know that relaying opaquely is safe. A session takes what is known when
            // it starts, so reconnect until EHLO shows the probed SIZE.
            let mut probed = None;
            for _ in 0..100 {
                let mut c = proxy.tcp(name).await;
                assert!(c.smtp_reply().await[0].starts_with("220 "));
                c.send("EHLO client.test\r\n").await;
                let reply = c.smtp_reply().await;
                assert!(reply.last().unwrap().starts_with("250 "));
                if reply.iter().any(|l| l.contains("SIZE")) {
                    probed = Some(c);
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let mut c = probed.expect("the EHLO probe never ran");
            c.send("MAIL FROM:<echo@test>\r\n").await;
            assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
            Box::new(c.into_inner())
        }
        Role::Imaps => {
            let mut c = proxy.tls(name).await;
            assert!(c.line().await.starts_with("* OK"));
            imap_echo_login(c).await
        }
        Role::Imap => {
            let mut c = proxy.tcp(name).await;
            assert!(c.line().await.starts_with("* OK"));
            c.send("a STARTTLS\r\n").await;
            assert!(c.line().await.starts_with("a OK"));
            let c = c.upgrade(&proxy.certs).await;
            imap_echo_login(c).await
        }
        Role::Pop3s => {
            let mut c = proxy.tls(name).await;
            assert!(c.line().await.starts_with("+OK"));
            pop3_echo_login(c).await
        }
        Role::Pop3 => {
            let mut c = proxy.tcp(name).await;
            assert!(c.line().await.starts_with("+OK"));
            c.send("STLS\r\n").await;
            assert!(c.line().await.starts_with("+OK"));
            let c = c.upgrade(&proxy.certs).await;
            pop3_echo_login(c).await
        }
    }
}

/// Pre-TLS greeting, EHLO, STARTTLS, handshake: a TLS session ready for its first command.
pub async fn smtp_starttls(proxy: &Proxy, name: &str) -> Conn<TlsClient> {
    let mut c = proxy.tcp(name).await;
    assert!(c.smtp_reply().await[0].starts_with("220 "));
    c.send("EHLO client.test\r\n").await;
    assert!(c.smtp_reply().await.iter().any(|l| l.contains("STARTTLS")));
    c.send("STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("220 "));
    c.upgrade(&proxy.certs).await
}

pub async fn smtp_auth_and_echo_mail(mut c: Conn<TlsClient>) -> Stream {
    c.send("EHLO client.test\r\n").await;
    assert!(c.smtp_reply().await.last().unwrap().starts_with("250 "));
    // PLAIN \0echo\0x
    c.send("AUTH PLAIN AGVjaG8AeA==\r\n").await;
    assert!(c.line().await.starts_with("235 "));
    c.send("MAIL FROM:<echo@test>\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    Box::new(c.into_inner())
}

pub async fn imap_echo_login(mut c: Conn<TlsClient>) -> Stream {
    c.send("a LOGIN echo x\r\n").await;
    let ok = c.line().await;
    assert!(ok.starts_with("a OK"), "{ok}");
    Box::new(c.into_inner())
}

pub async fn pop3_echo_login(mut c: Conn<TlsClient>) -> Stream {
    c.send("USER echo\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    c.send("PASS x\r\n").await;
    assert!(c.line().await.starts_with("+OK Logged in"));
    Box::new(c.into_inner())
}

/// What an echo session of `role` after login gives back for `sent`: the bytes themselves
/// on IMAP/POP3 (opaque relay); on SMTP what the smuggling guard lets through (bare CR/LF
/// normalized; the scripted backend announces no CHUNKING), and the refusal reply if it
/// refused (then the session ends).
pub fn echoed(role: Role, sent: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    use mailtls::protocol::smtp_guard::SmtpGuard;
    use mailtls::protocol::BareNewline;
    use mailtls::relay::{ClientFilter, Verdict};
    if role.name().starts_with("imap") || role.name().starts_with("pop3") {
        return (sent.to_vec(), None);
    }
    let mut guard = SmtpGuard::new(BareNewline::Normalize, false);
    let mut out = Vec::new();
    match guard.filter(sent, &mut out) {
        Verdict::Clean => (sent.to_vec(), None),
        Verdict::Changed => (out, None),
        Verdict::Refuse(reply) => (out, Some(reply)),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), different per seed, without CR or LF:
/// SMTP sessions pass the smuggling guard, which rewrites bare line endings by design (see
/// [`echoed`]); to the relay engines every other octet is as good as those two.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    for b in &mut out {
        if *b == b'\r' || *b == b'\n' {
            *b |= 0x80;
        }
    }
    out
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Asserts `got` is `want` byte for byte, naming the first difference instead of dumping.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: got {} bytes (fnv {:016x}), want {} bytes (fnv {:016x}); first difference at offset {first}",
        got.len(),
        fnv1a(got),
        want.len(),
        fnv1a(want)
    );
}

/// Writes `data` in odd-sized chunks while reading the echo concurrently; returns the
/// echoed bytes (exactly `data.len()` of them) and the stream's halves, still open.
pub async fn echo_round_trip(stream: Stream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let (mut rx, mut tx) = tokio::io::split(stream);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(7919) {
            tx.write_all(chunk).await?;
        }
        tx.flush().await?;
        Ok::<_, std::io::Error>(tx)
    });
    let mut got = vec![0u8; data.len()];
    let read = tokio::time::timeout(BULK_PATIENCE, rx.read_exact(&mut got)).await;
    let tx = writer.await.expect("writer task").expect("writing to the proxy");
    match read {
        Err(_) => panic!("echo of {} bytes did not come back within {BULK_PATIENCE:?}", data.len()),
        Ok(Err(e)) => panic!("reading the echo: {e}"),
        Ok(Ok(_)) => {}
    }
    drop(rx.unsplit(tx));
    got
}
