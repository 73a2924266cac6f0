//! Strict decoder for message content: DATA (dot-stuffed, ends at CRLF.CRLF) and
//! BDAT chunks (length-delimited).
//!
//! Only CRLF ends a line. A bare LF or bare CR anywhere poisons the message: it is
//! never queued, however the client meant to end it. That closes SMTP smuggling
//! (CVE-2023-51764 and kin), where a sender hides a second message behind a
//! `<LF>.<LF>` that some other server takes for the end of data; it also keeps bare
//! line endings out of the mail we relay onwards. The decoder keeps reading to the
//! real terminator so the session stays in sync with the client.
//!
//! NUL octets poison the message too. RFC 5321 text never contains NUL (only
//! BINARYMIME content may, and we do not offer it), and a next hop that drops NUL
//! before it looks for the end of data would read `<CRLF><NUL>.<CRLF>` as one:
//! another smuggling path. NUL is content to this decoder (it never ends a line or
//! the message), so such a fake end is read past like any other text.

/// Why a message was refused after its content was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    BareLf,
    BareCr,
    LineTooLong,
    TooBig,
    Nul,
}

impl DataError {
    pub fn reason(self) -> &'static str {
        match self {
            DataError::BareLf => "bare_lf",
            DataError::BareCr => "bare_cr",
            DataError::LineTooLong => "line_too_long",
            DataError::TooBig => "message_too_big",
            DataError::Nul => "nul_octet",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the first octet of a line.
    LineStart,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line; expecting LF.
    Cr,
    /// Saw `.` at the start of a line.
    Dot,
    /// Saw `.` CR at the start of a line; LF ends the message.
    DotCr,
}

/// Bytes reserved for the content when a decoder starts.
const INITIAL_CAPACITY: usize = 8 << 10;

#[derive(Debug)]
pub struct DataDecoder {
    dot_stuffed: bool,
    state: State,
    line_len: usize,
    max_line: usize,
    max_size: u64,
    size: u64,
    out: Vec<u8>,
    error: Option<DataError>,
    done: bool,
}

impl DataDecoder {
    /// Decoder for the DATA command: dot-unstuffs and looks for CRLF.CRLF.
    pub fn for_data(max_line: usize, max_size: u64) -> Self {
        Self::new(true, max_line, max_size)
    }

    /// Decoder for a BDAT transaction: the content is taken as-is, but the same
    /// line-ending and length rules apply (we do not offer BINARYMIME).
    pub fn for_bdat(max_line: usize, max_size: u64) -> Self {
        Self::new(false, max_line, max_size)
    }

    fn new(dot_stuffed: bool, max_line: usize, max_size: u64) -> Self {
        DataDecoder {
            dot_stuffed,
            state: State::LineStart,
            line_len: 0,
            max_line,
            max_size,
            size: 0,
            // Room for a typical small message up front: growing from empty took
            // 5-7 reallocations (and copies) per 1 KB message.
            out: Vec::with_capacity(
                INITIAL_CAPACITY.min(usize::try_from(max_size).unwrap_or(usize::MAX)),
            ),
            error: None,
            done: false,
        }
    }

    fn fail(&mut self, e: DataError) {
        if self.error.is_none() {
            self.error = Some(e);
            // Nothing of a refused message is kept; free the memory now.
            self.out = Vec::new();
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            self.fail(DataError::TooBig);
        }
        if self.error.is_none() {
            self.out.extend_from_slice(bytes);
        }
    }

    fn count_line(&mut self, n: usize) {
        self.line_len += n;
        if self.line_len > self.max_line {
            self.fail(DataError::LineTooLong);
        }
    }

