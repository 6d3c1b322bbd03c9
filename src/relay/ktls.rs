//! The kernel-TLS engine: after negotiation the rustls session keys go to the kernel (the
//! TLS ULP), the client socket then reads and writes plaintext, and splice serves both legs.
//!
//! The switch is only safe at a TLS record boundary with nothing left inside rustls: every
//! record it was handed is decrypted, its plaintext drained (and forwarded), and its
//! outgoing records flushed. Anything that makes that uncertain falls back to `copy`
//! *before* the keys leave rustls, so a fallback never loses a byte. After the switch, a
//! client close_notify is the end of its stream; other non-data records (a TLS 1.3
//! KeyUpdate) cannot be followed by the kernel (Linux 6.1 has no TLS 1.3 rekey), so the
//! client gets a fatal internal_error alert and the session ends, reported as failed.
//! tests/ktls-qemu.sh proves all of this on a real kernel with the TLS ULP.
//! TLS 1.3 session tickets are sent by rustls during the handshake, before the switch.
//! With a client filter, the kernel decrypts and user space filters the client's bytes
//! (see splice.rs); the backend's replies are still spliced into the kernel's TLS.

use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use ktls::CryptoInfo;
use ktls_sys::bindings as sys;
use rustls::{CipherSuite, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::splice::Pipes;
use super::Engines;
use crate::tls::prefixed::Prefixed;

/// TLS record content types (RFC 8446 5.1).
const RECORD_ALERT: u8 = 21;
/// The close_notify alert: level warning (1), description 0.
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// A fatal (2) internal_error (80) alert: what the client is told when the session must
/// end because the kernel cannot follow a record (RFC 8446 6.2).
const INTERNAL_ERROR: [u8; 2] = [2, 80];

/// A (version, AEAD) pair the kernel may or may not implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suite {
    pub tls13: bool,
    pub cipher: Cipher,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cipher = match self.cipher {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        };
        write!(f, "TLS{} {cipher}", if self.tls13 { "1.3" } else { "1.2" })
    }
}

pub(super) const ALL_SUITES: [Suite; 6] = [
    Suite { tls13: true, cipher: Cipher::Aes128Gcm },
    Suite { tls13: true, cipher: Cipher::Aes256Gcm },
    Suite { tls13: true, cipher: Cipher::Chacha20Poly1305 },
    Suite { tls13: false, cipher: Cipher::Aes128Gcm },
    Suite { tls13: false, cipher: Cipher::Aes256Gcm },
    Suite { tls13: false, cipher: Cipher::Chacha20Poly1305 },
];

impl Suite {
    /// The kernel's view of a negotiated rustls suite; `None` for suites it has no cipher for.
    fn of(suite: SupportedCipherSuite) -> Option<Suite> {
        let tls13 = suite.version().version == ProtocolVersion::TLSv1_3;
        let cipher = match suite.suite() {
            CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Cipher::Aes128Gcm,
            CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Cipher::Aes256Gcm,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Cipher::Chacha20Poly1305,
            _ => return None,
        };
        Some(Suite { tls13, cipher })
    }

