//! The one line framer of both peers: the client splits the server's
//! output with it, and the server its newline-delimited transports (stdio
//! and Unix sockets).
//!
//! `process/output` lines are a few hundred KiB each. A buffered reader
//! that copies every line into a `Vec` of its own costs a full pass over
//! the stream; here lines are handed out as slices of the read buffer, and
//! only the unfinished tail of a read is ever moved. With a limit, a line
//! longer than it is discarded as it arrives (never held whole) and
//! reported with its size.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Room kept free for each read.
const MIN_READ: usize = 256 * 1024;

pub(crate) struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Where the next line starts.
    start: usize,
    /// How far past `start` is known to hold no newline.
    scanned: usize,
    /// The longest line kept (newline not counted), if limited.
    max: Option<usize>,
    /// Bytes of an over-long line discarded so far.
    discarded: Option<usize>,
    /// Binary frames ([`crate::frame`]) may come between lines.
    frames: bool,
}

/// A piece found in the buffer.
enum Span {
    Line(std::ops::Range<usize>),
    TooLong(usize),
    Frame(std::ops::Range<usize>),
}

/// One unit of input.
#[derive(Debug, PartialEq)]
pub(crate) enum Piece<'a> {
    /// A line with its newline (the last one of the input may lack it).
    Line(&'a [u8]),
    /// A line over the limit, discarded: its size without the newline.
    TooLong(usize),
    /// A whole binary frame (only from a reader made [`LineReader::with_frames`]).
    Frame(&'a [u8]),
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        LineReader {
            inner,
            buf: Vec::with_capacity(4 * MIN_READ),
            start: 0,
            scanned: 0,
            max: None,
            discarded: None,
            frames: false,
        }
    }

    /// A reader of a server's output that may hold binary frames (the
    /// client's side only: a server never takes a frame from a client).
    pub(crate) fn with_frames(inner: R) -> Self {
        LineReader {
            frames: true,
            ..LineReader::new(inner)
        }
    }

    /// Lines longer than `max` bytes are discarded and reported.
    pub(crate) fn with_limit(inner: R, max: usize) -> Self {
        LineReader {
            max: Some(max),
            ..LineReader::new(inner)
        }
    }

    /// The next line with its newline; at the end of the input, an
    /// unfinished last line without one, then `None`. Without a limit,
    /// never [`Piece::TooLong`].
    pub(crate) async fn next_line(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            match self.next_span().await? {
                Some(Span::Line(range)) => return Ok(Some(&self.buf[range])),
                Some(Span::TooLong(_) | Span::Frame(_)) => continue,
                None => return Ok(None),
            }
        }
    }

    /// The next piece of input; `None` at its end.
    pub(crate) async fn next_piece(&mut self) -> io::Result<Option<Piece<'_>>> {
        Ok(match self.next_span().await? {
            Some(Span::Line(range)) => Some(Piece::Line(&self.buf[range])),
            Some(Span::TooLong(size)) => Some(Piece::TooLong(size)),
            Some(Span::Frame(range)) => Some(Piece::Frame(&self.buf[range])),
            None => None,
        })
    }

    async fn next_span(&mut self) -> io::Result<Option<Span>> {
        loop {
            if self.frames && self.buf.get(self.start) == Some(&crate::frame::MARK) {
                // A frame says its length: take it whole, or read on.
                let have = self.buf.len() - self.start;
                if have >= crate::frame::HEADER {
                    let total = crate::frame::total_len(&self.buf[self.start..]);
                    if have >= total {
                        let frame = self.start..self.start + total;
                        self.start = frame.end;
                        self.scanned = frame.end;
                        return Ok(Some(Span::Frame(frame)));
                    }
                    self.buf.reserve(total - have);
                }
                self.scanned = self.buf.len();
            } else if let Some(i) = find_newline(&self.buf[self.scanned..]) {
                let line = self.start..self.scanned + i + 1;
                self.start = line.end;
                self.scanned = line.end;
                if let Some(size) = self.discarded.take() {
                    return Ok(Some(Span::TooLong(size + line.len() - 1)));
                }
                if self.max.is_some_and(|max| line.len() - 1 > max) {
                    return Ok(Some(Span::TooLong(line.len() - 1)));
                }
                return Ok(Some(Span::Line(line)));
            } else {
                self.scanned = self.buf.len();
            }
            // Over the limit with no newline yet: drop what is held and
            // count the rest as it comes.
            if let Some(max) = self.max {
                let held = self.buf.len() - self.start;
                if held > max || self.discarded.is_some() {
                    *self.discarded.get_or_insert(0) += held;
                    self.buf.truncate(self.start);
                    self.scanned = self.start;
                }
            }
            // Move the unfinished line to the front before reading more,
            // once it is all that is left or the front half is used up.
            if self.start > 0
                && (self.start == self.buf.len() || self.start >= self.buf.capacity() / 2)
            {
                self.buf.copy_within(self.start.., 0);
                self.buf.truncate(self.buf.len() - self.start);
                self.scanned -= self.start;
                self.start = 0;
            }
            self.buf.reserve(MIN_READ);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if let Some(size) = self.discarded.take() {
                    return Ok(Some(Span::TooLong(size)));
                }
                if self.start == self.buf.len() {
                    return Ok(None);
                }
                let line = self.start..self.buf.len();
                self.start = line.end;
                self.scanned = line.end;
                if self.max.is_some_and(|max| line.len() > max) {
                    return Ok(Some(Span::TooLong(line.len())));
                }
                return Ok(Some(Span::Line(line)));
            }
        }
    }
}

