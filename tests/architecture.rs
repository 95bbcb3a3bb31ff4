//! The picture of the code, checked: the layers point one way. `api` and `protocol` are the leaf
//! contract; the roles and the engine never reach into the gateway; roles never import each other
//! (only `roles/mod.rs` and `up` wire several together). A read of the sources, not of a build: a
//! `use` that breaks the picture fails here by file and line.

use std::path::{Path, PathBuf};

fn sources(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        if d.is_file() {
            out.push(d);
            continue;
        }
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() || p.extension().is_some_and(|e| e == "rs") {
                stack.push(p);
            }
        }
    }
    assert!(!out.is_empty(), "no sources under src/{dir}");
    out
}

/// Every line of the files under `dir` that names one of `forbidden` in code (comments skipped).
fn offenders(dir: &str, forbidden: &[&str], allow_in: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in sources(dir) {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        if allow_in.contains(&name.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for f in forbidden {
                if code.contains(f) {
                    found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn roles_and_the_engine_never_import_the_gateway() {
    let bad: Vec<String> = ["roles", "engine", "worker"]
        .iter()
        .flat_map(|dir| offenders(dir, &["crate::gateway", "gateway::"], &[]))
        .collect();
    assert!(bad.is_empty(), "layers pointing up:\n{}", bad.join("\n"));
}

#[test]
fn the_contract_is_a_leaf() {
    let upward = [
        "crate::gateway",
        "crate::roles",
        "crate::engine",
        "crate::worker",
        "crate::config",
        "crate::metrics",
        "crate::state",
    ];
    let bad: Vec<String> = ["api.rs", "protocol.rs"]
        .iter()
        .flat_map(|f| offenders(f, &upward, &[]))
        .collect();
    assert!(
        bad.is_empty(),
        "the contract imports upward:\n{}",
        bad.join("\n")
    );
}

#[test]
fn roles_never_import_each_other_and_the_engine_knows_no_role() {
    let mut bad = Vec::new();
    for role in ["chat", "inference", "math"] {
        let others: Vec<String> = ["chat", "inference", "math"]
            .iter()
            .filter(|o| **o != role)
            .flat_map(|o| [format!("crate::roles::{o}"), format!("super::{o}")])
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        bad.extend(offenders(&format!("roles/{role}.rs"), &others, &[]));
    }
    bad.extend(offenders("engine", &["crate::roles", "crate::worker"], &[]));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
