//! `orderflow orders publish|consume`: sample `order.created` events written and read back,
//! one line each.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use rdkafka::consumer::Consumer;
use rdkafka::Message;

use crate::app::{self, Connect};
use crate::contracts::OrderCreated;
use crate::kafka::{self, Publisher};

#[derive(Debug, Subcommand)]
pub enum OrdersCommand {
    /// Publish sample `order.created` events (acks=all) and print where each landed.
    Publish {
        /// How many orders to publish.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Topic to publish to (default: the event type, with the topic prefix).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Consume `order.created` events, decode them by schema id and print one JSON line each.
    Consume {
        /// Topic to read (default: the event type, with the topic prefix).
        #[arg(long)]
        topic: Option<String>,
        /// Consumer group; offsets are committed for it.
        #[arg(long, default_value = "orderflow-cli")]
        group: String,
        /// Stop after this many events.
        #[arg(long, default_value_t = 10)]
        max: u32,
        /// Stop when no event arrives for this long (e.g. 10s, 1m).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
    },
}

pub(super) async fn orders(connect: &Connect, cmd: OrdersCommand) -> anyhow::Result<()> {
    let codec = app::codec(connect)?;
    match cmd {
        OrdersCommand::Publish { count, topic } => {
            let topic = topic.unwrap_or_else(|| connect.naming().topic("order.created"));
            let publisher = Publisher::new(&connect.bootstrap_servers, codec)?;
            let started = Instant::now();
            for _ in 0..count {
                let order = OrderCreated::sample("orderflow/cli");
                let at = publisher.publish(&topic, &order).await?;
                println!(
                    "published order.created {} order {} total {} {} -> {topic}[{}]@{}",
                    order.envelope.event_id,
                    order.data.order_id,
                    order.data.total.amount_minor,
                    order.data.total.currency,
                    at.partition,
                    at.offset
                );
            }
            eprintln!(
                "{count} orders published to {topic} in {:.2?}",
                started.elapsed()
            );
            Ok(())
        }
        OrdersCommand::Consume {
            topic,
            group,
            max,
            idle_timeout,
        } => {
            let topic = topic.unwrap_or_else(|| connect.naming().topic("order.created"));
            let consumer = kafka::consumer(&connect.bootstrap_servers, &group)?;
            consumer.subscribe(&[&topic])?;
            let mut seen = 0;
            while seen < max {
                let message = match tokio::time::timeout(idle_timeout, consumer.recv()).await {
                    Ok(message) => message?,
                    Err(_) => bail!(
                        "no event on {topic} for {} after {seen} of {max}",
                        humantime::format_duration(idle_timeout)
                    ),
                };
                let order: OrderCreated =
                    codec.decode(message.payload()).await.with_context(|| {
                        format!(
                            "record {}[{}]@{}",
                            message.topic(),
                            message.partition(),
                            message.offset()
                        )
                    })?;
                println!("{}", serde_json::to_string(&order)?);
                consumer.store_offset_from_message(&message)?;
                seen += 1;
            }
            consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)?;
            eprintln!("{seen} orders read from {topic}");
            Ok(())
        }
    }
}
