//! The pipeline files' validation, without Kafka: every problem reported with its field, and
//! the shipped pipelines valid.

use super::*;

fn parse_str(text: &str) -> Result<Pipeline, Vec<Problem>> {
    parse(Path::new("pipelines/x.yaml"), text, &["order-metrics"])
}

#[test]
fn the_shipped_pipelines_are_valid() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"));
    let pipelines = load_dir(dir, &crate::steps::HANDLER_NAMES).unwrap();
    let names: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
    for expected in ["analytics", "inventory", "notification", "payment"] {
        assert!(names.contains(&expected), "{names:?}");
    }
}

#[test]
fn every_problem_is_reported_with_its_field() {
    let problems = parse_str(
        r#"
name: Pay Ment
group: payment
inputs: [order.created, order.placed, order.created]
step:
  http:
    url: "ftp://x"
    timeout: 0s
    emit: {"2xx": payment.done, "abc": payment.failed}
retry:
  tiers: [1s, 2h]
classify: {"999": permanent, "409": fatal}
"#,
    )
    .unwrap_err();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "name",
            "inputs[1]",
            "inputs[2]",
            "step.http.url",
            "step.http.timeout",
            "step.http.emit.2xx",
            "step.http.emit.abc",
            "retry.tiers[1]",
            "classify.409",
            "classify.999",
        ],
        "{problems:#?}"
    );
    let text = problems[1].to_string();
    assert!(
        text.starts_with(
            "pipelines/x.yaml (pipeline Pay Ment): inputs[1]: 'order.placed' is not an event type"
        ),
        "{text}"
    );
}

#[test]
fn unknown_keys_are_refused() {
    let problems = parse_str(
        "name: a\ngroup: a\ninputs: [order.created]\nstep: {route: {to: [x]}}\nretires: {}\n",
    )
    .unwrap_err();
    assert!(
        problems[0].message.contains("unknown field `retires`"),
        "{problems:?}"
    );
    let problems =
        parse_str("name: a\ngroup: a\ninputs: [order.created]\nstep: {route: {to: [x], via: y}}\n")
            .unwrap_err();
    assert!(
        problems[0].message.contains("unknown field `via`"),
        "{problems:?}"
    );
}

#[test]
fn defaults_and_topic_names() {
    let p = parse_str("name: pay\ngroup: payment\ninputs: [order.created]\nstep: {custom: {handler: order-metrics}}\n").unwrap();
    assert_eq!(p.retry.tiers, [1, 2, 4, 8, 16].map(Duration::from_secs));
    assert_eq!(p.retry.transient_attempts, 3);
    let naming = Naming {
        topic_prefix: "stage.".into(),
        ..Naming::default()
    };
    assert_eq!(p.group_id(&naming), "stage.payment");
    let input = &p.input_topics(&naming)[0];
    assert_eq!(input, "stage.order.created");
    assert_eq!(
        p.retry_topic(input, 3),
        "stage.order.created.payment.retry.3"
    );
    assert_eq!(p.dlq_topic(input), "stage.order.created.payment.dlq");
}

#[test]
fn http_answers_match_exact_statuses_before_classes() {
    let p = parse_str(
            "name: pay\ngroup: payment\ninputs: [order.created]\nstep:\n  http:\n    url: http://x/pay\n    emit: {\"2xx\": payment.charged, \"202\": payment.failed}\n",
        )
        .unwrap();
    let Step::Http(http) = &p.step else { panic!() };
    assert_eq!(http.emits(202), Some("payment.failed"));
    assert_eq!(http.emits(201), Some("payment.charged"));
    assert_eq!(http.emits(500), None);
    assert_eq!(http.timeout, Duration::from_secs(2));
}

#[test]
fn exactly_once_is_for_kafka_only_steps() {
    let route = "name: a\ngroup: a\ninputs: [order.created]\nstep: {route: {to: [x]}}\ndelivery: exactly-once\n";
    assert_eq!(parse_str(route).unwrap().delivery, Delivery::ExactlyOnce);
    let http = "name: a\ngroup: a\ninputs: [order.created]\nstep: {http: {url: \"http://x\", emit: {\"2xx\": payment.charged}}}\ndelivery: exactly-once\n";
    let problems = parse_str(http).unwrap_err();
    assert_eq!(problems[0].field, "delivery", "{problems:?}");
    let bogus =
        "name: a\ngroup: a\ninputs: [order.created]\nstep: {route: {to: [x]}}\ndelivery: twice\n";
    assert!(parse_str(bogus).unwrap_err()[0]
        .message
        .contains("unknown variant `twice`"));
}

#[test]
fn a_pipelines_dedup_window_is_bounded_and_never_longer_than_the_global_one() {
    let base = "name: a\ngroup: a\ninputs: [order.created]\nstep: {route: {to: [x]}}\n";
    assert_eq!(parse_str(base).unwrap().dedup_retention, None);
    let p = parse_str(&format!("{base}dedup_retention: 2d\n")).unwrap();
    assert_eq!(p.dedup_retention, Some(Duration::from_secs(2 * 86_400)));
    for bad in ["30s", "400d", "soon"] {
        let problems = parse_str(&format!("{base}dedup_retention: {bad}\n")).unwrap_err();
        assert_eq!(problems[0].field, "dedup_retention", "{problems:?}");
        assert!(problems[0].to_string().contains(bad), "{problems:?}");
    }
    let week = Duration::from_secs(7 * 86_400);
    assert!(
        check_dedup_windows(std::slice::from_ref(&p), "ORDERFLOW_DEDUP_RETENTION", week).is_ok()
    );
    let e = check_dedup_windows(
        &[p],
        "ORDERFLOW_DEDUP_RETENTION",
        Duration::from_secs(86_400),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "(pipeline a): dedup_retention: 2days is longer than ORDERFLOW_DEDUP_RETENTION=1day"
        ),
        "{e}"
    );
}

#[test]
fn env_is_substituted_in_urls() {
    std::env::set_var("ORDERFLOW_TEST_PAY_URL", "http://pay:1");
    assert_eq!(
        substitute_env("${ORDERFLOW_TEST_PAY_URL}/x"),
        "http://pay:1/x"
    );
    assert_eq!(
        substitute_env("${ORDERFLOW_TEST_UNSET:-http://d}/x"),
        "http://d/x"
    );
}
