//! A private, throwaway etcd server on a free loopback port with a temporary data directory.
//!
//! `esi-host demo` and every integration test use this one helper, so both run against a
//! real etcd process, never a stand-in. The process is killed and its data removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

/// A running etcd process.
pub struct LocalEtcd {
    child: Child,
    endpoint: String,
    _data_dir: tempfile::TempDir,
    log_path: PathBuf,
}

impl LocalEtcd {
    /// Starts `etcd` from `PATH` and waits until it answers (up to 30 s).
    pub async fn start() -> anyhow::Result<LocalEtcd> {
        LocalEtcd::start_with_args(&[]).await
    }

    /// As [`LocalEtcd::start`], with extra command-line flags (e.g. lower request limits).
    pub async fn start_with_args(extra: &[&str]) -> anyhow::Result<LocalEtcd> {
        // The ports are free when picked but not held until etcd binds them: an etcd starting
        // at the same time can take one first. etcd then exits at once saying so, and the
        // start is tried again on new ports.
        let mut attempt = 1;
        loop {
            match LocalEtcd::start_once(extra).await {
                Err(e) if attempt < PORT_ATTEMPTS && format!("{e:#}").contains(PORT_TAKEN) => {
                    attempt += 1;
                }
                started => return started,
            }
        }
    }

    async fn start_once(extra: &[&str]) -> anyhow::Result<LocalEtcd> {
        let data_dir = tempfile::Builder::new()
            .prefix("esi-etcd-")
            .tempdir()
            .context("creating a temporary etcd data directory")?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let endpoint = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log_path = data_dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).context("creating the etcd log file")?;
        let child = Command::new("etcd")
            .arg("--name=esi-local")
            .arg(format!(
                "--data-dir={}",
                data_dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=esi-local={peer}"))
            .arg("--log-level=warn")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("etcd log")?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting etcd: is the `etcd` binary (Debian package etcd-server) on PATH?")?;
        let mut etcd = LocalEtcd {
            child,
            endpoint,
            _data_dir: data_dir,
            log_path,
        };
        etcd.wait_until_ready().await?;
        Ok(etcd)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "etcd exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            let probe = etcd_client::Client::connect([self.endpoint.as_str()], None).await;
            if let Ok(mut client) = probe {
                if client.get("health-probe", None).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd at {} did not become ready in 30 s:\n{}",
                    self.endpoint,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's log so far (for error messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops etcd and waits for it to exit.
    /// The etcd process id (to freeze it with SIGSTOP in tests), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A cluster of etcd members on loopback ports, for tests that kill members.
pub struct LocalEtcdCluster {
    members: Vec<Option<Child>>,
    endpoints: Vec<String>,
    _data_dir: tempfile::TempDir,
}

impl LocalEtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub async fn start(size: usize) -> anyhow::Result<LocalEtcdCluster> {
        let data_dir = tempfile::Builder::new()
            .prefix("esi-etcd-cluster-")
            .tempdir()?;
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        let mut endpoints = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let endpoint = format!("http://127.0.0.1:{client}");
            let log = std::fs::File::create(data_dir.path().join(format!("m{i}.log")))?;
            let child = Command::new("etcd")
                .arg(format!("--name=m{i}"))
                .arg(format!(
                    "--data-dir={}",
                    data_dir.path().join(format!("m{i}")).display()
                ))
                .arg(format!("--listen-client-urls={endpoint}"))
                .arg(format!("--advertise-client-urls={endpoint}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--log-level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("starting etcd: is the `etcd` binary on PATH?")?;
            members.push(Some(child));
            endpoints.push(endpoint);
        }
        let cluster = LocalEtcdCluster {
            members,
            endpoints,
            _data_dir: data_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.leader().await.is_none() {
            if Instant::now() > deadline {
                bail!("the etcd cluster elected no leader within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cluster)
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The index of the current leader, asked of the running members.
    pub async fn leader(&self) -> Option<usize> {
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if self.members[i].is_none() {
                continue;
            }
            let Ok(mut client) = etcd_client::Client::connect([endpoint.as_str()], None).await
            else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            let leader = status.leader();
            for (j, other) in self.endpoints.iter().enumerate() {
                let Ok(mut c) = etcd_client::Client::connect([other.as_str()], None).await else {
                    continue;
                };
                if let Ok(s) = c.status().await {
                    if s.header().map(|h| h.member_id()) == Some(leader) && leader != 0 {
                        return Some(j);
                    }
                }
            }
        }
        None
    }

    /// Kills member `i` with SIGKILL.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill().await;
        }
    }
}

/// Starts of a [`LocalEtcd`] tried when its ports were taken meanwhile.
const PORT_ATTEMPTS: u32 = 5;

/// What etcd's log says when a port it was told to listen on is taken.
const PORT_TAKEN: &str = "address already in use";

/// A loopback port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}
