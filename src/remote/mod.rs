//! Remote executors (`docs/PROTOCOL.md`, "Remote executors"): an executor
//! that nobody can dial registers with a registry and keeps one outbound
//! WebSocket to a rendezvous router; every orchestrator connection is an
//! end-to-end encrypted Noise stream multiplexed over it.
//!
//! - `frame`: the protobuf relay frame and its validation.
//! - `noise`: keys, prologue, the hybrid IK handshake, records.
//! - `registry`: the registry's three calls, as a client.
//! - `relay`: `exec-server relay`, a registry and rendezvous router.
//! - `dial`: opening a relay WebSocket (directly or through a proxy).
//! - `executor`: `exec-server --remote`, the executor's side.

pub mod dial;
#[cfg(feature = "server")]
pub(crate) mod executor;
pub mod frame;
pub mod noise;
pub mod registry;
#[cfg(feature = "server")]
pub(crate) mod relay;

/// `text` percent-encoded for one URL path segment.
pub fn path_segment(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `n` bytes from the kernel's random source.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: writes at most `n - filled` bytes into our buffer.
        let got = unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if got > 0 {
            filled += got as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom(2) only fails before the pool is ready on very old
            // kernels, or with a bad buffer; neither can be recovered.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    out
}
