//! The retained output of one process: chunks with their sequence numbers,
//! bounded in bytes and in count, oldest evicted first.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::protocol::{OutputChunk, SharedBytes, Stream};

/// Retention limits for one process's output.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_bytes: usize,
    pub max_chunks: usize,
}

#[derive(Debug)]
struct Retained {
    seq: u64,
    stream: Stream,
    data: Bytes,
}

/// Output chunks in seq order.
#[derive(Debug)]
pub struct OutputLog {
    chunks: VecDeque<Retained>,
    bytes: usize,
    limits: Retention,
    /// The highest seq evicted so far (0: none).
    evicted_through: u64,
    /// Bytes of every chunk that left the log so far (evicted, or freed
    /// by a read of a held process): a reader that has accounted for
    /// fewer bytes through its position lost the difference.
    dropped_bytes: u64,
}

/// What a read of the log found.
#[derive(Debug, Default)]
pub struct Slice {
    pub chunks: Vec<OutputChunk>,
    /// The seq of the last chunk returned.
    pub last_seq: Option<u64>,
    /// Output after the reader's position was evicted before this read.
    pub truncated: bool,
    /// Bytes of all chunks that have left the log so far.
    pub dropped_bytes: u64,
}

impl OutputLog {
    pub fn new(limits: Retention) -> Self {
        OutputLog {
            chunks: VecDeque::new(),
            bytes: 0,
            limits,
            evicted_through: 0,
            dropped_bytes: 0,
        }
    }

    /// Append a chunk, then (with `evict`) evict the oldest chunks beyond
    /// the limits. The newest chunk is always kept so that a reader can
    /// make progress. Without `evict` (a held process, which waits for
    /// room before it pushes) the log goes over its limit by one chunk at
    /// most.
    pub fn push(&mut self, seq: u64, stream: Stream, data: Bytes, evict: bool) {
        self.bytes += data.len();
        self.chunks.push_back(Retained { seq, stream, data });
        while evict
            && self.chunks.len() > 1
            && (self.bytes > self.limits.max_bytes || self.chunks.len() > self.limits.max_chunks)
        {
            if let Some(old) = self.chunks.pop_front() {
                self.bytes -= old.data.len();
                self.dropped_bytes += old.data.len() as u64;
                self.evicted_through = old.seq;
            }
        }
    }

    /// Whether the log is at its limits (a held process waits for room).
    pub fn is_full(&self) -> bool {
        self.bytes >= self.limits.max_bytes || self.chunks.len() >= self.limits.max_chunks
    }

    /// The reader has everything through `seq`: drop it (for a held
    /// process, whose log is drained by reads rather than evicted).
    pub fn forget_through(&mut self, seq: u64) {
        while self.chunks.front().is_some_and(|c| c.seq <= seq) {
            if let Some(old) = self.chunks.pop_front() {
                self.bytes -= old.data.len();
                self.dropped_bytes += old.data.len() as u64;
            }
        }
    }

    /// Chunks with `seq > after`, stopping before the chunk that would take
    /// the decoded size over `max_bytes` (but always at least one chunk).
    pub fn read(&self, after: u64, max_bytes: Option<usize>) -> Slice {
        let mut slice = Slice {
            truncated: self.evicted_through > after,
            dropped_bytes: self.dropped_bytes,
            ..Slice::default()
        };
        let start = self.chunks.partition_point(|c| c.seq <= after);
        let mut total = 0usize;
        for chunk in self.chunks.range(start..) {
            if let Some(max) = max_bytes {
                if !slice.chunks.is_empty() && total + chunk.data.len() > max {
                    break;
                }
            }
            total += chunk.data.len();
            slice.last_seq = Some(chunk.seq);
            slice.chunks.push(OutputChunk {
                seq: chunk.seq,
                stream: chunk.stream,
                chunk: SharedBytes(chunk.data.clone()),
            });
        }
        slice
    }

    /// Every retained byte, lower-cased, for the sandbox-denial heuristic.
    pub fn retained_text_lowercase(&self) -> String {
        let mut text = String::new();
        for chunk in &self.chunks {
            text.push_str(&String::from_utf8_lossy(&chunk.data).to_lowercase());
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(max_bytes: usize, max_chunks: usize) -> OutputLog {
        OutputLog::new(Retention {
            max_bytes,
            max_chunks,
        })
    }

    #[test]
    fn a_held_log_keeps_everything_until_read() {
        let mut log = OutputLog::new(Retention {
            max_bytes: 8,
            max_chunks: 100,
        });
        for seq in 1..=3 {
            log.push(seq, Stream::Stdout, vec![0; 5].into(), false);
        }
        assert!(log.is_full());
        assert_eq!(log.read(0, None).chunks.len(), 3, "nothing evicted");
        log.forget_through(2);
        assert!(!log.is_full());
        let left = log.read(2, None);
        assert_eq!((left.chunks.len(), left.truncated), (1, false));
    }

    #[test]
    fn eviction_by_bytes_marks_truncation_for_earlier_readers() {
        let mut log = log(10, 100);
        for seq in 1..=4 {
            log.push(seq, Stream::Stdout, vec![b'a'; 4].into(), true);
        }
        let slice = log.read(0, None);
        assert!(slice.truncated);
        assert_eq!(slice.chunks.first().map(|c| c.seq), Some(3));
        assert!(!log.read(2, None).truncated);
    }

    #[test]
    fn eviction_by_count() {
        let mut log = log(1 << 20, 2);
        for seq in 1..=5 {
            log.push(seq, Stream::Stderr, vec![1].into(), true);
        }
        let seqs: Vec<u64> = log.read(0, None).chunks.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
    }

    #[test]
    fn max_bytes_stops_before_overflow_but_returns_one_chunk() {
        let mut log = log(1 << 20, 100);
        log.push(1, Stream::Stdout, vec![0; 5].into(), true);
        log.push(2, Stream::Stdout, vec![0; 5].into(), true);
        log.push(3, Stream::Stdout, vec![0; 5].into(), true);
        assert_eq!(log.read(0, Some(10)).last_seq, Some(2));
        assert_eq!(log.read(0, Some(1)).last_seq, Some(1));
        assert_eq!(log.read(3, Some(1)).last_seq, None);
    }
}
