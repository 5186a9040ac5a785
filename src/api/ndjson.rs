//! NDJSON responses: a session task writes one JSON object per line into a
//! [`LineSink`](crate::session::lines::LineSink), the response body streams them out as they
//! come. When the client goes away the body is dropped, and the session sees
//! [`LineSink::closed`](crate::session::lines::LineSink::closed).

use crate::session::lines::LineSink;
use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::Stream;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

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
    let (sink, rx) = LineSink::channel();
    actix_web::rt::spawn(session(sink));
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(LineStream { rx })
}
