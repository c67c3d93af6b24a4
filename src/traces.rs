//! Traces over OTLP: set up when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, off otherwise.
//!
//! The spans the log filter lets through go to the collector: fleetlog's own (HTTP requests,
//! ingest batches, commands, appends, relay publishes, projection and process-manager batches,
//! dispatches) at info whatever `FLEETLOG_LOG` says, other crates' as `FLEETLOG_LOG` enables
//! them. One filter decides for logs and spans alike (see `init_logging`). Over
//! OTLP/HTTP, protobuf by default or JSON (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`), from the
//! batch processor's own thread. The context crosses processes as `fleetlog_trace` describes.
//! The standard `OTEL_*` variables apply: `OTEL_SERVICE_NAME` (default `fleetlog-{role}`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`; `OTEL_SDK_DISABLED=true`
//! or `OTEL_TRACES_EXPORTER=none` turn export off.

use anyhow::{bail, Context};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::Layer;

/// The environment variables that name a collector.
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// An installed exporter: flush it before the process exits, or the last spans are lost.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Sends what is still queued and stops the exporter.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("fleetlog: cannot send the last traces: {error}");
        }
    }
}

/// The exporter and the layer that feeds it, when the environment names a collector.
pub fn from_env<S>(service: &str) -> anyhow::Result<Option<(Traces, impl Layer<S>)>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    if !enabled() {
        return Ok(None);
    }
    let protocol = protocol()?;
    for variable in ENDPOINT_VARIABLES {
        if let Some(endpoint) = variable_value(variable) {
            check_endpoint(variable, &endpoint)?;
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .context("cannot set up trace export")?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(service))
        .build();
    let tracer = provider.tracer("fleetlog");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        // A span's parent is the current tracing span, as the span tree has it: attaching
        // OpenTelemetry contexts to threads on every enter serves other OpenTelemetry
        // instrumentation, which fleetlog has none of.
        .with_context_activation(false);
    Ok(Some((Traces { provider }, layer)))
}

/// Whether a collector is named and export is not switched off.
fn enabled() -> bool {
    let disabled = variable_value("OTEL_SDK_DISABLED")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || variable_value("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && ENDPOINT_VARIABLES
            .iter()
            .any(|v| variable_value(v).is_some())
}

/// The OTLP encoding: the signal's variable first, then the general one, protobuf by default
/// (the specification's default for HTTP). fleetlog speaks OTLP over HTTP only; a request for
/// gRPC is refused rather than sent to a gRPC port in a form it cannot read.
fn protocol() -> anyhow::Result<opentelemetry_otlp::Protocol> {
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        match variable_value(variable).as_deref() {
            None => {}
            Some("http/protobuf") => return Ok(opentelemetry_otlp::Protocol::HttpBinary),
            Some("http/json") => return Ok(opentelemetry_otlp::Protocol::HttpJson),
            Some("grpc") => bail!(
                "{variable}=grpc: fleetlog exports OTLP over HTTP; set it to http/protobuf (or \
                 http/json) and point the endpoint at the collector's HTTP port (4318)"
            ),
            Some(other) => bail!("{variable}={other:?}: expected http/protobuf or http/json"),
        }
    }
    Ok(opentelemetry_otlp::Protocol::HttpBinary)
}

fn check_endpoint(variable: &str, endpoint: &str) -> anyhow::Result<()> {
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("{variable}={endpoint:?} is not a URL"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => bail!("{variable}={endpoint:?}: expected an http:// or https:// URL with a host"),
    }
}

/// The service is the role unless `OTEL_SERVICE_NAME` (or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`) names it; the role and version are attributes either way.
fn resource(service: &str) -> Resource {
    let named = variable_value("OTEL_SERVICE_NAME").is_some()
        || variable_value("OTEL_RESOURCE_ATTRIBUTES")
            .is_some_and(|attributes| attributes.contains("service.name="));
    let builder = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("fleetlog.role", service.to_string()),
        KeyValue::new("process.pid", i64::from(std::process::id())),
    ]);
    let builder = if named {
        builder
    } else {
        builder.with_service_name(if service == "up" {
            "fleetlog".to_string()
        } else {
            format!("fleetlog-{service}")
        })
    };
    builder.build()
}

fn variable_value(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}
