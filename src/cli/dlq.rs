//! `orderflow dlq list|show|replay|discard`: dead letters printed one a line or in full, and
//! replayed or discarded with a progress bar. Reading and acting on them is [`crate::dlq`].

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use rdkafka::message::Headers;
use rdkafka::Message;

use super::{select_pipelines, PipelinesDir};
use crate::app::{self, load_pipelines, Connect};
use crate::dlq;
use crate::kafka::headers;
use crate::pipeline::Pipeline;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead letters not yet replayed or discarded, one line each.
    List {
        #[command(flatten)]
        select: DlqSelect,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter: every header and the decoded event.
    Show {
        /// `<dlq topic>:<partition>:<offset>`, as `dlq list` prints it.
        position: String,
    },
    /// Write the selected dead letters back, keeping their event ids, and record it.
    Replay {
        #[command(flatten)]
        select: DlqSelect,
        /// retry: the group's first retry tier, history kept (only the failed consumer sees it);
        /// original: the original topic (every consumer reads it again).
        #[arg(long, default_value = "retry", value_parser = ["retry", "original"])]
        to: String,
        /// Records per second.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// Say what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Mark the selected dead letters as handled without replaying them.
    Discard {
        #[command(flatten)]
        select: DlqSelect,
        /// Why; recorded in the audit topic.
        #[arg(long)]
        reason: String,
        /// Say what would be discarded, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters: every filter narrows the selection.
#[derive(Debug, Clone, Args)]
pub struct DlqSelect {
    /// Pipelines (by name); default: all.
    #[arg(long = "pipeline")]
    pub pipelines: Vec<String>,
    /// transient, service or permanent.
    #[arg(long, value_parser = ["transient", "service", "permanent"])]
    pub class: Option<String>,
    /// Event type, e.g. order.created.
    #[arg(long)]
    pub event_type: Option<String>,
    /// Dead-lettered at or after: an RFC 3339 time or an age such as 2h.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// Dead-lettered at or before: an RFC 3339 time or an age such as 30m.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Only this partition of the dead-letter topic.
    #[arg(long)]
    pub partition: Option<i32>,
    /// First offset (inclusive).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Last offset (inclusive).
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// Include dead letters already replayed or discarded (list only).
    #[arg(long)]
    pub all: bool,
}

impl DlqSelect {
    fn filter(&self) -> dlq::Filter {
        dlq::Filter {
            error_class: self.class.clone(),
            event_type: self.event_type.clone(),
            since_ms: self.since,
            until_ms: self.until,
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            include_handled: self.all,
        }
    }
}

/// An RFC 3339 time, or an age before now (`2h`), as ms since the epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_millis() as i64);
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(crate::contracts::events::now_millis() - age.as_millis() as i64),
        Err(_) => Err(format!(
            "'{text}' is neither an RFC 3339 time nor an age such as 2h"
        )),
    }
}

pub(super) async fn dead_letters(
    connect: &Connect,
    dir: &PipelinesDir,
    cmd: DlqCommand,
) -> anyhow::Result<()> {
    let naming = connect.naming();
    let bootstrap = connect.bootstrap_servers.clone();
    let read = |pipelines: Vec<Pipeline>, filter: dlq::Filter| {
        let (bootstrap, naming) = (bootstrap.clone(), naming.clone());
        tokio::task::spawn_blocking(move || {
            dlq::read(&bootstrap, &naming, &pipelines, &filter).map(|letters| (pipelines, letters))
        })
    };
    // Replay and discard act on the selected dead letters not yet handled.
    let pending = |select: DlqSelect| {
        let chosen = select_pipelines(dir, &select.pipelines);
        let filter = dlq::Filter {
            include_handled: false,
            ..select.filter()
        };
        async move { read(chosen?, filter).await? }
    };
    match cmd {
        DlqCommand::List { select, limit } => {
            let pipelines = select_pipelines(dir, &select.pipelines)?;
            let (_, letters) = read(pipelines, select.filter()).await??;
            println!(
                "{:<44} {:<24} {:<16} {:<9} {:<16} {:>7}  MESSAGE",
                "DEAD LETTER", "TIME", "EVENT TYPE", "CLASS", "KIND", "ATTEMPT"
            );
            for l in letters.iter().take(limit) {
                let time = l
                    .record
                    .timestamp()
                    .to_millis()
                    .map(|ms| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(ms as u64),
                        )
                        .to_string()
                    })
                    .unwrap_or_default();
                let mut message = l.header(headers::ERROR_MESSAGE).unwrap_or_default();
                message.truncate(
                    message
                        .char_indices()
                        .nth(70)
                        .map_or(message.len(), |(i, _)| i),
                );
                println!(
                    "{:<44} {time:<24} {:<16} {:<9} {:<16} {:>7}  {}{message}",
                    l.position(),
                    l.header("ce_type").unwrap_or_else(|| "?".into()),
                    l.header(headers::ERROR_CLASS).unwrap_or_else(|| "?".into()),
                    l.header(headers::ERROR_KIND).unwrap_or_else(|| "?".into()),
                    l.header(headers::ATTEMPT).unwrap_or_else(|| "?".into()),
                    if l.handled { "(handled) " } else { "" },
                );
            }
            eprintln!(
                "{} dead letter(s){}",
                letters.len(),
                if letters.len() > limit {
                    format!(", {limit} shown")
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        DlqCommand::Show { position } => {
            let (topic, partition, offset) = parse_position(&position)?;
            let pipelines = load_pipelines(&dir.pipelines_dir)?;
            let owner: Vec<Pipeline> = pipelines
                .into_iter()
                .filter(|p| {
                    p.input_topics(&naming)
                        .iter()
                        .any(|i| p.dlq_topic(i) == topic)
                })
                .collect();
            if owner.is_empty() {
                bail!(
                    "{topic} is not the dead-letter topic of any pipeline in {}",
                    dir.pipelines_dir.display()
                );
            }
            let filter = dlq::Filter {
                partition: Some(partition),
                from_offset: Some(offset),
                to_offset: Some(offset),
                include_handled: true,
                ..Default::default()
            };
            let (_, letters) = read(owner, filter).await??;
            let Some(letter) = letters.iter().find(|l| l.record.topic() == topic) else {
                bail!("no record at {position}");
            };
            println!(
                "dead letter {position}{}",
                if letter.handled {
                    " (already replayed or discarded)"
                } else {
                    ""
                }
            );
            println!(
                "key: {}",
                letter
                    .record
                    .key()
                    .map(|k| String::from_utf8_lossy(k).to_string())
                    .unwrap_or_else(|| "(none)".into())
            );
            if let Some(h) = letter.record.headers() {
                for h in h.iter() {
                    println!(
                        "header {}: {}",
                        h.key,
                        h.value
                            .map(|v| String::from_utf8_lossy(v).to_string())
                            .unwrap_or_default()
                    );
                }
            }
            let codec = app::codec(connect)?;
            match codec.decode_value(letter.record.payload()).await {
                Ok((name, value)) => {
                    let json: serde_json::Value =
                        value.try_into().unwrap_or(serde_json::Value::Null);
                    println!("event ({name}):\n{}", serde_json::to_string_pretty(&json)?);
                }
                Err(e) => println!("event: cannot be decoded ({}): {e}", e.kind()),
            }
            Ok(())
        }
        DlqCommand::Replay {
            select,
            to,
            rate,
            dry_run,
        } => {
            let (pipelines, letters) = pending(select).await?;
            let to = if to == "original" {
                dlq::ReplayTo::Original
            } else {
                dlq::ReplayTo::Retry
            };
            act(
                &bootstrap,
                &pipelines,
                &letters,
                dlq::Action::Replay(to),
                rate,
                dry_run,
                "replay",
            )
            .await
        }
        DlqCommand::Discard {
            select,
            reason,
            dry_run,
        } => {
            let (pipelines, letters) = pending(select).await?;
            act(
                &bootstrap,
                &pipelines,
                &letters,
                dlq::Action::Discard(&reason),
                1000,
                dry_run,
                "discard",
            )
            .await
        }
    }
}

fn parse_position(text: &str) -> anyhow::Result<(String, i32, i64)> {
    let mut parts = text.rsplitn(3, ':');
    let offset = parts.next().and_then(|o| o.parse().ok());
    let partition = parts.next().and_then(|p| p.parse().ok());
    let topic = parts.next();
    match (topic, partition, offset) {
        (Some(t), Some(p), Some(o)) => Ok((t.to_string(), p, o)),
        _ => bail!(
            "'{text}' is not <dlq topic>:<partition>:<offset>, e.g. order.created.payment.dlq:0:42"
        ),
    }
}

async fn act(
    bootstrap: &str,
    pipelines: &[Pipeline],
    letters: &[dlq::DeadLetter],
    action: dlq::Action<'_>,
    rate: u32,
    dry_run: bool,
    verb: &str,
) -> anyhow::Result<()> {
    if dry_run || letters.is_empty() {
        for l in letters {
            println!(
                "would {verb} {} ({})",
                l.position(),
                l.header("ce_id").unwrap_or_default()
            );
        }
        println!(
            "{} dead letter(s) to {verb}{}",
            letters.len(),
            if dry_run {
                " (dry run: nothing changed)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let done = dlq::handle(
        bootstrap,
        pipelines,
        letters,
        action,
        rate,
        |done, total| {
            if tty {
                let filled = done * 30 / total.max(1);
                eprint!(
                    "\r[{}{}] {done}/{total}",
                    "#".repeat(filled),
                    ".".repeat(30 - filled)
                );
            } else if done == total || done % 100 == 0 {
                eprintln!("{done}/{total}");
            }
        },
    )
    .await?;
    if tty {
        eprintln!();
    }
    println!("{verb}ed {} dead letter(s)", done.count);
    Ok(())
}
