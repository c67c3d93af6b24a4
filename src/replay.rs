//! `fleetlog replay`: rebuild read models from the events table, or verify them against it.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetlog_projections::replay::{self, Difference, Progress};
use fleetlog_projections::{with_projection, Projection, PROJECTIONS};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

/// Replays (or verifies) each named projection in turn. Fails on the first error, or after
/// verifying when any model differs.
pub async fn run(
    pool: &PgPool,
    projections: Vec<String>,
    verify: bool,
    patience: Duration,
) -> anyhow::Result<()> {
    let mut differing = Vec::new();
    for name in &projections {
        let Some(result) = with_projection!(name.as_str(), |projection| {
            one(&projection, pool, verify, patience).await
        }) else {
            bail!(
                "unknown projection {name:?}: expected one of {}",
                PROJECTIONS.join(", ")
            );
        };
        let differences = result?;
        if !differences.is_empty() {
            differing.push(format!("{name} ({} rows)", differences.len()));
        }
    }
    if !differing.is_empty() {
        bail!(
            "the rebuilt model differs from the live one: {}",
            differing.join(", ")
        );
    }
    Ok(())
}

async fn one<P: Projection>(
    projection: &P,
    pool: &PgPool,
    verify: bool,
    patience: Duration,
) -> anyhow::Result<Vec<Difference>> {
    let reporter = Reporter::new(P::NAME);
    if verify {
        let differences = replay::verify(projection, pool, patience, |p| reporter.report(p))
            .await
            .with_context(|| format!("cannot verify {}", P::NAME))?;
        reporter.finish();
        for difference in &differences {
            println!(
                "{}: only in {}: {}",
                difference.table, difference.only_in, difference.row
            );
        }
        if differences.is_empty() {
            println!("{}: the live model equals the replay", P::NAME);
        }
        Ok(differences)
    } else {
        let applied = replay::replay(projection, pool, |p| reporter.report(p))
            .await
            .with_context(|| format!("cannot replay {}", P::NAME))?;
        reporter.finish();
        println!(
            "{}: replayed {applied} events and swapped the model in",
            P::NAME
        );
        Ok(Vec::new())
    }
}

/// A progress bar on a terminal; a log line every few seconds otherwise.
struct Reporter {
    name: &'static str,
    bar: Option<ProgressBar>,
    last_line: std::cell::Cell<Instant>,
}

impl Reporter {
    fn new(name: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0).with_prefix(name);
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix:>10} {bar:40} {pos}/{len} events  {per_sec}  eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            name,
            bar,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn report(&self, progress: Progress) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(progress.total);
                bar.set_position(progress.applied);
            }
            None if self.last_line.get().elapsed() >= Duration::from_secs(2) => {
                self.last_line.set(Instant::now());
                let remaining = progress.total.saturating_sub(progress.applied) as f64;
                tracing::info!(
                    projection = self.name,
                    applied = progress.applied,
                    total = progress.total,
                    events_per_second = progress.rate.round(),
                    eta_seconds = (remaining / progress.rate.max(1.0)).round(),
                    "replaying"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
