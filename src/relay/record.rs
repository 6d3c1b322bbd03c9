//! The user-space record layer of the copy engine: once negotiation is over the session
//! keys leave rustls, and the relay seals and opens TLS records itself, in its own buffers.
//!
//! Why: rustls's buffered connection keeps state and buffers for the session's whole life
//! (a 4 KiB read buffer, plaintext queues, handshake and key-schedule state), and feeds its
//! deframer 4 KiB per read with two copies of every byte it decrypts. Here an idle session
//! holds its two AEAD keys and sequence numbers and no buffer; a read takes up to the whole
//! pooled buffer the copy engine lends (several records), opens the records in place and
//! moves their plaintext together, with no other copy and no allocation. Sealing costs what
//! it cost inside rustls (rustls's own sealers, one record per 16 KiB).
//!
//! The switch follows the ktls engine's rules (see ktls.rs): only at a record boundary with
//! everything rustls held drained and flushed; otherwise the session stays with rustls. After
//! it the relay does what rustls did: a close_notify ends the client's stream, TLS 1.2
//! warning alerts (and TLS 1.3 user_canceled) are ignored, a TLS 1.3 KeyUpdate is followed
//! (answered when the client asks) with the traffic secrets tls/secrets.rs kept, and any
//! other record (a renegotiation) ends the session with a fatal alert, as rustls ends it.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::crypto::cipher::{
    make_tls12_aad, make_tls13_aad, AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter,
    Nonce, OutboundChunks, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload,
};
use rustls::crypto::tls13::OkmBlock;
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
/// The most plaintext sealed per write: four full records, then the socket gets them.
const MAX_WRITE: usize = 4 * MAX_FRAGMENT;
/// Empty data records in a row tolerated before the peer is taken for a flood (rustls: 32).
const MAX_EMPTY_IN_A_ROW: u8 = 32;
/// TLS 1.2 warning alerts in a row tolerated (rustls: 4).
const MAX_WARNINGS_IN_A_ROW: u8 = 4;

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
    sealer: Box<dyn MessageEncrypter>,
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
    /// Sealed records not yet written, oldest first; emptied (and freed) once written.
    sealed: VecDeque<Vec<u8>>,
    sealed_pos: usize,
    incoming: Incoming,
    close_notify_sent: bool,
    empty_in_a_row: u8,
    warnings_in_a_row: u8,
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
                rekey = secrets.map(|secrets| (s, secrets));
                let sealer = Tls13Sealer::new(s, wk.as_ref(), wiv).ok_or(Fatal::Mismatch)?;
                (s.aead_alg.decrypter(rk, riv), Box::new(sealer) as Box<dyn MessageEncrypter>, true)
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
                let sealer: Box<dyn MessageEncrypter> =
                    match Tls12GcmSealer::new(s.common.suite, wk.as_ref(), &wiv) {
                        Some(sealer) => Box::new(sealer),
                        // ChaCha20-Poly1305: rustls's sealer has no such start-at-0 rule.
                        None => s.aead_alg.encrypter(wk, &wiv.as_ref()[..fixed], &wiv.as_ref()[fixed..]),
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
            sealed: VecDeque::new(),
            sealed_pos: 0,
            incoming: Incoming::Open,
            close_notify_sent: false,
            empty_in_a_row: 0,
            warnings_in_a_row: 0,
        })
    }

    /// Seals `fragment` (at most one record's worth) as a record of type `typ`, queued.
    fn seal(&mut self, typ: ContentType, fragment: &[u8]) -> io::Result<()> {
        if self.write_seq.saturating_add(1) >= self.write_limit && self.rekey.is_some() {
            // Near the suite's confidentiality limit: new keys, as rustls would do.
            self.seal_record(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0])?;
            self.rotate_sealer();
        }
        self.seal_record(typ, fragment)
    }

    /// Our next traffic secret and key, after a KeyUpdate of ours was sealed.
    fn rotate_sealer(&mut self) {
        if let Some((suite, secrets)) = self.rekey.as_mut() {
            secrets.server = next_secret(suite, &secrets.server);
            self.sealer = sealer_for(suite, &secrets.server);
            self.write_seq = 0;
        }
    }

    fn seal_record(&mut self, typ: ContentType, fragment: &[u8]) -> io::Result<()> {
        if self.write_seq >= self.write_limit {
            return Err(io::Error::other("the TLS confidentiality limit of the session keys was reached"));
        }
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(fragment),
        };
        let sealed = self.sealer.encrypt(msg, self.write_seq).map_err(io::Error::other)?;
        self.write_seq += 1;
        self.sealed.push_back(sealed.encode());
        Ok(())
    }

    /// Queues a fatal alert and pushes out what it can without waiting: the session ends
    /// right after, so the client should learn why rather than see a bare TCP close.
    fn fail(&mut self, description: u8, why: String) -> io::Error {
        if self.seal(ContentType::Alert, &[ALERT_FATAL, description]).is_ok() {
            let waker = std::task::Waker::noop();
            let _ = self.poll_drain(&mut Context::from_waker(waker));
        }
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// Writes sealed records until none is left or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.sealed.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); 16];
            let mut count = 0;
            for (i, record) in self.sealed.iter().take(slices.len()).enumerate() {
                let from = if i == 0 { self.sealed_pos } else { 0 };
                slices[i] = io::IoSlice::new(&record[from..]);
                count += 1;
            }
            let mut n = ready!(Pin::new(&mut self.socket).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while n > 0 {
                let Some(front) = self.sealed.front() else { break };
                let left = front.len() - self.sealed_pos;
                if n >= left {
                    n -= left;
                    self.sealed.pop_front();
                    self.sealed_pos = 0;
                } else {
                    self.sealed_pos += n;
                    n = 0;
                }
            }
        }
        // Free the queue itself too: an idle session keeps nothing.
        self.sealed = VecDeque::new();
        Poll::Ready(Ok(()))
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
                Err(e) => return Err(self.fail(BAD_RECORD_MAC, format!("opening a client TLS record: {e}"))),
            };
            self.read_seq += 1;
            pos += HEADER + len;
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
                    let message = &data[from..from + plain_len];
                    // One KeyUpdate, alone at the end of its record (RFC 8446 5.1: no
                    // handshake message may span a key change).
                    let request = match *message {
                        [KEY_UPDATE, 0, 0, 1, request] if request <= UPDATE_REQUESTED => request,
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
                    return Err(self.fail(if self.tls13 { INTERNAL_ERROR } else { UNEXPECTED_MESSAGE }, why));
                }
            }
        }
        Ok((out, pos))
    }

    /// Follows the client's KeyUpdate: its next records come under the next client key;
    /// when it asks, a KeyUpdate of ours goes out under the current server key, and ours
    /// change too (as rustls does, RFC 8446 4.6.3).
    fn key_update(&mut self, answer: bool) -> io::Result<()> {
        let Some((suite, secrets)) = self.rekey.as_mut() else {
            return Err(io::Error::other("no traffic secrets to follow a KeyUpdate"));
        };
        let suite = *suite;
        secrets.client = next_secret(suite, &secrets.client);
        self.opener = opener_for(suite, &secrets.client);
        self.read_seq = 0;
        if answer {
            self.seal_record(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0])?;
            self.rotate_sealer();
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
        dst[..carried].copy_from_slice(&self.carry);
        let end = carried + n;
        let (plain, rest) = self.open_records(&mut dst[..end])?;
        self.carry = if rest < end { dst[rest..end].to_vec() } else { Vec::new() };
        Poll::Ready(Ok(plain))
    }
}

