//! Firmware images over HTTP against a real Postgres and a local object store: streamed upload
//! with digest check, size limit and content addressing; download with Range, If-Range, ETag and
//! device tokens; release signatures that verify with the served public key; and the same
//! upload and download through an S3-compatible server (s3s-fs, speaking the S3 protocol over
//! HTTP with signed requests) configured by URL.

mod common;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use common::{Platform, TempDir, FIRMWARE_MAX_BYTES};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use fleetlog_domain::user::Role;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

/// Deterministic bytes that do not compress to nothing.
fn image(size: usize, seed: u8) -> Vec<u8> {
    let mut state = u32::from(seed) + 1;
    (0..size)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn raw(
    platform: &Platform,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Body,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let response = platform
        .router
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, headers, bytes)
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

/// The body as a stream of small chunks, with no Content-Length: as a client streaming a file.
fn streamed(bytes: Vec<u8>) -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
        .chunks(16 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures::stream::iter(chunks))
}

/// Files under the object store's directory, relative paths.
fn stored_files(platform: &Platform) -> Vec<String> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let root = platform.firmware_dir.0.join("images");
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_upload_streamed_once_per_content_and_come_back_whole_or_in_ranges() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let viewer = platform.token("acme", "vic", Role::Viewer);
    let bytes = image(300_000, 1);
    let digest = sha256(&bytes);

    // Upload, streamed, with the digest the client knows.
    let (status, _, body) = raw(
        &platform,
        Method::POST,
        &format!("/api/v1/firmware?model=thermo&version=1.0.0&compatible_models=thermo-v2&sha256={digest}"),
        &[bearer(&operator)],
        streamed(bytes.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
    let uploaded: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(uploaded["sha256"], digest);
    assert_eq!(uploaded["size_bytes"], 300_000);
    assert_eq!(stored_files(&platform), vec![format!("sha256/{digest}")]);

    // The same bytes as another version (digest in the header this time): stored once.
    let (status, _, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=1.0.1",
        &[bearer(&operator), ("x-checksum-sha256", digest.clone())],
        Body::from(bytes.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(stored_files(&platform), vec![format!("sha256/{digest}")]);

    // A taken id, a wrong digest, an empty body, an image over the limit: refused, nothing kept.
    let (status, _, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=1.0.0",
        &[bearer(&operator)],
        Body::from(image(10, 2)),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _, body) = raw(
        &platform,
        Method::POST,
        &format!(
            "/api/v1/firmware?model=thermo&version=2.0.0&sha256={}",
            "0".repeat(64)
        ),
        &[bearer(&operator)],
        streamed(image(50_000, 3)),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        String::from_utf8_lossy(&body).contains("sha256"),
        "{body:?}"
    );
    let (status, _, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=2.0.1",
        &[bearer(&operator)],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, headers, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=2.0.2",
        &[bearer(&operator)],
        streamed(image(FIRMWARE_MAX_BYTES as usize + 1, 4)),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let (status, _, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=2.0.3",
        &[
            bearer(&operator),
            ("content-length", (FIRMWARE_MAX_BYTES + 1).to_string()),
        ],
        Body::from(image(FIRMWARE_MAX_BYTES as usize + 1, 4)),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(stored_files(&platform), vec![format!("sha256/{digest}")]);
    let (status, _, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=9.0.0",
        &[bearer(&viewer)],
        Body::from(image(10, 5)),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Whole download: the bytes, their digest as ETag.
    let path = "/api/v1/firmware/thermo@1.0.0/download";
    let (status, headers, body) = raw(
        &platform,
        Method::GET,
        path,
        &[bearer(&viewer)],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), bytes.as_slice());
    let etag = headers[header::ETAG].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{digest}\""));
    assert_eq!(headers[header::ACCEPT_RANGES], "bytes");
    assert_eq!(headers[header::CONTENT_LENGTH], "300000");

    // A download cut after 123,457 bytes resumes with Range (and If-Range); the parts make the image.
    let (status, headers, first) = raw(
        &platform,
        Method::GET,
        path,
        &[bearer(&viewer), ("range", "bytes=0-123456".into())],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes 0-123456/300000");
    assert_eq!(first.len(), 123_457);
    let (status, headers, rest) = raw(
        &platform,
        Method::GET,
        path,
        &[
            bearer(&viewer),
            ("range", format!("bytes={}-", first.len())),
            ("if-range", etag.clone()),
        ],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes 123457-299999/300000");
    let mut joined = first.to_vec();
    joined.extend_from_slice(&rest);
    assert_eq!(sha256(&joined), digest);

    // If-Range naming another image: the whole image. If-None-Match: 304. Beyond the end: 416.
    let (status, _, body) = raw(
        &platform,
        Method::GET,
        path,
        &[
            bearer(&viewer),
            ("range", "bytes=10-".into()),
            ("if-range", "\"other\"".into()),
        ],
        Body::empty(),
    )
    .await;
    assert_eq!((status, body.len()), (StatusCode::OK, 300_000));
    let (status, _, body) = raw(
        &platform,
        Method::GET,
        path,
        &[bearer(&viewer), ("if-none-match", etag.clone())],
        Body::empty(),
    )
    .await;
    assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
    let (status, headers, _) = raw(
        &platform,
        Method::GET,
        path,
        &[bearer(&viewer), ("range", "bytes=300000-".into())],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes */300000");

    // Another tenant does not see it; without a token, 401.
    let stranger = platform.token("globex", "gil", Role::Admin);
    let (status, _, _) = raw(
        &platform,
        Method::GET,
        path,
        &[bearer(&stranger)],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = raw(&platform, Method::GET, path, &[], Body::empty()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_download_with_their_token_and_releases_are_signed() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let bytes = image(70_000, 9);
    let (status, _, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=1.2.0",
        &[bearer(&operator)],
        Body::from(bytes.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // A device downloads with its own token, naming itself.
    let (status, created) = platform.create(&operator, "d1").await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["device_token"].as_str().unwrap().to_string();
    let path = "/api/v1/firmware/thermo@1.2.0/download";
    let (status, _, body) = raw(
        &platform,
        Method::GET,
        path,
        &[
            ("x-device-id", "d1".into()),
            ("x-device-token", token.clone()),
        ],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), bytes.as_slice());
    let (status, _, _) = raw(
        &platform,
        Method::GET,
        path,
        &[
            ("x-device-id", "d1".into()),
            ("x-device-token", "wrong".into()),
        ],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A device of another tenant does not see the image.
    let globex = platform.token("globex", "gil", Role::Operator);
    let (_, other) = platform.create(&globex, "g1").await;
    let other_token = other["device_token"].as_str().unwrap().to_string();
    let (status, _, _) = raw(
        &platform,
        Method::GET,
        path,
        &[
            ("x-device-id", "g1".into()),
            ("authorization", format!("Bearer {other_token}")),
        ],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Release signs the digest; the public key (no token needed) verifies it.
    let (status, released) = platform
        .call(
            Method::POST,
            "/api/v1/firmware/thermo@1.2.0/release",
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{released}");
    let (status, _, key) = raw(
        &platform,
        Method::GET,
        "/api/v1/firmware/signing-key",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let key: serde_json::Value = serde_json::from_slice(&key).unwrap();
    assert_eq!(key["algorithm"], "ed25519");
    let position = released["global_position"].as_i64().unwrap();
    let (status, shown) = platform
        .call(
            Method::GET,
            &format!("/api/v1/firmware/thermo@1.2.0?min_position={position}"),
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["status"], "released");
    assert_eq!(shown["signing_key_id"], key["key_id"]);
    let public: [u8; 32] = BASE64
        .decode(key["public_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let public = VerifyingKey::from_bytes(&public).unwrap();
    let signature =
        Signature::from_slice(&BASE64.decode(shown["signature"].as_str().unwrap()).unwrap())
            .unwrap();
    let digest = Sha256::digest(&bytes);
    public
        .verify(&digest, &signature)
        .expect("the signature verifies");
    assert!(public
        .verify(&Sha256::digest(b"another image"), &signature)
        .is_err());
}

const S3_ACCESS_KEY: &str = "fleetlog-test";
const S3_SECRET_KEY: &str = "fleetlog-test-secret";

/// An S3-compatible server (s3s-fs) over `root` on a free local port, with a `firmware`
/// bucket; its endpoint URL.
async fn start_s3_server(root: &std::path::Path) -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use s3s::auth::SimpleAuth;
    use s3s::service::S3ServiceBuilder;

    std::fs::create_dir_all(root.join("firmware")).unwrap();
    let mut service = S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).unwrap());
    service.set_auth(SimpleAuth::from_single(S3_ACCESS_KEY, S3_SECRET_KEY));
    let service = service.build().into_shared();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let http = Builder::new(TokioExecutor::new());
        while let Ok((socket, _)) = listener.accept().await {
            let connection = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    });
    endpoint
}

/// The keys under `prefix` in the `firmware` bucket, listed through the S3 protocol.
async fn s3_keys(store: &dyn object_store::ObjectStore, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let mut keys: Vec<String> = store
        .list(Some(&object_store::path::Path::from(prefix)))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// `FLEETLOG_FIRMWARE_STORE=s3://...`: images go to an S3-compatible store, streamed in a
/// multipart upload, moved to their content address, stored once, and come back whole or in
/// ranges. A refused upload leaves nothing in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_live_in_an_s3_compatible_store_configured_by_url() {
    let root = TempDir::new();
    let endpoint = start_s3_server(&root.0).await;
    let options: Vec<(String, String)> = [
        ("aws_endpoint", endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", S3_ACCESS_KEY),
        ("aws_secret_access_key", S3_SECRET_KEY),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect();
    let platform =
        Platform::start_with_firmware_store("s3://firmware/images", options.clone()).await;
    let (bucket, _) =
        object_store::parse_url_opts(&url::Url::parse("s3://firmware").unwrap(), options.clone())
            .unwrap();
    let operator = platform.token("acme", "otto", Role::Operator);
    let bytes = image(700_000, 7);
    let digest = sha256(&bytes);

    for version in ["2.0.0", "2.0.1"] {
        let (status, _, body) = raw(
            &platform,
            Method::POST,
            &format!("/api/v1/firmware?model=thermo&version={version}&sha256={digest}"),
            &[bearer(&operator)],
            streamed(bytes.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
    }
    assert_eq!(
        s3_keys(bucket.as_ref(), "images").await,
        vec![format!("images/sha256/{digest}")],
        "stored once, at its content address, with no upload left behind"
    );

    let (status, _, _) = raw(
        &platform,
        Method::POST,
        &format!(
            "/api/v1/firmware?model=thermo&version=2.0.2&sha256={}",
            "0".repeat(64)
        ),
        &[bearer(&operator)],
        streamed(image(1_000, 8)),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, _) = raw(
        &platform,
        Method::POST,
        "/api/v1/firmware?model=thermo&version=2.0.3",
        &[bearer(&operator)],
        streamed(image(FIRMWARE_MAX_BYTES as usize + 1, 9)),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        s3_keys(bucket.as_ref(), "images").await,
        vec![format!("images/sha256/{digest}")],
        "refused uploads leave nothing"
    );

    let path = "/api/v1/firmware/thermo@2.0.1/download";
    let (status, headers, whole) = raw(
        &platform,
        Method::GET,
        path,
        &[bearer(&operator)],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::ETAG], format!("\"{digest}\"").as_str());
    assert_eq!(sha256(&whole), digest);
    let (status, headers, part) = raw(
        &platform,
        Method::GET,
        path,
        &[bearer(&operator), ("range", "bytes=500000-".into())],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes 500000-699999/700000");
    assert_eq!(part.as_ref(), &bytes[500_000..]);
}
