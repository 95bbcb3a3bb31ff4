//! The math chain at c=32 (gateway → caller → gateway → infer → gateway `state::incr`, durable)
//! through one gateway on sled, and through two gateways sharing one redis-server (AOF
//! `appendfsync always`) behind haproxy with every worker joined to both: the cost of leaving one
//! machine, as a ratio measured in one run (the two alternate, twice).
//!
//! Target: the Redis fleet ≥ 50% of the sled gateway's req/s, its p99 ≤ 10 ms.
//!
//! `cargo bench --bench load_fleet` (env `SECONDS`, default 5 per point; `CONC`, default 32).
//! Needs redis-server and haproxy (`scripts/deps --test`).

mod harness;

use std::net::SocketAddr;

use harness::{common, drive};

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A worker joined to every gateway in `urls` (echo generator: `math::add` needs no model).
fn worker(role: &str, urls: &[String], name: &str) -> common::Proc {
    let mut args = vec![role];
    for u in urls {
        args.extend(["--gateway-url", u.as_str()]);
    }
    args.extend(["--worker-token", common::TOKEN, "--name", name]);
    if role == "infer" {
        args.extend(["--generator", "echo", "--slots", "1"]);
    }
    common::Proc::start(&args, false)
}

fn main() {
    let secs: f64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let conc: usize = std::env::var("CONC")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let failed = rt.block_on(async {
        // One gateway on sled, its workers.
        let dir = tempfile::tempdir().unwrap();
        let sled = common::gateway(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
        let one = [sled.mesh_url()];
        let _sled_workers = (worker("caller", &one, "caller"), worker("infer", &one, "infer"));
        common::ready(sled.http()).await;

        // Two gateways on Redis, workers joined to both, haproxy in front.
        let redis = common::Redis::start();
        let url = redis.url();
        let gateways: Vec<common::Proc> = (0..2)
            .map(|_| {
                let d = tempfile::tempdir().unwrap();
                let http = at(common::free_port()).to_string();
                let g = common::gateway_with(d.path(), &http, "127.0.0.1:0", &["--state-url", &url]);
                std::mem::forget(d);
                g
            })
            .collect();
        let urls: Vec<String> = gateways.iter().map(common::Proc::mesh_url).collect();
        let _fleet_workers = (
            worker("caller", &urls, "caller"),
            worker("infer", &urls, "infer"),
        );
        for g in &gateways {
            common::ready(g.http()).await;
        }
        let https: Vec<SocketAddr> = gateways.iter().map(common::Proc::http).collect();
        let lb = common::Haproxy::start(&https);

        println!("load_fleet: {secs} s per point, c={conc}, 2 cores shared by the client and every process");
        println!(
            "{:<26} {:>10} {:>9} {:>9} {:>7}",
            "target", "req/s", "p50 ms", "p99 ms", "errors"
        );
        let math = |addr| drive(addr, "/math/add-two-numbers", br#"{"a": 1, "b": 2}"#, conc, secs);
        let (mut sled_rps, mut fleet_rps, mut fleet_p99, mut failed) = (0.0, 0.0, 0.0f64, 0);
        for _ in 0..2 {
            for (name, addr) in [("1 gateway, sled", sled.http()), ("2 gateways, redis, haproxy", lb.addr)] {
                let p = math(addr).await;
                println!(
                    "{name:<26} {:>10.0} {:>9.2} {:>9.2} {:>7}",
                    p.rps, p.p50, p.p99, p.errors
                );
                failed += p.errors;
                if addr == lb.addr {
                    fleet_rps += p.rps;
                    fleet_p99 = fleet_p99.max(p.p99);
                } else {
                    sled_rps += p.rps;
                }
            }
        }
        println!(
            "the redis fleet: {:.1}% of the sled gateway's req/s (target >= 50%), worst p99 {:.2} ms (target <= 10 ms)",
            100.0 * fleet_rps / sled_rps,
            fleet_p99
        );
        failed
    });
    if failed > 0 {
        eprintln!("load_fleet: {failed} requests failed; the figures above are not valid");
        std::process::exit(1);
    }
}
