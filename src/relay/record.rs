//! The user-space record layer of the copy engine: once negotiation is over the session
//! keys leave rustls, and the relay seals and opens TLS records itself, in its own buffers.
//!
//! Why: rustls's buffered connection keeps state and buffers for the session's whole life
//! (a 4 KiB read buffer, plaintext queues, handshake and key-schedule state: 7 KB of an idle
//! session's 22), reads about one record per call and copies every byte it decrypts twice.
//! Here an idle session holds its two AEAD keys and sequence numbers and no buffer; a read
//! takes up to the whole pooled buffer the copy engine lends (several records), opens the
//! records in place and moves their plaintext together, with no other copy and no
//! allocation. Sealing encrypts each byte straight from the copy engine's buffer into one
//! pooled buffer that holds a whole write's records, which leave in one system call (rustls
//! copies each record into a buffer of its own, then encrypts it there); the opening key is rustls's, the sealing keys are built here because rustls's
//! would refuse a sequence number that does not start at 0.
//!
//! The switch follows the ktls engine's rules (see ktls.rs): only at a record boundary with
//! everything rustls held drained and flushed; otherwise the session stays with rustls. After
//! it the relay does what rustls did: a close_notify ends the client's stream, TLS 1.2
//! warning alerts (and TLS 1.3 user_canceled) are ignored, a TLS 1.3 KeyUpdate is followed
//! (answered when the client asks, one answer for requests it has not yet been sent; at
//! most 32 in a row without data, as rustls) with the traffic secrets the connection's key
//! log kept (tls/secrets.rs), and any other record (a renegotiation) ends the session with
//! a fatal alert, as rustls ends it. Nothing is sealed after our close_notify.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::crypto::cipher::{
    make_tls12_aad, make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
    MessageEncrypter, Nonce, OutboundChunks, OutboundPlainMessage,
};
use rustls::crypto::tls13::{HkdfExpander, OkmBlock};
use rustls::{
    ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite, Tls13CipherSuite,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::secrets::TrafficSecrets;

/// Record header: type, version, 16-bit length.
const HEADER: usize = 5;
/// The largest plaintext fragment of a record (RFC 8446 5.1, RFC 5246 6.2.1).
const MAX_FRAGMENT: usize = 16 * 1024;
/// The largest record body accepted, as rustls's deframer has it (TLS 1.2's allowance).
const MAX_BODY: usize = MAX_FRAGMENT + 2048;
/// The most plaintext sealed per write: as much as the copy engine reads at a time (16
/// records), then the socket gets them.
const MAX_WRITE: usize = super::copy::BULK_BUFFER;
/// What a record adds to its plaintext at most: header, TLS 1.3's inner type or TLS 1.2's
/// explicit nonce, and the 16-byte tag.
const MAX_OVERHEAD: usize = HEADER + 8 + 16;
/// Empty data records in a row tolerated before the peer is taken for a flood (rustls: 32).
const MAX_EMPTY_IN_A_ROW: u8 = 32;
/// TLS 1.2 warning alerts in a row tolerated (rustls: 4).
const MAX_WARNINGS_IN_A_ROW: u8 = 4;
/// KeyUpdates tolerated without non-empty application data between (rustls: 32, after
/// BoringSSL): each costs HKDF work, and the peer gains nothing from more.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;
/// Sealed bytes queued beyond which the client is not read until the socket takes some:
/// what one write may leave (16 records) and a little for our KeyUpdate and alerts. With
/// answers coalesced it is not reached; it bounds the queue whatever the client does.
const MAX_QUEUED: usize = MAX_WRITE + MAX_WRITE / MAX_FRAGMENT * MAX_OVERHEAD + 1024;
/// Sealing buffers kept per thread for reuse, and the largest kept.
const SEALED_POOL_KEEP: usize = 16;
const SEALED_POOL_LARGEST: usize = 2 * MAX_QUEUED;

thread_local! {
    static SEALED_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A sealing buffer (its bytes initialised, whatever they hold), from this thread's pool
/// when it has one.
fn take_sealed() -> Vec<u8> {
    SEALED_POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

fn give_sealed(buf: Vec<u8>) {
    if buf.is_empty() || buf.len() > SEALED_POOL_LARGEST {
        return;
    }
    SEALED_POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < SEALED_POOL_KEEP {
            pool.push(buf);
        }
    });
}

/// Every TLS 1.3 record after the handshake says application_data outside (RFC 8446 5.2).
const TLS13_OUTER_TYPE: u8 = 23;

const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;

/// The TLS 1.3 KeyUpdate handshake message: type 24, 3-byte length 1, request_update.
const KEY_UPDATE: u8 = 24;
const KEY_UPDATE_LEN: usize = 5;
const UPDATE_REQUESTED: u8 = 1;

/// Why the record layer could not take a session over; the session then stays in rustls.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    #[error("the negotiated suite's keys cannot be taken out of rustls")]
    Suite,
}

/// Errors after the keys left rustls.
#[derive(Debug, thiserror::Error)]
pub(super) enum Fatal {
    #[error("extracting the TLS secrets: {0}")]
    Extract(rustls::Error),
    #[error("the extracted keys do not match the negotiated suite")]
    Mismatch,
}

