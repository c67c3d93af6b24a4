//! The operator's side of the run, over REST: the set-up (login, devices, firmware), a steady
//! stream of writes (desired properties, commands, registrations) each followed by a read with
//! `min_position` on the other API, and the rollouts.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// What a write was, to find it in the event store afterwards.
#[derive(Clone, Debug)]
pub enum WriteKind {
    /// `PUT desired {"setpoint": value}`.
    Desired { device: String, value: u64 },
    /// `POST commands`; the id when acknowledged.
    Command { device: String, id: Option<String> },
    /// `POST /devices` of a device no one connects.
    Register { device: String },
}

#[derive(Clone, Debug)]
pub struct Write {
    pub kind: WriteKind,
    pub phase: usize,
    pub acked: bool,
}

#[derive(Default)]
pub struct Writes {
    pub log: Mutex<Vec<Write>>,
    pub reads_ok: AtomicUsize,
    pub reads_failed: AtomicUsize,
}

/// A REST client logged in as the run's operator, spreading its requests over the APIs.
#[derive(Clone)]
pub struct Operator {
    http: reqwest::Client,
    apis: Vec<String>,
    token: String,
}

impl Operator {
    pub async fn login(
        apis: &[String],
        tenant: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let response = http
            .post(format!("{}/api/v1/auth/login", apis[0]))
            .json(&json!({"tenant": tenant, "username": user, "password": password}))
            .send()
            .await?;
        let body: Value = response.json().await?;
        let token = body["access_token"]
            .as_str()
            .with_context(|| format!("login refused: {body}"))?
            .to_string();
        Ok(Self {
            http,
            apis: apis.to_vec(),
            token,
        })
    }

