//! Bounded line framing shared by the three mail protocols.
//! A line is never split: one that outgrows its bound is reported, not cut in two.

use bytes::BytesMut;

/// The result of looking for one line at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, its terminator (LF or CRLF) included, removed from the buffer.
    Complete(BytesMut),
    /// No terminator yet and still within the bound: read more.
    Incomplete,
    /// No terminator within `max` bytes. Nothing was removed; the caller must end the
    /// dialogue, since resynchronising on a later LF could turn the tail of an overlong
    /// line into a command (the line-splitting injection).
    TooLong,
}

/// Takes one line of at most `max` bytes (terminator included) from the front of `input`.
pub fn take_line(input: &mut BytesMut, max: usize) -> Line {
    let window = input.len().min(max);
    match input[..window].iter().position(|&b| b == b'\n') {
        Some(lf) => Line::Complete(input.split_to(lf + 1)),
        None if input.len() >= max => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// The line without its LF or CRLF terminator.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits a command line into its first word and the rest (after one space or tab),
/// without the terminator. The rest is `None` when there is no blank at all.
///
/// The grammars say SP, but servers accept a tab too (Dovecot, Postfix), so mailtls must
/// read `STLS<TAB>` as the STLS the backend would see, or it would forward a STARTTLS.
pub fn split_word(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    let line = trim_eol(line);
    match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(sp) => (&line[..sp], Some(&line[sp + 1..])),
        None => (line, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_crlf_and_bare_lf_lines() {
        let mut buf = BytesMut::from(&b"EHLO a\r\nNOOP\nrest"[..]);
        assert_eq!(take_line(&mut buf, 512), Line::Complete(BytesMut::from(&b"EHLO a\r\n"[..])));
        assert_eq!(take_line(&mut buf, 512), Line::Complete(BytesMut::from(&b"NOOP\n"[..])));
        assert_eq!(take_line(&mut buf, 512), Line::Incomplete);
        assert_eq!(&buf[..], b"rest");
    }

    #[test]
    fn overlong_line_is_never_split() {
        let mut buf = BytesMut::from(&b"NOOP AAAAAAAA STARTTLS\r\n"[..]);
        assert_eq!(take_line(&mut buf, 10), Line::TooLong);
        assert_eq!(buf.len(), 24, "nothing consumed");
        let mut exact = BytesMut::from(&b"NOOP\r\n"[..]);
        assert!(matches!(take_line(&mut exact, 6), Line::Complete(_)));
    }

    #[test]
    fn splits_first_word() {
        assert_eq!(split_word(b"a LOGIN x\r\n"), (&b"a"[..], Some(&b"LOGIN x"[..])));
        assert_eq!(split_word(b"STARTTLS\r\n"), (&b"STARTTLS"[..], None));
        assert_eq!(split_word(b"STARTTLS \r\n"), (&b"STARTTLS"[..], Some(&b""[..])));
        assert_eq!(split_word(b"STLS\t\r\n"), (&b"STLS"[..], Some(&b""[..])));
        assert_eq!(split_word(b"a\tSTARTTLS\r\n"), (&b"a"[..], Some(&b"STARTTLS"[..])));
    }
}