    /// Feeds received octets. For DATA, returns `Some(consumed)` once the terminating
    /// CRLF.CRLF has been seen (octets after it belong to the next command); `None`
    /// when all of `input` was consumed and more is needed. For BDAT always `None`.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Mid | State::LineStart if self.state == State::Mid || !self.dot_stuffed => {
                    // Fast path: copy a run of ordinary octets in one go.
                    let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                    if run > 0 {
                        let chunk = &input[i..i + run];
                        let clean = self.line_len + run <= self.max_line
                            && self.size + run as u64 <= self.max_size
                            && memchr::memchr(0, chunk).is_none();
                        if (clean || self.error.is_some())
                            && input.get(i + run..i + run + 2) == Some(b"\r\n".as_slice())
                            && self.line_len + run + 2 <= self.max_line
                            && self.size + run as u64 + 2 <= self.max_size
                        {
                            // The whole line with its CRLF, in one copy and one step
                            // (the CR and LF states would accept it the same way).
                            self.push(&input[i..i + run + 2]);
                            self.line_len = 0;
                            i += run + 2;
                            self.state = State::LineStart;
                            continue;
                        }
                        if clean || self.error.is_some() {
                            self.count_line(run);
                            self.push(chunk);
                        } else {
                            // Octet by octet, so that the first error in the content
                            // is the one reported, however TCP cut it into reads.
                            for octet in chunk.chunks(1) {
                                if octet[0] == 0 {
                                    self.fail(DataError::Nul);
                                }
                                self.count_line(1);
                                self.push(octet);
                            }
                        }
                        i += run;
                        self.state = State::Mid;
                        continue;
                    }
                    let b = input[i];
                    i += 1;
                    self.count_line(1);
                    if b == b'\r' {
                        self.state = State::Cr;
                    } else {
                        self.fail(DataError::BareLf);
                        // Treat it as inside a line so `<LF>.<LF>` cannot end anything.
                        self.state = State::Mid;
                    }
                }
                State::LineStart => {
                    if input[i] == b'.' {
                        i += 1;
                        self.count_line(1);
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Mid => unreachable!("handled by the fast path"),
                State::Cr => {
                    if input[i] == b'\n' {
                        i += 1;
                        self.count_line(1);
                        self.push(b"\r\n");
                        self.line_len = 0;
                        self.state = State::LineStart;
                    } else {
                        self.fail(DataError::BareCr);
                        self.state = State::Mid;
                    }
                }
                State::Dot => match input[i] {
                    b'\r' => {
                        i += 1;
                        self.state = State::DotCr;
                    }
                    b'\n' => {
                        i += 1;
                        self.fail(DataError::BareLf);
                        self.state = State::Mid;
                    }
                    // Dot-unstuffing: the leading dot is dropped, the rest is content.
                    _ => self.state = State::Mid,
                },
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.done = true;
                        return Some(i + 1);
                    }
                    self.fail(DataError::BareCr);
                    self.state = State::Mid;
                }
            }
        }
        None
    }

    /// Octets of content counted so far (after unstuffing).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn error(&self) -> Option<DataError> {
        self.error
    }

    /// Ends a BDAT transaction (after the LAST chunk): a message must not end inside
    /// a line with a dangling CR.
    pub fn finish_bdat(&mut self) {
        if self.state == State::Cr {
            self.fail(DataError::BareCr);
        }
    }

    /// The decoded message, or why it is refused.
    pub fn into_result(self) -> Result<Vec<u8>, DataError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.out),
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> (Option<usize>, Result<Vec<u8>, DataError>) {
        let mut d = DataDecoder::for_data(1000, 1 << 20);
        let n = d.feed(input);
        (n, d.into_result())
    }

    #[test]
    fn plain_message_and_unstuffing() {
        let (n, r) = decode(b"Subject: x\r\n\r\n..leading dot\r\n.\r\nMAIL FROM:<>\r\n");
        assert_eq!(n, Some(32));
        assert_eq!(r.unwrap(), b"Subject: x\r\n\r\n.leading dot\r\n");
        let (n, r) = decode(b".\r\n");
        assert_eq!(n, Some(3));
        assert_eq!(r.unwrap(), b"");
    }

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let msg = b"A: b\r\n\r\n.x\r\n..\r\nline\r\n.\r\n";
        let mut d = DataDecoder::for_data(1000, 1 << 20);
        let mut end = None;
        for (i, b) in msg.iter().enumerate() {
            if let Some(n) = d.feed(std::slice::from_ref(b)) {
                end = Some(i + n);
                break;
            }
        }
        assert_eq!(end, Some(msg.len()));
        assert_eq!(d.into_result().unwrap(), b"A: b\r\n\r\nx\r\n.\r\nline\r\n");
    }

    #[test]
    fn smuggling_sequences_poison_and_do_not_terminate() {
        for bad in [
            &b"a\r\n\n.\n"[..],
            b"a\r\n\r.\r",
            b"a\n.\r\n",
            b"a\r\n.\n",
            b"a\r\n.\r",
            b"a\r.\r\n",
        ] {
            let mut d = DataDecoder::for_data(1000, 1 << 20);
            // What follows the fake end is a smuggled transaction, then the real end.
            let mut input = bad.to_vec();
            input.extend_from_slice(
                b"MAIL FROM:<x@y>\r\nRCPT TO:<v@w>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            let n = d.feed(&input);
            assert_eq!(
                n,
                Some(input.len()),
                "{bad:?} must only end at the real CRLF.CRLF"
            );
            assert!(
                matches!(d.into_result(), Err(DataError::BareLf | DataError::BareCr)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn nul_poisons_data_and_never_ends_it() {
        for bad in [
            &b"a\r\n\x00.\r\n"[..],
            b"a\r\n\x00.\x00\r\n",
            b"a\r\n.\x00\r\n",
            b"\x00",
            b"a\x00b\r\n",
        ] {
            let mut input = bad.to_vec();
            input.extend_from_slice(
                b"MAIL FROM:<x@y>\r\nRCPT TO:<v@w>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            // Byte at a time too: the run-copying fast path and single octets must agree.
            for split in [false, true] {
                let mut d = DataDecoder::for_data(1000, 1 << 20);
                let end = if split {
                    input
                        .iter()
                        .enumerate()
                        .find_map(|(i, b)| d.feed(std::slice::from_ref(b)).map(|n| i + n))
                } else {
                    d.feed(&input)
                };
                assert_eq!(end, Some(input.len()), "{bad:?} must not end the data");
                assert_eq!(d.into_result(), Err(DataError::Nul), "{bad:?}");
            }
        }
    }

    #[test]
    fn nul_poisons_bdat() {
        for bad in [&b"a\r\n\x00.\r\nb\r\n"[..], b"a\r\n\x00.\x00\r\n"] {
            let mut d = DataDecoder::for_bdat(1000, 1 << 20);
            assert_eq!(d.feed(bad), None);
            d.finish_bdat();
            assert_eq!(d.into_result(), Err(DataError::Nul), "{bad:?}");
        }
    }

    #[test]
    fn line_and_size_limits() {
        let mut d = DataDecoder::for_data(100, 1 << 20);
        let mut long = vec![b'x'; 99];
        long.extend_from_slice(b"\r\n.\r\n");
        d.feed(&long);
        assert_eq!(d.into_result(), Err(DataError::LineTooLong));
        let mut d = DataDecoder::for_data(100, 1 << 20);
        let mut ok = vec![b'x'; 98];
        ok.extend_from_slice(b"\r\n.\r\n");
        d.feed(&ok);
        assert!(d.into_result().is_ok());
        let mut d = DataDecoder::for_data(1000, 10);
        assert!(d.feed(b"0123456789\r\n").is_none());
        assert_eq!(d.feed(b".\r\n"), Some(3));
        assert_eq!(d.into_result(), Err(DataError::TooBig));
    }

    #[test]
    fn bdat_is_raw_but_strict() {
        let mut d = DataDecoder::for_bdat(1000, 1 << 20);
        assert_eq!(d.feed(b"a: b\r\n\r\n.not stuffed\r\n.\r\n"), None);
        d.finish_bdat();
        assert_eq!(
            d.into_result().unwrap(),
            b"a: b\r\n\r\n.not stuffed\r\n.\r\n"
        );
        let mut d = DataDecoder::for_bdat(1000, 1 << 20);
        d.feed(b"a\nb\r\n");
        assert_eq!(d.into_result(), Err(DataError::BareLf));
        let mut d = DataDecoder::for_bdat(1000, 1 << 20);
        d.feed(b"a\r");
        d.feed(b"\nb\r");
        d.finish_bdat();
        assert_eq!(d.into_result(), Err(DataError::BareCr));
    }

    /// Found by fuzzing (`fuzz/corpus/data/`): the error a message is refused with
    /// (its reply and metric) must not depend on how the content was segmented.
    #[test]
    fn first_error_wins_however_the_content_is_split() {
        let msg = b"abcdefghij\0\r\n.\r\n";
        for (max_line, max_size, want) in [
            (5, 1 << 20, DataError::LineTooLong),
            (100, 5, DataError::TooBig),
            (100, 1 << 20, DataError::Nul),
        ] {
            let mut whole = DataDecoder::for_data(max_line, max_size);
            assert_eq!(whole.feed(msg), Some(msg.len()));
            assert_eq!(whole.into_result(), Err(want));
            for cut in 1..msg.len() {
                let mut d = DataDecoder::for_data(max_line, max_size);
                assert_eq!(d.feed(&msg[..cut]), None);
                assert_eq!(d.feed(&msg[cut..]), Some(msg.len() - cut));
                assert_eq!(d.into_result(), Err(want), "cut at {cut}");
            }
            let mut b = DataDecoder::for_bdat(max_line, max_size);
            b.feed(&msg[..3]);
            b.feed(&msg[3..11]);
            b.finish_bdat();
            assert_eq!(b.into_result(), Err(want));
        }
    }
}
