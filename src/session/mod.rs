//! What a request does over its lifetime, with no HTTP in it: a generation job's events
//! written out as lines ([`generation`]), /warmup's wait for its parameters ([`warmup`]), and a
//! /pooled session with an orchestrator ([`pooled`]). Sessions write NDJSON lines into a
//! [`lines::LineSink`] and make their outgoing calls through [`client`]; the HTTP layer
//! ([`crate::api`]) only parses requests and turns a sink into a streamed response.

pub mod client;
pub mod events;
pub mod generation;
pub mod lines;
pub mod pooled;
pub mod validation;
pub mod warmup;

use tokio::sync::watch;

/// Whether the server has begun to shut down, for sessions to notice and wind down.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new(rx: watch::Receiver<bool>) -> Self {
        Shutdown(rx)
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the server has begun to shut down (or its sender is gone).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|v| *v).await;
    }
}
