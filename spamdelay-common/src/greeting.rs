//! Is the server's greeting complete? Fed the server's bytes in stream order,
//! the scanner reports the end of the first final reply line.
//!
//! A reply line is final unless its fourth character is `-` (RFC 5321 4.2.1):
//! that is how SMTP clients read replies, so a client may legitimately talk
//! after any such line. `220-` teaser lines (postscreen) are not final. Lines
//! end in CRLF and may be split across segments at any byte.

const CONTINUED: u8 = 1;
const PREV_CR: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GreetingScanner {
    /// Characters seen on the current line, saturating at 4.
    pos: u8,
    flags: u8,
}

impl GreetingScanner {
    /// Feeds one byte of the server's stream; true when it completes a final
    /// reply line.
    #[inline(always)]
    pub fn feed(&mut self, byte: u8) -> bool {
        if byte == b'\n' {
            let complete = self.flags == PREV_CR;
            *self = Self::default();
            return complete;
        }
        if self.pos == 3 && byte == b'-' {
            self.flags |= CONTINUED;
        }
        if self.pos < 4 {
            self.pos += 1;
        }
        if byte == b'\r' {
            self.flags |= PREV_CR;
        } else {
            self.flags &= !PREV_CR;
        }
        false
    }

    /// Feeds a run of bytes; returns how many were consumed up to and
    /// including the end of the final line, if it was reached.
    pub fn feed_all(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if self.feed(b) {
                return Some(i + 1);
            }
        }
        None
    }
}

/// `a` is after `b` in TCP sequence space.
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(chunks: &[&[u8]]) -> bool {
        let mut s = GreetingScanner::default();
        chunks.iter().any(|c| s.feed_all(c).is_some())
    }

    #[test]
    fn single_line_greeting_is_complete() {
        assert!(complete(&[b"220 mx.example.com ESMTP\r\n"]));
    }

    #[test]
    fn refusals_are_final_replies() {
        assert!(complete(&[b"421 too busy\r\n"]));
        assert!(complete(&[b"554 go away\r\n"]));
    }

    #[test]
    fn postscreen_teaser_is_not_a_greeting() {
        assert!(!complete(&[b"220-mx.example.com ESMTP Postfix\r\n"]));
        assert!(complete(&[
            b"220-mx.example.com ESMTP Postfix\r\n",
            b"220 mx.example.com ESMTP Postfix\r\n"
        ]));
    }

    #[test]
    fn split_lines_are_joined() {
        assert!(!complete(&[b"22"]));
        assert!(complete(&[b"22", b"0 ready\r\n"]));
        assert!(complete(&[
            b"220-a\r", b"\n220", b"-b\r\n2", b"20 ", b"c\r", b"\n"
        ]));
        assert!(!complete(&[
            b"220-a\r", b"\n220", b"-b\r\n2", b"20-", b"c\r", b"\n"
        ]));
    }

    #[test]
    fn line_needs_crlf() {
        assert!(!complete(&[b"220 ready\n"]));
        assert!(!complete(&[b"220 ready\r"]));
        assert!(!complete(&[b"220 ready\rx\n"]));
    }

    #[test]
    fn bare_code_line_is_final() {
        assert!(complete(&[b"220\r\n"]));
    }

    #[test]
    fn reports_where_the_greeting_ends() {
        let mut s = GreetingScanner::default();
        assert_eq!(s.feed_all(b"220-x\r\n220 y\r\n250 extra"), Some(14));
    }

    #[test]
    fn sequence_comparison_wraps() {
        assert!(seq_after(1, 0));
        assert!(seq_after(5, u32::MAX - 5));
        assert!(!seq_after(u32::MAX - 5, 5));
        assert!(!seq_after(7, 7));
    }
}