/// Whether rustls hands out this suite's keys (every suite rustls's aws-lc-rs provider has:
/// AES-GCM and ChaCha20-Poly1305, TLS 1.2 and 1.3). Asked before the keys leave rustls.
pub(super) fn takes(suite: SupportedCipherSuite) -> Result<(), Refusal> {
    match suite {
        SupportedCipherSuite::Tls13(_) => Ok(()),
        SupportedCipherSuite::Tls12(s) => {
            let shape = s.aead_alg.key_block_shape();
            if shape.fixed_iv_len + shape.explicit_nonce_len == 12 {
                Ok(())
            } else {
                Err(Refusal::Suite)
            }
        }
    }
}

/// How far the client's side of the stream has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Incoming {
    Open,
    /// close_notify received: end of stream.
    Closed,
    /// TCP closed without close_notify: reported once as `UnexpectedEof`, as rustls does.
    Truncated,
    /// Reported.
    Done,
}

/// A client leg whose TLS records mailtls seals and opens itself.
pub(super) struct RecordLeg {
    socket: TcpStream,
    opener: Box<dyn MessageDecrypter>,
    sealer: Box<dyn Sealer>,
    read_seq: u64,
    write_seq: u64,
    /// Records sealed beyond this many end the session: the suite's confidentiality limit
    /// (rustls would have refreshed the keys or closed there).
    write_limit: u64,
    tls13: bool,
    /// TLS 1.3 with the traffic secrets: what a KeyUpdate needs.
    rekey: Option<(&'static Tls13CipherSuite, TrafficSecrets)>,
    /// The bytes of an incomplete record, carried to the next read. Empty (no allocation)
    /// whenever the client is at a record boundary, so an idle session holds nothing here.
    carry: Vec<u8>,
    /// Plaintext opened but not yet delivered; only when a caller's buffer was too small
    /// for a whole record (the copy engine's never is).
    plain: Vec<u8>,
    plain_pos: usize,
    /// Sealed records, back to back, in `sealed[sealed_pos..sealed_end]` (what is before
    /// has been written); a pooled buffer while any wait, none (capacity 0) once all are
    /// written, so an idle session holds nothing. Its whole length is initialised, so
    /// records are sealed into it without clearing it first.
    sealed: Vec<u8>,
    sealed_pos: usize,
    sealed_end: usize,
    /// The last record queued is our answer to a KeyUpdate, not yet written: a later
    /// request is answered by it too (as rustls coalesces them), so requests from a
    /// client that does not read cannot pile answers up.
    answer_queued: bool,
    incoming: Incoming,
    close_notify_sent: bool,
    empty_in_a_row: u8,
    warnings_in_a_row: u8,
    key_updates_in_a_row: u8,
    /// The first bytes of a KeyUpdate that came in pieces (at most 4 of its 5).
    update_held: [u8; KEY_UPDATE_LEN - 1],
    update_len: u8,
}

impl RecordLeg {
    /// Takes the keys out of `conn` (which must have passed [`takes`] and be drained, flushed
    /// and at a record boundary) and serves `socket` with them.
    /// `secrets` (TLS 1.3) let it follow KeyUpdates; without them one ends the session.
    pub(super) fn new(
        socket: TcpStream,
        conn: rustls::ServerConnection,
        secrets: Option<TrafficSecrets>,
    ) -> Result<RecordLeg, Fatal> {
        let suite = conn.negotiated_cipher_suite().ok_or(Fatal::Mismatch)?;
        let keys = conn.dangerous_extract_secrets().map_err(Fatal::Extract)?;
        let (read_seq, rx) = keys.rx;
        let (write_seq, tx) = keys.tx;
        let mut rekey = None;
        let (opener, sealer, tls13) = match suite {
            SupportedCipherSuite::Tls13(s) => {
                let (rk, riv) = key_iv(rx).ok_or(Fatal::Mismatch)?;
                let (wk, wiv) = key_iv(tx).ok_or(Fatal::Mismatch)?;
                rekey = secrets.and_then(|t| {
                    let client = generation_of(s, t.client, &rk, &riv)?;
                    let server = generation_of(s, t.server, &wk, &wiv)?;
                    Some((s, TrafficSecrets { client, server }))
                });
                let sealer = Tls13Sealer::new(s, wk.as_ref(), wiv).ok_or(Fatal::Mismatch)?;
                (s.aead_alg.decrypter(rk, riv), Box::new(sealer) as Box<dyn Sealer>, true)
            }
            SupportedCipherSuite::Tls12(s) => {
                let shape = s.aead_alg.key_block_shape();
                let fixed = shape.fixed_iv_len;
                if fixed + shape.explicit_nonce_len != 12 {
                    return Err(Fatal::Mismatch);
                }
                let (rk, riv) = key_iv(rx).ok_or(Fatal::Mismatch)?;
                let (wk, wiv) = key_iv(tx).ok_or(Fatal::Mismatch)?;
                let opener = s.aead_alg.decrypter(rk, &riv.as_ref()[..fixed]);
                let sealer: Box<dyn Sealer> = match Tls12GcmSealer::new(s.common.suite, wk.as_ref(), &wiv) {
                    Some(sealer) => Box::new(sealer),
                    // ChaCha20-Poly1305: rustls's sealer has no such start-at-0 rule.
                    None => Box::new(RustlsSealer(s.aead_alg.encrypter(
                        wk,
                        &wiv.as_ref()[..fixed],
                        &wiv.as_ref()[fixed..],
                    ))),
                };
                (opener, sealer, false)
            }
        };
        let write_limit = match suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        Ok(RecordLeg {
            socket,
            opener,
            sealer,
            read_seq,
            write_seq,
            write_limit,
            tls13,
            rekey,
            carry: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            sealed: Vec::new(),
            sealed_pos: 0,
            sealed_end: 0,
            answer_queued: false,
            incoming: Incoming::Open,
            close_notify_sent: false,
            empty_in_a_row: 0,
            warnings_in_a_row: 0,
            key_updates_in_a_row: 0,
            update_held: [0; KEY_UPDATE_LEN - 1],
            update_len: 0,
        })
    }