    /// A crypto-info block with zero keys, as the start-up probe hands the kernel.
    fn probe_info(self) -> CryptoInfo {
        let version = if self.tls13 { version(3, 4) } else { version(3, 3) };
        let info = |cipher: u32| sys::tls_crypto_info { version, cipher_type: cipher as u16 };
        match self.cipher {
            Cipher::Aes128Gcm => CryptoInfo::AesGcm128(sys::tls12_crypto_info_aes_gcm_128 {
                info: info(sys::TLS_CIPHER_AES_GCM_128),
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Aes256Gcm => CryptoInfo::AesGcm256(sys::tls12_crypto_info_aes_gcm_256 {
                info: info(sys::TLS_CIPHER_AES_GCM_256),
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Chacha20Poly1305 => {
                CryptoInfo::Chacha20Poly1305(sys::tls12_crypto_info_chacha20_poly1305 {
                    info: info(sys::TLS_CIPHER_CHACHA20_POLY1305),
                    iv: [0; 12],
                    key: [0; 32],
                    salt: Default::default(),
                    rec_seq: [0; 8],
                })
            }
        }
    }
}

fn version(major: u16, minor: u16) -> u16 {
    (major << 8) | minor
}

/// What the start-up probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KtlsSupport {
    /// The TLS ULP is there; these suites can be handed to it.
    Available(Vec<Suite>),
    /// Not usable, and why (for the start-up log).
    Unavailable(String),
}

/// Asks the kernel, on a loopback connection, whether it has the TLS ULP and which
/// ciphers it accepts. Done once at start-up; a session never pays for it.
pub(super) fn probe() -> KtlsSupport {
    match probe_suites() {
        Ok(suites) if suites.is_empty() => {
            KtlsSupport::Unavailable("the TLS ULP accepts none of the ciphers rustls negotiates".to_owned())
        }
        Ok(suites) => KtlsSupport::Available(suites),
        Err(e) => KtlsSupport::Unavailable(e),
    }
}

fn probe_suites() -> Result<Vec<Suite>, String> {
    let mut found = Vec::new();
    for suite in ALL_SUITES {
        // Crypto info can be set once per socket and direction: one connection per suite.
        let (socket, _peer) =
            loopback_pair().map_err(|e| format!("cannot open a loopback probe connection: {e}"))?;
        set_ulp(socket.as_raw_fd()).map_err(|e| {
            format!("setsockopt(TCP_ULP, \"tls\") failed: {e} (kernel without CONFIG_TLS, or the tls module not loaded)")
        })?;
        if set_crypto(socket.as_raw_fd(), libc::TLS_TX, &suite.probe_info()).is_ok() {
            found.push(suite);
        }
    }
    Ok(found)
}

fn loopback_pair() -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((server, client))
}

fn set_ulp(fd: RawFd) -> io::Result<()> {
    const NAME: &[u8] = b"tls";
    // SAFETY: `fd` is an open TCP socket owned by the caller for the whole call; the
    // option value points at NAME's 3 bytes, and exactly that length is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            NAME.as_ptr().cast(),
            NAME.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The upper-layer protocol on a TCP socket: "tls" once kernel TLS is on it, "" for none.
/// Lets tests and diagnostics see that the kernel path was really taken.
pub fn socket_ulp(socket: BorrowedFd<'_>) -> io::Result<String> {
    // TCP_ULP_NAME_MAX in the kernel is 16.
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `socket` is borrowed open for the whole call; the kernel writes at most `len`
    // bytes into `name` (16, its buffer size) and stores the length written in `len`.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_TCP, libc::TCP_ULP, name.as_mut_ptr().cast(), &mut len)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let written = &name[..(len as usize).min(name.len())];
    let end = written.iter().position(|&b| b == 0).unwrap_or(written.len());
    Ok(String::from_utf8_lossy(&written[..end]).into_owned())
}

fn set_crypto(fd: RawFd, direction: libc::c_int, info: &CryptoInfo) -> io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller; `info.as_ptr()` points at the
    // `#[repr(C)]` kernel struct inside `info`, which lives across the call, and
    // `info.size()` is that struct's exact size.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_TLS, direction, info.as_ptr(), info.size() as libc::socklen_t)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why a session did not take the ktls engine.
#[derive(Debug, thiserror::Error)]
pub(super) enum Skip {
    #[error("kernel TLS unavailable (see the start-up log)")]
    Unavailable,
    #[error("the kernel has no cipher for the negotiated suite {0}")]
    Suite(String),
    #[error("STARTTLS prefix bytes still unread by rustls")]
    Prefix,
    #[error("the client closed its TLS stream during the switch")]
    ClientClosed,
    #[error("rustls holds part of a TLS record")]
    MidRecord,
    #[error("flushing rustls before the switch: {0}")]
    Flush(io::Error),
    #[error("draining rustls before the switch: {0}")]
    Drain(io::Error),
    #[error("enabling the TLS ULP: {0}")]
    Ulp(io::Error),
    #[error("no pipes: {0}")]
    Pipes(io::Error),
}

/// Errors after the keys left rustls: the session cannot go on with any engine.
#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error("extracting the TLS secrets: {0}")]
    Extract(rustls::Error),
    #[error("building the kernel crypto info: {0}")]
    Info(String),
    #[error("installing the {0} keys in the kernel: {1}")]
    Install(&'static str, io::Error),
}

/// What became of a TLS client leg offered to the kernel.
pub(super) enum Taken {
    /// The keys are in the kernel: splice serves the socket from here on.
    Kernel(TcpStream, Pipes),
    /// Not taken, rustls still whole: the copy engine serves it.
    Declined(Box<TlsStream<Prefixed<TcpStream>>>),
    /// The set-up failed after the keys left rustls: the session cannot go on.
    Failed,
}

/// Hands a TLS client leg to the kernel where possible. Run in a future of its own, freed
/// before the relay starts, so a relay idling for hours does not keep this one's state.
pub(super) async fn take(
    mut client: Box<TlsStream<Prefixed<TcpStream>>>,
    to_backend: &mut Vec<u8>,
    engines: &Engines,
) -> Taken {
    let pipes = match prepare(&mut client, to_backend, engines).await {
        Ok(pipes) => pipes,
        Err(Skip::Unavailable) => {
            // Expected on kernels without CONFIG_TLS: said once at start-up, not per session.
            return Taken::Declined(client);
        }
        Err(other) => {
            tracing::debug!("ktls engine not used for this session, using copy: {other}");
            return Taken::Declined(client);
        }
    };
    let (prefixed, conn) = super::unbox(client).into_inner();
    let socket = prefixed.into_inner();
    match install(&socket, conn) {
        Ok(()) => Taken::Kernel(socket, pipes),
        Err(e) => {
            tracing::warn!("kernel TLS set-up failed after the keys left rustls; session ends: {e}");
            Taken::Failed
        }
    }
}

/// Everything that can still fail while rustls holds the keys. On success the stream is
/// at a record boundary, flushed, its plaintext appended to `to_backend`, and the ULP on.
async fn prepare(
    client: &mut TlsStream<Prefixed<TcpStream>>,
    to_backend: &mut Vec<u8>,
    engines: &Engines,
) -> Result<Pipes, Skip> {
    let suites = match engines.ktls() {
        super::KtlsSupport::Available(suites) => suites,
        super::KtlsSupport::Unavailable(_) => return Err(Skip::Unavailable),
    };
    let negotiated = client.get_ref().1.negotiated_cipher_suite();
    let suite = negotiated.and_then(Suite::of);
    if !suite.is_some_and(|s| suites.contains(&s)) {
        let name = negotiated.and_then(|s| s.suite().as_str()).unwrap_or("unknown");
        return Err(Skip::Suite(name.to_owned()));
    }
    quiesce(client, to_backend).await?;
    // Pipes before the ULP: either can fail, and both must before the keys leave rustls.
    let pipes = Pipes::new(&engines.faults).map_err(Skip::Pipes)?;
    set_ulp(client.get_ref().0.get_ref().as_raw_fd()).map_err(Skip::Ulp)?;
    Ok(pipes)
}

/// Brings a rustls stream to the state in which its keys can leave it: no STARTTLS prefix
/// left unread, everything it would send flushed, the plaintext it already decrypted moved
/// to `to_backend`, and no part of a record inside it. The ktls engine and the copy
/// engine's own record layer both switch only from here; any refusal leaves rustls whole.
pub(super) async fn quiesce(
    client: &mut TlsStream<Prefixed<TcpStream>>,
    to_backend: &mut Vec<u8>,
) -> Result<(), Skip> {
    if client.get_ref().0.unread_prefix() > 0 {
        return Err(Skip::Prefix);
    }
    client.flush().await.map_err(Skip::Flush)?;
    drain_plaintext(client, to_backend)?;
    if !client.get_ref().0.at_record_boundary() || client.get_ref().1.wants_write() {
        return Err(Skip::MidRecord);
    }
    Ok(())
}

/// Moves plaintext rustls already decrypted into `out`; every complete record rustls was
/// handed has been processed by then (tokio-rustls processes what it reads at once).
fn drain_plaintext(client: &mut TlsStream<Prefixed<TcpStream>>, out: &mut Vec<u8>) -> Result<(), Skip> {
    let conn = client.get_mut().1;
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => return Err(Skip::ClientClosed),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Skip::ClientClosed),
            Err(e) => return Err(Skip::Drain(e)),
        }
    }
}

