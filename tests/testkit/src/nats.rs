//! A real nats-server with JetStream for one test (or one test binary), with fleetlog's users
//! and their rights (`deploy/nats/accounts.conf`), each with a fresh password.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The users and rights every fleetlog deployment's NATS server has.
const ACCOUNTS: &str = include_str!("../../../deploy/nats/accounts.conf");

/// The users `ACCOUNTS` defines, and the variables their passwords come from.
pub const USERS: [(&str, &str); 8] = [
    ("fleetlog.relay", "FLEETLOG_RELAY_NATS_PASSWORD"),
    ("fleetlog.project", "FLEETLOG_PROJECT_NATS_PASSWORD"),
    ("fleetlog.ingest", "FLEETLOG_INGEST_NATS_PASSWORD"),
    ("fleetlog.dispatch", "FLEETLOG_DISPATCH_NATS_PASSWORD"),
    ("fleetlog.sync", "FLEETLOG_BROKER_SYNC_NATS_PASSWORD"),
    ("fleetlog.api", "FLEETLOG_API_NATS_PASSWORD"),
    ("fleetlog.reader", "FLEETLOG_READER_NATS_PASSWORD"),
    ("fleetlog.admin", "FLEETLOG_ADMIN_NATS_PASSWORD"),
];

/// A nats-server process on a free loopback port. Killed, and its store removed, on drop.
pub struct NatsServer {
    port: u16,
    store_dir: PathBuf,
    process: Option<Child>,
    passwords: Vec<String>,
}

fn binary() -> PathBuf {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|path| path.exists())
    .unwrap_or_else(|| PathBuf::from("nats-server"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Self {
        let store_dir =
            std::env::temp_dir().join(format!("fleetlog-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&store_dir).expect("create the JetStream store directory");
        let port = free_port();
        std::fs::write(store_dir.join("accounts.conf"), ACCOUNTS).expect("write accounts.conf");
        // Includes are read relative to the including file.
        let config = format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\ninclude \"accounts.conf\"\n",
            store_dir.join("jetstream").display().to_string()
        );
        std::fs::write(store_dir.join("nats.conf"), config).expect("write nats.conf");
        let mut server = Self {
            port,
            store_dir,
            process: None,
            // nats-server reads a variable's value as a configuration value: a leading letter
            // keeps it a plain word, never a number.
            passwords: USERS
                .iter()
                .map(|_| format!("pw{}", uuid::Uuid::new_v4().simple()))
                .collect(),
        };
        server.resume();
        server
    }

    /// `nats://fleetlog.admin:…@127.0.0.1:{port}`: the operators' user, who may do everything,
    /// for tests that are not about the roles' rights.
    pub fn url(&self) -> String {
        self.url_as("fleetlog.admin")
    }

    /// `nats://127.0.0.1:{port}`, without credentials: the server refuses it.
    pub fn anonymous_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL for one of the users, credentials included.
    pub fn url_as(&self, user: &str) -> String {
        format!(
            "nats://{user}:{}@127.0.0.1:{}",
            self.password(user),
            self.port
        )
    }

    /// The password of one of the users.
    pub fn password(&self, user: &str) -> &str {
        let index = USERS
            .iter()
            .position(|(name, _)| *name == user)
            .unwrap_or_else(|| panic!("the test NATS server has no user {user:?}"));
        &self.passwords[index]
    }

    /// Each user's password variable and password, as nats-server (and fleetlog) read them.
    pub fn password_variables(&self) -> Vec<(&'static str, &str)> {
        USERS
            .iter()
            .zip(&self.passwords)
            .map(|((_, variable), password)| (*variable, password.as_str()))
            .collect()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store_dir.join("nats.log")).unwrap_or_default()
    }

    /// Kills the server at once, as a crash would. Its store stays.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn resume(&mut self) {
        assert!(self.process.is_none(), "nats-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store_dir.join("nats.log"))
            .expect("open the nats-server log");
        let process = Command::new(binary())
            .arg("-c")
            .arg(self.store_dir.join("nats.conf"))
            .envs(self.password_variables())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (install it, or run ./deploy/local/test.sh)");
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                std::fs::read_to_string(self.store_dir.join("nats.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store_dir);
    }
}