    /// Seals `fragment` (at most one record's worth) as a record of type `typ`, queued.
    fn seal(&mut self, typ: ContentType, fragment: &[u8]) -> io::Result<()> {
        if self.write_seq.saturating_add(1) >= self.write_limit && self.rekey.is_some() {
            // Near the suite's confidentiality limit: new keys, as rustls would do.
            self.seal_record(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0])?;
            self.rotate_sealer()?;
        }
        self.seal_record(typ, fragment)
    }

    /// Our next traffic secret and key, after a KeyUpdate of ours was sealed.
    fn rotate_sealer(&mut self) -> io::Result<()> {
        let Some((suite, secrets)) = self.rekey.as_mut() else { return Ok(()) };
        let stuck = || io::Error::other("deriving mailtls's next TLS 1.3 traffic key failed");
        secrets.server = next_secret(suite, &secrets.server).ok_or_else(stuck)?;
        let (key, iv) = traffic_key(suite, &secrets.server).ok_or_else(stuck)?;
        self.sealer = Box::new(Tls13Sealer { key, iv });
        self.write_seq = 0;
        Ok(())
    }

    fn seal_record(&mut self, typ: ContentType, fragment: &[u8]) -> io::Result<()> {
        if self.write_seq >= self.write_limit {
            return Err(io::Error::other("the TLS confidentiality limit of the session keys was reached"));
        }
        self.make_room(fragment.len() + MAX_OVERHEAD);
        let room = &mut self.sealed[self.sealed_end..];
        let len = self.sealer.seal(typ, fragment, self.write_seq, room).map_err(io::Error::other)?;
        self.sealed_end += len;
        self.write_seq += 1;
        self.answer_queued = false;
        Ok(())
    }

