//! The retry gate: decides, from a record's role and its failure headers, whether it runs now,
//! waits a moment in its lane, pauses its partition until it is due, or goes to the dead-letter
//! topic because its headers cannot be trusted.
//!
//! Invariant: every number read from a header is checked against the pipeline before it sizes
//! a wait, picks a tier or names a partition. A tier outside the pipeline's tiers, a due time
//! beyond the tier's delay plus [`DUE_MARGIN`], a partition the input does not have or an absurd
//! attempt count is rejected, never obeyed. Pure: no clock, no Kafka; the engine acts on the
//! answer.

use std::time::Duration;

use crate::kafka::headers::FailureContext;

/// A partition paused for a retry record resumes this long before the record is due, so the
/// fetch already in flight (`fetch.wait.max.ms`) is not added to the record's lateness.
pub const RESUME_LEAD: Duration = Duration::from_millis(200);
/// A record due within this long waits in its lane instead of pausing its partition.
pub const HOLD_WITHIN: Duration = Duration::from_millis(300);
/// How far past its tier's delay a due time may lie (clock skew between writers).
pub const DUE_MARGIN: Duration = Duration::from_secs(60);
/// More failures than this for one record cannot come from this pipeline's tiers and replays.
pub const MAX_ATTEMPTS: u32 = 10_000;

/// What the gate knows of the pipeline.
#[derive(Debug, Clone)]
pub struct GateRules {
    /// Delay of each tier; tier n is `tiers[n - 1]`.
    pub tiers: Vec<Duration>,
}

/// Where a record came from, as far as the gate cares.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    Input,
    /// Retry topic of `tier` (1-based) for `input_topic`, which has `input_partitions`.
    Retry {
        tier: usize,
        input_topic: &'a str,
        input_partitions: i32,
    },
}

/// The gate's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Run now. `late_ms` is how long after its due time a retry record runs.
    Run {
        context: Option<FailureContext>,
        late_ms: Option<i64>,
    },
    /// Due within [`HOLD_WITHIN`]: wait in its lane, then run.
    Hold {
        context: FailureContext,
        wait: Duration,
    },
    /// Not due for a while: rewind to it and pause its partition, resuming after `resume_in`.
    Pause { resume_in: Duration },
    /// Its failure headers are missing, malformed or out of range: dead-letter it, saying why.
    Reject { reason: String },
}

/// Decides what to do with a record read at `now_ms` (ms since the epoch).
pub fn admit(
    source: Source<'_>,
    context: Option<FailureContext>,
    now_ms: i64,
    rules: &GateRules,
) -> Admission {
    let Source::Retry {
        tier,
        input_topic,
        input_partitions,
    } = source
    else {
        return Admission::Run {
            context: None,
            late_ms: None,
        };
    };
    let Some(context) = context else {
        return reject("missing or malformed orderflow.* failure headers".into());
    };
    if let Err(reason) = check(&context, tier, input_topic, input_partitions, now_ms, rules) {
        return reject(reason);
    }
    let Some(due) = context.due_ms else {
        return Admission::Run {
            context: Some(context),
            late_ms: None,
        };
    };
    let wait_ms = due.saturating_sub(now_ms);
    if wait_ms <= 0 {
        return Admission::Run {
            context: Some(context),
            late_ms: Some(-wait_ms),
        };
    }
    let wait = Duration::from_millis(wait_ms as u64);
    if wait <= HOLD_WITHIN {
        Admission::Hold { context, wait }
    } else {
        Admission::Pause {
            resume_in: wait - RESUME_LEAD,
        }
    }
}

fn reject(reason: String) -> Admission {
    Admission::Reject { reason }
}

