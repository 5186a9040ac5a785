//! A /pooled session: this server as one worker of an orchestrator.
//!
//! The [`session`] registers (retried after 1, 2, 4 and 8 s), waits for a block hash, builds
//! the model, says it is ready and computes the nonce range it is given, streaming every
//! status and result line as it happens. Each result goes to the [`outbox`], which posts it to
//! the orchestrator at once when nothing older waits, keeps it for re-sending through
//! /results/batch when a post fails, and pauses the computation while more than
//! `max_backlog` results wait: no result is ever discarded. The orchestrator's config is
//! polled every `poll` for `compute`, `switch_job` and `shutdown` commands, and a heartbeat
//! goes out every `heartbeat`. However the session ends (command, time limit, preemption,
//! client gone, SIGTERM) it stops computing, delivers what is pending and posts its shutdown
//! notice. The client may bound the session in its request (`max_seconds`, `max_nonces`):
//! reaching a bound winds it down the same way, the final `shutdown` line naming the bound as
//! its `reason`. [`orchestrator`] is the orchestrator's HTTP API; [`config`] what it has said.

pub mod config;
pub mod orchestrator;
pub mod outbox;
pub mod session;

pub use config::{ClientBounds, PooledConfig, WorkerConfig};
pub use orchestrator::{Orchestrator, OrchestratorApi, ResultPoster};
pub use outbox::Outbox;
pub use session::{run, PooledEnv};
