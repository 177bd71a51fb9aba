//! A throwaway PostgreSQL server of a test's own, to stop, restart and SIGSTOP without touching
//! the shared stack's. Invariant: it is stopped (continued first) and its folder removed when
//! dropped, whatever the test's outcome.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Pg {
    pub url: String,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/stack installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().expect("a PostgreSQL bin folder")
}

/// As the postgres user when we are root: PostgreSQL refuses to run as root.
fn as_postgres(program: PathBuf) -> Command {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Pg {
    /// initdb in a fresh folder, then start on a free port; waits until it answers.
    pub async fn start() -> Pg {
        let dir = std::env::temp_dir().join(format!("it-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let bin = bin_dir();
        let out = as_postgres(bin.join("initdb"))
            .arg("-D")
            .arg(&dir)
            .args(["-U", "orderflow", "--auth=trust", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut pg = Pg {
            url: format!("postgres://orderflow@127.0.0.1:{port}/postgres"),
            port,
            dir,
            bin,
            child: None,
        };
        pg.up().await;
        pg
    }

    /// Starts the server on its folder and port; waits (30 s at most) until it answers.
    pub async fn up(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("it-pg-{}.log", self.port)))
                .unwrap();
        let mut command = as_postgres(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", "fsync=off", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(command.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL on port {} did not answer within 30 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> PathBuf {
        std::env::temp_dir().join(format!("it-pg-{}.log", self.port))
    }

    /// Stops it (fast shutdown: open connections are closed); waits for the exit.
    pub fn down(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.signal_group(libc::SIGCONT);
        // SAFETY: kill(2) on the pid of a child we own and have not waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freezes the server and its backends: it accepts TCP connections but answers nothing.
    pub fn freeze(&self) {
        self.signal_group(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal_group(libc::SIGCONT);
    }

    /// The postmaster, then each of its children: backends call setsid(), so a process-group
    /// signal would miss them.
    fn signal_group(&self, signal: i32) {
        let Some(child) = &self.child else { return };
        let postmaster = child.id() as i32;
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: the command may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                    pids.push(pid);
                }
            }
        }
        for pid in pids {
            // SAFETY: kill(2) on the server we started and its children.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.log());
    }
}