    /// Queues a fatal alert and pushes out what it can without waiting: the session ends
    /// right after, so the client should learn why rather than see a bare TCP close.
    /// Nothing is sealed after our close_notify (RFC 8446 6.1), not even the alert.
    fn fail(&mut self, description: u8, why: String) -> io::Error {
        if !self.close_notify_sent && self.seal(ContentType::Alert, &[ALERT_FATAL, description]).is_ok() {
            let waker = std::task::Waker::noop();
            let _ = self.poll_drain(&mut Context::from_waker(waker));
        }
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// Bytes sealed and not yet written.
    fn queued(&self) -> usize {
        self.sealed_end - self.sealed_pos
    }

    /// Makes the sealing buffer hold at least `need` bytes after what is sealed, taking a
    /// buffer from the pool or growing it (zeroed once) as needed.
    fn make_room(&mut self, need: usize) {
        if self.sealed.is_empty() {
            self.sealed = take_sealed();
        }
        let end = self.sealed_end + need;
        if self.sealed.len() < end {
            self.sealed.resize(end, 0);
        }
    }

    /// Writes sealed records until none is left or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sealed_pos < self.sealed_end {
            let n = ready!(
                Pin::new(&mut self.socket).poll_write(cx, &self.sealed[self.sealed_pos..self.sealed_end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sealed_pos += n;
        }
        // All written: the buffer goes back to the pool, and an idle session keeps nothing.
        give_sealed(std::mem::take(&mut self.sealed));
        self.sealed_pos = 0;
        self.sealed_end = 0;
        self.answer_queued = false;
        Poll::Ready(Ok(()))
    }

    /// Pushes sealed records out; `Pending` only while the socket takes none and more than
    /// [`MAX_QUEUED`] bytes wait: then the client is not read (and cannot make us seal
    /// more) until it reads what it was sent.
    fn poll_backlog(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.queued() == 0 {
            return Poll::Ready(Ok(()));
        }
        match self.poll_drain(cx) {
            Poll::Pending if self.queued() > MAX_QUEUED => Poll::Pending,
            Poll::Pending => Poll::Ready(Ok(())),
            done => done,
        }
    }

    /// Opens every whole record in `data`, moving the plaintext of data records to the front.
    /// Returns the plaintext length and where the first incomplete record starts.
    fn open_records(&mut self, data: &mut [u8]) -> io::Result<(usize, usize)> {
        let base = data.as_ptr() as usize;
        let mut pos = 0;
        let mut out = 0;
        while data.len() - pos >= HEADER {
            let typ = data[pos];
            let version = u16::from_be_bytes([data[pos + 1], data[pos + 2]]);
            let len = usize::from(u16::from_be_bytes([data[pos + 3], data[pos + 4]]));
            if len > MAX_BODY {
                return Err(
                    self.fail(RECORD_OVERFLOW, format!("the client sent a TLS record of {len} bytes"))
                );
            }
            if data.len() - pos - HEADER < len {
                break;
            }
            if self.tls13 && typ != TLS13_OUTER_TYPE {
                let why = format!("the client sent a TLS 1.3 record of outer type {typ}");
                return Err(self.fail(UNEXPECTED_MESSAGE, why));
            }
            let body = &mut data[pos + HEADER..pos + HEADER + len];
            let sealed =
                InboundOpaqueMessage::new(ContentType::from(typ), ProtocolVersion::from(version), body);
            let opened = self.opener.decrypt(sealed, self.read_seq);
            let (kind, from, plain_len) = match opened {
                Ok(plain) => (plain.typ, plain.payload.as_ptr() as usize - base, plain.payload.len()),
                Err(e) => {
                    // The alerts rustls sends for the same records.
                    let description = match e {
                        rustls::Error::PeerSentOversizedRecord => RECORD_OVERFLOW,
                        rustls::Error::PeerMisbehaved(_) => UNEXPECTED_MESSAGE,
                        _ => BAD_RECORD_MAC,
                    };
                    return Err(self.fail(description, format!("opening a client TLS record: {e}")));
                }
            };
            self.read_seq += 1;
            pos += HEADER + len;
            if self.update_len > 0 && kind != ContentType::Handshake {
                // RFC 8446 5.1: a handshake message's pieces come with nothing between.
                let why = "the client sent a TLS record inside a fragmented KeyUpdate".to_owned();
                return Err(self.fail(UNEXPECTED_MESSAGE, why));
            }
            match kind {
                ContentType::ApplicationData => {
                    self.warnings_in_a_row = 0;
                    if plain_len == 0 {
                        self.empty_in_a_row += 1;
                        if self.empty_in_a_row > MAX_EMPTY_IN_A_ROW {
                            let why = "the client sent too many empty TLS records".to_owned();
                            return Err(self.fail(UNEXPECTED_MESSAGE, why));
                        }
                        continue;
                    }
                    if plain_len > MAX_FRAGMENT {
                        let why = format!("the client sent a TLS record of {plain_len} plaintext bytes");
                        return Err(self.fail(RECORD_OVERFLOW, why));
                    }
                    self.empty_in_a_row = 0;
                    self.key_updates_in_a_row = 0;
                    data.copy_within(from..from + plain_len, out);
                    out += plain_len;
                }
                ContentType::Alert => {
                    let alert = &data[from..from + plain_len];
                    let &[level, description] = alert else {
                        return Err(
                            self.fail(DECODE_ERROR, "the client sent a malformed TLS alert".to_owned())
                        );
                    };
                    if level != ALERT_WARNING && level != ALERT_FATAL {
                        let why = format!("the client sent a TLS alert of level {level}");
                        return Err(self.fail(ILLEGAL_PARAMETER, why));
                    }
                    if description == CLOSE_NOTIFY {
                        // What follows a close_notify is ignored, as rustls ignores it.
                        self.incoming = Incoming::Closed;
                        return Ok((out, data.len()));
                    }
                    let why = format!("the client sent TLS alert {description} (level {level})");
                    if level == ALERT_FATAL {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                    }
                    // Warnings: nonfatal in TLS 1.2, outlawed in TLS 1.3 but for user_canceled;
                    // a few in a row at most (rustls's rules).
                    self.warnings_in_a_row += 1;
                    if self.warnings_in_a_row > MAX_WARNINGS_IN_A_ROW {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                    }
                    if self.tls13 && description != USER_CANCELED {
                        return Err(self.fail(DECODE_ERROR, why));
                    }
                }
                ContentType::Handshake if self.rekey.is_some() => {
                    self.warnings_in_a_row = 0;
                    // One KeyUpdate, alone at the end of its record (RFC 8446 5.1: no
                    // handshake message may span a key change), which may come in pieces
                    // over several records (5.1 allows it; rustls joins them).
                    let held = usize::from(self.update_len);
                    if plain_len == 0 || held + plain_len > KEY_UPDATE_LEN {
                        let why = "the client sent a TLS handshake record other than one KeyUpdate \
                                   after the handshake"
                            .to_owned();
                        return Err(self.fail(UNEXPECTED_MESSAGE, why));
                    }
                    let mut message = [0u8; KEY_UPDATE_LEN];
                    message[..held].copy_from_slice(&self.update_held[..held]);
                    message[held..held + plain_len].copy_from_slice(&data[from..from + plain_len]);
                    let got = held + plain_len;
                    if got < KEY_UPDATE_LEN {
                        if message[..got.min(4)] != [KEY_UPDATE, 0, 0, 1][..got.min(4)] {
                            let why = "the client sent a TLS handshake message other than a KeyUpdate \
                                       after the handshake"
                                .to_owned();
                            return Err(self.fail(UNEXPECTED_MESSAGE, why));
                        }
                        self.update_held[..got].copy_from_slice(&message[..got]);
                        self.update_len = got as u8;
                        continue;
                    }
                    self.update_len = 0;
                    let request = match message {
                        [KEY_UPDATE, 0, 0, 1, request] if request <= UPDATE_REQUESTED => request,
                        [KEY_UPDATE, 0, 0, 1, request] => {
                            let why =
                                format!("the client sent a TLS KeyUpdate with request_update {request}");
                            return Err(self.fail(ILLEGAL_PARAMETER, why));
                        }
                        _ => {
                            let why = "the client sent a TLS handshake message other than a KeyUpdate \
                                       after the handshake"
                                .to_owned();
                            return Err(self.fail(UNEXPECTED_MESSAGE, why));
                        }
                    };
                    self.key_update(request == UPDATE_REQUESTED)?;
                }
                other => {
                    // A TLS 1.2 renegotiation, or a KeyUpdate without the secrets to follow it.
                    let why = format!(
                        "the client sent a TLS {other:?} record after the handshake, which the relay \
                         cannot follow"
                    );
                    // What we cannot follow is ours to own (internal_error); anything else is
                    // the client's error, as rustls has it.
                    let ours = self.tls13 && other == ContentType::Handshake;
                    return Err(self.fail(if ours { INTERNAL_ERROR } else { UNEXPECTED_MESSAGE }, why));
                }
            }
        }
        Ok((out, pos))
    }

    /// Follows the client's KeyUpdate: its next records come under the next client key;
    /// when it asks, a KeyUpdate of ours goes out under the current server key, and ours
    /// change too (as rustls does, RFC 8446 4.6.3). One answer still queued answers later
    /// requests too; none after our close_notify. More than [`MAX_KEY_UPDATES_IN_A_ROW`]
    /// without data between end the session, as rustls ends it.
    fn key_update(&mut self, answer: bool) -> io::Result<()> {
        self.key_updates_in_a_row += 1;
        if self.key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
            let why = "the client sent too many TLS KeyUpdates without data between".to_owned();
            return Err(self.fail(UNEXPECTED_MESSAGE, why));
        }
        let Some((suite, secrets)) = self.rekey.as_mut() else {
            return Err(io::Error::other("no traffic secrets to follow a KeyUpdate"));
        };
        let suite = *suite;
        let stuck = || io::Error::other("deriving the client's next TLS 1.3 traffic key failed");
        secrets.client = next_secret(suite, &secrets.client).ok_or_else(stuck)?;
        let (key, iv) = traffic_key(suite, &secrets.client).ok_or_else(stuck)?;
        self.opener = Box::new(Tls13Opener { key, iv });
        self.read_seq = 0;
        if answer && !self.answer_queued && !self.close_notify_sent {
            self.seal_record(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0])?;
            self.rotate_sealer()?;
            self.answer_queued = true;
        }
        Ok(())
    }

