//! The replication engine: per-peer sequence spaces, acknowledgements, snapshots and the
//! external cache. Sans-IO: driven by messages and a clock passed in; no sockets, no tokio.
//!
//! - [`message`]: what peers say to each other.
//! - [`index`]: own flows ordered by change counter; peers are cursors into it.
//! - [`external`]: flows learnt from peers, per origin.
//! - [`engine`]: per-peer state machines tying the three together.

pub mod engine;
pub mod external;
pub mod index;
pub mod message;

pub use engine::{Engine, EngineConfig, PeerError, PeerStatus};
pub use external::{ExternalCache, ExternalChange, ExternalFlow, OriginCache};
pub use message::{Batch, Hello, Message, VERSION_MAJOR, VERSION_MINOR};

#[cfg(test)]
mod sim;
