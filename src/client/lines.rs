//! Splitting the server's output into lines without copying them.
//!
//! `process/output` lines are a few hundred KiB each. A buffered reader
//! that copies every line into a `Vec` of its own costs a full pass over
//! the stream; here lines are handed out as slices of the read buffer, and
//! only the unfinished tail of a read is ever moved.

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
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        LineReader {
            inner,
            buf: Vec::with_capacity(4 * MIN_READ),
            start: 0,
            scanned: 0,
        }
    }

    /// The next line with its newline; at the end of the input, an
    /// unfinished last line without one, then `None`.
    pub(crate) async fn next_line(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            if let Some(i) = find_newline(&self.buf[self.scanned..]) {
                let line = self.start..self.scanned + i + 1;
                self.start = line.end;
                self.scanned = line.end;
                return Ok(Some(&self.buf[line]));
            }
            self.scanned = self.buf.len();
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
                if self.start == self.buf.len() {
                    return Ok(None);
                }
                let line = self.start..self.buf.len();
                self.start = line.end;
                self.scanned = line.end;
                return Ok(Some(&self.buf[line]));
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

    async fn lines_of(input: &[u8]) -> Vec<Vec<u8>> {
        let mut reader = LineReader::new(input);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line.to_vec());
        }
        out
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