/// application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", Hash.length).
fn next_secret(suite: &'static Tls13CipherSuite, secret: &OkmBlock) -> OkmBlock {
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    let length = (expander.hash_len() as u16).to_be_bytes();
    const LABEL: &[u8] = b"tls13 traffic upd";
    expander.expand_block(&[&length, &[LABEL.len() as u8], LABEL, &[0]])
}

// The traffic key and IV of a secret (RFC 8446 7.3), derived by rustls itself: its public
// `AeadKey` cannot be built at a key length below 32 bytes from outside. These two sit in
// rustls's `internal` module, so a rustls that moves them fails this build, not a session.
fn opener_for(suite: &'static Tls13CipherSuite, secret: &OkmBlock) -> Box<dyn MessageDecrypter> {
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    let key = rustls::internal::derive_traffic_key(expander.as_ref(), suite.aead_alg);
    suite.aead_alg.decrypter(key, rustls::internal::derive_traffic_iv(expander.as_ref()))
}

fn sealer_for(suite: &'static Tls13CipherSuite, secret: &OkmBlock) -> Box<dyn MessageEncrypter> {
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    let key = rustls::internal::derive_traffic_key(expander.as_ref(), suite.aead_alg);
    let iv = rustls::internal::derive_traffic_iv(expander.as_ref());
    match Tls13Sealer::new(suite, key.as_ref(), iv) {
        Some(sealer) => Box::new(sealer),
        // Not reached: the suite was sealed with before. rustls's own sealer is right at
        // sequence 0, which a new key always starts from.
        None => suite.aead_alg.encrypter(key, rustls::internal::derive_traffic_iv(expander.as_ref())),
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
        let algorithm = match suite.common.suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => &aead::AES_128_GCM,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => &aead::AES_256_GCM,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => &aead::CHACHA20_POLY1305,
            _ => return None,
        };
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(algorithm, key).ok()?);
        Some(Tls13Sealer { key, iv })
    }
}

impl MessageEncrypter for Tls13Sealer {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, rustls::Error> {
        use aws_lc_rs::aead;
        let total = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total);
        payload.extend_from_chunks(&msg.payload);
        // TLSInnerPlaintext: the content, then its real type (RFC 8446 5.2); no padding.
        payload.extend_from_slice(&[u8::from(msg.typ)]);
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls13_aad(total));
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aad, payload.as_mut())
            .map_err(|_| rustls::Error::EncryptError)?;
        payload.extend_from_slice(tag.as_ref());
        Ok(OutboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + self.key.algorithm().tag_len()
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

impl MessageEncrypter for Tls12GcmSealer {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, rustls::Error> {
        use aws_lc_rs::aead;
        let mut payload = PrefixedPayload::with_capacity(self.encrypted_payload_len(msg.payload.len()));
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls12_aad(seq, msg.typ, msg.version, msg.payload.len()));
        payload.extend_from_slice(&nonce.as_ref()[4..]);
        payload.extend_from_chunks(&msg.payload);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aad, &mut payload.as_mut()[EXPLICIT_NONCE..])
            .map_err(|_| rustls::Error::EncryptError)?;
        payload.extend_from_slice(tag.as_ref());
        Ok(OutboundOpaqueMessage::new(msg.typ, msg.version, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + EXPLICIT_NONCE + self.key.algorithm().tag_len()
    }
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
        if !this.sealed.is_empty() {
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
            let need = this.carry.len() + HEADER + MAX_BODY;
            let plain = if buf.remaining() >= need {
                let dst = buf.initialize_unfilled();
                let plain = ready!(this.poll_fill(cx, dst))?;
                buf.advance(plain);
                if !this.sealed.is_empty() {
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
