//! The deployment under test: every role of `fleetlog` in a process of its own, and the
//! servers (Postgres, nats-server, Mosquitto) of the stack that `deploy/local/stack.sh` runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// One role process: how to start it again after it was killed.
pub struct RoleProcess {
    /// Its name in the report and in its log file, such as `ingest-1`.
    pub name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// Times it stopped without being told to.
    pub unexpected_exits: u32,
}

/// Every role process, started in an order that leaves `relay-1` the active relay.
pub struct Topology {
    fleetlog: PathBuf,
    /// Every process id started, one per line, for `deploy/bench/faults.sh` to stop whatever
    /// is left should this run itself be killed.
    pids: PathBuf,
    stack: PathBuf,
    pub roles: Vec<RoleProcess>,
    /// The API base URLs, `http://127.0.0.1:{port}`.
    pub api_urls: Vec<String>,
}

/// How the two ingest instances share the device topics.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum IngestMode {
    /// One shared subscription (each instance its own client id and session), both serving.
    Shared,
    /// One plain subscription on one session (one client id): one instance serves, the other
    /// stands by and takes the session over.
    Turns,
}

impl IngestMode {
    /// As the report says it.
    pub fn describe(self) -> &'static str {
        match self {
            IngestMode::Shared => "two instances on a shared subscription",
            IngestMode::Turns => {
                "two instances taking turns on one session with a plain subscription"
            }
        }
    }
}

/// A server of the stack.
#[derive(Clone, Copy, Debug)]
pub enum Server {
    Postgres,
    Nats,
    Mosquitto,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::Nats => "nats",
            Server::Mosquitto => "mosquitto",
        }
    }
}

impl Topology {
    /// Two of each role but the dispatcher and the broker sync, which run once. `work_dir`
    /// holds their logs and the API's data directory (firmware images, the signing key).
    pub fn new(
        fleetlog: &Path,
        stack: &Path,
        work_dir: &Path,
        first_http_port: u16,
        ingest: IngestMode,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(work_dir.join("logs"))?;
        let data_dir = work_dir.join("data");
        let common = vec![
            (
                "FLEETLOG_DATA_DIR".to_string(),
                data_dir.display().to_string(),
            ),
            // The operator's session lasts the whole run; a token expiring mid-run would read
            // as refused writes.
            ("FLEETLOG_ACCESS_TOKEN_TTL_SECS".into(), "86400".into()),
            (
                "FLEETLOG_LOG".into(),
                std::env::var("FAULTS_LOG").unwrap_or("info".into()),
            ),
        ];
        let mut roles = Vec::new();
        let mut role = |name: &str, subcommand: &str, extra: Vec<(String, String)>| {
            let mut env = common.clone();
            env.extend(extra);
            roles.push(RoleProcess {
                name: name.to_string(),
                args: vec![subcommand.to_string()],
                env,
                log: work_dir.join("logs").join(format!("{name}.log")),
                child: None,
                unexpected_exits: 0,
            });
        };
        // The broker sync first: it creates the broker accounts of the other roles.
        role("broker-sync", "broker-sync", vec![]);
        role("relay-1", "relay", vec![]);
        role("relay-2", "relay", vec![]);
        let mut api_urls = Vec::new();
        for n in 1..=2u16 {
            let port = first_http_port + n - 1;
            role(
                &format!("api-{n}"),
                "api",
                vec![("FLEETLOG_HTTP_ADDR".into(), format!("127.0.0.1:{port}"))],
            );
            api_urls.push(format!("http://127.0.0.1:{port}"));
        }
        role("project-1", "project", vec![]);
        role("project-2", "project", vec![]);
        for n in 1..=2 {
            let subscription = match ingest {
                IngestMode::Shared => vec![(
                    "FLEETLOG_INGEST_CLIENT_ID".into(),
                    format!("fleetlog.ingest.{n}"),
                )],
                IngestMode::Turns => vec![
                    ("FLEETLOG_INGEST_CLIENT_ID".into(), "fleetlog.ingest".into()),
                    ("FLEETLOG_INGEST_SHARE_GROUP".into(), String::new()),
                ],
            };
            role(&format!("ingest-{n}"), "ingest", subscription);
        }
        role("dispatch", "dispatch", vec![]);
        Ok(Self {
            fleetlog: fleetlog.to_path_buf(),
            pids: work_dir.join("pids"),
            stack: stack.to_path_buf(),
            roles,
            api_urls,
        })
    }

