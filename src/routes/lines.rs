//! The line format of a routes map, for maps too large for TOML: one `address backend`
//! pair per line, as Postfix maps are written, read as a stream (never the whole file).
//!
//! ```text
//! # comment lines and blank lines are skipped
//! default             10.0.0.1:143     (required, once: everyone the map does not name)
//! alice@example.org   10.0.0.2:143
//! @example.com        10.0.0.3:143     (a whole domain)
//! ```

use std::io::BufRead;
use std::path::Path;

use super::compact::{Builder, Map};
use super::RoutesError;

/// Reads a whole map from `input`; `path` names the file in messages. `size_hint`: the
/// file's length in bytes, to size the map's arrays once.
pub fn read(path: &Path, mut input: impl BufRead, size_hint: u64) -> Result<Map, RoutesError> {
    // About 40 bytes a line ("user123456@example.org 10.0.12.34:143").
    let mut builder = Builder::with_capacity(usize::try_from(size_hint / 40).unwrap_or(0));
    let mut buf = Vec::with_capacity(256);
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| RoutesError::Read { path: path.to_owned(), source })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let syntax = |message: String| RoutesError::Syntax { path: path.to_owned(), line: line_no, message };
        let line = std::str::from_utf8(&buf).map_err(|_| syntax("not UTF-8 text".to_owned()))?.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_ascii_whitespace();
        let (Some(key), Some(backend), None) = (words.next(), words.next(), words.next()) else {
            return Err(syntax(shape_hint(line)));
        };
        let invalid = |key: &str, message: String| RoutesError::Invalid {
            path: path.to_owned(),
            line: line_no,
            key: key.to_owned(),
            message,
        };
        if key == "default" {
            if builder.has_default() {
                return Err(invalid(key, "given twice".to_owned()));
            }
            builder.set_default(backend).map_err(|e| invalid(key, e.message))?;
        } else {
            builder.add(key, backend).map_err(|e| invalid(key, e.message))?;
        }
    }
    builder.finish().ok_or_else(|| RoutesError::Syntax {
        path: path.to_owned(),
        line: line_no,
        message: "no `default BACKEND` line: everyone the map does not name needs a backend".to_owned(),
    })
}

/// What a line that is not `address backend` should have been.
fn shape_hint(line: &str) -> String {
    let mut message =
        "expected `address backend` (two words), e.g. `alice@example.org 10.0.0.2:143`".to_owned();
    if line.contains('=') || line.starts_with('[') {
        message.push_str("; this looks like TOML: a TOML routes file must be named *.toml");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "# routes\ndefault 10.0.0.1:143\n\nalice@example.org\t10.0.0.2:143\n@example.org  10.0.0.3:143\nBob@Example.COM [::1]:143\n";

    fn map(text: &str) -> Result<Map, RoutesError> {
        read(Path::new("/etc/mailtls/routes.map"), text.as_bytes(), text.len() as u64)
    }

    fn error_of(text: &str) -> String {
        match map(text) {
            Ok(_) => panic!("map should have been refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn lines_hold_addresses_domains_and_the_default() {
        let m = map(MAP).unwrap();
        assert_eq!(m.default(), "10.0.0.1:143");
        assert_eq!(m.address("alice@example.org"), Some("10.0.0.2:143"));
        assert_eq!(m.address("bob@example.com"), Some("[::1]:143"));
        assert_eq!(m.domain("example.org"), Some("10.0.0.3:143"));
        assert_eq!((m.addresses(), m.domain_count()), (2, 1));
        assert_eq!(map(&MAP.replace('\n', "\r\n")).unwrap(), m, "CRLF files read the same");
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = error_of(&format!("{MAP}carol@example.org 10.0.0.9\n"));
        assert_eq!(e, "/etc/mailtls/routes.map:7: carol@example.org: \"10.0.0.9\" is not host:port");
        let e = error_of(&format!("{MAP}ALICE@example.org 10.0.0.9:143\n"));
        assert!(e.starts_with("/etc/mailtls/routes.map:7: ALICE@example.org: listed twice"), "{e}");
        let e = error_of(&format!("{MAP}@EXAMPLE.org 10.0.0.9:143\n"));
        assert!(e.starts_with("/etc/mailtls/routes.map:7: @EXAMPLE.org: listed twice"), "{e}");
        let e = error_of(&format!("{MAP}carol 10.0.0.9:143\n"));
        assert!(e.starts_with("/etc/mailtls/routes.map:7: carol: a key is a full address"), "{e}");
        let e = error_of(&format!("{MAP}default 10.0.0.9:143\n"));
        assert_eq!(e, "/etc/mailtls/routes.map:7: default: given twice");
        let e = error_of(&format!("{MAP}carol@example.org 10.0.0.9:143 extra\n"));
        assert!(e.starts_with("/etc/mailtls/routes.map:7: expected `address backend`"), "{e}");
        let e = error_of("default = \"10.0.0.1:143\"\n");
        assert!(e.ends_with("this looks like TOML: a TOML routes file must be named *.toml"), "{e}");
        let e = error_of("alice@example.org 10.0.0.2:143\n");
        assert!(e.starts_with("/etc/mailtls/routes.map:1: no `default BACKEND` line"), "{e}");
        let e = match read(Path::new("r.map"), &b"default h:1\n\xff\xfe h:2\n"[..], 0) {
            Ok(_) => panic!("refused"),
            Err(e) => e.to_string(),
        };
        assert_eq!(e, "r.map:2: not UTF-8 text");
    }
}
