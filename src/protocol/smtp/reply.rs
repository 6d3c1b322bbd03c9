//! Backend replies: framing whole (multi-line) replies under bounds, building mailtls's own
//! replies, and the EHLO filter.

use super::*;

pub(super) fn too_many(hostname: &str, what: &str) -> Vec<u8> {
    format!("421 4.7.0 {hostname} Error: too many {what}\r\n").into_bytes()
}

/// `code` followed by one line per text, `-` on all but the last (RFC 5321 4.2.1).
pub(super) fn multiline(code: &[u8], texts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        out.extend_from_slice(code);
        out.push(if i + 1 == texts.len() { b' ' } else { b'-' });
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One whole backend reply, multi-line ones included.
pub(super) struct Reply {
    pub(super) raw: BytesMut,
    pub(super) code: [u8; 3],
}

pub(super) enum Frame {
    Complete(Reply),
    Incomplete,
    Bad(&'static str),
}

impl Reply {
    pub(super) fn is_positive(&self) -> bool {
        self.code[0] == b'2'
    }

    pub(super) fn is(&self, code: &[u8; 3]) -> bool {
        &self.code == code
    }

    /// The text of each line, after `ddd-` / `ddd `, without its terminator.
    pub(super) fn texts(&self) -> impl Iterator<Item = &[u8]> {
        self.raw.split_inclusive(|&b| b == b'\n').map(|line| line::trim_eol(line).get(4..).unwrap_or(b""))
    }

    pub(super) fn first_line(&self) -> String {
        let first = self.raw.as_ref().split(|&b| b == b'\n').next().unwrap_or(b"");
        printable(line::trim_eol(first))
    }
}

/// The code of a reply line and whether another line follows; `None` when malformed.
pub(super) fn reply_line(line: &[u8]) -> Option<([u8; 3], bool)> {
    match line::trim_eol(line) {
        [a, b, c, rest @ ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
            let more = match rest.first() {
                None | Some(b' ') => false,
                Some(b'-') => true,
                Some(_) => return None,
            };
            Some(([*a, *b, *c], more))
        }
        _ => None,
    }
}

/// Takes one whole reply from the front of `input`, leaving it untouched until the final
/// line has arrived. Lines are bounded by `max_line`, the whole reply by `max_reply`.
pub(super) fn take_reply(input: &mut BytesMut, max_line: usize, max_reply: usize) -> Frame {
    let mut end = 0;
    let mut code = None;
    loop {
        let rest = input.get(end..).unwrap_or(&[]);
        let window = rest.get(..rest.len().min(max_line)).unwrap_or(rest);
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            if rest.len() >= max_line {
                return Frame::Bad("reply line too long");
            }
            if input.len() >= max_reply {
                return Frame::Bad("reply too long");
            }
            return Frame::Incomplete;
        };
        let Some((line_code, more)) = reply_line(window.get(..=lf).unwrap_or(window)) else {
            return Frame::Bad("malformed reply line");
        };
        if *code.get_or_insert(line_code) != line_code {
            return Frame::Bad("reply code changed between lines");
        }
        end += lf + 1;
        if !more {
            let raw = input.split_to(end);
            return Frame::Complete(Reply { raw, code: line_code });
        }
        if end >= max_reply {
            return Frame::Bad("reply too long");
        }
    }
}

/// An EHLO reply without the extensions the client must not see (`hidden`); unchanged
/// bytes when nothing is dropped. The first line is the server's name, never an extension.
pub(super) fn filter_capabilities(reply: &Reply, hidden: fn(&[u8]) -> bool) -> Vec<u8> {
    let mut texts = reply.texts();
    let Some(first) = texts.next() else {
        return reply.raw.to_vec();
    };
    let extensions: Vec<&[u8]> = texts.collect();
    let kept: Vec<&[u8]> = extensions.iter().copied().filter(|extension| !hidden(extension)).collect();
    if kept.len() == extensions.len() {
        return reply.raw.to_vec();
    }
    let mut lines = vec![first];
    lines.extend(kept);
    multiline(&reply.code, &lines)
}

/// Peer text made safe for a log line or an error message.
pub(super) fn printable(text: &[u8]) -> String {
    text.iter()
        .take(200)
        .map(|&b| if b.is_ascii_graphic() || b == b' ' { char::from(b) } else { '?' })
        .collect()
}
