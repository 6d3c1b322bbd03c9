//! cargo-fuzz target: the routes-file parser (`routes::parse`) on arbitrary text. Asserts
//! no panic, that every refusal names the file and a line that exists, and that a map
//! that parses routes every name to one of its own backends.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mailtls::routes::{self, RoutesError};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/fuzz/routes.toml");
    match routes::parse(path, &text) {
        Ok(map) => {
            // Any login name, the map's own keys among them, gets some backend.
            for user in text.split(['"', '\n', ' ']).chain(["", "@", "a@b", "\u{0130}@x"]) {
                let (backend, _) = map.route(user);
                assert!(!backend.is_empty());
            }
        }
        Err(e) => {
            let lines = text.matches('\n').count() + 1;
            let line = match &e {
                RoutesError::Syntax { line, .. } | RoutesError::Invalid { line, .. } => *line,
                RoutesError::Read { .. } => panic!("parse read a file: {e}"),
            };
            assert!(line <= lines, "line {line} of a {lines}-line text: {e}");
            assert!(e.to_string().starts_with("/fuzz/routes.toml:"), "{e}");
        }
    }
});
