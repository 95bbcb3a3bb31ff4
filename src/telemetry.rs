//! Logging through `tracing`: human-readable by default, JSON lines with `--log-format json`.
//! Every invocation runs in a span carrying its `trace_id`, so each line of every role names it.
//!
//! OpenTelemetry, off by default: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are also exported as OTLP/HTTP protobuf to that
//! collector (Jaeger, Tempo, the OpenTelemetry Collector, X-Ray or Datadog through it), named by
//! `OTEL_SERVICE_NAME` (default `meshd-<role>`). A W3C `traceparent` travels with every
//! invocation on the mesh ([`inject`], [`extract`]), so one trace spans gateway → caller →
//! gateway → infer.
//!
//! Sampling is decided once, where a request enters (the gateway's HTTP edge), by the standard
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`; e.g.
//! `parentbased_traceidratio` with `0.01` keeps 1%), and travels in the `traceparent`'s sampled
//! flag; an invocation without a sampled `traceparent` is not traced. A request that is not
//! sampled makes no OpenTelemetry span at all ([`span!`](crate::span) gives its spans a target
//! the exporter's layer never sees), so sampling cuts the cost, not only the volume.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static SAMPLER: OnceLock<Sampler> = OnceLock::new();

/// The target of the spans the OTLP layer exports; every other span is only logged.
pub const TRACED: &str = "meshd::traced";

/// An info span named `$name` with `$fields`, exported over OTLP when `$sampled` (see
/// [`sampled_root`], [`sampled_child`]) and only logged otherwise.
#[macro_export]
macro_rules! span {
    ($sampled:expr, $name:literal, $($fields:tt)*) => {
        if $sampled {
            ::tracing::info_span!(target: "meshd::traced", $name, $($fields)*)
        } else {
            ::tracing::info_span!($name, $($fields)*)
        }
    };
}

/// The standard sampler settings, read once at [`init`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sampler {
    /// A request with a `traceparent` follows its sampled flag.
    parent_based: bool,
    /// The share of other requests sampled.
    ratio: f64,
}

impl Sampler {
    fn from_env(sampler: Option<&str>, arg: Option<&str>) -> Sampler {
        let ratio = || {
            arg.and_then(|a| a.trim().parse::<f64>().ok())
                .filter(|r| r.is_finite())
                .map_or(1.0, |r| r.clamp(0.0, 1.0))
        };
        let name = sampler.map(str::trim).filter(|s| !s.is_empty());
        let (parent_based, ratio) = match name.unwrap_or("parentbased_always_on") {
            "always_on" => (false, 1.0),
            "always_off" => (false, 0.0),
            "traceidratio" => (false, ratio()),
            "parentbased_always_on" => (true, 1.0),
            "parentbased_always_off" => (true, 0.0),
            "parentbased_traceidratio" => (true, ratio()),
            other => {
                eprintln!("meshd: OTEL_TRACES_SAMPLER={other} is not supported here; sampling every request");
                (true, 1.0)
            }
        };
        Sampler {
            parent_based,
            ratio,
        }
    }
}

/// Whether a request entering with `traceparent` (from a client; `None`: a new trace) is traced.
pub fn sampled_root(traceparent: Option<&str>) -> bool {
    let Some(s) = SAMPLER.get() else {
        return false;
    };
    match traceparent.filter(|t| s.parent_based && is_traceparent(t)) {
        Some(tp) => flag_sampled(tp),
        None => s.ratio >= 1.0 || (s.ratio > 0.0 && rand::random::<f64>() < s.ratio),
    }
}

/// Whether a hop of an invocation that came with `traceparent` is traced: only when it carries
/// a sampled one (the decision was made where the request entered).
pub fn sampled_child(traceparent: Option<&str>) -> bool {
    SAMPLER.get().is_some() && traceparent.is_some_and(|t| is_traceparent(t) && flag_sampled(t))
}

fn flag_sampled(traceparent: &str) -> bool {
    traceparent
        .rsplit('-')
        .next()
        .and_then(|f| u8::from_str_radix(f, 16).ok())
        .is_some_and(|f| f & 1 == 1)
}

/// Whether OTLP export is configured in this process's environment.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

/// Installs the global subscriber (once per process; later calls are ignored).
/// `RUST_LOG`, when set, wins over `level`. `role` names the service when `OTEL_SERVICE_NAME`
/// does not.
pub fn init(format: LogFormat, level: &str, role: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    // The log level filters the log lines only: the exported spans are meshd's info spans
    // (http, route, invoke) whatever the logs show.
    let otel = otlp_configured().then(|| tracer(role)).flatten();
    let otel_layer = otel.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t)
            // Less work per span: no busy/idle timing, no source location or thread attributes.
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            // Sampled spans only (no event has this target: log events stay log lines). A static
            // filter, decided once per callsite: a dynamic one would make every log callsite ask
            // the subscriber again on every call.
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(TRACED, tracing::level_filters::LevelFilter::INFO),
            )
    });
    let registry = tracing_subscriber::registry().with(otel_layer);
    let _ = match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
    };
}

fn tracer(role: &str) -> Option<opentelemetry_sdk::trace::SdkTracer> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("meshd: OTLP export is configured but cannot start: {e}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("meshd-{role}"));
    let _ = SAMPLER.set(Sampler::from_env(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
    ));
    let provider = SdkTracerProvider::builder()
        // The decision is meshd's (see `sampled_root`): every span that reaches the SDK is kept.
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("meshd");
    let _ = PROVIDER.set(provider);
    Some(tracer)
}

/// Sends the spans still buffered (at exit; bounded by the exporter's own timeout).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// The W3C `traceparent` of `span`, when OTLP export is on and the span is sampled.
pub fn inject(span: &tracing::Span) -> Option<String> {
    PROVIDER.get()?;
    if span.metadata()?.target() != TRACED {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Whether `s` is a W3C `traceparent` of version 00 (`00-<32 hex>-<16 hex>-<2 hex>`, neither id
/// all zeros): the only form the gateway forwards from one worker to another.
pub fn is_traceparent(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let zero = |p: &str| p.bytes().all(|b| b == b'0');
    let parts: Vec<&str> = s.split('-').collect();
    matches!(parts.as_slice(), ["00", trace, span, flags]
        if hex(trace, 32) && hex(span, 16) && hex(flags, 2) && !zero(trace) && !zero(span))
}

/// Makes `span` a child of the remote span named by `traceparent` (no-op when OTLP export is
/// off or the value is not a valid `traceparent`).
pub fn extract(span: &tracing::Span, traceparent: Option<&str>) {
    let (Some(_), Some(tp)) = (PROVIDER.get(), traceparent) else {
        return;
    };
    if span.metadata().is_none_or(|m| m.target() != TRACED) {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::{flag_sampled, is_traceparent, Sampler};

    #[test]
    fn the_standard_sampler_variables_are_read() {
        let s = |name: Option<&str>, arg: Option<&str>| Sampler::from_env(name, arg);
        let on = Sampler {
            parent_based: true,
            ratio: 1.0,
        };
        assert_eq!(s(None, None), on);
        assert_eq!(s(Some("parentbased_always_on"), Some("0.5")), on);
        assert_eq!(
            s(Some("parentbased_traceidratio"), Some("0.01")),
            Sampler {
                parent_based: true,
                ratio: 0.01
            }
        );
        assert_eq!(s(Some("traceidratio"), Some("7")).ratio, 1.0);
        assert_eq!(s(Some("traceidratio"), Some("nope")).ratio, 1.0);
        assert_eq!(s(Some("always_off"), None).ratio, 0.0);
        assert!(!s(Some("always_on"), None).parent_based);
        assert!(flag_sampled(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!flag_sampled(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
    }

    #[test]
    fn only_a_well_formed_traceparent_passes() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
        }
        assert!(!is_traceparent(&"0".repeat(4096)));
    }
}
