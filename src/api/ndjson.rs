//! NDJSON responses: a session task writes one JSON object per line into a bounded channel,
//! the response body streams them out as they come. When the client goes away the body is
//! dropped, and the session sees [`LineSink::closed`].

use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Lines waiting for a slow client before the writer waits.
const LINE_CAPACITY: usize = 256;

/// The writing end of an NDJSON response.
#[derive(Clone)]
pub struct LineSink {
    tx: mpsc::Sender<Bytes>,
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Bytes {
    let mut b =
        serde_json::to_vec(v).unwrap_or_else(|_| b"{\"error\":\"unserialisable line\"}".to_vec());
    b.push(b'\n');
    Bytes::from(b)
}

impl LineSink {
    /// Write a line, waiting while the client is behind; false once the client is gone.
    pub async fn send<T: Serialize + ?Sized>(&self, v: &T) -> bool {
        self.tx.send(encode(v)).await.is_ok()
    }

    /// Write a line unless the client is far behind (then the line is skipped); false once
    /// the client is gone.
    pub fn send_now<T: Serialize + ?Sized>(&self, v: &T) -> bool {
        match self.tx.try_send(encode(v)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!("client is not reading: a status line was skipped");
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

struct LineStream {
    rx: mpsc::Receiver<Bytes>,
}

impl Stream for LineStream {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(Ok))
    }
}

/// A 200 `application/x-ndjson` response whose lines `session` writes; the session runs as
/// its own task on the current worker and ends the response by returning.
pub fn response<F, Fut>(session: F) -> HttpResponse
where
    F: FnOnce(LineSink) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let (tx, rx) = mpsc::channel(LINE_CAPACITY);
    actix_web::rt::spawn(session(LineSink { tx }));
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(LineStream { rx })
}
