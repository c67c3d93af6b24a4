//! Trace context across fleetlog's hops: one trace from an HTTP request or an MQTT message,
//! through the command, the stored event, the relay and JetStream, to the projection, process
//! manager or dispatcher that acts on it, even when each of those runs in its own process.
//!
//! The context travels as W3C Trace Context (`traceparent`, `tracestate`):
//!
//! - in the HTTP request's headers, into the API's request span ([`from_http_headers`]);
//! - in the metadata of every event a command appends, next to its correlation id
//!   ([`inject_current`]), so the relay, running elsewhere and later, continues the trace
//!   ([`from_metadata`], [`from_metadata_json`]);
//! - in the headers of the JetStream message the relay publishes ([`inject`]), read by each
//!   consumer ([`from_nats_headers`], [`follow_messages`]).
//!
//! Only a sampled context is stored or forwarded: with tracing off (no OTLP endpoint) or a trace
//! the sampler dropped, events carry nothing extra and the hops create no spans. A process
//! without an exporter still forwards the context it read, so a trace passes through it.
//!
//! The exporter itself (OTLP over HTTP) is set up by the binary; this crate only carries the
//! context and is what every role links.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::Deserialize;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and metadata key) naming the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header (and metadata key) carrying vendor state along the trace.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` forwarded: the W3C limit is 32 members of at most 256 bytes, and
/// anything beyond a sane size is dropped rather than stored with every event.
const MAX_TRACESTATE_BYTES: usize = 512;

/// Adds the current span's trace context to `metadata` (an event's metadata, as a command
/// stamps it), when that span is sampled; leaves it untouched otherwise.
pub fn inject_current(metadata: &mut HashMap<String, String>) {
    let context = Span::current().context();
    inject(&context, |key, value| {
        metadata.insert(key.to_string(), value);
    });
}

/// Writes `context` as `traceparent` (and `tracestate`) through `set`, when it is a sampled
/// span's context: into JetStream headers, HTTP headers, or a metadata map.
pub fn inject(context: &Context, set: impl FnMut(&str, String)) {
    if !context.span().span_context().is_sampled() {
        return;
    }
    TraceContextPropagator::new().inject_context(context, &mut Setter(set));
}

/// The context `span` passes on: its own when this process records spans, else `parent`, the
/// one it continued (a process without an exporter forwards what it read).
pub fn passed_on(span: &Span, parent: Context) -> Context {
    let own = span.context();
    if own.span().span_context().is_valid() {
        own
    } else {
        parent
    }
}

/// The trace context carried in an HTTP request's headers, if any.
pub fn from_http_headers(headers: &http::HeaderMap) -> Option<Context> {
    extract(&HttpHeaders(headers))
}

/// The trace context a JetStream message carries in its headers, if any.
pub fn from_nats_headers(headers: Option<&async_nats::HeaderMap>) -> Option<Context> {
    extract(&NatsHeaders(headers?))
}

/// The trace context an event's metadata carries, if any.
pub fn from_metadata(metadata: &serde_json::Value) -> Option<Context> {
    extract(&JsonMetadata(metadata.as_object()?))
}

/// [`from_metadata`] on the metadata as the events table stores it, without parsing the rest
/// of it: most events carry no context, and those cost one substring search.
pub fn from_metadata_json(metadata: &str) -> Option<Context> {
    if !metadata.contains(TRACEPARENT) {
        return None;
    }
    #[derive(Deserialize)]
    struct Carried {
        traceparent: Option<String>,
        tracestate: Option<String>,
    }
    let carried: Carried = serde_json::from_str(metadata).ok()?;
    let mut pairs = HashMap::with_capacity(2);
    pairs.insert(TRACEPARENT.to_string(), carried.traceparent?);
    if let Some(state) = carried.tracestate {
        pairs.insert(TRACESTATE.to_string(), state);
    }
    extract(&pairs)
}