fn check(
    c: &FailureContext,
    tier: usize,
    input_topic: &str,
    input_partitions: i32,
    now_ms: i64,
    rules: &GateRules,
) -> Result<(), String> {
    if c.tier != tier || tier == 0 || tier > rules.tiers.len() {
        return Err(format!(
            "retry tier {} on the topic of tier {tier} (the pipeline has {} tiers)",
            c.tier,
            rules.tiers.len()
        ));
    }
    if c.original_topic != input_topic {
        return Err(format!(
            "original topic {} is not this retry topic's input {input_topic}",
            c.original_topic
        ));
    }
    if c.original_partition < 0 || c.original_partition >= input_partitions {
        return Err(format!(
            "original partition {} does not exist ({input_topic} has {input_partitions})",
            c.original_partition
        ));
    }
    if c.original_offset < 0 {
        return Err(format!("original offset {} is negative", c.original_offset));
    }
    if c.attempt == 0 || c.attempt > MAX_ATTEMPTS {
        return Err(format!(
            "attempt {} is outside 1..={MAX_ATTEMPTS}",
            c.attempt
        ));
    }
    if let Some(due) = c.due_ms {
        let limit = rules.tiers[tier - 1] + DUE_MARGIN;
        if due.saturating_sub(now_ms) > limit.as_millis() as i64 {
            return Err(format!(
                "due time {due} is more than {limit:?} away (tier {tier} waits {:?})",
                rules.tiers[tier - 1]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn rules() -> GateRules {
        GateRules {
            tiers: vec![Duration::from_secs(1), Duration::from_secs(16)],
        }
    }

    fn context(tier: usize, due_in_ms: i64) -> FailureContext {
        FailureContext {
            attempt: tier as u32,
            original_topic: "in".into(),
            original_partition: 2,
            original_offset: 7,
            original_timestamp: Some(NOW - 5000),
            first_failure_ms: NOW - 4000,
            tier,
            due_ms: Some(NOW + due_in_ms),
        }
    }

    fn retry(tier: usize) -> Source<'static> {
        Source::Retry {
            tier,
            input_topic: "in",
            input_partitions: 3,
        }
    }

    #[test]
    fn inputs_run_at_once() {
        assert_eq!(
            admit(Source::Input, None, NOW, &rules()),
            Admission::Run {
                context: None,
                late_ms: None
            }
        );
    }

    #[test]
    fn a_retry_record_runs_when_due_waits_when_close_and_pauses_when_far() {
        let late = admit(retry(1), Some(context(1, -40)), NOW, &rules());
        assert!(matches!(
            late,
            Admission::Run {
                late_ms: Some(40),
                ..
            }
        ));
        let close = admit(retry(1), Some(context(1, 150)), NOW, &rules());
        assert!(
            matches!(close, Admission::Hold { wait, .. } if wait == Duration::from_millis(150))
        );
        let far = admit(retry(2), Some(context(2, 10_000)), NOW, &rules());
        assert_eq!(
            far,
            Admission::Pause {
                resume_in: Duration::from_millis(10_000) - RESUME_LEAD
            }
        );
    }

    #[test]
    fn untrusted_headers_are_rejected_not_obeyed() {
        let cases: Vec<(FailureContext, Source<'static>, &str)> = vec![
            (context(1, 100), retry(2), "tier"),
            (
                FailureContext {
                    tier: 4_000_000_000,
                    ..context(1, 100)
                },
                retry(1),
                "tier",
            ),
            (context(1, 61_000 + 1_000 + 1), retry(1), "due time"),
            (context(2, i64::MAX / 2), retry(2), "due time"),
            (
                FailureContext {
                    original_partition: 3,
                    ..context(1, 0)
                },
                retry(1),
                "partition",
            ),
            (
                FailureContext {
                    original_partition: -1,
                    ..context(1, 0)
                },
                retry(1),
                "partition",
            ),
            (
                FailureContext {
                    attempt: 0,
                    ..context(1, 0)
                },
                retry(1),
                "attempt",
            ),
            (
                FailureContext {
                    attempt: u32::MAX,
                    ..context(1, 0)
                },
                retry(1),
                "attempt",
            ),
            (
                FailureContext {
                    original_topic: "other".into(),
                    ..context(1, 0)
                },
                retry(1),
                "original topic",
            ),
        ];
        for (c, source, word) in cases {
            match admit(source, Some(c.clone()), NOW, &rules()) {
                Admission::Reject { reason } => assert!(reason.contains(word), "{reason} / {c:?}"),
                other => panic!("{c:?} was {other:?}"),
            }
        }
        assert!(matches!(
            admit(retry(1), None, NOW, &rules()),
            Admission::Reject { .. }
        ));
    }

    #[test]
    fn a_due_time_at_the_limit_is_accepted() {
        let at_limit = context(2, 16_000 + 60_000);
        assert!(matches!(
            admit(retry(2), Some(at_limit), NOW, &rules()),
            Admission::Pause { .. }
        ));
    }
}