    /// One request to API `api` (modulo the count); the status and the JSON body.
    pub async fn call(
        &self,
        api: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.apis[api % self.apis.len()]);
        let mut request = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Like [`Operator::call`], retried on any API until it answers `expect`, for the set-up.
    pub async fn call_until(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        expect: &[u16],
    ) -> anyhow::Result<Value> {
        let mut last = String::new();
        for attempt in 0..40 {
            match self.call(attempt, method.clone(), path, body.clone()).await {
                Ok((status, body)) if expect.contains(&status) => return Ok(body),
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(error) => last = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("{method} {path}: {last}")
    }

    /// Registers a device; answers its token.
    pub async fn register(&self, id: &str) -> anyhow::Result<String> {
        let body = self
            .call_until(
                reqwest::Method::POST,
                "/api/v1/devices",
                Some(json!({"device_id": id, "name": id, "model": "sim"})),
                &[201],
            )
            .await?;
        Ok(body["device_token"]
            .as_str()
            .context("no device token")?
            .to_string())
    }

    /// Uploads and releases an image of version `version`; answers its id.
    pub async fn release_firmware(&self, version: &str) -> anyhow::Result<String> {
        let image: Vec<u8> = (0..4096u32)
            .map(|n| (n * 31 + 7) as u8)
            .chain(version.bytes())
            .collect();
        let url = format!(
            "{}/api/v1/firmware?model=sim&version={version}&compatible_models=sim",
            self.apis[0]
        );
        let response = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(image)
            .send()
            .await?;
        if response.status().as_u16() != 201 {
            bail!("upload of {version}: {}", response.text().await?);
        }
        let id = format!("sim@{version}");
        self.call_until(
            reqwest::Method::POST,
            &format!("/api/v1/firmware/{id}/release"),
            None,
            &[200],
        )
        .await?;
        Ok(id)
    }

    /// Starts a rollout of `firmware` over `devices`; answers whether it was created. A
    /// refusal because a device still waits for an earlier rollout answers `false`.
    pub async fn start_rollout(
        &self,
        id: &str,
        firmware: &str,
        devices: &[String],
    ) -> anyhow::Result<bool> {
        let body = json!({
            "rollout_id": id,
            "firmware_id": firmware,
            "device_ids": devices,
            "waves": [20, 100],
            "success_threshold": 90,
            "error_threshold": 50,
            "on_error": "pause",
            "device_timeout_secs": 600,
            "window_secs": 3600,
        });
        for attempt in 0..10 {
            match self
                .call(
                    attempt,
                    reqwest::Method::POST,
                    "/api/v1/rollouts",
                    Some(body.clone()),
                )
                .await
            {
                Ok((201, _)) => {
                    self.call_until(
                        reqwest::Method::POST,
                        &format!("/api/v1/rollouts/{id}/start"),
                        None,
                        &[200],
                    )
                    .await?;
                    return Ok(true);
                }
                Ok((409, _)) => return Ok(false),
                Ok((status, body)) => bail!("rollout {id}: {status} {body}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        Ok(false)
    }

    /// A rollout's status, when an API answers.
    pub async fn rollout_status(&self, id: &str) -> Option<String> {
        let (status, body) = self
            .call(
                0,
                reqwest::Method::GET,
                &format!("/api/v1/rollouts/{id}"),
                None,
            )
            .await
            .ok()?;
        (status == 200).then(|| body["status"].as_str().unwrap_or_default().to_string())
    }

    /// Writes about `per_second` times a second until `stop`, turn by turn a desired
    /// property, a command and a registration, each on the next API; after each acknowledged
    /// write, reads the device with its `min_position` from the other API.
    pub async fn write_steadily(
        self,
        devices: Vec<String>,
        per_second: u64,
        phase: Arc<AtomicUsize>,
        writes: Arc<Writes>,
        stop: Arc<AtomicBool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            n += 1;
            let api = n as usize;
            let device = devices[(n as usize * 7) % devices.len()].clone();
            let phase = phase.load(Ordering::Relaxed);
            let (kind, method, path, body) = match n % 3 {
                0 => (
                    WriteKind::Desired {
                        device: device.clone(),
                        value: n,
                    },
                    reqwest::Method::PUT,
                    format!("/api/v1/devices/{device}/desired"),
                    json!({"setpoint": n}),
                ),
                1 => (
                    WriteKind::Command {
                        device: device.clone(),
                        id: None,
                    },
                    reqwest::Method::POST,
                    format!("/api/v1/devices/{device}/commands"),
                    json!({"name": "blink", "params": {"n": n}, "ttl_secs": 3600}),
                ),
                _ => {
                    let device = format!("reg-{n}");
                    (
                        WriteKind::Register {
                            device: device.clone(),
                        },
                        reqwest::Method::POST,
                        "/api/v1/devices".to_string(),
                        json!({"device_id": device, "name": device, "model": "sim"}),
                    )
                }
            };
            let answer = self.call(api, method, &path, Some(body)).await;
            let (acked, kind, position, read_device) = match (answer, kind) {
                (Ok((status, body)), kind) if (200..300).contains(&status) => {
                    let position = body["global_position"].as_i64();
                    let kind = match kind {
                        WriteKind::Command { device, .. } => WriteKind::Command {
                            device,
                            id: body["command_id"].as_str().map(str::to_string),
                        },
                        other => other,
                    };
                    let read_device = match &kind {
                        WriteKind::Desired { device, .. }
                        | WriteKind::Command { device, .. }
                        | WriteKind::Register { device } => device.clone(),
                    };
                    (true, kind, position, read_device)
                }
                (_, kind) => (false, kind, None, String::new()),
            };
            writes
                .log
                .lock()
                .unwrap()
                .push(Write { kind, phase, acked });
            if let Some(position) = position {
                let read = self
                    .call(
                        api + 1,
                        reqwest::Method::GET,
                        &format!("/api/v1/devices/{read_device}?min_position={position}"),
                        None,
                    )
                    .await;
                match read {
                    Ok((200, _)) => writes.reads_ok.fetch_add(1, Ordering::Relaxed),
                    _ => writes.reads_failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    }
}
