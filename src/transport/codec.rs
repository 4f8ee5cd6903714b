//! The `PeerSync.Sync` stream's codec and service plumbing, with [`crate::wire::frame`]'s
//! hand-written protobuf codec in place of tonic-prost's.
//!
//! The generated `PeerSyncClient`/`PeerSyncServer` can only carry the generated `pb` messages,
//! which would mean building and converting a `pb` tree per message; this module does what they
//! do (same path, same content type, same message limits, `Unimplemented` for other methods) but
//! carries [`Message`]s, so a peer running the generated code, or any gRPC peer of this schema,
//! sees no difference.

use crate::sync::Message;
use crate::wire::{self, FrameError, WireError};
use prost::bytes::Buf;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::{NamedService, StreamingService};
use tonic::Status;

/// The gRPC service name of the schema.
pub const SERVICE: &str = "ctsync.v1.PeerSync";
/// The `Sync` method.
pub const METHOD: &str = "Sync";
/// The `Sync` method's path.
pub const SYNC_PATH: &str = "/ctsync.v1.PeerSync/Sync";

/// What the stream yields per message: a valid message, or why a well-formed one is invalid.
///
/// Malformed protobuf ends the stream with a `Status`, as tonic-prost's codec does, but a
/// message that decodes and breaks a model rule is handed over as such, so that the transport
/// can tell a broken stream from a misbehaving peer.
pub type Inbound = Result<Message, WireError>;

/// Encodes [`Message`]s and decodes [`Inbound`]s with [`wire::encode_message`] and
/// [`wire::decode_message`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncCodec;

impl Codec for SyncCodec {
    type Encode = Message;
    type Decode = Inbound;
    type Encoder = SyncCodec;
    type Decoder = SyncCodec;

    fn encoder(&mut self) -> SyncCodec {
        SyncCodec
    }

    fn decoder(&mut self) -> SyncCodec {
        SyncCodec
    }
}

impl Encoder for SyncCodec {
    type Item = Message;
    type Error = Status;

    /// Sizes tonic's buffer once for the whole message, then writes it. A message over the
    /// peers' limit is refused here, before any byte is written, and said so in our log: tonic
    /// would refuse it too, but only after encoding, and the reason would reach our log as a
    /// bare protocol error (or only the peer's log).
    fn encode(&mut self, item: Message, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let sized = wire::SizedMessage::new(&item);
        if sized.len() > super::grpc::MAX_MESSAGE_BYTES {
            let limit = super::grpc::MAX_MESSAGE_BYTES;
            tracing::error!(
                bytes = sized.len(),
                limit,
                "refusing to send a message over the peers' size limit"
            );
            return Err(Status::out_of_range(format!(
                "message of {} bytes to send, the limit is {limit} bytes",
                sized.len()
            )));
        }
        dst.reserve(sized.len());
        sized.encode(dst);
        Ok(())
    }
}

impl Decoder for SyncCodec {
    type Item = Inbound;
    type Error = Status;

    /// Decodes in place from tonic's buffer: the message is contiguous there, so nothing is
    /// copied (the copy is only a fallback should a buffer ever come in pieces).
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, Status> {
        let len = src.remaining();
        let result = if src.chunk().len() == len {
            let r = wire::decode_message(src.chunk());
            src.advance(len);
            r
        } else {
            wire::decode_message(&src.copy_to_bytes(len))
        };
        match result {
            Ok(m) => Ok(Some(Ok(m))),
            Err(FrameError::Wire(e)) => Ok(Some(Err(e))),
            // What tonic-prost answers to a prost decoding error.
            Err(e @ FrameError::Protobuf(_)) => Err(Status::internal(e.to_string())),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The `Sync` handler: a request stream of [`Inbound`]s in, a response stream of messages out.
pub trait SyncHandler: Send + Sync + 'static {
    /// The stream of outgoing messages.
    type Stream: tokio_stream::Stream<Item = Result<Message, Status>> + Send + 'static;

    /// Handles one `Sync` call.
    fn sync(
        &self,
        request: tonic::Request<tonic::Streaming<Inbound>>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Stream>, Status>> + Send;
}

/// The `PeerSync` service as the generated server would route it, with [`SyncCodec`].
pub struct SyncServer<H> {
    handler: std::sync::Arc<H>,
    max_message_bytes: usize,
}

impl<H> SyncServer<H> {
    /// Serves `handler`, refusing messages above `max_message_bytes` both ways.
    pub fn new(handler: H, max_message_bytes: usize) -> Self {
        SyncServer {
            handler: std::sync::Arc::new(handler),
            max_message_bytes,
        }
    }
}

impl<H> Clone for SyncServer<H> {
    fn clone(&self) -> Self {
        SyncServer {
            handler: std::sync::Arc::clone(&self.handler),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

impl<H> NamedService for SyncServer<H> {
    const NAME: &'static str = SERVICE;
}

/// Adapts a [`SyncHandler`] to tonic's streaming method interface.
struct SyncMethod<H>(std::sync::Arc<H>);

impl<H: SyncHandler> StreamingService<Inbound> for SyncMethod<H> {
    type Response = Message;
    type ResponseStream = H::Stream;
    type Future = BoxFuture<Result<tonic::Response<H::Stream>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Inbound>>) -> Self::Future {
        let handler = std::sync::Arc::clone(&self.0);
        Box::pin(async move { handler.sync(request).await })
    }
}

impl<H, B> tonic::codegen::Service<http::Request<B>> for SyncServer<H>
where
    H: SyncHandler,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SYNC_PATH {
            return Box::pin(async { Ok(unimplemented()) });
        }
        let method = SyncMethod(std::sync::Arc::clone(&self.handler));
        let max = Some(self.max_message_bytes);
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(SyncCodec).apply_max_message_size_config(max, max);
            Ok(grpc.streaming(method, req).await)
        })
    }
}

/// The answer to any other method: `Unimplemented`, as the generated server gives.
fn unimplemented() -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    let headers = response.headers_mut();
    headers.insert(
        Status::GRPC_STATUS,
        (tonic::Code::Unimplemented as i32).into(),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    response
}

/// Opens a `Sync` stream on `channel` sending `outbound`, with messages limited to
/// `max_message_bytes` both ways (what the generated client's `sync` does, with [`SyncCodec`]).
pub async fn open_sync<S>(
    channel: tonic::transport::Channel,
    outbound: S,
    max_message_bytes: usize,
) -> Result<tonic::Response<tonic::Streaming<Inbound>>, Status>
where
    S: tokio_stream::Stream<Item = Message> + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
    let mut req = tonic::Request::new(outbound);
    req.extensions_mut()
        .insert(tonic::GrpcMethod::new(SERVICE, METHOD));
    let path = http::uri::PathAndQuery::from_static(SYNC_PATH);
    grpc.streaming(req, path, SyncCodec).await
}
