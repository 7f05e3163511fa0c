//! The stdio transport: the process's own stdin and stdout.
//!
//! Both ends run on dedicated OS threads. Reading stdin through tokio would
//! park a blocking-pool thread that cannot be cancelled, and a dedicated
//! writer lets large output lines be coalesced into few `write` calls.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::{Frame, OUTBOUND_CAPACITY, Transport};

/// The running stdio transport; `writer` finishes once every sender is gone.
pub struct Stdio {
    pub transport: Transport,
    pub writer: JoinHandle<()>,
}

/// Start reading stdin and writing stdout.
pub fn start(max_message_bytes: usize) -> Stdio {
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    std::thread::Builder::new()
        .name("stdin-reader".into())
        .spawn(move || {
            let stdin = io::stdin().lock();
            if let Err(err) = read_frames(stdin, max_message_bytes, |frame| {
                in_tx.blocking_send(frame).is_ok()
            }) {
                tracing::warn!("reading stdin failed: {err}");
            }
        })
        .expect("spawn stdin reader thread");
    let writer = std::thread::Builder::new()
        .name("stdout-writer".into())
        .spawn(move || {
            // SAFETY: fd 1 stays open for the life of the process; the
            // ManuallyDrop keeps this File from closing it.
            let file = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
            if let Err(err) = write_lines(&*file, out_rx) {
                tracing::warn!("writing stdout failed: {err}");
            }
        })
        .expect("spawn stdout writer thread");
    Stdio {
        transport: Transport {
            incoming: in_rx,
            outgoing: out_tx,
        },
        writer,
    }
}

/// Split `input` into frames and hand each to `emit` until it returns false
/// or the input ends. Lines over `max` bytes are discarded without being
/// held in memory, and reported as [`Frame::TooLong`].
pub fn read_frames(
    input: impl Read,
    max: usize,
    mut emit: impl FnMut(Frame) -> bool,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line = Vec::new();
    let mut size = 0usize;
    let mut discarding = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if buf.is_empty() {
            // A last line without a newline still counts.
            if discarding {
                emit(Frame::TooLong { size });
            } else if let Some(frame) = finish_line(&mut line) {
                emit(frame);
            }
            return Ok(());
        }
        let (part, found_newline) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        let used = part.len() + usize::from(found_newline);
        size += part.len();
        if !discarding {
            if size > max {
                discarding = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(part);
            }
        }
        reader.consume(used);
        if found_newline {
            let keep_going = if discarding {
                emit(Frame::TooLong { size })
            } else {
                match finish_line(&mut line) {
                    Some(frame) => emit(frame),
                    None => true,
                }
            };
            if !keep_going {
                return Ok(());
            }
            discarding = false;
            size = 0;
        }
    }
}

/// Take the accumulated line as a frame; `None` for a blank line.
fn finish_line(line: &mut Vec<u8>) -> Option<Frame> {
    let mut taken = std::mem::take(line);
    if taken.last() == Some(&b'\r') {
        taken.pop();
    }
    if taken.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(Frame::Line(taken))
    }
}

/// Write every line from `rx` to `out`, flushing whenever the queue runs dry.
pub fn write_lines(out: impl Write, mut rx: mpsc::Receiver<Vec<u8>>) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, out);
    while let Some(line) = rx.blocking_recv() {
        out.write_all(&line)?;
        while let Ok(line) = rx.try_recv() {
            out.write_all(&line)?;
        }
        out.flush()?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max: usize) -> Vec<String> {
        let mut out = Vec::new();
        read_frames(input, max, |frame| {
            out.push(match frame {
                Frame::Line(line) => String::from_utf8(line).unwrap(),
                Frame::TooLong { size } => format!("<too long: {size}>"),
            });
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn splits_lines_and_strips_crlf_and_blank_lines() {
        assert_eq!(frames(b"a\r\n\n  \nb\nc", 100), vec!["a", "b", "c"]);
    }

    #[test]
    fn overlong_line_is_reported_and_the_next_line_survives() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\nok\n");
        assert_eq!(frames(&input, 10), vec!["<too long: 50>", "ok"]);
    }

    #[test]
    fn line_of_exactly_the_limit_is_kept() {
        assert_eq!(frames(b"0123456789\n", 10), vec!["0123456789"]);
    }
}
