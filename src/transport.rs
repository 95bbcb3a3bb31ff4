//! WebSocket plumbing shared by both ends of the mesh: a writer task that drains a bounded channel
//! (batching frames into one flush) and a reader that yields decoded [`Message`]s.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::protocol::{self, CodecError, Message};

/// Frames queued for one connection before senders wait.
pub const OUTBOX_CAPACITY: usize = 1024;

/// What the writer task sends: a message, or a close with a reason.
pub enum Outgoing {
    Msg(Message),
    Close(String),
}

pub type Outbox = mpsc::Sender<Outgoing>;

/// WebSocket settings that enforce the frame limit below the codec as well.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Starts the writer task for `sink`; it ends when every [`Outbox`] clone is dropped, after a
/// close, or when the socket fails. Await the handle after a close to know everything queued
/// before it reached the socket (a process about to exit must).
pub fn spawn_writer<S>(
    mut sink: SplitSink<WebSocketStream<S>, WsMessage>,
) -> (Outbox, tokio::task::JoinHandle<()>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Outgoing>(OUTBOX_CAPACITY);
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            // Feed everything already queued, then flush once.
            while let Some(out) = next.take() {
                match out {
                    Outgoing::Msg(msg) => {
                        let bytes = match protocol::encode(&msg) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!(error = %e, "dropping a message that cannot be encoded");
                                continue;
                            }
                        };
                        if sink.feed(WsMessage::Binary(bytes.into())).await.is_err() {
                            return;
                        }
                    }
                    Outgoing::Close(reason) => {
                        let frame = CloseFrame {
                            code: CloseCode::Policy,
                            reason: reason.into(),
                        };
                        let _ = sink.send(WsMessage::Close(Some(frame))).await;
                        let _ = sink.close().await;
                        return;
                    }
                }
                next = rx.try_recv().ok();
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    (tx, task)
}

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("connection closed: {0}")]
    Closed(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("websocket error: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("text frames are not part of the mesh protocol")]
    Text,
}

/// Reads the next mesh message; control frames are handled by tungstenite and skipped here.
pub async fn recv<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    max_frame: usize,
) -> Result<Message, RecvError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    next_frame(stream, |b| protocol::decode(b, max_frame)).await
}

/// Reads the first frame of a connection as a [`protocol::HelloFrame`].
pub async fn recv_hello<S>(ws: &mut WebSocketStream<S>) -> Result<protocol::HelloFrame, RecvError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    next_frame(ws, protocol::decode_hello).await
}

async fn next_frame<T, St>(
    stream: &mut St,
    decode: impl Fn(&[u8]) -> Result<T, CodecError>,
) -> Result<T, RecvError>
where
    St: futures_util::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + Unpin,
{
    loop {
        match stream.next().await {
            None => return Err(RecvError::Closed("end of stream".into())),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(WsMessage::Binary(b))) => return Ok(decode(&b)?),
            Some(Ok(WsMessage::Close(frame))) => {
                let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                return Err(RecvError::Closed(reason));
            }
            Some(Ok(WsMessage::Text(_))) => return Err(RecvError::Text),
            Some(Ok(_)) => continue,
        }
    }
}
