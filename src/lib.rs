//! mailtls: a TLS front door for mail servers. Implicit TLS and server-side STARTTLS for
//! SMTP, IMAP and POP3 in front of a cleartext backend, with PROXY protocol headers.
//!
//! Data flows one way: `server` (listeners) -> `session` -> `tls` / `protocol` ->
//! `backend` -> `relay`. `config` and `metrics` are read by all.

// Unsafe code is allowed only where the relay talks to the kernel directly (src/relay/).
#![deny(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod cli;
pub mod config;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod probe;
pub mod protocol;
pub mod relay;
pub mod routes;
pub mod server;
pub mod session;
pub mod systemd;
pub mod tls;
pub mod watch;