/// Takes the keys out of rustls and gives them to the kernel, both directions.
fn install(socket: &TcpStream, conn: rustls::ServerConnection) -> Result<(), Fatal> {
    let suite = conn.negotiated_cipher_suite().ok_or(Fatal::Info("no negotiated suite".to_owned()))?;
    let secrets = conn.dangerous_extract_secrets().map_err(Fatal::Extract)?;
    let tx = CryptoInfo::from_rustls(suite, secrets.tx).map_err(|e| Fatal::Info(e.to_string()))?;
    let rx = CryptoInfo::from_rustls(suite, secrets.rx).map_err(|e| Fatal::Info(e.to_string()))?;
    let fd = socket.as_raw_fd();
    set_crypto(fd, libc::TLS_TX, &tx).map_err(|e| Fatal::Install("transmit", e))?;
    set_crypto(fd, libc::TLS_RX, &rx).map_err(|e| Fatal::Install("receive", e))?;
    Ok(())
}

/// Sends a close_notify alert on a kernel-TLS socket, before its write side is shut.
pub(super) async fn send_close_notify(socket: &TcpStream) -> io::Result<()> {
    loop {
        socket.writable().await?;
        match socket
            .try_io(Interest::WRITABLE, || send_record(socket.as_raw_fd(), RECORD_ALERT, &CLOSE_NOTIFY))
        {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Reads the non-data record a kernel-TLS socket refused to splice. Returns normally for
/// close_notify (the client's end of stream); any other record is an error that ends the
/// session, since the kernel cannot act on it.
pub(super) async fn read_control_record(socket: &TcpStream) -> io::Result<()> {
    let (kind, body) = loop {
        socket.readable().await?;
        match socket.try_io(Interest::READABLE, || recv_record(socket.as_raw_fd())) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => break other?,
        }
    };
    if kind == RECORD_ALERT && body.get(1) == Some(&CLOSE_NOTIFY[1]) {
        return Ok(());
    }
    // Tell the client why the connection ends instead of a bare TCP close, which it could
    // take for a truncation attack or a network fault. The kernel's send keys are still
    // valid (only the client's changed). Best effort: the session ends either way.
    let _ =
        socket.try_io(Interest::WRITABLE, || send_record(socket.as_raw_fd(), RECORD_ALERT, &INTERNAL_ERROR));
    Err(io::Error::other(format!(
        "the client sent a TLS record of type {kind} after the switch to kernel TLS (a KeyUpdate?), \
         which the kernel cannot follow"
    )))
}

/// Control-message buffer, aligned as cmsghdr requires.
#[repr(C, align(8))]
struct CmsgSpace([u8; 64]);

fn send_record(fd: RawFd, kind: u8, body: &[u8]) -> io::Result<()> {
    let mut space = CmsgSpace([0; 64]);
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value before it is filled in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: msg_control points at `space` (64 bytes, 8-aligned), at least CMSG_SPACE(1)
    // long, so CMSG_FIRSTHDR returns a pointer into it, and the header and one data byte
    // written through it stay inside `space`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = sys::TLS_SET_RECORD_TYPE as libc::c_int;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = kind;
    }
    // SAFETY: `fd` is an open socket; msg and everything it points to (iov -> body,
    // control -> space) outlive the call; the kernel only reads them.
    let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    match sent {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == body.len() => Ok(()),
        _ => Err(io::Error::other("TLS control record sent only in part")),
    }
}

fn recv_record(fd: RawFd) -> io::Result<(u8, Vec<u8>)> {
    let mut space = CmsgSpace([0; 64]);
    // A control record is small (alerts are 2 bytes, KeyUpdate 5); its body is only inspected.
    let mut body = vec![0u8; 1024];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr().cast(), iov_len: body.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value before it is filled in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.0.as_mut_ptr().cast();
    msg.msg_controllen = space.0.len() as _;
    // SAFETY: `fd` is an open socket; iov points at `body` and control at `space`, both
    // writable for the lengths given and alive across the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    body.truncate(n as usize);
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only
    // within msg_controllen, and CMSG_DATA of a TLS_GET_RECORD_TYPE header holds one byte.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS
                && (*cmsg).cmsg_type == sys::TLS_GET_RECORD_TYPE as libc::c_int
            {
                return Ok((*libc::CMSG_DATA(cmsg), body));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // No record type: a data record after all; the relay cannot put it back into order.
    Err(io::Error::other("kernel TLS returned a record without its type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiated_suites_map_to_kernel_ciphers() {
        let aws = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
        assert_eq!(Suite::of(aws), Some(Suite { tls13: true, cipher: Cipher::Aes128Gcm }));
        let tls12 = rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384;
        assert_eq!(Suite::of(tls12), Some(Suite { tls13: false, cipher: Cipher::Aes256Gcm }));
        assert_eq!(Suite { tls13: true, cipher: Cipher::Aes128Gcm }.to_string(), "TLS1.3 AES-128-GCM");
    }

    /// The probe answers either way, and says why when the answer is no.
    #[test]
    fn probe_answers_with_a_reason() {
        match probe() {
            KtlsSupport::Available(suites) => assert!(!suites.is_empty()),
            KtlsSupport::Unavailable(why) => {
                eprintln!("kernel TLS is not available on this machine: {why}");
                assert!(!why.is_empty());
            }
        }
    }
}
