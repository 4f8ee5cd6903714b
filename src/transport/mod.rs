//! Peer transports: carry [`crate::sync::Message`]s between nodes.
//!
//! The sync engine is sans-IO; a transport owns the sockets. [`grpc`] is the one transport: one
//! bidirectional gRPC stream per pair of nodes, over mutual TLS (or plaintext, with a warning).

mod codec;
pub mod grpc;

pub use grpc::{
    start, PeerAddr, SendError, TlsFiles, Transport, TransportConfig, TransportError,
    TransportEvent,
};
