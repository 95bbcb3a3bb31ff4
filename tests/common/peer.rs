//! A raw mesh peer for attacker-style tests: speaks the wire (`meshd::protocol`) directly over a
//! real WebSocket, so a test controls every message a worker sends — including the ones a real
//! worker never would.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use meshd::protocol::{self, Message, PROTOCOL_VERSION};
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

pub struct Peer {
    ws: Ws,
}

impl Peer {
    /// Connects to `url` (`ws://…`) and says `Hello`; panics unless the gateway welcomes it.
    pub async fn join(url: &str, token: &str, name: &str) -> Peer {
        let mut peer = Peer::hello(url, token, name).await;
        match peer.recv().await {
            Some(Message::Welcome { .. }) => peer,
            other => panic!("no welcome for {name}: {other:?}"),
        }
    }

    /// Connects and says `Hello` without waiting for the answer.
    pub async fn hello(url: &str, token: &str, name: &str) -> Peer {
        let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("ws://"))
            .await
            .unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        let mut peer = Peer { ws };
        peer.send(Message::Hello {
            protocol: PROTOCOL_VERSION,
            name: name.into(),
            token: token.into(),
        })
        .await;
        peer
    }

    pub async fn send(&mut self, msg: Message) {
        let bytes = protocol::encode(&msg).unwrap();
        // A refused peer's socket may already be closed: what matters is what comes back.
        let _ = self.ws.send(WsMessage::Binary(bytes.into())).await;
    }

    pub async fn register(&mut self, function: &str, resumable: bool) {
        self.send(Message::RegisterFunction {
            name: function.into(),
            description: None,
            resumable,
            models: Vec::new(),
        })
        .await;
    }

    pub async fn trigger(&mut self, method: &str, path: &str, function: &str) {
        self.send(Message::RegisterTrigger {
            method: method.into(),
            path: path.into(),
            function: function.into(),
            requires: vec![],
        })
        .await;
    }

    /// The next message that is not a heartbeat (answering pings), or `None` once the
    /// connection is closed or 10 s pass.
    pub async fn recv(&mut self) -> Option<Message> {
        self.recv_within(Duration::from_secs(10)).await
    }

    pub async fn recv_within(&mut self, limit: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            let WsMessage::Binary(bytes) = frame.ok()? else {
                continue;
            };
            match protocol::decode(&bytes, 16 << 20).ok()? {
                Message::Ping { nonce, .. } => self.send(Message::Pong { nonce }).await,
                Message::Pong { .. } => {}
                other => return Some(other),
            }
        }
    }

    /// The reason of the `Refused` the gateway sends, and whether it then closed the connection.
    pub async fn refusal(&mut self) -> (String, bool) {
        let reason = match self.recv().await {
            Some(Message::Refused { reason }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        (reason, self.recv().await.is_none())
    }

    /// Invokes `function` with a JSON payload encoded as the mesh does; answers its outcome.
    pub async fn call(
        &mut self,
        id: u64,
        function: &str,
        payload: &serde_json::Value,
    ) -> protocol::Outcome {
        self.send(Message::Invoke {
            id,
            function: function.into(),
            payload: serde_bytes::ByteBuf::from(protocol::to_payload(payload)),
            timeout_ms: 10_000,
            trace_id: format!("test-{id}"),
            http: None,
            traceparent: None,
            route: None,
        })
        .await;
        loop {
            match self.recv().await {
                Some(Message::Result { id: got, outcome }) if got == id => return outcome,
                Some(_) => continue,
                None => panic!("the connection closed before `{function}` answered"),
            }
        }
    }
}
