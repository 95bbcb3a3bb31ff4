//! `meshd chat` driven through a real pseudo-terminal, as a person would use it: against
//! `meshd up` (echo generator: the terminal client is under test, not the model), it streams an
//! answer, keeps the conversation (the prompt grows), forgets it on `/reset`, shows the gateway's
//! error for an unknown `/model`, and leaves on `/quit`.

mod common;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The chat process, killed when dropped (a failing assertion must not leave it behind).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Terminal {
    master: std::fs::File,
    screen: Arc<Mutex<String>>,
    /// How much of `screen` the last `expect` consumed.
    seen: usize,
}

impl Terminal {
    /// Starts `meshd ARGS` on the slave side of a new pty.
    fn spawn(args: &[&str]) -> (Terminal, Child) {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty fills two descriptors it has just opened; nothing else owns them.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty");
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        let child = Command::new(bin())
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let master = unsafe { std::fs::File::from_raw_fd(master) };
        let screen = Arc::new(Mutex::new(String::new()));
        let (mut reader, s) = (master.try_clone().unwrap(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        (
            Terminal {
                master,
                screen,
                seen: 0,
            },
            Child(child),
        )
    }

    fn type_line(&mut self, line: &str) {
        self.master
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// Waits (bounded) until the output after the last match holds `needle`; answers the text
    /// up to and including it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen.lock().unwrap().clone();
            if let Some(at) = screen[self.seen..].find(needle) {
                let end = self.seen + at + needle.len();
                let text = screen[self.seen..end].to_string();
                self.seen = end;
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the terminal; it shows:\n{}",
                &screen[self.seen..]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn prompt_tokens(text: &str) -> u64 {
    let start = text.rfind('[').expect("a usage line") + 1;
    text[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_can_chat_from_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let server = up(dir.path(), &["--generator", "echo"]);
    ready(server.http()).await;
    let url = format!("http://{}", server.http());
    let args = [
        "chat",
        "--url",
        &url,
        "--max-tokens",
        "4",
        "--temperature",
        "0",
    ];
    let (mut term, mut child) = Terminal::spawn(&args);
    let greeting = term.expect("> ");
    assert!(greeting.contains("meshd chat with"), "{greeting}");

    term.type_line("hello there");
    let first = term.expect("completion tokens]");
    term.expect("> ");
    term.type_line("and again");
    let second = term.expect("completion tokens]");
    term.expect("> ");
    // The second question carried the first exchange: its prompt is longer.
    assert!(
        prompt_tokens(&second) > prompt_tokens(&first) + 4,
        "{first}\n{second}"
    );

    term.type_line("/reset");
    term.expect("conversation cleared");
    term.type_line("hello there");
    let fresh = term.expect("completion tokens]");
    assert_eq!(prompt_tokens(&fresh), prompt_tokens(&first));

    term.type_line("/model no-such-model");
    term.expect("(model: no-such-model; conversation cleared)");
    term.expect("> ");
    term.type_line("hi");
    let err = term.expect("model_not_found)");
    assert!(err.contains("error: 404"), "{err}");
    term.expect("> ");

    term.type_line("/quit");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "meshd chat did not leave on /quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