    /// One socket read into `dst` after the carried bytes, then every whole record opened.
    /// Returns how many plaintext bytes now lead `dst`.
    fn poll_fill(&mut self, cx: &mut Context<'_>, dst: &mut [u8]) -> Poll<io::Result<usize>> {
        let carried = self.carry.len();
        let mut read = ReadBuf::new(&mut dst[carried..]);
        ready!(Pin::new(&mut self.socket).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        if n == 0 {
            // TCP closed without close_notify (a partial record is lost with it).
            self.incoming = Incoming::Truncated;
            return Poll::Ready(Ok(0));
        }
        let end = carried + n;
        if carried >= HEADER && end < record_end(&self.carry) {
            // Still not the whole carried record (one dribbled in): append, copy nothing back.
            self.carry.extend_from_slice(&dst[carried..end]);
            return Poll::Ready(Ok(0));
        }
        dst[..carried].copy_from_slice(&self.carry);
        let (plain, rest) = self.open_records(&mut dst[..end])?;
        self.carry_over(&dst[rest..end]);
        Poll::Ready(Ok(plain))
    }

    /// Keeps the incomplete record that ends a read, in the carry's own allocation if it
    /// has one, reserved for the whole record once its length is known (so appending the
    /// rest never reallocates); at a record boundary the carry is freed.
    fn carry_over(&mut self, partial: &[u8]) {
        if partial.is_empty() {
            self.carry = Vec::new();
            return;
        }
        self.carry.clear();
        let want = if partial.len() >= HEADER { record_end(partial) } else { HEADER };
        self.carry.reserve_exact(want);
        self.carry.extend_from_slice(partial);
    }
}

/// Where the record whose header starts `bytes` (at least [`HEADER`] long) ends.
fn record_end(bytes: &[u8]) -> usize {
    HEADER + usize::from(u16::from_be_bytes([bytes[3], bytes[4]]))
}

/// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446 7.1).
fn expand_label(expander: &dyn HkdfExpander, label: &[u8], out: &mut [u8]) -> bool {
    let length = (out.len() as u16).to_be_bytes();
    const PREFIX: &[u8] = b"tls13 ";
    let label_len = [(PREFIX.len() + label.len()) as u8];
    expander.expand_slice(&[&length, &label_len, PREFIX, label, &[0]], out).is_ok()
}

/// application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", Hash.length).
fn next_secret(suite: &'static Tls13CipherSuite, secret: &OkmBlock) -> Option<OkmBlock> {
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    let mut next = [0u8; 64];
    let next = &mut next[..expander.hash_len()];
    expand_label(expander.as_ref(), b"traffic upd", next).then(|| OkmBlock::new(next))
}

/// The traffic key and IV of a secret (RFC 8446 7.3), as an aws-lc key.
fn traffic_key(
    suite: &'static Tls13CipherSuite,
    secret: &OkmBlock,
) -> Option<(aws_lc_rs::aead::LessSafeKey, Iv)> {
    use aws_lc_rs::aead;
    let (key, len, iv) = traffic_key_bytes(suite, secret)?;
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(tls13_algorithm(suite)?, &key[..len]).ok()?);
    Some((key, Iv::from(iv)))
}

/// The key (its first `len` bytes) and IV of a secret, as bytes.
fn traffic_key_bytes(
    suite: &'static Tls13CipherSuite,
    secret: &OkmBlock,
) -> Option<([u8; 32], usize, [u8; 12])> {
    let len = tls13_algorithm(suite)?.key_len();
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    let mut key = [0u8; 32];
    let mut iv = [0u8; 12];
    let derived = expand_label(expander.as_ref(), b"key", key.get_mut(..len)?)
        && expand_label(expander.as_ref(), b"iv", &mut iv);
    derived.then_some((key, len, iv))
}

