//! Sagas: an order's steps across services (reserve stock, charge, ship), each committed by its
//! own service, and the finished ones undone in reverse order when a later one fails for good.
//!
//! - [`definition`]: saga files (`pipelines/sagas/*.yaml`), validated against the pipelines
//!   that carry out the commands.
//! - [`commands`]: builders of the command events, from the order and earlier replies.
//! - [`state`]: one saga's state and how each input moves it (pure, so every path is tested).
//! - [`batch`]: the states in memory and the open batch on top of them (no Kafka calls).
//! - [`orchestrator`]: the Kafka side's loop: a batch of inputs, its commands, states and input
//!   offsets in one transaction, batches bounded by count and time.
//! - [`commit`]: a batch's transaction, committed in the background while the next batch takes
//!   inputs; an aborted one read again.
//! - [`state_topic`]: the compacted state topic: created, read up to its last stable offset,
//!   folded into the newest state of each order; `find_state` for `orderflow saga show`.
//! - [`retention`]: how long a finished saga's state is kept, and which states are past it.
//! - [`input`]: inputs decoded (start, reply, dead letter); [`rebalance`]: the consumer's
//!   rebalance callbacks.
//!
//! Orchestrated, not choreographed: one place knows the order of steps and what undoes each.
//! The steps themselves are ordinary pipelines (`http` steps with retry tiers and a DLQ): a
//! command that lands in its pipeline's DLQ fails its step; a compensation that lands there
//! makes the saga `stuck`, which is alerted on.
//!
//! State is kept in Kafka, not a database: a compacted topic keyed by order id, co-partitioned
//! with the inputs and written in the same transaction as the commands and the input offsets.
//! Limits: every topic the saga reads must have the same partition count (checked at start);
//! a replica holds in memory the states of the partitions it owns (about 2 KiB each): the
//! sagas in flight, and the finished ones for the retention window ([`retention`]), after which
//! they are tombstoned and evicted; a rebalance reloads each partition's states (those same
//! ones) before its next input.
//!
//! Membership is static: `group.instance.id` is the instance id (`ORDERFLOW_INSTANCE_ID`, the
//! pod name in the Kubernetes manifests), so an orchestrator restarted in place (a crash, an OOM
//! kill) takes its partitions back at once instead of after its predecessor's 10 s session. An
//! instance that leaves for good (scale-down, a rollout) holds its partitions for that session
//! before the others take them: for a saga whose steps time out after a minute, a short pause on
//! a planned change is the better trade than one on every crash.

pub mod batch;
pub mod commands;
pub mod commit;
pub mod definition;
pub mod input;
pub mod orchestrator;
pub mod rebalance;
pub mod retention;
pub mod state;
pub mod state_topic;

pub use commit::BatchStats;
pub use definition::{load_dir, Saga};
pub use orchestrator::Orchestrator;
pub use state::{SagaState, SagaStatus};
pub use state_topic::find_state;
