//! SASL PLAIN (RFC 4616) as routed listeners read it: the base64 response a client sends
//! to IMAP AUTHENTICATE or POP3 AUTH, decoded only to learn whose mailbox is meant.
//!
//! The decoded password is dropped at once; what travels on to the backend is the client's
//! own base64 text, byte for byte.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Why a PLAIN response cannot be used; each protocol words its own refusal.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlainError {
    #[error("the response is not base64")]
    Base64,
    #[error("the response is not authzid NUL authcid NUL password")]
    Shape,
    #[error("the response names no user")]
    NoUser,
}

/// The user whose mailbox a PLAIN response asks for: the authorization identity when the
/// client gave one (a master user logging in as someone else wants that someone's
/// server), else the authentication identity. `response` is the base64 text, without
/// line terminator; "=" is RFC 4959's empty initial response, which PLAIN cannot use.
pub fn plain_user(response: &[u8]) -> Result<String, PlainError> {
    let decoded = STANDARD.decode(response).map_err(|_| PlainError::Base64)?;
    let mut parts = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(_password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PlainError::Shape);
    };
    let user = if authzid.is_empty() { authcid } else { authzid };
    if user.is_empty() {
        return Err(PlainError::NoUser);
    }
    Ok(String::from_utf8_lossy(user).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(raw: &[u8]) -> Vec<u8> {
        STANDARD.encode(raw).into_bytes()
    }

    #[test]
    fn authcid_names_the_user_unless_an_authzid_is_given() {
        assert_eq!(plain_user(&b64(b"\0alice@example.org\0secret")), Ok("alice@example.org".to_owned()));
        assert_eq!(plain_user(&b64(b"bob@example.org\0master\0pw")), Ok("bob@example.org".to_owned()));
        // An empty password is the backend's business, not a malformed message.
        assert_eq!(plain_user(&b64(b"\0carol\0")), Ok("carol".to_owned()));
    }

    #[test]
    fn malformed_responses_are_refused() {
        assert_eq!(plain_user(b"="), Err(PlainError::Base64));
        assert_eq!(plain_user(b"not base64!"), Err(PlainError::Base64));
        assert_eq!(plain_user(b"AGFsaWNl"), Err(PlainError::Shape), "\\0alice: one NUL");
        assert_eq!(plain_user(&b64(b"a\0b\0c\0d")), Err(PlainError::Shape));
        assert_eq!(plain_user(&b64(b"\0\0secret")), Err(PlainError::NoUser));
        assert_eq!(plain_user(b""), Err(PlainError::Shape));
    }
}