/// Makes `span` continue `parent`'s trace. Call it before the span is first entered.
pub fn follow(span: &Span, parent: Context) {
    // Fails only when no OpenTelemetry layer is installed (tracing off) or the span is
    // disabled: then there is nothing to link.
    let _ = span.set_parent(parent);
}

/// Makes `span`, which handles several messages at once, continue the trace of the first
/// message that carries one, and links it to the traces of the others: a batch belongs to
/// many traces, and each of them can find it.
pub fn follow_messages(span: &Span, contexts: impl IntoIterator<Item = Context>) {
    let mut contexts = contexts.into_iter();
    let Some(first) = contexts.next() else {
        return;
    };
    let first_trace = first.span().span_context().trace_id();
    follow(span, first);
    for context in contexts {
        let linked: SpanContext = context.span().span_context().clone();
        if linked.trace_id() != first_trace {
            span.add_link(linked);
        }
    }
}

/// The span `make` builds for handling one JetStream message, continuing the trace the message
/// carries; [`Span::none`] when it carries none (an untraced event costs no span).
pub fn span_for_message(message: &async_nats::Message, make: impl FnOnce() -> Span) -> Span {
    span_for_messages(std::iter::once(message), make)
}

/// The span `make` builds for handling `messages` together (one transaction for a batch),
/// continuing the first carried trace and linking the others ([`follow_messages`]);
/// [`Span::none`] when none carries a trace.
pub fn span_for_messages<'a>(
    messages: impl IntoIterator<Item = &'a async_nats::Message>,
    make: impl FnOnce() -> Span,
) -> Span {
    let mut contexts = messages
        .into_iter()
        .filter_map(|message| from_nats_headers(message.headers.as_ref()))
        .peekable();
    if contexts.peek().is_none() {
        return Span::none();
    }
    let span = make();
    follow_messages(&span, contexts);
    span
}

/// A valid, sampled context from `carrier`: an unsampled or malformed one is as good as none.
fn extract(carrier: &dyn Extractor) -> Option<Context> {
    let context = TraceContextPropagator::new().extract(carrier);
    let span_context = context.span().span_context().clone();
    (span_context.is_valid() && span_context.is_sampled()).then_some(context)
}

struct Setter<F>(F);

impl<F: FnMut(&str, String)> Injector for Setter<F> {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACESTATE && (value.is_empty() || value.len() > MAX_TRACESTATE_BYTES) {
            return;
        }
        (self.0)(key, value);
    }
}

struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

struct JsonMetadata<'a>(&'a serde_json::Map<String, serde_json::Value>);

