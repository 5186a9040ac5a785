//! Reading a job's events for a stream: the next event, unless the client goes away or the
//! server shuts down and the job does not end within [`SHUTDOWN_DRAIN`]. Shared by the
//! streams that end with their job (/generate, /warmup's generation, /validate).

use super::lines::{LineSink, SHUTTING_DOWN};
use super::Shutdown;
use crate::engine::{JobEvent, JobHandle};
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How long a stream waits, once the server shuts down, for its job's last events before it
/// writes the shutdown line and ends.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// What reading a job's events gave.
// Handed straight to the caller's match: boxing the event would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    Event(JobEvent),
    /// The client went away (or the job's events ended without their last one).
    Gone,
    /// The server shut down and the job did not end in time: the shutdown line was written,
    /// the stream ends.
    ShutDown,
}

/// A job's events as a stream reads them.
pub struct EventReader<'a> {
    handle: &'a mut JobHandle,
    sink: &'a LineSink,
    shutdown: &'a Shutdown,
    drain: Pin<Box<Sleep>>,
    draining: bool,
}

impl<'a> EventReader<'a> {
    pub fn new(handle: &'a mut JobHandle, sink: &'a LineSink, shutdown: &'a Shutdown) -> Self {
        EventReader {
            handle,
            sink,
            shutdown,
            drain: Box::pin(tokio::time::sleep(Duration::MAX)),
            draining: false,
        }
    }

    /// The job being read.
    pub fn handle(&self) -> &JobHandle {
        self.handle
    }

    pub async fn next(&mut self) -> Next {
        loop {
            tokio::select! {
                ev = self.handle.events.recv() => {
                    return ev.map_or(Next::Gone, Next::Event);
                }
                _ = self.sink.closed() => return Next::Gone,
                _ = self.shutdown.wait(), if !self.draining => {
                    self.draining = true;
                    self.drain.as_mut().reset(Instant::now() + SHUTDOWN_DRAIN);
                }
                _ = self.drain.as_mut() => {
                    // The job has not finished in time (the engine was told to stop it).
                    let id = self.handle.id;
                    tracing::info!(job = id, "shutting down: ending the stream of job {id}");
                    self.sink.send(&SHUTTING_DOWN).await;
                    return Next::ShutDown;
                }
            }
        }
    }
}
