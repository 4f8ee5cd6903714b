//! The bridge to the kernel's conntrack table over ctnetlink.
//!
//! `codec` turns netlink bytes into [`crate::flow::Flow`] and back, `socket` owns the system
//! calls, `kernel` builds dumps, the event stream and batched writes on top of both.

pub mod attr;
pub mod codec;
pub mod kernel;
pub mod socket;

pub use codec::{CodecError, CtEventKind, CtMessage, WriteOp};
pub use kernel::{
    count, dump, CreationSwitch, EventSource, KernelError, KernelEvent, Origins, WriteFailure,
    WriteReport, Writer,
};
pub use socket::{CtSocket, SocketError};
