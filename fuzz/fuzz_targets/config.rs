//! cargo-fuzz target: the config parser (`config::parse`) on arbitrary text. Asserts no
//! panic, and that every refusal names the file and a line that exists in the text, as
//! the contract says a config error must.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mailtls::config::{self, ConfigError};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/fuzz/mailtls.toml");
    match config::parse(path, &text) {
        Ok(_) => {}
        Err(e) => {
            let lines = text.matches('\n').count() + 1;
            let line = match &e {
                ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => *line,
                ConfigError::Read { .. } => panic!("parse read a file: {e}"),
            };
            assert!(line <= lines, "line {line} of a {lines}-line text: {e}");
            assert!(e.to_string().starts_with("/fuzz/mailtls.toml:"), "{e}");
        }
    }
});
