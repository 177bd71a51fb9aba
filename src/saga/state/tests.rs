//! Every path of a saga's state, without Kafka.

use std::path::Path;

use super::*;
use crate::pipeline;

fn order_saga() -> Saga {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let pipelines = pipeline::load_dir(&dir, &crate::steps::HANDLER_NAMES).unwrap();
    let mut sagas = super::super::load_dir(&dir.join("sagas"), &pipelines).unwrap();
    sagas.remove(0)
}

/// A reply of `event_type` to `command`, with `data`.
fn reply(command: &AnyEvent, event_type: &str, data: Value) -> AnyEvent {
    AnyEvent::from_data(event_type, data, "test", command.envelope()).unwrap()
}

struct Harness {
    saga: Saga,
    state: Option<SagaState>,
    now: i64,
    emitted: Vec<AnyEvent>,
    happenings: Vec<Happening>,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            saga: order_saga(),
            state: None,
            now: 1_000_000,
            emitted: Vec::new(),
            happenings: Vec::new(),
        }
    }

    fn apply(&mut self, input: Input<'_>) -> Result<Vec<AnyEvent>, &'static str> {
        match apply(&self.saga, self.state.as_ref(), input, self.now, "test") {
            Outcome::Changed(t) => {
                let version = self.state.as_ref().map_or(0, |s| s.version);
                assert_eq!(t.state.version, version + 1);
                self.state = Some(t.state);
                self.emitted.extend(t.emit.clone());
                self.happenings.extend(t.happenings);
                Ok(t.emit)
            }
            Outcome::Ignored(why) => Err(why),
        }
    }

    fn state(&self) -> &SagaState {
        self.state.as_ref().unwrap()
    }

    fn types(events: &[AnyEvent]) -> Vec<&'static str> {
        events.iter().map(AnyEvent::event_type).collect()
    }

    fn start(&mut self) -> AnyEvent {
        let order = OrderCreated::sample("test");
        let out = self.apply(Input::Started(&order)).unwrap();
        assert_eq!(Harness::types(&out), ["inventory.reservation-requested"]);
        out[0].clone()
    }

    fn reserved(&mut self, command: &AnyEvent) -> AnyEvent {
        let AnyEvent::InventoryReservationRequested(c) = command else {
            panic!("{command:?}")
        };
        let data = serde_json::json!({
            "order_id": c.data.order_id.to_string(),
            "reservation_id": Uuid::now_v7().to_string(),
            "lines": c.data.lines,
        });
        reply(command, "inventory.reserved", data)
    }

    fn charged(&mut self, command: &AnyEvent) -> AnyEvent {
        let AnyEvent::PaymentChargeRequested(c) = command else {
            panic!("{command:?}")
        };
        let data = serde_json::json!({
            "order_id": c.data.order_id.to_string(),
            "payment_id": Uuid::now_v7().to_string(),
            "amount": c.data.amount,
        });
        reply(command, "payment.charged", data)
    }
}

fn order_id(e: &AnyEvent) -> String {
    e.key()
}

#[test]
fn every_step_succeeding_confirms_the_order() {
    let mut h = Harness::new();
    let reserve = h.start();
    let reserved = h.reserved(&reserve);
    let charge = h.apply(Input::Reply(&reserved)).unwrap();
    assert_eq!(Harness::types(&charge), ["payment.charge-requested"]);
    // The same reply again changes nothing.
    assert_eq!(h.apply(Input::Reply(&reserved)).unwrap_err(), "duplicate");
    let charged = h.charged(&charge[0]);
    let ship = h.apply(Input::Reply(&charged)).unwrap();
    assert_eq!(Harness::types(&ship), ["shipment.scheduling-requested"]);
    let scheduled = reply(
        &ship[0],
        "shipment.scheduled",
        serde_json::json!({"order_id": order_id(&ship[0]), "shipment_id": Uuid::now_v7().to_string(), "carrier": "dhl"}),
    );
    let end = h.apply(Input::Reply(&scheduled)).unwrap();
    assert_eq!(Harness::types(&end), ["order.confirmed"]);
    assert_eq!(h.state().status, SagaStatus::Confirmed);
    assert_eq!(h.state().version, 4);
    assert_eq!(end[0].envelope().correlation_id, h.state().correlation_id);
    assert_eq!(
        end[0].envelope().causation_id,
        Some(scheduled.envelope().event_id)
    );
    assert_eq!(h.apply(Input::Reply(&scheduled)).unwrap_err(), "duplicate");
    assert_eq!(h.apply(Input::Tick).unwrap_err(), "unrelated");
}

