//! `fleetlog replay`: rebuild read models from the events table, or verify them against it.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetlog_projections::replay::{
    self, Difference, Pages, PassedOver, Progress, Replayed, Verified,
};
use fleetlog_projections::{with_projection, Projection, PROJECTIONS};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sqlx::PgPool;

/// Replays (or verifies) the named projections, all at once: each rebuilds from the events
/// table on connections of its own, so the rebuilds of several models share the machine's
/// cores (and the swaps, which lock the projections' positions, take turns). Those that read
/// the same aggregate type share one reading of its events ([`Pages::shared`]). Fails when any
/// fails (after all have ended), or after verifying when any model differs.
pub async fn run(
    pool: &PgPool,
    projections: Vec<String>,
    verify: bool,
    patience: Duration,
) -> anyhow::Result<()> {
    if let Some(unknown) = projections
        .iter()
        .find(|name| !PROJECTIONS.contains(&name.as_str()))
    {
        bail!(
            "unknown projection {unknown:?}: expected one of {}",
            PROJECTIONS.join(", ")
        );
    }
    let bars = MultiProgress::new();
    // Each aggregate type's projections at once; those sharing a reading wait for its locks
    // without holding back the others.
    let groups = by_aggregate_type(&projections)
        .into_iter()
        .map(|(aggregate_type, names)| {
            let bars = &bars;
            async move {
                let pages = if names.len() > 1 {
                    match Pages::shared(pool, aggregate_type, &names).await {
                        Ok(pages) => pages,
                        Err(error) => {
                            let error = format!("cannot start reading the events: {error}");
                            return names
                                .into_iter()
                                .map(|name| (name, Err(anyhow::anyhow!("{name}: {error}"))))
                                .collect();
                        }
                    }
                } else {
                    vec![Pages::own()]
                };
                let runs = names
                    .into_iter()
                    .zip(pages)
                    .map(|(name, pages)| async move {
                        let result = with_projection!(name, |projection| {
                            one(&projection, pool, pages, verify, patience, bars).await
                        })
                        .expect("the names were checked");
                        (name, result)
                    });
                futures::future::join_all(runs).await
            }
        });
    let results: Vec<_> = futures::future::join_all(groups)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut differing = Vec::new();
    let mut failed = Vec::new();
    let mut passed_over = 0;
    for (name, result) in results {
        match result {
            Ok((differences, passed)) => {
                if !differences.is_empty() {
                    differing.push(format!("{name} ({} rows)", differences.len()));
                }
                passed_over += passed;
            }
            Err(error) => failed.push(format!("{error:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    if !differing.is_empty() {
        bail!(
            "the rebuilt model differs from the live one: {}",
            differing.join(", ")
        );
    }
    if passed_over > 0 {
        bail!(
            "{passed_over} events could not be applied and were passed over (listed above, and in projection_dead_letters)"
        );
    }
    Ok(())
}

/// The projections by the aggregate type whose events they read, names in the order given.
fn by_aggregate_type(projections: &[String]) -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut by_type: BTreeMap<&'static str, Vec<&'static str>> = BTreeMap::new();
    for name in projections {
        let (name, aggregate_type) =
            with_projection!(name.as_str(), |projection| identity_of(&projection))
                .expect("the names were checked");
        by_type.entry(aggregate_type).or_default().push(name);
    }
    by_type
}

/// A projection's name and the aggregate type whose events it reads.
fn identity_of<P: Projection>(_: &P) -> (&'static str, &'static str) {
    (P::NAME, P::AGGREGATE_TYPE)
}

async fn one<P: Projection>(
    projection: &P,
    pool: &PgPool,
    pages: Pages,
    verify: bool,
    patience: Duration,
    bars: &MultiProgress,
) -> anyhow::Result<(Vec<Difference>, usize)> {
    let reporter = Reporter::new(P::NAME, bars);
    if verify {
        let Verified {
            differences,
            passed_over,
        } = replay::verify_from(projection, pool, pages, patience, |p| reporter.report(p))
            .await
            .with_context(|| format!("cannot verify {}", P::NAME))?;
        reporter.finish();
        report_passed_over(P::NAME, &passed_over);
        for difference in &differences {
            println!(
                "{}: only in {}: {}",
                difference.table, difference.only_in, difference.row
            );
        }
        if differences.is_empty() {
            println!("{}: the live model equals the replay", P::NAME);
        }
        Ok((differences, passed_over.len()))
    } else {
        let Replayed {
            applied,
            passed_over,
        } = replay::replay_from(projection, pool, pages, |p| reporter.report(p))
            .await
            .with_context(|| format!("cannot replay {}", P::NAME))?;
        reporter.finish();
        report_passed_over(P::NAME, &passed_over);
        println!(
            "{}: replayed {applied} events and swapped the model in",
            P::NAME
        );
        Ok((Vec::new(), passed_over.len()))
    }
}

fn report_passed_over(name: &str, passed_over: &[PassedOver]) {
    for event in passed_over {
        println!("{name}: passed over {}: {}", event.message_id, event.reason);
    }
}

/// A progress bar on a terminal; a log line every few seconds otherwise.
struct Reporter {
    name: &'static str,
    bar: Option<ProgressBar>,
    last_line: std::cell::Cell<Instant>,
}

impl Reporter {
    fn new(name: &'static str, bars: &MultiProgress) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = bars.add(ProgressBar::new(0).with_prefix(name));
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
