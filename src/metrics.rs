//! Prometheus text metrics, all prefixed `meshd_`. Label values come only from bounded sets
//! (registered routes, status codes, refusal kinds), never from raw request input.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::gateway::registry::FunctionStatus;

use crate::api::Histogram;

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    refused: BTreeMap<&'static str, u64>,
    lost: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn http_request(&self, route: &str, status: u16, elapsed: Duration) {
        let mut m = self.lock();
        *m.requests.entry((route.to_string(), status)).or_default() += 1;
        m.latency
            .entry(route.to_string())
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    pub fn worker_refused(&self, kind: &'static str) {
        *self.lock().refused.entry(kind).or_default() += 1;
    }

    /// A worker taken out of service by the gateway: `heartbeat` (declared dead), `stalled`
    /// (engine without progress), `slow_reader` (one invocation cancelled, its answers unread).
    pub fn worker_lost(&self, reason: &'static str) {
        *self.lock().lost.entry(reason).or_default() += 1;
    }

    /// Renders every metric, with the registry's live view for the gauges and the inference
    /// workers' engine statistics (gathered by the caller, labelled by worker).
    pub fn render(
        &self,
        functions: &[FunctionStatus],
        workers: usize,
        engines: &[(String, crate::api::StatsSnapshot)],
    ) -> String {
        let m = self.lock();
        let mut out = String::new();
        out.push_str(
            "# HELP meshd_http_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE meshd_http_requests_total counter\n");
        for ((route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "meshd_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str(
            "# HELP meshd_http_request_duration_seconds Time to the response head, by route.\n",
        );
        out.push_str("# TYPE meshd_http_request_duration_seconds histogram\n");
        for (route, h) in &m.latency {
            let route = escape(route);
            for (b, n) in h.le.iter().zip(&h.buckets) {
                let _ = writeln!(
                    out,
                    "meshd_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "meshd_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "meshd_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "meshd_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP meshd_workers_refused_total Mesh connections refused, by reason.\n");
        out.push_str("# TYPE meshd_workers_refused_total counter\n");
        for (kind, n) in &m.refused {
            let _ = writeln!(out, "meshd_workers_refused_total{{reason=\"{kind}\"}} {n}");
        }
        out.push_str("# HELP meshd_workers_lost_total Workers the gateway took out of service (or invocations it cancelled for a worker that stopped reading), by reason.\n");
        out.push_str("# TYPE meshd_workers_lost_total counter\n");
        for (reason, n) in &m.lost {
            let _ = writeln!(out, "meshd_workers_lost_total{{reason=\"{reason}\"}} {n}");
        }
        out.push_str("# HELP meshd_workers_connected Workers connected to the mesh.\n");
        out.push_str("# TYPE meshd_workers_connected gauge\n");
        let _ = writeln!(out, "meshd_workers_connected {workers}");
        out.push_str("# HELP meshd_function_workers Live workers serving each function.\n");
        out.push_str("# TYPE meshd_function_workers gauge\n");
        for f in functions {
            let _ = writeln!(
                out,
                "meshd_function_workers{{function=\"{}\"}} {}",
                escape(&f.function),
                f.workers.len()
            );
        }
        out.push_str("# HELP meshd_function_inflight Invocations in flight (the admission queue depth), by function.\n");
        out.push_str("# TYPE meshd_function_inflight gauge\n");
        for f in functions {
            let _ = writeln!(
                out,
                "meshd_function_inflight{{function=\"{}\"}} {}",
                escape(&f.function),
                f.inflight
            );
        }
        render_engines(&mut out, engines);
        out
    }
}

fn render_engines(out: &mut String, engines: &[(String, crate::api::StatsSnapshot)]) {
    type Field = fn(&crate::api::StatsSnapshot) -> u64;
    let families: [(&str, &str, &str, Field); 9] = [
        (
            "meshd_active_sequences",
            "gauge",
            "Sequences generating now.",
            |s| s.active_sequences,
        ),
        (
            "meshd_queued_sequences",
            "gauge",
            "Requests waiting for a free slot.",
            |s| s.queued_sequences,
        ),
        (
            "meshd_slots",
            "gauge",
            "Sequences an infer worker can generate at once.",
            |s| s.slots as u64,
        ),
        (
            "meshd_generations_completed_total",
            "counter",
            "Generations finished.",
            |s| s.completed,
        ),
        (
            "meshd_generations_cancelled_total",
            "counter",
            "Generations cancelled (client left or deadline).",
            |s| s.cancelled,
        ),
        (
            "meshd_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            |s| s.prompt_tokens_total,
        ),
        (
            "meshd_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens served from the prefix cache instead of decoded (hit rate: over meshd_prompt_tokens_total).",
            |s| s.cached_tokens_total,
        ),
        (
            "meshd_prefix_cache_tokens",
            "gauge",
            "Tokens an infer worker's prefix cache holds.",
            |s| s.prefix_cache_tokens,
        ),
        (
            "meshd_tokens_generated_total",
            "counter",
            "Completion tokens generated.",
            |s| s.completion_tokens_total,
        ),
    ];
    for (name, kind, help, field) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (worker, s) in engines {
            let _ = writeln!(out, "{name}{{worker=\"{}\"}} {}", escape(worker), field(s));
        }
    }
    let name = "meshd_time_to_first_token_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} From admission to the queue until the first token.\n# TYPE {name} histogram"
    );
    for (worker, s) in engines {
        let w = escape(worker);
        let h = &s.ttft;
        for (b, n) in h.le.iter().zip(&h.buckets) {
            let _ = writeln!(out, "{name}_bucket{{worker=\"{w}\",le=\"{b}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{worker=\"{w}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{worker=\"{w}\"}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{worker=\"{w}\"}} {}", h.count);
    }
}

/// Conversations routed to the worker holding their prefix (`kept`) or, past `affinity_slack`,
/// to the least-loaded one (`overflowed`).
pub fn render_affinity(out: &mut String, kept: u64, overflowed: u64) {
    let name = "meshd_affinity_routes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Invocations with an affinity key, by whether they went to their key's worker.\n# TYPE {name} counter"
    );
    let _ = writeln!(out, "{name}{{outcome=\"kept\"}} {kept}");
    let _ = writeln!(out, "{name}{{outcome=\"overflowed\"}} {overflowed}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.http_request("/x", 200, Duration::from_millis(3));
        m.http_request("/x", 200, Duration::from_millis(300));
        m.worker_refused("token");
        let text = m.render(&[], 2, &[]);
        assert!(text.contains("meshd_http_requests_total{route=\"/x\",status=\"200\"} 2"));
        assert!(text
            .contains("meshd_http_request_duration_seconds_bucket{route=\"/x\",le=\"0.005\"} 1"));
        assert!(
            text.contains("meshd_http_request_duration_seconds_bucket{route=\"/x\",le=\"0.5\"} 2")
        );
        assert!(text.contains("meshd_workers_refused_total{reason=\"token\"} 1"));
        assert!(text.contains("meshd_workers_connected 2"));
    }
}