#[test]
fn a_declined_payment_releases_the_stock_and_cancels() {
    let mut h = Harness::new();
    let reserve = h.start();
    let reserved = h.reserved(&reserve);
    let charge = h.apply(Input::Reply(&reserved)).unwrap();
    let AnyEvent::PaymentChargeRequested(c) = &charge[0] else {
        panic!()
    };
    let declined = reply(
        &charge[0],
        "payment.failed",
        serde_json::json!({"order_id": c.data.order_id.to_string(), "amount": c.data.amount, "reason": "card declined"}),
    );
    let release = h.apply(Input::Reply(&declined)).unwrap();
    assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
    let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
        panic!()
    };
    assert_eq!(
        serde_json::json!(r.data.reservation_id.to_string()),
        h.state().steps[0].reply.as_ref().unwrap()["reservation_id"]
    );
    assert_eq!(h.state().status, SagaStatus::Compensating);
    let released = reply(
        &release[0],
        "inventory.released",
        serde_json::to_value(&r.data).unwrap(),
    );
    let end = h.apply(Input::Reply(&released)).unwrap();
    assert_eq!(Harness::types(&end), ["order.cancelled"]);
    let AnyEvent::OrderCancelled(cancelled) = &end[0] else {
        panic!()
    };
    assert_eq!(cancelled.data.reason, "charge-payment: card declined");
    assert_eq!(h.state().status, SagaStatus::Cancelled);
    assert_eq!(h.state().steps[1].status, StepStatus::Failed);
    assert_eq!(h.state().steps[0].status, StepStatus::Compensated);
}

#[test]
fn a_failed_shipment_refunds_then_releases() {
    let mut h = Harness::new();
    let reserve = h.start();
    let reserved = h.reserved(&reserve);
    let charge = h.apply(Input::Reply(&reserved)).unwrap();
    let charged = h.charged(&charge[0]);
    let ship = h.apply(Input::Reply(&charged)).unwrap();
    let failed = reply(
        &ship[0],
        "shipment.scheduling-failed",
        serde_json::json!({"order_id": order_id(&ship[0]), "reason": "no carrier"}),
    );
    // Newest first: the refund, and only once it is done, the release.
    let refund = h.apply(Input::Reply(&failed)).unwrap();
    assert_eq!(Harness::types(&refund), ["payment.refund-requested"]);
    let AnyEvent::PaymentRefundRequested(r) = &refund[0] else {
        panic!()
    };
    let refunded = reply(
        &refund[0],
        "payment.refunded",
        serde_json::to_value(&r.data).unwrap(),
    );
    let release = h.apply(Input::Reply(&refunded)).unwrap();
    assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
    assert_eq!(h.apply(Input::Reply(&refunded)).unwrap_err(), "duplicate");
    let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
        panic!()
    };
    let released = reply(
        &release[0],
        "inventory.released",
        serde_json::to_value(&r.data).unwrap(),
    );
    let end = h.apply(Input::Reply(&released)).unwrap();
    assert_eq!(Harness::types(&end), ["order.cancelled"]);
    let compensated: Vec<&Happening> = h
        .happenings
        .iter()
        .filter(|h| matches!(h, Happening::Compensated { .. }))
        .collect();
    assert_eq!(
        compensated,
        [
            &Happening::Compensated {
                step: "charge-payment".into()
            },
            &Happening::Compensated {
                step: "reserve-inventory".into()
            },
        ]
    );
}

