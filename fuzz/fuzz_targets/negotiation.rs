//! cargo-fuzz target: the negotiation phase of every protocol and way in (implicit TLS,
//! after STARTTLS, opportunistic plaintext SMTP), with the backend's greeting, responses
//! and the client's commands interleaved as the input says. Asserts no panic, progress on
//! every step, and bounded output per step.
#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailtls::protocol::{self, Entry, Next, Protocol, Settings};

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let protocol = match head % 3 {
        0 => Protocol::Smtp,
        1 => Protocol::Imap,
        _ => Protocol::Pop3,
    };
    let entry = match (head / 3) % 3 {
        0 => Entry::Implicit,
        1 => Entry::AfterStartTls,
        _ if protocol == Protocol::Smtp => Entry::Plaintext { replay: b"EHLO x\r\n".to_vec() },
        _ => Entry::AfterStartTls,
    };
    let extensions: &[&str] =
        if head & 0x40 != 0 { &["SIZE 1", "AUTH PLAIN"] } else { &["SIZE 1", "CHUNKING"] };
    let mut settings = Settings {
        require_tls: head & 0x20 == 0,
        xclient: head & 0x80 != 0,
        client: Some("192.0.2.1:1".parse().expect("address")),
        backend_extensions: Arc::from(extensions.iter().map(|e| e.to_string()).collect::<Vec<_>>()),
        ..Settings::default()
    };
    if head & 0x10 != 0 {
        settings.max_line = 96;
        settings.max_literal = 64;
        settings.max_errors = 3;
    }
    let mut n = protocol::negotiation(protocol, &settings, entry);
    let (mut client, mut backend) = (BytesMut::new(), BytesMut::new());
    let mut greeted = false;
    // Segments separated by 0xFF; a segment's first byte says whose it is (even: backend).
    for segment in rest.split(|&b| b == 0xFF) {
        let Some((&side, bytes)) = segment.split_first() else { continue };
        if side % 2 == 0 {
            backend.extend_from_slice(bytes);
        } else {
            client.extend_from_slice(bytes);
        }
        if !greeted {
            match n.on_greeting(&mut backend) {
                None => continue,
                Some(step) if step.next != Next::Negotiate => return,
                Some(_) => greeted = true,
            }
        }
        let available = backend.len() + client.len();
        let mut steps = 0;
        loop {
            let before = backend.len() + client.len();
            let step = match n.on_backend(&mut backend) {
                Some(step) => step,
                None => match n.on_client(&mut client) {
                    Some(step) => step,
                    None => break,
                },
            };
            steps += 1;
            assert!(steps <= available + 2, "steps without progress");
            let consumed = before - (backend.len() + client.len());
            assert!(step.to_client.len() + step.to_backend.len() <= consumed + 4096, "amplification");
            if step.next != Next::Negotiate {
                return;
            }
        }
    }
});
