//! Real services the tests start for themselves on loopback: redis-server and haproxy (Debian
//! packages that `scripts/deps --test` installs). Each is killed when dropped.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn(cmd: &mut Command) -> Child {
    // Die with the test, whatever happens to it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (scripts/deps --test installs it)"))
}

/// A free loopback port (bound, then released for the service to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// redis-server with AOF and `appendfsync always` in its own directory: what it acknowledged
/// survives `kill -9`.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// TLS only (`rediss://`): the certificate and key it serves.
    tls: Option<(PathBuf, PathBuf)>,
    cluster: bool,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// On a port chosen beforehand (a gateway may already be pointed at it).
    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            tls: None,
            cluster: false,
        };
        r.restart();
        r
    }

    /// A node of a Redis Cluster (`cluster-enabled yes`), not yet part of one.
    fn cluster_node() -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            tls: None,
            cluster: false,
        };
        r.cluster = true;
        r.restart();
        r
    }

    /// Serving TLS only, with `cert` and `key` (clients are not asked for certificates).
    pub fn start_tls(cert: PathBuf, key: PathBuf) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            tls: Some((cert, key)),
            cluster: false,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again) on the same port and directory: it replays its AOF.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port = self.port.to_string();
        let listen: Vec<&str> = match &self.tls {
            None => vec!["--port", &port],
            Some((cert, key)) => vec![
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ],
        };
        let cluster = if self.cluster {
            vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
        } else {
            vec![]
        };
        let child = spawn(
            Command::new("redis-server")
                .args(&listen)
                .args(&cluster)
                .args(["--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--dir", self.dir.path().to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        self.child = Some(child);
        wait_for_port(self.port, "redis-server");
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One command through redis-cli, its output trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// A Redis Cluster of three primaries (no replicas): every slot served, keys spread by slot.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<Redis> = (0..3).map(|_| Redis::cluster_node()).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            while !n.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// One node's URL: the client learns the rest.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// haproxy in front of HTTP backends: round robin, each checked with `GET /readyz`.
pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Haproxy {
    pub fn start(backends: &[SocketAddr]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, a)| format!("    server gw{i} {a} check inter 200ms fall 2 rise 2\n"))
            .collect();
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 4096\n\
                 defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    \
                 retries 2\n    option redispatch 1\n\
                 frontend api\n    bind 127.0.0.1:{port}\n    default_backend gateways\n\
                 backend gateways\n    balance roundrobin\n    option httpchk GET /readyz\n    \
                 http-check expect status 200\n{servers}"
            ),
        )
        .unwrap();
        let check = Command::new("haproxy")
            .args(["-c", "-q", "-f", config.to_str().unwrap()])
            .status()
            .expect("haproxy");
        assert!(check.success(), "haproxy refused its configuration");
        let child = spawn(
            Command::new("haproxy")
                .args(["-db", "-f", config.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for_port(port, "haproxy");
        Haproxy {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            _dir: dir,
            config,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
