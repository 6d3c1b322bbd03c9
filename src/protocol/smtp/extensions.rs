//! EHLO extensions: which ones a client may be shown in which mode, and the strict BDAT
//! size parser the backend must agree with.

use super::*;

/// The keyword of an EHLO extension line ("SIZE 1000" -> "SIZE").
pub(super) fn keyword(extension: &[u8]) -> &[u8] {
    let extension = extension.trim_ascii_start();
    let end = extension.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(extension.len());
    extension.get(..end).unwrap_or(extension)
}

pub(super) fn is_keyword(extension: &[u8], names: &[&[u8]]) -> bool {
    let word = keyword(extension);
    names.iter().any(|name| name.eq_ignore_ascii_case(word))
}

/// After TLS: the TLS is mailtls's, and the XCLIENT/XFORWARD trust is mailtls's alone.
pub(super) fn hidden_after_tls(extension: &[u8]) -> bool {
    is_keyword(extension, &[b"STARTTLS"]) || is_proxy_command(Protocol::Smtp, keyword(extension))
}

/// `AUTH mechanisms` or the old `AUTH=mechanisms` form some clients still look for.
pub(super) fn is_auth(extension: &[u8]) -> bool {
    let word = keyword(extension);
    word.eq_ignore_ascii_case(b"AUTH")
        || word.get(..5).is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"AUTH="))
}

/// In plaintext: as after TLS, and no AUTH in the clear.
pub(super) fn hidden_in_plaintext(extension: &[u8]) -> bool {
    is_auth(extension) || hidden_after_tls(extension)
}

/// Before TLS on an opportunistic listener: what the backend has, minus what is hidden in
/// plaintext, minus lines no client should be shown.
pub(super) fn offered_before_tls(extension: &[u8]) -> bool {
    !extension.trim_ascii().is_empty() && !has_control_bytes(extension) && !hidden_in_plaintext(extension)
}

/// An opaque plaintext relay is safe only with a backend known (from the probe) to offer
/// neither AUTH nor the XCLIENT/XFORWARD trust: it then refuses them itself, whatever the
/// client sends through the relay. Unknown extensions are not known to be safe.
pub(super) fn opaque_plaintext_is_safe(extensions: &[String]) -> bool {
    !extensions.is_empty()
        && !extensions.iter().any(|extension| {
            let extension = extension.as_bytes();
            is_auth(extension) || is_proxy_command(Protocol::Smtp, keyword(extension))
        })
}

/// Whether a (positive) EHLO reply announces CHUNKING (RFC 3030).
pub(super) fn announces_chunking(reply: &Reply) -> bool {
    reply.is_positive() && reply.texts().skip(1).any(|extension| is_keyword(extension, &[b"CHUNKING"]))
}

/// The size of a `BDAT <size> [LAST]` command, parsed strictly (digits, single spaces):
/// the backend must count exactly the bytes mailtls counts, or the rest of a chunk would
/// become commands there. `None` for anything else, overflow included.
pub(in crate::protocol) fn bdat_size(argument: Option<&[u8]>) -> Option<u64> {
    let argument = argument?;
    let digits = match argument.iter().position(|&b| b == b' ') {
        Some(sp) => {
            let (digits, last) = argument.split_at(sp);
            if !last.get(1..).is_some_and(|word| word.eq_ignore_ascii_case(b"LAST")) {
                return None;
            }
            digits
        }
        None => argument,
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = if b.is_ascii_digit() { u64::from(b - b'0') } else { return None };
        size.checked_mul(10)?.checked_add(digit)
    })
}
