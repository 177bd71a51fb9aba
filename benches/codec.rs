//! Encode and decode throughput of one `order.created` event on a single thread, against the
//! running registry (the first call registers and fetches; after that both sides are cached).
//!
//!   eval "$(scripts/stack up)" && cargo bench --bench codec
//!
//! ORDERFLOW_BENCH_EVENTS (default 200000) events per round, ORDERFLOW_BENCH_ROUNDS (5) rounds;
//! prints each round and the median, and writes every round's rates as JSON to the file
//! ORDERFLOW_BENCH_JSON, else to stdout (`scripts/bench` puts them in BENCHMARKS.md).

mod common;

use common::env_or;
use std::sync::Arc;
use std::time::Instant;

use orderflow::contracts::{Catalog, EventCodec, OrderCreated};

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let events = env_or("ORDERFLOW_BENCH_EVENTS", 200_000);
    let rounds = env_or("ORDERFLOW_BENCH_ROUNDS", 5);
    let registry_url = std::env::var("ORDERFLOW_REGISTRY_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18081/apis/ccompat/v7".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let catalog = Arc::new(Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/avro")).unwrap());
    let codec = EventCodec::new(&registry_url, catalog).unwrap();
    let topic = format!("bench-codec-{}", uuid::Uuid::new_v4().simple());
    let order = OrderCreated::sample("orderflow/bench");

    let result = runtime.block_on(async {
        let payload = codec.encode(&topic, &order).await.expect("registry reachable");
        assert_eq!(codec.decode::<OrderCreated>(Some(&payload)).await.unwrap(), order);
        println!(
            "order.created: {} bytes on the wire ({} items), {events} events x {rounds} rounds, 1 thread",
            payload.len(),
            order.data.items.len()
        );
        let (mut encode_rates, mut decode_rates) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let started = Instant::now();
            let mut bytes = 0;
            for _ in 0..events {
                bytes += codec.encode(&topic, &order).await.unwrap().len();
            }
            let encode = events as f64 / started.elapsed().as_secs_f64();
            let started = Instant::now();
            for _ in 0..events {
                let decoded: OrderCreated = codec.decode(Some(&payload)).await.unwrap();
                std::hint::black_box(decoded);
            }
            let decode = events as f64 / started.elapsed().as_secs_f64();
            std::hint::black_box(bytes);
            println!("round {round}: encode {encode:>10.0} events/s   decode {decode:>10.0} events/s");
            encode_rates.push(encode);
            decode_rates.push(decode);
        }
        println!(
            "median:  encode {:>10.0} events/s   decode {:>10.0} events/s   (validate + Avro + Confluent framing)",
            median(encode_rates.clone()),
            median(decode_rates.clone())
        );
        serde_json::json!({
            "bytes": payload.len(),
            "events_per_round": events,
            "encode_per_second": encode_rates,
            "decode_per_second": decode_rates,
        })
    });
    common::write_result(&result);
}