/// The index of the first `\n` (libc's vectorised `memchr`).
fn find_newline(bytes: &[u8]) -> Option<usize> {
    // SAFETY: searches within the slice's bounds.
    let found = unsafe { libc::memchr(bytes.as_ptr().cast(), b'\n' as i32, bytes.len()) };
    (!found.is_null()).then(|| found as usize - bytes.as_ptr() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pieces_of(input: &[u8], max: usize) -> Vec<String> {
        let mut reader = LineReader::with_limit(input, max);
        let mut out = Vec::new();
        while let Some(piece) = reader.next_piece().await.unwrap() {
            out.push(match piece {
                Piece::Line(line) => String::from_utf8_lossy(line).into_owned(),
                Piece::TooLong(size) => format!("<too long: {size}>"),
                Piece::Frame(frame) => format!("<frame of {}>", frame.len()),
            });
        }
        out
    }

    #[tokio::test]
    async fn an_overlong_line_is_reported_and_the_next_line_survives() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\nok\n");
        assert_eq!(pieces_of(&input, 10).await, vec!["<too long: 50>", "ok\n"]);
        // A line of exactly the limit is kept; a last line without its
        // newline counts too, over the limit or not.
        assert_eq!(
            pieces_of(b"0123456789\n0123456789x", 10).await,
            vec!["0123456789\n", "<too long: 11>"]
        );
        assert_eq!(pieces_of(b"abc", 10).await, vec!["abc"]);
    }

    #[tokio::test]
    async fn an_overlong_line_is_never_held_whole() {
        // 4 MiB with a 1 KiB limit, through small pieces: the buffer stays
        // near one read's size.
        let (mut tx, rx) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&vec![b'y'; 4 << 20]).await.unwrap();
            tx.write_all(b"\nnext\n").await.unwrap();
        });
        let mut reader = LineReader::with_limit(rx, 1024);
        assert_eq!(
            reader.next_piece().await.unwrap(),
            Some(Piece::TooLong(4 << 20))
        );
        assert!(reader.buf.capacity() < 2 << 20, "{}", reader.buf.capacity());
        assert_eq!(
            reader.next_piece().await.unwrap(),
            Some(Piece::Line(b"next\n"))
        );
        writer.await.unwrap();
    }

    async fn lines_of(input: &[u8]) -> Vec<Vec<u8>> {
        let mut reader = LineReader::new(input);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line.to_vec());
        }
        out
    }

    #[tokio::test]
    async fn frames_between_lines_come_out_whole_however_the_input_is_cut() {
        use crate::protocol::Stream;
        let frames: Vec<Vec<u8>> = (0..30)
            .map(|i| {
                crate::frame::encode_output("p", i, Stream::Stdout, &vec![b'\n'; i as usize * 9973])
            })
            .collect();
        let mut all = Vec::new();
        for f in &frames {
            all.extend_from_slice(b"{\"a\":1}\n");
            all.extend_from_slice(f);
        }
        all.extend_from_slice(b"last\n");
        let (mut tx, rx) = tokio::io::duplex(4093);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&all).await.unwrap();
        });
        let mut reader = LineReader::with_frames(rx);
        for f in &frames {
            assert_eq!(
                reader.next_piece().await.unwrap(),
                Some(Piece::Line(b"{\"a\":1}\n"))
            );
            assert!(reader.next_piece().await.unwrap() == Some(Piece::Frame(f)));
        }
        assert_eq!(
            reader.next_piece().await.unwrap(),
            Some(Piece::Line(b"last\n"))
        );
        writer.await.unwrap();
        // Without frames, a NUL is just a byte of a line.
        assert_eq!(lines_of(b"\x00x\n").await, vec![b"\x00x\n".to_vec()]);
    }

    #[tokio::test]
    async fn splits_on_newlines_and_keeps_an_unfinished_last_line() {
        assert_eq!(
            lines_of(b"a\n\nbc\nd").await,
            vec![
                b"a\n".to_vec(),
                b"\n".to_vec(),
                b"bc\n".to_vec(),
                b"d".to_vec()
            ]
        );
        assert!(lines_of(b"").await.is_empty());
    }

    #[tokio::test]
    async fn lines_longer_than_a_read_and_many_refills_come_out_whole() {
        // Lines of every size up to several reads long, through a pipe that
        // delivers them in small, odd pieces.
        let lines: Vec<Vec<u8>> = (0..40)
            .map(|i| {
                let mut line = vec![b'a' + (i % 26) as u8; i * i * 997];
                line.push(b'\n');
                line
            })
            .collect();
        let all = lines.concat();
        let (mut tx, rx) = tokio::io::duplex(7919);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&all).await.unwrap();
        });
        let mut reader = LineReader::new(rx);
        for want in &lines {
            let got = reader.next_line().await.unwrap().expect("a line");
            assert_eq!(got.len(), want.len());
            assert!(got == &want[..]);
        }
        writer.await.unwrap();
        assert!(reader.next_line().await.unwrap().is_none());
    }
}
