//! cargo-fuzz target: the pre-TLS dialogue of every protocol (a STARTTLS listener's
//! plaintext phase) fed arbitrary bytes cut at arbitrary points. Asserts no panic, progress
//! on every step, and that an undecided line stays below the pre-TLS bound.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailtls::protocol::{self, PreTlsStep, Protocol, Settings};

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let protocol = match head % 3 {
        0 => Protocol::Smtp,
        1 => Protocol::Imap,
        _ => Protocol::Pop3,
    };
    let mut settings =
        Settings { require_tls: protocol != Protocol::Smtp || head & 0x10 == 0, ..Settings::default() };
    if head & 0x20 != 0 {
        settings.max_pre_tls_line = 64;
        settings.max_errors = 3;
        settings.max_pre_tls_commands = 8;
    }
    let mut dialogue = protocol::pre_tls(protocol, &settings);
    let _ = dialogue.greeting();
    let mut input = BytesMut::new();
    // Cut points: every byte 0xFF in the stream ends a network read.
    for chunk in rest.split(|&b| b == 0xFF) {
        input.extend_from_slice(chunk);
        let start = input.len();
        let mut steps = 0;
        while let Some(step) = dialogue.on_client(&mut input) {
            steps += 1;
            assert!(steps <= start + 1, "steps without progress");
            match step {
                PreTlsStep::Reply(_) => {}
                _ => return,
            }
        }
        assert!(input.len() < settings.max_pre_tls_line, "undecided line past the bound");
    }
});
