//! Which inbound ids are accepted.

/// The default rule's longest id.
pub const MAX_LEN: usize = 128;

/// Whether `b` is in `[A-Za-z0-9._:-]`, without branches (so a loop over an id vectorises).
#[inline]
const fn allowed(b: u8) -> bool {
    let letter = (b | 0x20).wrapping_sub(b'a') < 26; // `| 0x20` folds A-Z onto a-z only
    let digit_or_colon = b.wrapping_sub(b'0') < 11; // 0-9 and ':' (0x30-0x3A)
    let dash_or_dot = b.wrapping_sub(b'-') < 2; // '-' and '.' (0x2D-0x2E)
    letter | digit_or_colon | dash_or_dot | (b == b'_')
}

/// The default rule: 1-128 bytes, each in `[A-Za-z0-9._:-]`.
///
/// Everything else — empty, overlong, spaces, quotes, bytes `0x80`-`0xFF`, `%` (so no
/// percent-encoded CR/LF), control characters — is rejected and replaced by a generated id.
///
/// ```
/// use steadfast_correlation::is_valid_default;
///
/// assert!(is_valid_default(b"0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60"));
/// assert!(is_valid_default(b"svc.orders:42_a"));
/// assert!(!is_valid_default(b""));
/// assert!(!is_valid_default(b"a b"));
/// assert!(!is_valid_default(b"x%0D%0Ay"));
/// assert!(!is_valid_default(&[b'a'; 129]));
/// ```
pub fn is_valid_default(id: &[u8]) -> bool {
    // No early exit: ids are short and a branch-free pass is faster than stopping early.
    !id.is_empty() && id.len() <= MAX_LEN && id.iter().fold(true, |ok, &b| ok & allowed(b))
}

/// Decides whether an inbound id is acceptable.
///
/// Implemented for closures `Fn(&[u8]) -> bool`. A validator must accept only visible ASCII
/// (bytes `0x21`-`0x7E`); anything else is rejected regardless, so an id can always be used as
/// a header value and logged safely.
pub trait ValidateId {
    /// Whether `id` is acceptable.
    fn is_valid(&self, id: &[u8]) -> bool;

    /// Whether `id` is accepted: visible ASCII *and* [`is_valid`](Self::is_valid). Override
    /// only with a rule that already implies visible ASCII.
    fn accepts(&self, id: &[u8]) -> bool {
        is_visible_ascii(id) && self.is_valid(id)
    }
}

impl<F: Fn(&[u8]) -> bool> ValidateId for F {
    fn is_valid(&self, id: &[u8]) -> bool {
        self(id)
    }
}

/// The default rule as a [`ValidateId`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultRule;

impl ValidateId for DefaultRule {
    fn is_valid(&self, id: &[u8]) -> bool {
        is_valid_default(id)
    }

    // The default language is a subset of visible ASCII: one pass is enough.
    fn accepts(&self, id: &[u8]) -> bool {
        is_valid_default(id)
    }
}

/// Visible ASCII only: the floor every validator is held to.
pub(crate) fn is_visible_ascii(id: &[u8]) -> bool {
    !id.is_empty() && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The documented language, written independently of the bit tricks.
    fn reference(id: &[u8]) -> bool {
        (1..=128).contains(&id.len())
            && id.iter().all(|&b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_uppercase()
                    || b.is_ascii_digit()
                    || b".:_-".contains(&b)
            })
    }

    #[test]
    fn every_byte_is_classified_like_the_reference() {
        for b in 0..=255u8 {
            assert_eq!(allowed(b), reference(&[b]), "byte {b:#04x}");
        }
    }

    #[test]
    fn hostile_inputs() {
        for bad in [
            &b""[..],
            b" ",
            b"a b",
            b"\"quoted\"",
            b"'q'",
            b"\xc3\xa9",
            b"\x80",
            b"\xff",
            b"%0D%0A",
            b"a\r\nb",
            b"a\x00b",
            b"a\x7f",
            b"a\tb",
            b"<script>",
            b"a/b",
            b"a=b",
        ] {
            assert!(!is_valid_default(bad), "{bad:?}");
        }
        assert!(is_valid_default(&[b'a'; 128]));
        assert!(!is_valid_default(&[b'a'; 129]));
    }

    proptest! {
        #[test]
        fn accepts_exactly_the_language(id in proptest::collection::vec(any::<u8>(), 0..140)) {
            prop_assert_eq!(is_valid_default(&id), reference(&id));
        }

        #[test]
        fn accepts_every_word_of_the_language(id in "[A-Za-z0-9._:-]{1,128}") {
            prop_assert!(is_valid_default(id.as_bytes()));
        }

        #[test]
        fn one_bad_byte_spoils_it(prefix in "[A-Za-z0-9._:-]{0,60}", bad in any::<u8>(), suffix in "[A-Za-z0-9._:-]{0,60}") {
            let mut id = prefix.into_bytes();
            id.push(bad);
            id.extend_from_slice(suffix.as_bytes());
            prop_assert_eq!(is_valid_default(&id), reference(&[bad]));
        }
    }
}