impl Extractor for JsonMetadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(serde_json::Value::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    use serde_json::json;

    use super::*;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    fn trace_id(context: &Context) -> String {
        context.span().span_context().trace_id().to_string()
    }

    #[test]
    fn a_sampled_context_in_metadata_is_read_back_whichever_form_the_metadata_has() {
        let metadata = json!({"actor": "cli", "correlation_id": "c", TRACEPARENT: SAMPLED});
        let from_value = from_metadata(&metadata).expect("a context");
        let from_text = from_metadata_json(&metadata.to_string()).expect("a context");
        assert_eq!(trace_id(&from_value), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id(&from_text), trace_id(&from_value));
        assert!(from_value.span().span_context().is_remote());
    }

    #[test]
    fn metadata_without_a_sampled_well_formed_context_carries_none() {
        for metadata in [
            json!({"actor": "cli"}),
            json!({TRACEPARENT: UNSAMPLED}),
            json!({TRACEPARENT: "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}),
            json!({TRACEPARENT: "not a traceparent"}),
            json!({TRACEPARENT: ""}),
            json!({TRACEPARENT: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\0"}),
            json!({TRACEPARENT: 7}),
            json!("traceparent"),
        ] {
            assert!(from_metadata(&metadata).is_none(), "{metadata}");
            assert!(
                from_metadata_json(&metadata.to_string()).is_none(),
                "{metadata}"
            );
        }
    }

    #[test]
    fn headers_carry_the_context_both_ways() {
        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vendor", "value")]).unwrap(),
        );
        let context = Context::new().with_remote_span_context(span_context);
        let mut nats = async_nats::HeaderMap::new();
        inject(&context, |key, value| nats.insert(key, value.as_str()));
        assert_eq!(
            nats.get(TRACEPARENT).map(|v| v.as_str()),
            Some(SAMPLED),
            "the W3C form"
        );
        assert_eq!(
            nats.get(TRACESTATE).map(|v| v.as_str()),
            Some("vendor=value")
        );
        let back = from_nats_headers(Some(&nats)).expect("a context");
        assert_eq!(trace_id(&back), trace_id(&context));

        let mut http = http::HeaderMap::new();
        inject(&back, |key, value| {
            http.insert(
                http::HeaderName::from_bytes(key.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        });
        assert_eq!(
            trace_id(&from_http_headers(&http).expect("a context")),
            trace_id(&context)
        );
    }

    #[test]
    fn an_unsampled_context_is_neither_stored_nor_forwarded() {
        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::default(),
            false,
            TraceState::default(),
        );
        let context = Context::new().with_remote_span_context(span_context);
        let mut written = Vec::new();
        inject(&context, |key, value| {
            written.push((key.to_string(), value))
        });
        assert!(written.is_empty());
        assert!(from_nats_headers(None).is_none());
    }

    #[test]
    fn without_tracing_a_command_stamps_nothing() {
        let mut metadata = HashMap::new();
        inject_current(&mut metadata);
        assert!(metadata.is_empty());
    }

    #[test]
    fn a_process_that_records_no_spans_passes_on_the_context_it_read() {
        let parent = from_metadata(&json!({TRACEPARENT: SAMPLED})).unwrap();
        let span = tracing::info_span!("relay.publish");
        follow(&span, parent.clone());
        assert_eq!(
            trace_id(&passed_on(&span, parent)),
            trace_id(&from_metadata(&json!({TRACEPARENT: SAMPLED})).unwrap())
        );
    }
}

#[cfg(test)]
mod with_an_exporter {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use serde_json::json;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn recording() -> (
        InMemorySpanExporter,
        SdkTracerProvider,
        impl tracing::Subscriber,
    ) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        (
            exporter,
            provider,
            tracing_subscriber::registry().with(layer),
        )
    }

    #[test]
    fn a_command_stamps_the_context_of_the_span_it_runs_in() {
        let (exporter, provider, subscriber) = recording();
        let parent = from_metadata(
            &json!({TRACEPARENT: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}),
        )
        .unwrap();
        let metadata = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("command");
            follow(&span, parent);
            let _entered = span.enter();
            let mut metadata = HashMap::new();
            inject_current(&mut metadata);
            metadata
        });
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let command = spans.iter().find(|span| span.name == "command").unwrap();
        assert_eq!(
            command.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(command.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(
            metadata[TRACEPARENT],
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                command.span_context.span_id()
            ),
            "the stored context names the command's span as the parent of what follows"
        );
    }

    #[test]
    fn a_batch_continues_its_first_traced_message_and_links_the_others() {
        let (exporter, provider, subscriber) = recording();
        let first = "00-11111111111111111111111111111111-1111111111111111-01";
        let second = "00-22222222222222222222222222222222-2222222222222222-01";
        let contexts: Vec<Context> = [first, second, first]
            .iter()
            .filter_map(|parent| from_metadata(&json!({TRACEPARENT: parent})))
            .collect();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("project");
            follow_messages(&span, contexts);
            let _entered = span.enter();
        });
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let project = spans.iter().find(|span| span.name == "project").unwrap();
        assert_eq!(
            project.span_context.trace_id().to_string(),
            "11111111111111111111111111111111"
        );
        let linked: Vec<String> = project
            .links
            .iter()
            .map(|link| link.span_context.trace_id().to_string())
            .collect();
        assert_eq!(linked, ["22222222222222222222222222222222"]);
    }
}