/// Whether `secret` is the one `key` and `iv` come from.
fn secret_gives(suite: &'static Tls13CipherSuite, secret: &OkmBlock, key: &AeadKey, iv: &Iv) -> bool {
    traffic_key_bytes(suite, secret)
        .is_some_and(|(k, len, i)| k[..len] == *key.as_ref() && i[..] == *iv.as_ref())
}

/// The traffic secret of the generation `key` and `iv` belong to, derived forward from the
/// key log's generation 0 (RFC 8446 7.2): KeyUpdates rustls followed during negotiation
/// moved its keys on, not the log's. At most [`MAX_KEY_UPDATES_IN_A_ROW`] generations on
/// (more would have needed data between, which negotiation has little of); `None` if none
/// gives the keys: then the secrets are not the session's keys' and no KeyUpdate is
/// followed (one ends the session, as on the ktls engine), rather than risk sealing
/// under a key already used with sequence numbers reset.
fn generation_of(
    suite: &'static Tls13CipherSuite,
    secret: OkmBlock,
    key: &AeadKey,
    iv: &Iv,
) -> Option<OkmBlock> {
    let mut secret = secret;
    for _ in 0..MAX_KEY_UPDATES_IN_A_ROW {
        if secret_gives(suite, &secret, key, iv) {
            return Some(secret);
        }
        secret = next_secret(suite, &secret)?;
    }
    secret_gives(suite, &secret, key, iv).then_some(secret)
}

fn tls13_algorithm(suite: &'static Tls13CipherSuite) -> Option<&'static aws_lc_rs::aead::Algorithm> {
    use aws_lc_rs::aead;
    match suite.common.suite {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(&aead::AES_128_GCM),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(&aead::AES_256_GCM),
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(&aead::CHACHA20_POLY1305),
        _ => None,
    }
}

/// Seals one record into a batch of them.
trait Sealer: Send + Sync {
    /// Seals `fragment` (at most [`MAX_FRAGMENT`] bytes) as one whole record of type `typ`
    /// under sequence number `seq` at the start of `out` (which has room for its
    /// [`MAX_OVERHEAD`] too); returns the record's length.
    fn seal(
        &mut self,
        typ: ContentType,
        fragment: &[u8],
        seq: u64,
        out: &mut [u8],
    ) -> Result<usize, rustls::Error>;
}

/// TLS 1.3 record opening under a key of the relay's own (after a KeyUpdate); the one
/// the session starts with is rustls's.
struct Tls13Opener {
    key: aws_lc_rs::aead::LessSafeKey,
    iv: Iv,
}

impl MessageDecrypter for Tls13Opener {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, rustls::Error> {
        use aws_lc_rs::aead;
        let payload = &mut msg.payload;
        if payload.len() < self.key.algorithm().tag_len() {
            return Err(rustls::Error::DecryptError);
        }
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain =
            self.key.open_in_place(nonce, aad, payload).map_err(|_| rustls::Error::DecryptError)?.len();
        payload.truncate(plain);
        msg.into_tls13_unpadded_message()
    }
}

/// TLS 1.3 record sealing with aws-lc's general AEAD. rustls's own sealer uses aws-lc's
/// TLS 1.3 key, which takes the first nonce it sees as sequence 0 and refuses the rest once
/// they stop increasing from there: right for a key rustls installs at 0, wrong for one
/// that leaves rustls mid-session (its sequence is past 0 by the session tickets).
struct Tls13Sealer {
    key: aws_lc_rs::aead::LessSafeKey,
    iv: Iv,
}

impl Tls13Sealer {
    fn new(suite: &'static Tls13CipherSuite, key: &[u8], iv: Iv) -> Option<Tls13Sealer> {
        use aws_lc_rs::aead;
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(tls13_algorithm(suite)?, key).ok()?);
        Some(Tls13Sealer { key, iv })
    }
}

impl Sealer for Tls13Sealer {
    fn seal(
        &mut self,
        typ: ContentType,
        fragment: &[u8],
        seq: u64,
        out: &mut [u8],
    ) -> Result<usize, rustls::Error> {
        use aws_lc_rs::aead;
        // TLSInnerPlaintext: the content, then its real type (RFC 8446 5.2); no padding.
        // The type is aws-lc's "extra" plaintext, sealed after the content, before the tag.
        let body = fragment.len() + 1 + self.key.algorithm().tag_len();
        let record = out.get_mut(..HEADER + body).ok_or(rustls::Error::EncryptError)?;
        let (header, rest) = record.split_at_mut(HEADER);
        header.copy_from_slice(&record_header(TLS13_OUTER_TYPE, body));
        let (ciphertext, type_and_tag) = rest.split_at_mut(fragment.len());
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls13_aad(body));
        self.key
            .seal_out_of_place_scatter(nonce, aad, fragment, ciphertext, &[u8::from(typ)], type_and_tag)
            .map_err(|_| rustls::Error::EncryptError)?;
        Ok(HEADER + body)
    }
}

/// TLS 1.2 AES-GCM record sealing, for the same reason as [`Tls13Sealer`]: rustls seals
/// these with aws-lc's TLS key too (its TLS 1.3 nonce rule: the first nonce is sequence 0).
/// The record as rustls writes it: the explicit nonce (the low 8 bytes of IV ^ sequence),
/// the ciphertext, the tag; the additional data is sequence, type, version, length.
struct Tls12GcmSealer {
    key: aws_lc_rs::aead::LessSafeKey,
    iv: Iv,
}

