//! Every kind of NDJSON line the server streams, in one place: a batch's fields (on /generate
//! lines and in /pooled results), a /generate line, a /validate progress line (its final line
//! is [`crate::pow::validation::ValidatedBatch`]), an error line and its two fixed forms; and
//! [`LineSink`], the writing end of a stream of lines.

use crate::engine::{BatchReport, JobError};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

/// The fields every batch result carries, on /generate lines and in /pooled results.
#[derive(Debug, Serialize)]
pub struct BatchFields<'a> {
    pub worker_id: usize,
    pub public_key: &'a str,
    pub block_hash: &'a str,
    pub block_height: u64,
    pub nonces: &'a [u64],
    pub dist: &'a [f64],
    pub node_id: usize,
    pub batch_number: u64,
    pub batch_computed: u64,
    pub batch_valid: u64,
    pub total_computed: u64,
    pub total_valid: u64,
    pub elapsed_seconds: u64,
}

impl<'a> BatchFields<'a> {
    /// A batch's valid nonces and their distances, numbered `batch_number`.
    pub fn of(b: &'a BatchReport, batch_number: u64) -> Self {
        BatchFields {
            worker_id: b.worker_id,
            public_key: &b.public_key,
            block_hash: &b.block_hash,
            block_height: b.block_height,
            nonces: &b.valid_nonces,
            dist: &b.valid_dist,
            node_id: b.worker_id,
            batch_number,
            batch_computed: b.batch_computed(),
            batch_valid: b.batch_valid(),
            total_computed: b.total_computed,
            total_valid: b.total_valid,
            elapsed_seconds: b.elapsed.as_secs(),
        }
    }
}

/// One line of a /generate stream: the batch's fields, then the stream's running totals.
#[derive(Debug, Serialize)]
pub struct GenerateLine<'a> {
    #[serde(flatten)]
    pub batch: BatchFields<'a>,
    pub next_nonce: u64,
    pub aggregated_batch_number: u64,
    pub aggregated_total_computed: u64,
    pub aggregated_total_valid: u64,
    pub n_workers: usize,
}

/// Why a bounded generation ended (the `reason` of a [`FinishedLine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The request's `max_nonces` were all computed.
    MaxNonces,
    /// The request's `max_seconds` passed.
    MaxSeconds,
    /// The server's job limit (`--max-job-seconds`) passed first.
    TimeLimit,
}

/// The last line of a generation whose request set `max_seconds` or `max_nonces`, once its
/// job completed: why it ended and what it did.
#[derive(Debug, Serialize)]
pub struct FinishedLine {
    /// Always "finished".
    pub status: &'static str,
    pub reason: FinishReason,
    /// From the start of the stream to its end.
    pub seconds: f64,
    pub aggregated_batch_number: u64,
    pub aggregated_total_computed: u64,
    pub aggregated_total_valid: u64,
}

/// `{"error", "error_type"[, "fatal"]}`.
#[derive(Debug, Serialize)]
pub struct ErrorLine<'a> {
    pub error: &'a str,
    pub error_type: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fatal: bool,
}

impl<'a> ErrorLine<'a> {
    pub fn of(e: &'a JobError) -> Self {
        ErrorLine {
            error: &e.message,
            error_type: e.error_type,
            fatal: e.fatal,
        }
    }
}

/// A /validate progress line, one per computed batch.
#[derive(Debug, Serialize)]
pub struct ValidationProgress {
    /// Nonces recomputed so far, of `total`.
    pub validated: u64,
    pub total: u64,
    /// Of those, the ones whose recomputed distance is above r_target.
    pub n_invalid_so_far: u64,
    /// Since the job started computing.
    pub elapsed_seconds: f64,
}

/// The line of a job preempted by a newer request.
pub const PREEMPTED: ErrorLine<'static> = ErrorLine {
    error: "preempted by a newer request",
    error_type: "Preempted",
    fatal: false,
};

/// The line of a job stopped because the server shuts down.
pub const SHUTTING_DOWN: ErrorLine<'static> = ErrorLine {
    error: "the server is shutting down",
    error_type: "Shutdown",
    fatal: false,
};

/// Lines waiting for a slow client before the writer waits.
pub const LINE_CAPACITY: usize = 256;

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
    /// A sink and the receiving end its lines arrive at, each one a JSON object and a newline.
    pub fn channel() -> (LineSink, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(LINE_CAPACITY);
        (LineSink { tx }, rx)
    }

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