#[test]
fn a_step_without_reply_times_out_and_a_late_success_is_undone() {
    let mut h = Harness::new();
    let reserve = h.start();
    let reserved = h.reserved(&reserve);
    let charge = h.apply(Input::Reply(&reserved)).unwrap();
    h.now += 59_000;
    assert_eq!(h.apply(Input::Tick).unwrap_err(), "unrelated");
    h.now += 1_000;
    let release = h.apply(Input::Tick).unwrap();
    assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
    assert!(h.happenings.iter().any(|x| matches!(
        x,
        Happening::StepFailed {
            why: FailedBy::TimedOut,
            ..
        }
    )));
    let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
        panic!()
    };
    let released = reply(
        &release[0],
        "inventory.released",
        serde_json::to_value(&r.data).unwrap(),
    );
    let end = h.apply(Input::Reply(&released)).unwrap();
    assert_eq!(Harness::types(&end), ["order.cancelled"]);
    // The payment service answers after all: the charge is refunded, the order stays
    // cancelled.
    let charged = h.charged(&charge[0]);
    let refund = h.apply(Input::Reply(&charged)).unwrap();
    assert_eq!(Harness::types(&refund), ["payment.refund-requested"]);
    assert_eq!(h.state().status, SagaStatus::Cancelled);
    let AnyEvent::PaymentRefundRequested(r) = &refund[0] else {
        panic!()
    };
    let refunded = reply(
        &refund[0],
        "payment.refunded",
        serde_json::to_value(&r.data).unwrap(),
    );
    assert!(h.apply(Input::Reply(&refunded)).unwrap().is_empty());
    assert_eq!(h.state().steps[1].status, StepStatus::Compensated);
    assert_eq!(h.state().status, SagaStatus::Cancelled);
}

#[test]
fn a_dead_lettered_compensation_makes_the_saga_stuck_until_its_reply_comes() {
    let mut h = Harness::new();
    let reserve = h.start();
    let reserved = h.reserved(&reserve);
    let charge = h.apply(Input::Reply(&reserved)).unwrap();
    // The charge command exhausted its retries.
    let release = h
        .apply(Input::DeadLettered {
            command: &charge[0],
            error: "http 500".into(),
        })
        .unwrap();
    assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
    assert!(h
        .state()
        .reason
        .as_deref()
        .unwrap()
        .contains("retries exhausted: http 500"));
    // So did the release.
    let nothing = h
        .apply(Input::DeadLettered {
            command: &release[0],
            error: "http 500".into(),
        })
        .unwrap();
    assert!(nothing.is_empty());
    assert_eq!(h.state().status, SagaStatus::Stuck);
    // Its replay succeeded: the saga resumes and cancels.
    let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
        panic!()
    };
    let released = reply(
        &release[0],
        "inventory.released",
        serde_json::to_value(&r.data).unwrap(),
    );
    let end = h.apply(Input::Reply(&released)).unwrap();
    assert_eq!(Harness::types(&end), ["order.cancelled"]);
    assert!(h.happenings.contains(&Happening::Resumed));
}

#[test]
fn unrelated_and_repeated_inputs_are_ignored() {
    let mut h = Harness::new();
    let order = OrderCreated::sample("test");
    h.apply(Input::Started(&order)).unwrap();
    assert_eq!(h.apply(Input::Started(&order)).unwrap_err(), "duplicate");
    // A reply to a command this saga never sent.
    let other = OrderCreated::sample("test");
    let stray = reply(
        &AnyEvent::OrderCreated(other),
        "payment.failed",
        serde_json::json!({"order_id": order.data.order_id.to_string(), "amount": order.data.total, "reason": "x"}),
    );
    assert_eq!(h.apply(Input::Reply(&stray)).unwrap_err(), "late");
    assert_eq!(h.state().version, 1);
    // No saga at all for a reply.
    let mut fresh = Harness::new();
    assert_eq!(fresh.apply(Input::Reply(&stray)).unwrap_err(), NO_SAGA);
}
