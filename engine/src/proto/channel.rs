//! Channel-name rules: 1–255 bytes of `A-Z a-z 0-9 _ - . : @ /`.
//!
//! Every allowed byte is printable ASCII that needs no escaping in JSON, in
//! a URL path segment (except `/`, which routing handles) or in Redis keys.

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a channel name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than [`MAX_CHANNEL_LEN`] bytes.
    #[error("channel name is longer than 255 bytes")]
    TooLong,
    /// The name has a byte outside the allowed set.
    #[error("channel name has a character outside A-Z a-z 0-9 _ - . : @ /")]
    BadChar,
}

const fn allowed_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/');
        c += 1;
    }
    t
}

static ALLOWED: [bool; 256] = allowed_table();

/// Checks a channel name against the rules.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    let b = name.as_bytes();
    if b.is_empty() {
        return Err(ChannelError::Empty);
    }
    if b.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    if b.iter().all(|&c| ALLOWED[c as usize]) {
        Ok(())
    } else {
        Err(ChannelError::BadChar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_set() {
        assert_eq!(validate("news"), Ok(()));
        assert_eq!(validate("a-Z_0.9:x@y/z"), Ok(()));
        assert_eq!(validate(&"x".repeat(255)), Ok(()));
    }

    #[test]
    fn refuses_empty_long_and_odd_bytes() {
        assert_eq!(validate(""), Err(ChannelError::Empty));
        assert_eq!(validate(&"x".repeat(256)), Err(ChannelError::TooLong));
        for bad in ["a b", "a\"b", "a\\b", "é", "a\nb", "a*b", "a$b", "a#b", "a?b"] {
            assert_eq!(validate(bad), Err(ChannelError::BadChar), "{bad:?}");
        }
    }
}
