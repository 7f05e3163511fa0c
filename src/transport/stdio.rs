//! The stdio transport: the process's own stdin and stdout.
//!
//! Both ends run on dedicated OS threads. Reading stdin through tokio would
//! park a blocking-pool thread that cannot be cancelled, and a dedicated
//! writer lets large output lines be coalesced into few `write` calls.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::{Encoded, Frame, OUTBOUND_CAPACITY, Outbound, Transport};
use crate::jsonrpc::encode_line;

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
            outgoing: Outbound::new(out_tx, encode_line),
        },
        writer,
    }
}

/// Split `input` into frames and hand each to `emit` until it returns false
/// or the input ends. Lines over `max` bytes are discarded without being
/// held in memory, and reported as [`Frame::TooLong`]. Runs the shared
/// line framer (`crate::lines`) on the calling thread, which it blocks:
/// call it on a thread of its own (a blocking read, of stdin say, can't be
/// cancelled).
pub fn read_frames(
    input: impl Read + Unpin,
    max: usize,
    mut emit: impl FnMut(Frame) -> bool,
) -> io::Result<()> {
    use crate::lines::{LineReader, Piece};
    run_ready(async {
        let mut reader = LineReader::with_limit(Blocking(input), max);
        while let Some(piece) = reader.next_piece().await? {
            let frame = match piece {
                Piece::Line(line) => match finish_line(line) {
                    Some(frame) => frame,
                    None => continue,
                },
                Piece::TooLong(size) => Frame::TooLong { size },
                // Not made with frames: none comes.
                Piece::Frame(_) => continue,
            };
            if !emit(frame) {
                break;
            }
        }
        Ok(())
    })
}

/// Drive a future whose every poll completes at once (its reads block
/// instead of waiting): on this thread, with no runtime (the frames are
/// handed on with `blocking_send`, which a runtime would forbid).
fn run_ready<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(value) = future.as_mut().poll(&mut cx) {
            return value;
        }
    }
}

/// A line as a frame, without its `\n` or `\r\n`; `None` for a blank line.
fn finish_line(line: &[u8]) -> Option<Frame> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(Frame::Line(line.to_vec()))
    }
}

/// A blocking reader as an `AsyncRead` that is always ready: for the
/// framer on a thread of its own.
struct Blocking<R>(R);

impl<R: Read + Unpin> tokio::io::AsyncRead for Blocking<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        loop {
            match self.0.read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return std::task::Poll::Ready(Err(err)),
            }
        }
    }
}

/// Lines gathered into one `writev`, at most.
const BATCH_LINES: usize = 64;
/// Bytes gathered into one `writev`, about (a line is never split).
const BATCH_BYTES: usize = 1 << 20;

/// Write every line from `rx` to `out`: whatever is queued goes out in one
/// vectored write, so large output lines are never copied into a buffer
/// and small ones still share a system call.
pub fn write_lines(mut out: impl Write, mut rx: mpsc::Receiver<Encoded>) -> io::Result<()> {
    let mut batch: Vec<Encoded> = Vec::with_capacity(BATCH_LINES);
    while let Some(line) = rx.blocking_recv() {
        let mut bytes = line.len();
        batch.push(line);
        while batch.len() < BATCH_LINES && bytes < BATCH_BYTES {
            let Ok(line) = rx.try_recv() else { break };
            bytes += line.len();
            batch.push(line);
        }
        write_all_vectored(&mut out, &batch)?;
        batch.clear();
    }
    out.flush()
}

/// `write_all` for a list of messages (a frame's body from where it is).
fn write_all_vectored(out: &mut impl Write, lines: &[Encoded]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(lines.len() * 2);
    for line in lines {
        slices.push(IoSlice::new(&line.head));
        if let Some(body) = &line.body {
            slices.push(IoSlice::new(body));
        }
    }
    let mut rest = &mut slices[..];
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match out.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
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

    /// A writer that takes at most `step` bytes per call, as a full pipe
    /// does.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            let mut left = self.step;
            for buf in bufs {
                let n = buf.len().min(left);
                self.out.extend_from_slice(&buf[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Ok(self.step - left)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    use crate::jsonrpc::Outgoing;

    #[test]
    fn queued_lines_go_out_whole_and_in_order_through_short_writes() {
        // 200 messages of growing size.
        let message = |i: usize| Outgoing::Closed {
            process_id: "x".repeat(i * 7).into(),
            seq: i as u64,
        };
        let lines: Vec<Vec<u8>> = (0..200).map(|i| encode_line(&message(i))).collect();
        let want = lines.concat();
        for step in [1, 3, 4096, 1 << 30] {
            let (tx, rx) = mpsc::channel(lines.len());
            for i in 0..lines.len() {
                tx.try_send(encode_line(&message(i)).into()).unwrap();
            }
            drop(tx);
            let mut out = Trickle {
                out: Vec::new(),
                step,
                calls: 0,
            };
            write_lines(&mut out, rx).unwrap();
            assert_eq!(out.out, want, "step {step}");
            if step == 1 << 30 {
                // Queued lines go out in whole batches, not a call per line.
                assert_eq!(out.calls, lines.len().div_ceil(BATCH_LINES));
            }
        }
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