/// GCM's explicit nonce in a TLS 1.2 record.
const EXPLICIT_NONCE: usize = 8;

impl Tls12GcmSealer {
    fn new(suite: rustls::CipherSuite, key: &[u8], iv: &Iv) -> Option<Tls12GcmSealer> {
        use aws_lc_rs::aead;
        use rustls::CipherSuite as S;
        let algorithm = match suite {
            S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
                &aead::AES_128_GCM
            }
            S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
                &aead::AES_256_GCM
            }
            _ => return None,
        };
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(algorithm, key).ok()?);
        Some(Tls12GcmSealer { key, iv: Iv::copy(iv.as_ref()) })
    }
}

impl Sealer for Tls12GcmSealer {
    fn seal(
        &mut self,
        typ: ContentType,
        fragment: &[u8],
        seq: u64,
        out: &mut [u8],
    ) -> Result<usize, rustls::Error> {
        use aws_lc_rs::aead;
        let body = EXPLICIT_NONCE + fragment.len() + self.key.algorithm().tag_len();
        let record = out.get_mut(..HEADER + body).ok_or(rustls::Error::EncryptError)?;
        let (header, rest) = record.split_at_mut(HEADER);
        header.copy_from_slice(&record_header(u8::from(typ), body));
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls12_aad(seq, typ, ProtocolVersion::TLSv1_2, fragment.len()));
        let (explicit, rest) = rest.split_at_mut(EXPLICIT_NONCE);
        explicit.copy_from_slice(&nonce.as_ref()[4..]);
        let (ciphertext, tag) = rest.split_at_mut(fragment.len());
        self.key
            .seal_out_of_place_scatter(nonce, aad, fragment, ciphertext, &[], tag)
            .map_err(|_| rustls::Error::EncryptError)?;
        Ok(HEADER + body)
    }
}

/// rustls's own sealer, for the one suite without a sealer here (TLS 1.2 ChaCha20-Poly1305):
/// it builds each record in a buffer of its own, copied into the batch.
struct RustlsSealer(Box<dyn MessageEncrypter>);

impl Sealer for RustlsSealer {
    fn seal(
        &mut self,
        typ: ContentType,
        fragment: &[u8],
        seq: u64,
        out: &mut [u8],
    ) -> Result<usize, rustls::Error> {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(fragment),
        };
        let record = self.0.encrypt(msg, seq)?.encode();
        out.get_mut(..record.len()).ok_or(rustls::Error::EncryptError)?.copy_from_slice(&record);
        Ok(record.len())
    }
}

/// A record's header: type, the legacy version every record after the handshake carries
/// (TLS 1.2's, also in TLS 1.3: RFC 8446 5.1), body length.
fn record_header(typ: u8, body: usize) -> [u8; HEADER] {
    let [hi, lo] = u16::try_from(body).unwrap_or(u16::MAX).to_be_bytes();
    [typ, 3, 3, hi, lo]
}

/// The key and IV of one direction, whatever the AEAD; `None` for a kind rustls may add.
fn key_iv(secrets: ConnectionTrafficSecrets) -> Option<(AeadKey, Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Some((key, iv)),
        _ => None,
    }
}

