//! `orderflow schemas register|check|deploy|list`: the event schemas of `avro/` against the
//! registry, printed one subject a line; a breaking change fails naming the field and rule.

use anyhow::bail;
use clap::Subcommand;

use crate::app::{self, Connect};
use crate::contracts::compatibility;
use crate::contracts::subjects::COMPATIBILITY_LEVELS;
use crate::contracts::{RegistryClient, RegistryError};

#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Register every event schema under its topic's value subject (`<event-type>-value`).
    /// Idempotent: an unchanged schema keeps its id and version.
    Register {
        /// Show what would be registered without changing the registry.
        #[arg(long)]
        dry_run: bool,
        /// Compatibility level set on every subject before registering.
        #[arg(long, env = "ORDERFLOW_COMPATIBILITY", default_value = "BACKWARD_TRANSITIVE",
            value_parser = clap::builder::PossibleValuesParser::new(COMPATIBILITY_LEVELS))]
        compatibility: String,
    },
    /// Ask the registry whether every local schema may become its subject's next version.
    /// Exits non-zero naming the subject, field and rule of each breaking change, so CI can
    /// block a deploy.
    Check,
    /// `check`, then `register` when every schema passes: the pre-deploy step in one command
    /// (the runtime image has no shell to chain two).
    Deploy {
        /// Compatibility level set on every subject before registering.
        #[arg(long, env = "ORDERFLOW_COMPATIBILITY", default_value = "BACKWARD_TRANSITIVE",
            value_parser = clap::builder::PossibleValuesParser::new(COMPATIBILITY_LEVELS))]
        compatibility: String,
    },
    /// List the registry's subjects with their latest id and version.
    List,
}

fn subject_width(subjects: &[String]) -> usize {
    subjects
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("SUBJECT".len())
}

pub(super) async fn schemas(connect: &Connect, cmd: SchemasCommand) -> anyhow::Result<()> {
    let registry = RegistryClient::new(&connect.registry_url);
    let naming = connect.naming();
    match cmd {
        SchemasCommand::Register {
            dry_run,
            compatibility,
        } => {
            let catalog = app::load_catalog(connect)?;
            let subjects: Vec<String> = catalog.events.iter().map(|e| naming.subject(e)).collect();
            let w = subject_width(&subjects);
            println!("{:<w$} {:>6} {:>8}  STATUS", "SUBJECT", "ID", "VERSION");
            let mut refused = 0;
            for (event, subject) in catalog.events.iter().zip(subjects) {
                let existing = registry.lookup(&subject, &event.expanded).await?;
                if !dry_run {
                    registry.set_compatibility(&subject, &compatibility).await?;
                }
                let (registered, status) = match (existing, dry_run) {
                    (Some(found), _) => (Some(found), "unchanged".to_string()),
                    (None, true) => (None, "would register".to_string()),
                    (None, false) => match registry.register(&subject, &event.expanded).await {
                        Ok(r) => (Some(r), "registered".to_string()),
                        Err(RegistryError::Refused {
                            status: 409,
                            message,
                            ..
                        }) => {
                            refused += 1;
                            (
                                None,
                                format!("REFUSED ({}): {message}", event.file.display()),
                            )
                        }
                        Err(e) => return Err(e.into()),
                    },
                };
                let (id, version) = registered
                    .map(|r| (r.id.to_string(), r.version.to_string()))
                    .unwrap_or(("-".into(), "-".into()));
                println!("{subject:<w$} {id:>6} {version:>8}  {status}");
            }
            if refused > 0 {
                bail!("the registry refused {refused} schema(s); `orderflow schemas check` names the fields");
            }
            Ok(())
        }
        SchemasCommand::Deploy { compatibility } => {
            Box::pin(schemas(connect, SchemasCommand::Check)).await?;
            let register = SchemasCommand::Register {
                dry_run: false,
                compatibility,
            };
            Box::pin(schemas(connect, register)).await
        }
        SchemasCommand::Check => {
            let catalog = app::load_catalog(connect)?;
            let subjects: Vec<String> = catalog.events.iter().map(|e| naming.subject(e)).collect();
            let w = subject_width(&subjects);
            println!("{:<w$}  RESULT", "SUBJECT");
            let mut incompatible = 0;
            for (event, subject) in catalog.events.iter().zip(subjects) {
                if let Some(found) = registry.lookup(&subject, &event.expanded).await? {
                    println!("{subject:<w$}  unchanged (version {})", found.version);
                    continue;
                }
                match registry.is_compatible(&subject, &event.expanded).await? {
                    None => println!("{subject:<w$}  new subject"),
                    Some(true) => println!("{subject:<w$}  compatible"),
                    Some(false) => {
                        incompatible += 1;
                        let rule = registry.compatibility(&subject).await?;
                        println!(
                            "{subject:<w$}  INCOMPATIBLE under {rule} ({})",
                            event.file.display()
                        );
                        let mut versions = Vec::new();
                        for v in registry.versions(&subject).await? {
                            if let Some(text) = registry.version_schema(&subject, v).await? {
                                versions.push((v, apache_avro::Schema::parse_str(&text)?));
                            }
                        }
                        let breaches = compatibility::explain(&rule, &event.schema, &versions);
                        if breaches.is_empty() {
                            println!("  {subject}: the registry refuses it under {rule}");
                        }
                        for breach in breaches {
                            println!("  {subject}: {breach}");
                        }
                    }
                }
            }
            if incompatible > 0 {
                bail!(
                    "{incompatible} schema(s) in {} would break their subject's compatibility rule",
                    catalog.dir.display()
                );
            }
            Ok(())
        }
        SchemasCommand::List => {
            let subjects = registry.subjects().await?;
            let w = subject_width(&subjects);
            println!(
                "{:<w$} {:>6} {:>8}  COMPATIBILITY",
                "SUBJECT", "ID", "VERSION"
            );
            for subject in subjects {
                let level = registry.compatibility(&subject).await?;
                match registry.latest(&subject).await? {
                    Some(latest) => println!(
                        "{subject:<w$} {:>6} {:>8}  {level}",
                        latest.id, latest.version
                    ),
                    None => println!("{subject:<w$} {:>6} {:>8}  {level}", "-", "-"),
                }
            }
            Ok(())
        }
    }
}
