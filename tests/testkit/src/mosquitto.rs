//! A real Mosquitto broker for one test (or one test binary).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mosquitto process on a free loopback port, with persistence in a throwaway directory (so
/// persistent sessions survive a broker restart). Killed, and its directory removed, on drop.
pub struct MosquittoServer {
    port: u16,
    dir: PathBuf,
    process: Option<Child>,
}

fn binary() -> PathBuf {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|path| path.exists())
    .unwrap_or_else(|| PathBuf::from("mosquitto"))
}

fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|user| !user.is_empty())
        .or_else(|| {
            let output = Command::new("id").arg("-un").output().ok()?;
            Some(String::from_utf8_lossy(&output.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "root".into())
}

impl MosquittoServer {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        let dir = std::env::temp_dir().join(format!(
            "fleetlog-mosquitto-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create the mosquitto directory");
        // `user` keeps mosquitto from switching to its own user when the tests run as root.
        let config = format!(
            "user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {dir}/\nmax_queued_messages 1000000\nmax_inflight_messages 0\n\
             message_size_limit 262144\nlog_dest stderr\n",
            user = current_user(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("mosquitto.conf"), config).expect("write mosquitto.conf");
        let mut server = Self {
            port,
            dir,
            process: None,
        };
        server.resume();
        server
    }

    /// `mqtt://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the broker at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts the broker again on the same port and persistence directory.
    pub fn resume(&mut self) {
        assert!(self.process.is_none(), "mosquitto is already running");
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).expect("create the log");
        let process = Command::new(binary())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto (install it, or run ./deploy/local/test.sh)");
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for MosquittoServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