impl AsyncRead for RecordLeg {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A KeyUpdate answer may wait here while the backend is silent: push it out now.
        if this.queued() > 0 {
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        loop {
            if this.plain_pos < this.plain.len() {
                let n = (this.plain.len() - this.plain_pos).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.incoming {
                Incoming::Open => {}
                Incoming::Closed | Incoming::Done => return Poll::Ready(Ok(())),
                Incoming::Truncated => {
                    this.incoming = Incoming::Done;
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_backlog(cx))?;
            let need = this.carry.len() + HEADER + MAX_BODY;
            let plain = if buf.remaining() >= need {
                let dst = buf.initialize_unfilled();
                let plain = ready!(this.poll_fill(cx, dst))?;
                buf.advance(plain);
                if this.queued() > 0 {
                    if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                plain
            } else {
                // A small caller buffer: open into a scratch one, deliver what fits.
                let mut scratch = vec![0u8; need];
                let plain = ready!(this.poll_fill(cx, &mut scratch))?;
                scratch.truncate(plain);
                this.plain = scratch;
                this.plain_pos = 0;
                continue;
            };
            if plain > 0 || this.incoming != Incoming::Open {
                if plain > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Only a partial record or non-data records so far: read on.
        }
    }
}

impl AsyncWrite for RecordLeg {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // At most one batch waits in user space: the next waits for the socket.
        ready!(this.poll_drain(cx))?;
        if this.close_notify_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let take = data.len().min(MAX_WRITE);
        // Room for the whole batch at once: growing record by record would copy it again.
        this.make_room(take + take.div_ceil(MAX_FRAGMENT) * MAX_OVERHEAD);
        for fragment in data[..take].chunks(MAX_FRAGMENT) {
            this.seal(ContentType::ApplicationData, fragment)?;
        }
        // The bytes are taken; whatever the socket does not accept now waits for the next
        // write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.close_notify_sent {
            this.seal(ContentType::Alert, &[ALERT_WARNING, CLOSE_NOTIFY])?;
            this.close_notify_sent = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A handshaken pair: the client's rustls stream and the server's socket with its
    /// connection, ready to be taken over.
    async fn handshaken() -> (tokio_rustls::client::TlsStream<TcpStream>, TcpStream, rustls::ServerConnection)
    {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let (client, server) = tokio::join!(
            async { connector.connect(name, TcpStream::connect(addr).await.unwrap()).await.unwrap() },
            async { acceptor.accept(listener.accept().await.unwrap().0).await.unwrap() }
        );
        let (socket, conn) = server.into_inner();
        (client, socket, conn)
    }

    /// A caller whose buffer cannot hold a whole record still gets every byte, in order;
    /// the relay's own buffers never take this path, so it is proven here.
    #[tokio::test]
    async fn a_small_read_buffer_gets_every_byte_in_order() {
        let (mut client, socket, conn) = handshaken().await;
        let mut leg = RecordLeg::new(socket, conn, None).unwrap();
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let writer = async {
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            client
        };
        let reader = async {
            let mut got = Vec::new();
            let mut small = [0u8; 100];
            while got.len() < sent.len() {
                let n = leg.read(&mut small).await.unwrap();
                assert!(n > 0, "early end of stream");
                got.extend_from_slice(&small[..n]);
            }
            got
        };
        let (mut client, got) = tokio::join!(writer, reader);
        assert!(got == sent, "the bytes came through changed");
        // And the other way, then close_notify each way.
        leg.write_all(b"* OK from the relay\r\n").await.unwrap();
        leg.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"* OK from the relay\r\n");
        client.shutdown().await.unwrap();
        let mut rest = [0u8; 16];
        assert_eq!(leg.read(&mut rest).await.unwrap(), 0, "close_notify is the end of the stream");
    }

    /// Secrets that do not give the session's own keys (in any of the generations derived
    /// forward from them) are not used.
    #[tokio::test]
    async fn only_the_sessions_own_secrets_are_kept() {
        let (_client, socket, conn) = handshaken().await;
        let wrong = TrafficSecrets { client: OkmBlock::new(&[1; 32]), server: OkmBlock::new(&[2; 32]) };
        let leg = RecordLeg::new(socket, conn, Some(wrong)).unwrap();
        assert!(leg.tls13);
        assert!(leg.rekey.is_none(), "secrets that give other keys must not be used");
    }

    /// A record that arrives a few bytes at a time is carried in one buffer of its own
    /// size, appended to in place (not copied in and out on every read), then opened.
    #[tokio::test]
    async fn a_dribbled_record_is_appended_to_its_carry_in_place() {
        use std::io::Write;
        let (mut client, socket, conn) = handshaken().await;
        let mut leg = RecordLeg::new(socket, conn, None).unwrap();
        let line = vec![b'x'; 10_000];
        let conn = &mut client.get_mut().1;
        conn.writer().write_all(&line).unwrap();
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).unwrap();
        }
        assert_eq!(wire.len(), HEADER + line.len() + 17, "one record");
        let mut dst = vec![0u8; 64 * 1024];
        let mut carry_at = None;
        for piece in wire.chunks(1000) {
            let sent_before = leg.carry.len();
            client.get_mut().0.write_all(piece).await.unwrap();
            let mut plain = 0;
            while leg.carry.len() < sent_before + piece.len() {
                plain = std::future::poll_fn(|cx| leg.poll_fill(cx, &mut dst)).await.unwrap();
                if plain > 0 {
                    break;
                }
            }
            if plain > 0 {
                assert_eq!(&dst[..plain], &line[..], "the record opened whole");
                assert_eq!(leg.carry.capacity(), 0, "nothing carried after it");
                return;
            }
            assert!(leg.carry.capacity() >= wire.len(), "the carry is reserved for the whole record");
            let at = leg.carry.as_ptr();
            assert_eq!(*carry_at.get_or_insert(at), at, "the carry was not reallocated");
        }
        panic!("the record never opened");
    }

    /// A bulk write is sealed as a batch of whole records, straight from the caller's
    /// buffer, and the client opens every byte in order; then the leg holds no buffer.
    #[tokio::test]
    async fn a_bulk_write_is_sealed_in_batches_the_client_opens_in_order() {
        let (mut client, socket, conn) = handshaken().await;
        let mut leg = RecordLeg::new(socket, conn, None).unwrap();
        let data: Vec<u8> = (0..3 * MAX_WRITE + 12_345).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == expected, "the client read other bytes than were written");
        });
        let mut written = 0;
        while written < data.len() {
            let n = leg.write(&data[written..]).await.unwrap();
            assert!(n <= MAX_WRITE, "one write seals at most one batch");
            written += n;
        }
        leg.flush().await.unwrap();
        reader.await.unwrap();
        assert_eq!(leg.sealed.capacity(), 0, "the sealing buffer went back to the pool");
        assert_eq!(leg.queued(), 0);
    }

    /// An idle leg at a record boundary holds no buffer of its own.
    #[tokio::test]
    async fn an_idle_leg_holds_no_buffer() {
        let (mut client, socket, conn) = handshaken().await;
        let mut leg = RecordLeg::new(socket, conn, None).unwrap();
        client.write_all(b"a1 NOOP\r\n").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = leg.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"a1 NOOP\r\n");
        leg.write_all(b"a1 OK\r\n").await.unwrap();
        leg.flush().await.unwrap();
        assert_eq!(leg.carry.capacity(), 0);
        assert_eq!(leg.plain.capacity(), 0);
        assert_eq!(leg.sealed.capacity(), 0);
    }
}
