//! A real Mosquitto broker for one test (or one test binary), secured as fleetlog's deployments
//! are: the dynamic-security plugin, no anonymous clients, everything denied that no role
//! allows.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetlog_broker::access::{
    self, Acl, DynsecAdmin, DISPATCH_ROLE, DISPATCH_USERNAME, INGEST_ROLE, INGEST_USERNAME,
    SYNC_USERNAME,
};
use rumqttc::MqttOptions;

/// The topic root the test brokers' roles are made for.
pub const TOPIC_ROOT: &str = "devices";

/// The test-only account that stands in for any number of devices, for tests that are not
/// about device identity: it may publish and receive on every device's topics.
pub const SIMULATOR_USERNAME: &str = "fleetlog.simulator";

/// A mosquitto process on a free loopback port, with persistence in a throwaway directory (so
/// persistent sessions and the dynamic-security state survive a broker restart). It holds
/// fleetlog's service accounts (sync admin, ingest, dispatch) and [`SIMULATOR_USERNAME`], each
/// with a fresh password. Killed, and its directory removed, on drop.
pub struct MosquittoServer {
    port: u16,
    tls_port: Option<u16>,
    dir: PathBuf,
    process: Option<Child>,
    passwords: Vec<(&'static str, String)>,
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

/// The dynamic-security plugin of the installed broker.
pub fn dynamic_security_plugin() -> PathBuf {
    let candidates = ["/usr/lib", "/usr/local/lib", "/usr/lib64"];
    for base in candidates {
        let direct = Path::new(base).join("mosquitto_dynamic_security.so");
        if direct.exists() {
            return direct;
        }
        if let Ok(entries) = std::fs::read_dir(base) {
            for entry in entries.flatten() {
                let nested = entry.path().join("mosquitto_dynamic_security.so");
                if nested.exists() {
                    return nested;
                }
            }
        }
    }
    panic!("mosquitto_dynamic_security.so not found: install mosquitto 2 (or run ./deploy/local/test.sh)")
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

fn fresh_password() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// A CA and a server certificate it signs for 127.0.0.1, made with openssl in `dir` as the
/// local stack makes them (`deploy/local/stack.sh`).
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (install it, or run ./deploy/local/test.sh)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-days",
        "2",
        "-subj",
        "/CN=fleetlog test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&ca);
    let mut request = vec!["req"];
    request.extend(ec);
    request.extend([
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(&request);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
}

impl MosquittoServer {
    /// Starts a broker, creates its accounts, and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// The same, with a second listener speaking TLS with a certificate from a CA made for
    /// this broker ([`Self::ca_pem`]).
    pub fn start_with_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "fleetlog-mosquitto-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create the mosquitto directory");
        let tls_port = tls.then(|| {
            make_certificates(&dir);
            free_port()
        });
        let passwords = vec![
            (SYNC_USERNAME, fresh_password()),
            (INGEST_USERNAME, fresh_password()),
            (DISPATCH_USERNAME, fresh_password()),
            (SIMULATOR_USERNAME, fresh_password()),
        ];
        let security = dir.join("dynamic-security.json");
        let init = Command::new("mosquitto_ctrl")
            .args(["dynsec", "init"])
            .arg(&security)
            .args([SYNC_USERNAME, &passwords[0].1])
            .output()
            .expect("run mosquitto_ctrl (install mosquitto 2, or run ./deploy/local/test.sh)");
        assert!(
            init.status.success(),
            "mosquitto_ctrl dynsec init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        // `user` keeps mosquitto from switching to its own user when the tests run as root,
        // which could neither read this directory nor save the plugin's state in it.
        let config = format!(
            "user {user}\nper_listener_settings false\nallow_anonymous false\n\
             plugin {plugin}\nplugin_opt_config_file {security}\n\
             listener {port} 127.0.0.1\npersistence true\n\
             persistence_location {dir}/\nmax_queued_messages 1000000\nmax_inflight_messages 0\n\
             message_size_limit 262144\nlog_dest stderr\nlog_type all\n",
            user = current_user(),
            plugin = dynamic_security_plugin().display(),
            security = security.display(),
            dir = dir.display(),
        );
        let config = match tls_port {
            Some(tls_port) => format!(
                "{config}listener {tls_port} 127.0.0.1\ncafile {dir}/ca.pem\n\
                 certfile {dir}/server.pem\nkeyfile {dir}/server.key\n",
                dir = dir.display()
            ),
            None => config,
        };
        std::fs::write(dir.join("mosquitto.conf"), config).expect("write mosquitto.conf");
        let mut server = Self {
            port,
            tls_port,
            dir,
            process: None,
            passwords,
        };
        server.resume();
        server.create_accounts();
        server
    }

    /// The password of one of the broker's accounts.
    pub fn password(&self, username: &str) -> &str {
        self.passwords
            .iter()
            .find(|(name, _)| *name == username)
            .map(|(_, password)| password.as_str())
            .unwrap_or_else(|| panic!("the test broker has no account {username:?}"))
    }

    /// `mqtt://127.0.0.1:{port}`, without credentials: the broker refuses it.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The URL for one of the broker's accounts, credentials included.
    pub fn url_as(&self, username: &str) -> String {
        format!(
            "mqtt://{username}:{}@127.0.0.1:{}",
            self.password(username),
            self.port
        )
    }

    /// The ingest account's URL.
    pub fn ingest_url(&self) -> String {
        self.url_as(INGEST_USERNAME)
    }

    /// The dispatch account's URL.
    pub fn dispatch_url(&self) -> String {
        self.url_as(DISPATCH_USERNAME)
    }

    /// The sync's (admin) URL.
    pub fn sync_url(&self) -> String {
        self.url_as(SYNC_USERNAME)
    }

    /// Client options for `account` under `client_id`.
    pub fn options_as(&self, username: &str, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", self.port);
        options.set_credentials(username, self.password(username));
        options
    }

    /// Client options of the device simulator ([`SIMULATOR_USERNAME`]) under `client_id`.
    pub fn simulator_options(&self, client_id: &str) -> MqttOptions {
        self.options_as(SIMULATOR_USERNAME, client_id)
    }

    /// Client options of a real device: its id as user name and client id, its token as
    /// password.
    pub fn device_options(&self, device_id: &str, token: &str) -> MqttOptions {
        let mut options = MqttOptions::new(device_id, "127.0.0.1", self.port);
        options.set_credentials(device_id, token);
        options
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of its TLS listener, when started with one.
    pub fn tls_port(&self) -> u16 {
        self.tls_port.expect("the broker was started without TLS")
    }

    /// The CA (PEM) that signed its TLS certificate.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.pem")).expect("the broker was started without TLS")
    }

    /// `mqtts://{user}:{password}@127.0.0.1:{tls port}`.
    pub fn tls_url_as(&self, username: &str) -> String {
        format!(
            "mqtts://{username}:{}@127.0.0.1:{}",
            self.password(username),
            self.tls_port()
        )
    }

    /// Kills the broker at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Freezes the broker (SIGSTOP), as a network stall would: connections stay open and
    /// nothing is answered. [`MosquittoServer::kill`] ends a frozen broker too.
    pub fn freeze(&self) {
        if let Some(process) = &self.process {
            let status = Command::new("kill")
                .arg("-STOP")
                .arg(process.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -STOP failed");
        }
    }

    /// Starts the broker again on the same port, persistence directory and security state.
    pub fn resume(&mut self) {
        assert!(self.process.is_none(), "mosquitto is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .expect("open the log");
        let process = Command::new(binary())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto (install it, or run ./deploy/local/test.sh)");
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(15);
        let ports = [Some(self.port), self.tls_port];
        while ports
            .iter()
            .flatten()
            .any(|port| TcpStream::connect(("127.0.0.1", *port)).is_err())
        {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// The service accounts as the broker sync would make them, and the simulator. On a
    /// runtime of its own, so it works inside and outside a test's runtime.
    fn create_accounts(&self) {
        let sync_url = self.sync_url();
        let passwords = self.passwords.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the broker set-up");
            runtime.block_on(async move {
                let url = sync_url.parse().expect("the sync URL");
                let admin = DynsecAdmin::connect(&url, "fleetlog.testkit", Duration::from_secs(10))
                    .await
                    .expect("connect to the test broker as its admin");
                admin.deny_by_default().await.expect("deny by default");
                let everything = |acltype: &str| Acl {
                    acltype: acltype.into(),
                    topic: format!("{TOPIC_ROOT}/#"),
                    allow: true,
                };
                let roles = [
                    (INGEST_ROLE, access::ingest_acls(TOPIC_ROOT)),
                    (DISPATCH_ROLE, access::dispatch_acls(TOPIC_ROOT)),
                    (
                        SIMULATOR_USERNAME,
                        vec![
                            everything("publishClientSend"),
                            everything("publishClientReceive"),
                            everything("subscribePattern"),
                        ],
                    ),
                ];
                for (role, acls) in &roles {
                    admin.ensure_role(role, acls).await.expect("create a role");
                }
                for (username, password) in passwords.iter().skip(1) {
                    let role = match *username {
                        INGEST_USERNAME => INGEST_ROLE,
                        DISPATCH_USERNAME => DISPATCH_ROLE,
                        other => other,
                    };
                    admin
                        .ensure_service_account(username, password, role)
                        .await
                        .expect("create a service account");
                }
                admin.close().await;
            });
        })
        .join()
        .expect("the broker set-up");
    }
}

impl Drop for MosquittoServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