    /// Starts every role, each once the one before it had a moment to take its locks, and
    /// waits until both APIs answer ready.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        for index in 0..self.roles.len() {
            self.spawn(index)?;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        for url in self.api_urls.clone() {
            wait_ready(&url, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.roles
            .iter()
            .position(|role| role.name == name)
            .with_context(|| format!("no role process {name}"))
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let role = &mut self.roles[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&role.log)
            .with_context(|| format!("cannot open {}", role.log.display()))?;
        let child = Command::new(&self.fleetlog)
            .args(&role.args)
            .envs(role.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", role.name))?;
        if let Some(pid) = child.id() {
            use std::io::Write;
            let mut pids = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.pids)?;
            writeln!(pids, "{pid}")?;
        }
        role.child = Some(child);
        Ok(())
    }

    /// `kill -9` of one role process.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index(name)?;
        if let Some(mut child) = self.roles[index].child.take() {
            child.start_kill().ok();
            child.wait().await.ok();
        }
        Ok(())
    }

    /// Starts a killed role process again, as its supervisor would.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index(name)?;
        self.spawn(index)?;
        if let Some(port) = name.strip_prefix("api-") {
            let url = &self.api_urls[port.parse::<usize>()? - 1];
            wait_ready(url, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// Starts again every role that stopped by itself, counting it: a role is expected to
    /// ride out every fault of the matrix.
    pub fn revive_exited(&mut self) -> anyhow::Result<Vec<String>> {
        let mut exited = Vec::new();
        for index in 0..self.roles.len() {
            let stopped = match self.roles[index].child.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => false,
            };
            if stopped {
                self.roles[index].unexpected_exits += 1;
                exited.push(self.roles[index].name.clone());
                self.spawn(index)?;
            }
        }
        Ok(exited)
    }

    /// Stops every role (SIGTERM, then SIGKILL after 15 s).
    pub async fn stop(&mut self) {
        for role in &mut self.roles {
            if let Some(child) = role.child.as_mut() {
                if let Some(pid) = child.id() {
                    let _ = signal(pid, "TERM").await;
                }
            }
        }
        for role in &mut self.roles {
            if let Some(mut child) = role.child.take() {
                if tokio::time::timeout(Duration::from_secs(15), child.wait())
                    .await
                    .is_err()
                {
                    child.start_kill().ok();
                    child.wait().await.ok();
                }
            }
        }
    }

    /// Restarts a server through the stack script; `crash` stops Postgres as a power cut would.
    pub async fn restart_server(&self, server: Server, crash: bool) -> anyhow::Result<()> {
        let which = if crash { "crash" } else { server.name() };
        let status = Command::new(&self.stack)
            .args(["restart", which])
            .stdout(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("{} restart {which} failed", self.stack.display());
        }
        Ok(())
    }

    /// Sends `signal` (`STOP`, `CONT`) to a server's process.
    pub async fn signal_server(&self, server: Server, name: &str) -> anyhow::Result<()> {
        let output = Command::new(&self.stack)
            .args(["pid", server.name()])
            .output()
            .await?;
        let pid: u32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .with_context(|| format!("no pid of {}", server.name()))?;
        signal(pid, name).await
    }
}

async fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// Waits until `GET {url}/ready` answers 200.
pub async fn wait_ready(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = client.get(format!("{url}/ready")).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} never became ready");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
