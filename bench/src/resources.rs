//! What a process costs: CPU time and memory, read from `/proc`. A Postgres cluster counts as
//! its postmaster and every backend under it; its memory as the sum of their proportional set
//! sizes (shared buffers counted once, not once per backend).

use std::collections::HashMap;

use serde::Serialize;

/// The processes a benchmark watches, by the name it reports them under.
#[derive(Clone, Debug)]
pub struct Watched {
    pub processes: Vec<(String, u32, bool)>,
}

/// CPU seconds per watched process at one instant.
#[derive(Clone, Debug, Default)]
pub struct CpuSample(HashMap<String, f64>);

/// Per process over an interval: CPU microseconds per message and the peak memory seen.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessCost {
    pub process: String,
    pub cpu_us_per_message: f64,
    pub peak_rss_mb: f64,
}

impl Watched {
    /// `fleetlog=pid`, `mosquitto=pid`, ...; a name ending in `+` also counts the process's
    /// children (the Postgres postmaster and its backends).
    pub fn parse(specs: &[String]) -> anyhow::Result<Self> {
        let mut processes = Vec::new();
        for spec in specs {
            let (name, pid) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--watch takes name=pid, not {spec}"))?;
            let (name, children) = match name.strip_suffix('+') {
                Some(name) => (name, true),
                None => (name, false),
            };
            processes.push((name.to_string(), pid.trim().parse()?, children));
        }
        Ok(Self { processes })
    }

    fn pids(&self, pid: u32, children: bool) -> Vec<u32> {
        let mut pids = vec![pid];
        if children {
            pids.extend(children_of(pid));
        }
        pids
    }

    pub fn cpu(&self) -> CpuSample {
        CpuSample(
            self.processes
                .iter()
                .map(|(name, pid, children)| {
                    let seconds = self
                        .pids(*pid, *children)
                        .iter()
                        .filter_map(|p| cpu_seconds(*p))
                        .sum();
                    (name.clone(), seconds)
                })
                .collect(),
        )
    }

    /// Memory now per process in MB: the peak RSS of a single process (`VmHWM`), the summed
    /// PSS of a process with its children.
    pub fn memory(&self) -> HashMap<String, f64> {
        self.processes
            .iter()
            .map(|(name, pid, children)| (name.clone(), self.megabytes(*pid, *children, "VmHWM:")))
            .collect()
    }

    /// Resident memory now (`VmRSS`, or summed PSS with children), in MB.
    pub fn resident(&self, name: &str) -> f64 {
        self.processes
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(0.0, |(_, pid, children)| {
                self.megabytes(*pid, *children, "VmRSS:")
            })
    }

    /// `field` of the process's status, or with its children their summed PSS, in MB.
    fn megabytes(&self, pid: u32, children: bool, field: &str) -> f64 {
        let kb = if children {
            self.pids(pid, true).iter().filter_map(|p| pss_kb(*p)).sum()
        } else {
            status_kb(pid, field).unwrap_or(0.0)
        };
        kb / 1024.0
    }

    /// The cost of `messages` between two samples, with the peak memory seen meanwhile.
    pub fn cost(
        &self,
        before: &CpuSample,
        after: &CpuSample,
        peak: &HashMap<String, f64>,
        messages: u64,
    ) -> Vec<ProcessCost> {
        self.processes
            .iter()
            .map(|(name, _, _)| {
                let cpu = after.0.get(name).unwrap_or(&0.0) - before.0.get(name).unwrap_or(&0.0);
                ProcessCost {
                    process: name.clone(),
                    cpu_us_per_message: cpu * 1e6 / messages.max(1) as f64,
                    peak_rss_mb: peak.get(name).copied().unwrap_or(0.0),
                }
            })
            .collect()
    }
}

/// Keeps the larger of each process's memory figures.
pub fn keep_peak(peak: &mut HashMap<String, f64>, now: HashMap<String, f64>) {
    for (name, mb) in now {
        let entry = peak.entry(name).or_insert(0.0);
        *entry = entry.max(mb);
    }
}

fn ticks_per_second() -> f64 {
    // Linux reports CPU times in USER_HZ, 100 on every architecture it runs on today.
    100.0
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

fn status_kb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn pss_kb(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    line[4..].trim().trim_end_matches("kB").trim().parse().ok()
}
