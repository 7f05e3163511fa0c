//! The one integration-test binary: every test drives the real
//! `exec-server` binary over real pipes.

mod errors;
mod fs;
mod hygiene;
mod process;
mod support;
mod transcripts;
