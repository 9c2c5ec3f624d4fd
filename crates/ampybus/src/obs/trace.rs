//! OpenTelemetry spans linked through the `traceparent` header (W3C trace context, read and
//! written by the OpenTelemetry propagator over the envelope headers, so the same on every
//! transport).

use crate::headers::{Headers, names};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::sync::OnceLock;

/// The instrumentation scope of every span this crate starts.
///
/// ```
/// assert_eq!(ampybus::obs::TRACER_NAME, "ampybus");
/// ```
pub const TRACER_NAME: &str = "ampybus";

fn propagator() -> &'static TraceContextPropagator {
    static P: OnceLock<TraceContextPropagator> = OnceLock::new();
    P.get_or_init(TraceContextPropagator::new)
}

/// Reads trace headers out of [`Headers`] for the propagator.
struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// Writes trace headers into [`Headers`]; an empty `tracestate` is not written.
struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.set(key, value);
        }
    }
}

/// The remote context a message's headers carry (`traceparent`, `tracestate`).
///
/// ```
/// use opentelemetry::trace::TraceContextExt;
/// let h = ampybus::Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
/// let cx = ampybus::obs::extract_context(&h);
/// let sc = cx.span().span_context().clone();
/// assert_eq!(sc.trace_id().to_string(), h.trace_context().unwrap().trace_id);
/// assert!(sc.is_remote());
/// ```
pub fn extract_context(headers: &Headers) -> Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// Writes the span context of `cx` into `headers` (`traceparent`, plus `trace_id`/`span_id`
/// for older peers). Nothing is written when `cx` has no valid span context.
///
/// ```
/// let src = ampybus::Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
/// let mut dst = ampybus::Headers::new();
/// ampybus::obs::inject_context(&ampybus::obs::extract_context(&src), &mut dst);
/// assert_eq!(dst.traceparent(), src.traceparent());
/// assert_eq!(dst.get("span_id"), src.get("span_id"));
/// ```
pub fn inject_context(cx: &Context, headers: &mut Headers) {
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return;
    }
    propagator().inject_context(cx, &mut HeaderInjector(headers));
    headers.set(names::TRACE_ID, sc.trace_id().to_string());
    headers.set(names::SPAN_ID, sc.span_id().to_string());
}

/// The tracer of a bus handle: the global provider's, taken when the handle is made
/// (install your provider, e.g. with [`crate::obs::init_tracing`], before `Bus::connect`).
#[derive(Clone)]
pub(crate) struct BusTracer {
    tracer: std::sync::Arc<global::BoxedTracer>,
    /// Whether the tracer records spans (false for the no-op provider that is installed when
    /// no exporter is configured): consumer spans are then not built at all and the handler
    /// runs without a trace context (so an idle tracer costs nothing per message).
    recording: bool,
}

impl BusTracer {
    pub(crate) fn from_global() -> BusTracer {
        let tracer = global::tracer_provider().tracer(TRACER_NAME);
        let recording = {
            let mut probe = tracer.start("ampybus.probe");
            let r = probe.is_recording();
            // One span named `ampybus.probe` per bus handle on a recording provider (so
            // exporters see it once per handle); the no-op provider drops it.
            probe.end();
            r
        };
        BusTracer {
            tracer: std::sync::Arc::new(tracer),
            recording,
        }
    }

    /// Starts the publish span of one message and rewrites its trace headers to it. The parent
    /// is the current OpenTelemetry context when it has a span (a handler publishing
    /// downstream, an application span), else the `traceparent` the headers carry.
    pub(crate) fn start_publish(&self, topic: &str, headers: &mut Headers) -> PublishSpan {
        let current = Context::current();
        let parent = if current.has_active_span() {
            current
        } else {
            extract_context(headers)
        };
        let parent_span = parent.span().span_context().span_id();
        let mut span = self
            .tracer
            .span_builder(publish_name(topic))
            .with_kind(SpanKind::Producer)
            .start_with_context(&*self.tracer, &parent);
        let sc = span.span_context().clone();
        // A no-op tracer hands back the parent's context: nothing to rewrite.
        if sc.is_valid() && sc.span_id() != parent_span {
            if span.is_recording() {
                span.set_attribute(KeyValue::new("messaging.system", "ampybus"));
                span.set_attribute(KeyValue::new(
                    "messaging.destination.name",
                    topic.to_owned(),
                ));
                if let Some(id) = headers.message_id() {
                    span.set_attribute(KeyValue::new("messaging.message.id", id.to_owned()));
                }
            }
            let cx = Context::new().with_remote_span_context(sc);
            inject_context(&cx, headers);
        }
        PublishSpan { span }
    }

    /// Whether spans are recorded (a tracer provider other than the no-op one is installed).
    pub(crate) fn is_recording(&self) -> bool {
        self.recording
    }

    /// Starts the consumer span of one handling attempt; the parent is the message's
    /// `traceparent`.
    pub(crate) fn start_consume(
        &self,
        topic: &str,
        headers: &Headers,
        consumer: &str,
    ) -> ConsumeSpan {
        let parent = extract_context(headers);
        if !self.recording {
            return ConsumeSpan { cx: parent };
        }
        let mut span = self
            .tracer
            .span_builder(process_name(topic))
            .with_kind(SpanKind::Consumer)
            .start_with_context(&*self.tracer, &parent);
        if span.is_recording() {
            span.set_attribute(KeyValue::new("messaging.system", "ampybus"));
            span.set_attribute(KeyValue::new(
                "messaging.destination.name",
                topic.to_owned(),
            ));
            span.set_attribute(KeyValue::new(
                "messaging.consumer.group.name",
                consumer.to_owned(),
            ));
            if let Some(id) = headers.message_id() {
                span.set_attribute(KeyValue::new("messaging.message.id", id.to_owned()));
            }
        }
        let cx = parent.with_span(span);
        ConsumeSpan { cx }
    }
}

fn publish_name(topic: &str) -> String {
    format!("publish {}", super::domain_topic(topic))
}

fn process_name(topic: &str) -> String {
    format!("process {}", super::domain_topic(topic))
}

/// The span of one publish; ended by [`PublishSpan::end`] (or on drop).
pub(crate) struct PublishSpan {
    span: global::BoxedSpan,
}

impl PublishSpan {
    pub(crate) fn end(mut self, error: Option<&crate::Error>) {
        if let Some(e) = error {
            self.span.set_status(Status::error(e.to_string()));
        }
        self.span.end();
    }
}

/// The span of one handling attempt, as a context the handler runs in.
pub(crate) struct ConsumeSpan {
    cx: Context,
}

impl ConsumeSpan {
    /// The context to run the handler in (so downstream publishes become children).
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    /// The trace id as 32 hex digits, for logs.
    pub(crate) fn trace_id(&self) -> opentelemetry::trace::TraceId {
        self.cx.span().span_context().trace_id()
    }

    /// Ends the span with its result (`ok`, `retry`, `dlq`, `skipped`, `released`).
    pub(crate) fn end(self, result: &'static str, dlq_reason: Option<&str>) {
        let span = self.cx.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new("ampybus.result", result));
            if let Some(r) = dlq_reason {
                span.set_attribute(KeyValue::new("ampybus.dlq_reason", r.to_owned()));
                span.set_status(Status::error(r.to_owned()));
            }
        }
        span.end();
    }
}
