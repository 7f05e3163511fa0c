//! The one integration-test binary: every test drives the real
//! `exec-server` binary over real pipes.

mod audit;
mod budget;
mod cli;
mod client;
mod containment;
mod descriptors;
mod doors;
mod dropin;
mod errors;
mod flood;
mod frames;
mod fs;
mod http;
mod hygiene;
mod limits;
mod network;
mod noise;
mod persist;
mod polling;
mod process;
mod proxy_policy;
mod remote;
mod sandbox;
mod sessions;
mod ssh;
mod support;
mod transcripts;
mod watch;
mod web;
mod websocket;
