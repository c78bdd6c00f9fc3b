//! Shared harness for the end-to-end suites: builds and spawns the real `flotilla-hub`,
//! `flotilla-agent` and `flotilla` binaries on loopback, in temporary directories, and cleans up.
//!
//! Every wait is bounded; every child is killed when its handle drops.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

pub mod tools;

/// Directory holding the workspace binaries of the profile these tests were built with.
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Binaries of another build (an earlier release, to write a data dir it would leave).
        if let Some(dir) = std::env::var_os("FLOTILLA_E2E_BIN_DIR") {
            return PathBuf::from(dir);
        }
        // current_exe: <target>/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().unwrap_or_default();
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        ensure_binaries_built(&profile_dir);
        profile_dir
    })
}

/// `cargo test` builds only the binaries of the package under test, so the suites build the
/// workspace binaries themselves once per test process (a no-op when they are fresh).
fn ensure_binaries_built(profile_dir: &Path) {
    let target_dir = profile_dir.parent().unwrap_or(profile_dir);
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| if n == "debug" { "dev" } else { n })
        .unwrap_or("dev")
        .to_string();
    let mut cargo = Command::new(env!("CARGO"));
    // Variables cargo sets for the running test would make build scripts (ring's, for one) look
    // changed and force a rebuild of half the tree on every run; hide them from the nested build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_crate = key.starts_with("CARGO_PKG_")
            || matches!(
                key.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            );
        if per_crate {
            cargo.env_remove(key.as_ref());
        }
    }
    let status = cargo
        .args([
            "build",
            "--quiet",
            "--profile",
            &profile,
            // The whole workspace, as `cargo test --workspace` resolves it: selecting fewer
            // packages would unify features differently and rebuild every time.
            "--workspace",
            "--bins",
        ])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!("building the flotilla binaries failed: {other:?}"),
    }
}

/// The `flotilla ...` commands a message suggests (its backticked spans), as printed.
pub fn hints(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| span.starts_with("flotilla "))
        .map(str::to_string)
        .collect()
}

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `check` every 100 ms until it returns `Ok(Some(_))`, or fails after `timeout` with the last error.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition never held");
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Takes ownership of a child started elsewhere (killed on drop); its output goes nowhere.
    pub fn adopt(child: Child) -> Self {
        Self {
            child,
            log: PathBuf::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (graceful stop).
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for exit up to `timeout`; returns the status and the log.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let status = wait_for(timeout, "process exit", || Ok(self.child.try_wait()?))?;
        Ok((status, self.log_text()))
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Settings for a test hub.
#[derive(Clone)]
pub struct HubOptions {
    pub cert_ttl: String,
    pub heartbeat_interval: String,
    pub poll_interval: String,
    /// Serve the HTTP listener (webhooks) on 127.0.0.1:0.
    pub http: bool,
    /// Serve the operators' listener on 127.0.0.1:0 ([`Hub::operator_cli`]).
    pub operators: bool,
    pub webhook_secret: Option<String>,
    /// More `flotilla-hub serve` arguments.
    pub extra_args: Vec<String>,
    /// More environment for `flotilla-hub serve` (e.g. `FLOTILLA_TEST_HOOKS=1`).
    pub env: Vec<(String, String)>,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            cert_ttl: "30d".into(),
            heartbeat_interval: "1s".into(),
            poll_interval: "1s".into(),
            http: false,
            operators: false,
            webhook_secret: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// The CLI with the admin's credentials for one hub.
#[derive(Clone)]
pub struct AdminCli {
    url: String,
    pki: PathBuf,
}

impl AdminCli {
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(self.command(args).output()?)
    }

    /// The admin's `flotilla` command line, to spawn (a long wait read while it runs).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("flotilla"));
        cmd.arg("--hub")
            .arg(&self.url)
            .arg("--ca")
            .arg(self.pki.join("ca.pem"))
            .arg("--cert")
            .arg(self.pki.join("admin.pem"))
            .arg("--key")
            .arg(self.pki.join("admin-key.pem"))
            .args(args);
        cmd
    }
}

/// A hub in a temporary data directory.
pub struct Hub {
    pub dir: tempfile::TempDir,
    pub opts: HubOptions,
    pub url: String,
    pub addr: String,
    /// The HTTP listener's address, when enabled.
    pub http_addr: Option<String>,
    /// The operators' listener's address, when enabled.
    pub operators_addr: Option<String>,
    pub process: Proc,
}

impl Hub {
    /// `flotilla-hub init` + `serve` on 127.0.0.1:0.
    pub fn start(opts: HubOptions) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let out = Command::new(bin("flotilla-hub"))
            .args(["init", "--data-dir"])
            .arg(dir.path().join("hub"))
            .output()?;
        ensure!(
            out.status.success(),
            "hub init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (process, addr, http_addr, operators_addr) =
            serve(&dir.path().join("hub"), "127.0.0.1:0", &opts, dir.path())?;
        Ok(Self {
            url: format!("https://{addr}"),
            addr,
            http_addr,
            operators_addr,
            dir,
            opts,
            process,
        })
    }

    /// `flotilla-hub serve` on a data directory made elsewhere: `dir`/hub (a fixture unpacked).
    pub fn serve_existing(dir: tempfile::TempDir, opts: HubOptions) -> Result<Self> {
        let (process, addr, http_addr, operators_addr) =
            serve(&dir.path().join("hub"), "127.0.0.1:0", &opts, dir.path())?;
        Ok(Self {
            url: format!("https://{addr}"),
            addr,
            http_addr,
            operators_addr,
            dir,
            opts,
            process,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("hub")
    }

    pub fn pki(&self, file: &str) -> PathBuf {
        self.data_dir().join("pki").join(file)
    }

    /// `kill -9` the hub.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the hub again on the same data directory and port.
    pub fn restart(&mut self) -> Result<()> {
        self.process.kill9();
        let addr = self.addr.clone();
        // The port was just released; retry briefly in case the kernel has not let go of it yet.
        let (process, _, http_addr, operators_addr) =
            wait_for(Duration::from_secs(10), "hub restart", || {
                match serve(&self.data_dir(), &addr, &self.opts, self.dir.path()) {
                    Ok(p) => Ok(Some(p)),
                    Err(e) => Err(e),
                }
            })?;
        self.process = process;
        self.http_addr = http_addr;
        self.operators_addr = operators_addr;
        Ok(())
    }

    /// `flotilla backup` into `file` with the passphrase in `pass_file`.
    pub fn backup(&self, file: &Path, pass_file: &Path) -> Result<()> {
        let out = self.cli(&[
            "backup",
            "--file",
            &file.display().to_string(),
            "--passphrase-file",
            &pass_file.display().to_string(),
        ])?;
        ensure!(
            out.status.success(),
            "flotilla backup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Runs the CLI as the admin: on the operators' listener when the hub serves one (as an
    /// operator of a busy hub would), else on the agents' listener.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.operator_cli()
            .unwrap_or_else(|| self.admin_cli())
            .run(args)
    }

    /// The admin's CLI on the operators' listener ([`HubOptions::operators`]).
    pub fn operator_cli(&self) -> Option<AdminCli> {
        Some(AdminCli {
            url: format!("https://{}", self.operators_addr.as_ref()?),
            pki: self.data_dir().join("pki"),
        })
    }

    /// The admin's CLI on the agents' listener, as a handle another thread can use (while this
    /// one restarts the hub).
    pub fn admin_cli(&self) -> AdminCli {
        AdminCli {
            url: self.url.clone(),
            pki: self.data_dir().join("pki"),
        }
    }

    /// Runs a command the CLI or hub suggested, as printed (words split on spaces): it must be a
    /// command that runs — no usage error, no error at all (`app diff`'s exit 1 for
    /// "differences" is an answer, not an error).
    pub fn run_hint(&self, hint: &str) -> Result<Output> {
        let words: Vec<&str> = hint.split_whitespace().collect();
        ensure!(
            words.first() == Some(&"flotilla"),
            "not a flotilla command: {hint}"
        );
        let out = self.cli(&words[1..])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !stderr.contains("error") && out.status.code() != Some(2),
            "the hint `{hint}` does not run: {stderr}"
        );
        Ok(out)
    }

    /// One sample of the hub's `/metrics` (HTTP listener: [`HubOptions::http`]), by its full
    /// name with labels (`flotilla_hub_renders_total{result="ok"}`).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let addr = self
            .http_addr
            .as_deref()
            .context("the hub serves no HTTP listener")?;
        let (_, body) = http_get(addr, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} not in /metrics:\n{body}"))
    }

    /// Runs the CLI and parses its JSON output; fails with stderr if the command failed.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all)?;
        ensure!(
            out.status.success(),
            "flotilla {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing output of flotilla {args:?}"))
    }

    /// `flotilla token create` with extra args; returns the token.
    pub fn token(&self, extra: &[&str]) -> Result<String> {
        let mut args = vec!["token", "create"];
        args.extend(extra);
        let v = self.cli_json(&args)?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no token in {v}"))
    }

    /// `flotilla app get NAME -o json`.
    pub fn app(&self, name: &str) -> Result<Value> {
        self.cli_json(&["app", "get", name])
    }

    /// `flotilla app apply -f` of a document; fails with the CLI's error.
    pub fn apply_app(&self, document: &str) -> Result<()> {
        let path = unique_log(self.dir.path(), "app").with_extension("yaml");
        std::fs::write(&path, document)?;
        let out = self.cli(&["app", "apply", "-f", &path.display().to_string()])?;
        ensure!(
            out.status.success(),
            "app apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Waits until app `name` was rendered from `revision`; returns the app.
    pub fn wait_revision(&self, name: &str, revision: &str, timeout: Duration) -> Result<Value> {
        wait_for(timeout, &format!("app {name} at {revision}"), || {
            let app = self.app(name)?;
            if app["revision"] == revision {
                return Ok(Some(app));
            }
            Err(anyhow!(
                "app is at {} (error: {})",
                app["revision"],
                app["last_error"]
            ))
        })
    }

    /// The JSON object of one cluster from `cluster list -o json`, if listed.
    pub fn cluster(&self, name: &str) -> Result<Option<Value>> {
        let list = self.cli_json(&["cluster", "list"])?;
        Ok(list
            .as_array()
            .ok_or_else(|| anyhow!("cluster list is not an array: {list}"))?
            .iter()
            .find(|c| c["name"] == name)
            .cloned())
    }

    /// Waits until `name` is listed as connected.
    pub fn wait_connected(&self, name: &str, timeout: Duration) -> Result<Value> {
        wait_for(timeout, &format!("cluster {name} connected"), || {
            Ok(self.cluster(name)?.filter(|c| c["connected"] == true))
        })
    }

    /// Starts an agent for `name` in a fresh data directory under the hub's temp dir.
    pub fn agent(&self, name: &str, token: Option<&str>, labels: &str) -> Result<Agent> {
        let data_dir = unique_log(self.dir.path(), &format!("agent-{name}")).with_extension("d");
        Agent::start(
            &self.url,
            &self.pki("ca.pem"),
            &data_dir,
            Some(name),
            token,
            labels,
        )
    }

    /// Starts an agent for `name` that also manages the cluster behind `kubeconfig`.
    pub fn agent_with_cluster(
        &self,
        name: &str,
        token: Option<&str>,
        kubeconfig: &Path,
    ) -> Result<Agent> {
        self.agent_with_cluster_labels(name, token, kubeconfig, "")
    }

    /// Like [`Hub::agent_with_cluster`], registering with labels.
    pub fn agent_with_cluster_labels(
        &self,
        name: &str,
        token: Option<&str>,
        kubeconfig: &Path,
        labels: &str,
    ) -> Result<Agent> {
        self.agent_with_args(name, token, labels, &cluster_args(kubeconfig))
    }

    /// Like [`Hub::agent_with_cluster_labels`], serving the agent's metrics on `metrics`.
    pub fn agent_with_metrics(
        &self,
        name: &str,
        token: Option<&str>,
        kubeconfig: &Path,
        labels: &str,
        metrics: &str,
    ) -> Result<Agent> {
        let mut args = cluster_args(kubeconfig);
        args.extend(["--metrics-listen".into(), metrics.into()]);
        self.agent_with_args(name, token, labels, &args)
    }

    /// An agent for `name` in a fresh data directory, with more `flotilla-agent run` arguments.
    pub fn agent_with_args(
        &self,
        name: &str,
        token: Option<&str>,
        labels: &str,
        extra: &[String],
    ) -> Result<Agent> {
        let data_dir = unique_log(self.dir.path(), &format!("agent-{name}")).with_extension("d");
        Agent::start_with(
            &self.url,
            &self.pki("ca.pem"),
            &data_dir,
            Some(name),
            token,
            labels,
            extra,
        )
    }

    /// Waits until `n` clusters are listed as connected.
    pub fn wait_all_connected(&self, n: usize, timeout: Duration) -> Result<()> {
        wait_for(timeout, &format!("{n} clusters connected"), || {
            let list = self.cli_json(&["cluster", "list"])?;
            let connected = list
                .as_array()
                .map_or(0, |l| l.iter().filter(|c| c["connected"] == true).count());
            ensure!(connected == n, "{connected} of {n} connected");
            Ok(Some(()))
        })
    }

    /// `flotilla status -o json`.
    pub fn status(&self) -> Result<Vec<Value>> {
        let v = self.cli_json(&["status"])?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

fn serve(
    data_dir: &Path,
    listen: &str,
    opts: &HubOptions,
    logs: &Path,
) -> Result<(Proc, String, Option<String>, Option<String>)> {
    let log = unique_log(logs, "hub");
    let mut cmd = Command::new(bin("flotilla-hub"));
    cmd.args(["serve", "--poll-interval", &opts.poll_interval]);
    if opts.http {
        cmd.args(["--http-listen", "127.0.0.1:0"]);
    }
    if opts.operators {
        cmd.args(["--operator-listen", "127.0.0.1:0"]);
    }
    cmd.args(&opts.extra_args);
    if let Some(secret) = &opts.webhook_secret {
        let path = logs.join("webhook-secret");
        std::fs::write(&path, secret)?;
        cmd.arg("--webhook-secret-file").arg(path);
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", listen, "--cert-ttl", &opts.cert_ttl])
        .args(["--heartbeat-interval", &opts.heartbeat_interval])
        .env("RUST_LOG", "info")
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let stdout = child.stdout.take().context("hub stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Drains stdout for the life of the process; ends when the hub exits.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            for (kind, prefix) in [
                (0, "flotilla-hub listening on "),
                (1, "flotilla-hub http on "),
                (2, "flotilla-hub operators on "),
            ] {
                if let Some(addr) = line.strip_prefix(prefix) {
                    let _ = tx.send((kind, addr.trim().to_string()));
                }
            }
        }
    });
    let mut process = Proc { child, log };
    let first = rx.recv_timeout(Duration::from_secs(20));
    // The others follow the first line at once, in this order.
    let more = |wanted: bool, kind: u8| {
        wanted
            .then(|| rx.recv_timeout(Duration::from_secs(5)).ok())
            .flatten()
            .filter(|(k, _)| *k == kind)
            .map(|(_, a)| a)
    };
    let http = more(opts.http, 1);
    let operators = more(opts.operators, 2);
    match first {
        Ok((_, addr)) => Ok((process, addr, http, operators)),
        Err(_) => {
            process.kill9();
            bail!("hub did not start listening: {}", process.log_text())
        }
    }
}

fn unique_log(dir: &Path, prefix: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{prefix}-{n}.log"))
}

/// A hub (polling every 300 ms), simulated clusters each with a real agent process, and a git
/// repository: the fixture of the suites that drive apps end to end.
pub struct Fleet {
    pub hub: Hub,
    pub clusters: SimCluster,
    pub repo: GitRepo,
    _agents: Vec<Agent>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// `clusters`: (name, labels `k=v,...`); returns once every agent is connected.
    pub fn start(clusters: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(clusters, HubOptions::default())
    }

    /// Like [`Fleet::start`], with the hub's options (its poll interval is always 300 ms).
    pub fn start_with(clusters: &[(&str, &str)], opts: HubOptions) -> Result<Self> {
        let names: Vec<&str> = clusters.iter().map(|(n, _)| *n).collect();
        let sim = SimCluster::start_many(&names)?;
        let hub = Hub::start(HubOptions {
            poll_interval: "300ms".into(),
            ..opts
        })?;
        let token = hub.token(&["--uses", &clusters.len().to_string()])?;
        let mut agents = Vec::new();
        for (name, labels) in clusters {
            agents.push(hub.agent_with_cluster_labels(
                name,
                Some(&token),
                &sim.kubeconfig_of(name),
                labels,
            )?);
        }
        hub.wait_all_connected(clusters.len(), Duration::from_secs(60))?;
        let dir = tempfile::tempdir()?;
        let repo = GitRepo::init(&dir.path().join("repo"))?;
        Ok(Self {
            hub,
            clusters: sim,
            repo,
            _agents: agents,
            _dir: dir,
        })
    }

    /// Applies App `name` from `path` of the fleet's repository; `spec` is more of its spec,
    /// indented by two spaces.
    pub fn apply(&self, name: &str, path: &str, spec: &str) -> Result<()> {
        self.hub.apply_app(&format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  source: {{repoURL: \"{}\", path: {path}}}\n{spec}",
            self.repo.url()
        ))
    }

    /// The status rows of `app`.
    pub fn rows(&self, app: &str) -> Result<Vec<Value>> {
        Ok(self
            .hub
            .status()?
            .into_iter()
            .filter(|r| r["app"] == app)
            .collect())
    }

    /// Waits until `app` has `n` rows, all at `revision`, Synced and Healthy.
    pub fn wait_healthy(&self, app: &str, n: usize, revision: &str) -> Result<Vec<Value>> {
        wait_for(
            Duration::from_secs(60),
            &format!("{app} Synced+Healthy at {revision} on {n}"),
            || {
                let rows = self.rows(app)?;
                let done = rows.len() == n
                    && rows.iter().all(|r| {
                        r["revision"] == revision
                            && r["sync"] == "Synced"
                            && r["health"] == "Healthy"
                    });
                if done {
                    return Ok(Some(rows));
                }
                Err(anyhow!("{}", serde_json::to_string(&rows)?))
            },
        )
    }

    /// Waits until `app` has `n` rows, all back at `revision` and Healthy after a rollback:
    /// OutOfSync with git (which still wants the rolled-back revision), and saying so.
    pub fn wait_rolled_back(&self, app: &str, n: usize, revision: &str) -> Result<Vec<Value>> {
        wait_for(
            Duration::from_secs(60),
            &format!("{app} rolled back to {revision} on {n}"),
            || {
                let rows = self.rows(app)?;
                let done = rows.len() == n
                    && rows.iter().all(|r| {
                        r["revision"] == revision
                            && r["sync"] == "OutOfSync"
                            && r["health"] == "Healthy"
                            && r["message"]
                                .as_str()
                                .is_some_and(|m| m.contains("was rolled back"))
                    });
                if done {
                    return Ok(Some(rows));
                }
                Err(anyhow!("{}", serde_json::to_string(&rows)?))
            },
        )
    }

    /// `flotilla rollout status APP`.
    pub fn rollout(&self, app: &str) -> Result<Value> {
        self.hub.cli_json(&["rollout", "status", app])
    }

    /// Waits for the rollout of `app` at `revision` to reach `phase`.
    pub fn wait_phase(&self, app: &str, revision: &str, phase: &str) -> Result<Value> {
        wait_for(
            Duration::from_secs(60),
            &format!("rollout of {app} at {revision} {phase}"),
            || {
                let r = self.rollout(app)?;
                ensure!(r["revision"] == revision && r["phase"] == phase, "{r}");
                Ok(Some(r))
            },
        )
    }

    /// The resourceVersion of an object in one of the fleet's clusters.
    pub fn resource_version(
        &self,
        cluster: &str,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> Result<String> {
        let obj = self
            .clusters
            .object(cluster, kind, ns, name)?
            .ok_or_else(|| anyhow!("{kind} {ns}/{name} missing in {cluster}"))?;
        Ok(obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

/// A running `flotilla-agent run`.
pub struct Agent {
    pub data_dir: PathBuf,
    pub process: Proc,
}

impl Agent {
    pub fn start(
        hub_url: &str,
        ca: &Path,
        data_dir: &Path,
        name: Option<&str>,
        token: Option<&str>,
        labels: &str,
    ) -> Result<Self> {
        Self::start_with(hub_url, ca, data_dir, name, token, labels, &[])
    }

    /// Like [`Agent::start`], with more `run` arguments (see [`cluster_args`]).
    pub fn start_with(
        hub_url: &str,
        ca: &Path,
        data_dir: &Path,
        name: Option<&str>,
        token: Option<&str>,
        labels: &str,
        extra: &[String],
    ) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let log = unique_log(data_dir, "agent");
        let mut cmd = Command::new(bin("flotilla-agent"));
        cmd.args(["run", "--hub", hub_url])
            .arg("--ca")
            .arg(ca)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(name) = name {
            cmd.args(["--cluster-name", name]);
        }
        if let Some(token) = token {
            // Through the environment, as an operator should: argv is visible to every local user.
            cmd.env("FLOTILLA_TOKEN", token);
        }
        if !labels.is_empty() {
            cmd.args(["--labels", labels]);
        }
        cmd.args(extra);
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            process: Proc {
                child: cmd.spawn()?,
                log,
            },
        })
    }

    /// Runs an agent command line as the CLI printed it (`flotilla-agent run ...`, words split
    /// on spaces, no quoting), with `placeholders` replaced word by word and the token in
    /// `FLOTILLA_TOKEN`; the data directory is the value of its `--data-dir`.
    pub fn from_printed(command: &str, token: &str, placeholders: &[(&str, &str)]) -> Result<Self> {
        let mut words = command.split_whitespace().map(|w| {
            placeholders
                .iter()
                .find(|(p, _)| *p == w)
                .map_or_else(|| w.to_string(), |(_, v)| (*v).to_string())
        });
        ensure!(
            words.next().as_deref() == Some("flotilla-agent"),
            "not an agent command: {command}"
        );
        let args: Vec<String> = words.collect();
        let data_dir = args
            .iter()
            .position(|a| a == "--data-dir")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("no --data-dir in {command}"))?;
        std::fs::create_dir_all(&data_dir)?;
        let log = unique_log(&data_dir, "agent");
        let child = Command::new(bin("flotilla-agent"))
            .args(&args)
            .env("FLOTILLA_TOKEN", token)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Self {
            data_dir,
            process: Proc { child, log },
        })
    }

    /// Starts the agent again on the same data directory (after it exited or was killed).
    pub fn restart(&mut self, hub_url: &str, ca: &Path, token: Option<&str>) -> Result<()> {
        self.restart_with(hub_url, ca, token, None)
    }

    /// Restarts on the same data directory, optionally managing a cluster.
    pub fn restart_with(
        &mut self,
        hub_url: &str,
        ca: &Path,
        token: Option<&str>,
        kubeconfig: Option<&Path>,
    ) -> Result<()> {
        self.process.kill9();
        let extra = kubeconfig.map(cluster_args).unwrap_or_default();
        let fresh = Agent::start_with(hub_url, ca, &self.data_dir, None, token, "", &extra)?;
        *self = fresh;
        Ok(())
    }

    /// The agent's identity file (certificate + key).
    pub fn identity(&self) -> PathBuf {
        self.data_dir.join("identity.pem")
    }
}

/// `flotilla-agent run` arguments that make it manage the cluster behind `kubeconfig`.
pub fn cluster_args(kubeconfig: &Path) -> Vec<String> {
    vec![
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--resync".into(),
        "2s".into(),
    ]
}

/// `cluster list -o json` without the fields that change on their own (last_seen).
pub fn stable_view(list: &Value) -> Value {
    let mut list = list.clone();
    if let Some(items) = list.as_array_mut() {
        for item in items {
            if let Some(obj) = item.as_object_mut() {
                obj.remove("last_seen");
                obj.remove("connected");
            }
        }
    }
    list
}

/// A kubesim cluster served from its own runtime, so blocking test code can use it freely.
pub struct SimCluster {
    pub sim: kubesim::Sim,
    pub kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    /// Dropping this ends the simulator's runtime thread.
    _stop: std::sync::mpsc::Sender<()>,
}

impl SimCluster {
    pub fn start() -> Result<Self> {
        Self::start_many(&["kubesim"])
    }

    /// One simulator serving the named clusters; `kubeconfig` is the first one's.
    pub fn start_many(names: &[&str]) -> Result<Self> {
        let opts = kubesim::SimOptions {
            clusters: names.iter().map(|n| n.to_string()).collect(),
            ..kubesim::SimOptions::default()
        };
        // Its own runtime on its own thread, so sync and async tests alike can use it.
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(anyhow!("runtime: {e}")));
                    return;
                }
            };
            let sim = runtime
                .block_on(kubesim::Sim::start(opts))
                .map_err(|e| anyhow!("{e}"));
            let _ = started_tx.send(sim);
            // Serve until the owner goes away.
            let _ = stop_rx.recv();
            drop(runtime);
        });
        let sim = started_rx
            .recv()
            .map_err(|_| anyhow!("kubesim thread died"))??;
        let dir = tempfile::tempdir()?;
        for name in names {
            sim.write_kubeconfig(name, &dir.path().join(format!("{name}.kubeconfig")))?;
        }
        let kubeconfig = dir.path().join(format!(
            "{}.kubeconfig",
            names.first().context("a cluster")?
        ));
        Ok(Self {
            sim,
            kubeconfig,
            _dir: dir,
            _stop: stop,
        })
    }

    /// What a pod of the first cluster would see: a service-account directory (token, ca.crt,
    /// namespace) written under `dir`, and the `KUBERNETES_SERVICE_*` environment pointing at the
    /// simulator (which serves its first cluster at the root path, as an API server does).
    pub fn pod_environment(&self, dir: &Path, namespace: &str) -> Result<Vec<(String, String)>> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), self.sim.token())?;
        std::fs::write(dir.join("ca.crt"), self.sim.ca_pem())?;
        std::fs::write(dir.join("namespace"), namespace)?;
        let addr = self.sim.addr();
        Ok(vec![
            ("KUBERNETES_SERVICE_HOST".into(), addr.ip().to_string()),
            ("KUBERNETES_SERVICE_PORT".into(), addr.port().to_string()),
            (
                "FLOTILLA_SERVICE_ACCOUNT_DIR".into(),
                dir.display().to_string(),
            ),
        ])
    }

    /// The kubeconfig of cluster `name`.
    pub fn kubeconfig_of(&self, name: &str) -> PathBuf {
        self._dir.path().join(format!("{name}.kubeconfig"))
    }

    /// Objects of built-in `kind` in `namespace` of cluster `cluster`, as the API server stores them.
    pub fn objects(&self, cluster: &str, kind: &str, namespace: &str) -> Result<Vec<Value>> {
        let rt = kubesim::resources::builtins()
            .into_iter()
            .find(|r| r.kind == kind)
            .with_context(|| format!("{kind} is not built in"))?;
        let c = self.sim.cluster(cluster).context("cluster")?;
        let (items, _, _) = c.list(&rt, Some(namespace), |_| true, None, None);
        Ok(items.into_iter().collect())
    }

    /// One object by name, if it exists.
    pub fn object(
        &self,
        cluster: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>> {
        Ok(self
            .objects(cluster, kind, namespace)?
            .into_iter()
            .find(|o| o["metadata"]["name"] == name))
    }

    /// Names of the ConfigMaps in `namespace` of cluster `cluster`.
    pub fn configmaps_in(&self, cluster: &str, namespace: &str) -> Result<Vec<String>> {
        let rt = kubesim::resources::builtins()
            .into_iter()
            .find(|r| r.kind == "ConfigMap")
            .context("ConfigMap is built in")?;
        let c = self.sim.cluster(cluster).context("cluster")?;
        let (items, _, _) = c.list(&rt, Some(namespace), |_| true, None, None);
        Ok(items
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Names of the ConfigMaps in `namespace`.
    pub fn configmaps(&self, namespace: &str) -> Result<Vec<String>> {
        let rt = kubesim::resources::builtins()
            .into_iter()
            .find(|r| r.kind == "ConfigMap")
            .context("ConfigMap is built in")?;
        let cluster = self.sim.cluster("kubesim").context("cluster")?;
        let (items, _, _) = cluster.list(&rt, Some(namespace), |_| true, None, None);
        Ok(items
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Runs kubectl (an independent client) against cluster `cluster`, with `stdin` as its input;
    /// fails with kubectl's stderr unless it succeeds.
    pub fn kubectl(&self, cluster: &str, args: &[&str], stdin: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig_of(cluster))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl (1.32 is required by the suites)")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Deletes a ConfigMap, as an operator would by hand.
    pub fn delete_configmap(&self, namespace: &str, name: &str) -> Result<()> {
        let rt = kubesim::resources::builtins()
            .into_iter()
            .find(|r| r.kind == "ConfigMap")
            .context("ConfigMap is built in")?;
        let cluster = self.sim.cluster("kubesim").context("cluster")?;
        cluster
            .delete(&rt, Some(namespace), name, &serde_json::json!({}), false)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}

/// Runs `flotilla-agent apply` (blocking) and returns its output.
pub fn agent_apply(kubeconfig: &Path, data_dir: &Path, app: &str, bundle: &Path) -> Result<Output> {
    Ok(Command::new(bin("flotilla-agent"))
        .args(["apply", "--app", app, "--timeout", "20s"])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--data-dir")
        .arg(data_dir)
        .arg(bundle)
        .output()?)
}

/// Direct gRPC access to a hub, for inputs the real binaries would never send.
pub mod grpc {
    use super::*;
    use flotilla_proto::v1::RegisterRequest;
    use flotilla_proto::v1::registration_client::RegistrationClient;
    use flotilla_proto::{ClientTls, endpoint};
    use tonic::transport::Channel;

    /// PEM certificate and key.
    pub type Identity = (Vec<u8>, Vec<u8>);

    /// A channel to `hub` with an optional client identity; connection errors surface on first use.
    pub fn channel(hub: &Hub, identity: Option<Identity>) -> Result<Channel> {
        let tls = ClientTls {
            ca_pem: std::fs::read(hub.pki("ca.pem"))?,
            identity,
        };
        Ok(endpoint(&hub.url, &tls)?.connect_lazy())
    }

    /// Opens an agent session with `identity` and returns the hub's refusal (an error if it is
    /// accepted): for checking that revoked certificates stay revoked.
    pub async fn session_refusal(hub: &Hub, identity: Identity) -> Result<tonic::Status> {
        use flotilla_proto::v1::agent_client::AgentClient;
        use flotilla_proto::v1::{AgentMessage, Hello, agent_message};
        let hello = tokio_stream::once(AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello::default())),
        });
        match AgentClient::new(channel(hub, Some(identity))?)
            .session(hello)
            .await
        {
            Ok(_) => anyhow::bail!("the hub accepted a session it should have refused"),
            Err(status) => Ok(status),
        }
    }

    /// The admin identity of `hub`.
    pub fn admin(hub: &Hub) -> Result<Identity> {
        Ok((
            std::fs::read(hub.pki("admin.pem"))?,
            std::fs::read(hub.pki("admin-key.pem"))?,
        ))
    }

    /// A fresh key and a CSR with CN `cn`.
    pub fn key_and_csr(cn: &str) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let csr = params.serialize_request(&key)?.pem()?;
        Ok((key.serialize_pem(), csr))
    }

    /// Registers `name` directly; returns its identity.
    pub async fn register(hub: &Hub, token: &str, name: &str) -> Result<Identity> {
        register_with_labels(hub, token, name, &[]).await
    }

    /// Registers `name` with labels directly; returns its identity.
    pub async fn register_with_labels(
        hub: &Hub,
        token: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Identity> {
        let (key, csr) = key_and_csr(name)?;
        let mut client = RegistrationClient::new(channel(hub, None)?);
        let response = client
            .register(RegisterRequest {
                token: token.into(),
                cluster_name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                csr_pem: csr,
            })
            .await?
            .into_inner();
        Ok((response.certificate_pem.into_bytes(), key.into_bytes()))
    }

    /// Reads an agent's identity file (certificate followed by key).
    pub fn agent_identity(agent: &Agent) -> Result<Identity> {
        let text = std::fs::read_to_string(agent.identity())?;
        let split = text
            .find("-----BEGIN PRIVATE KEY-----")
            .context("no key in identity file")?;
        Ok((
            text.as_bytes()[..split].to_vec(),
            text.as_bytes()[split..].to_vec(),
        ))
    }
}

/// Resident and peak resident memory of a process, in KiB (`VmRSS`, `VmHWM` of /proc).
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => dirs.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// A git repository on disk, driven with the git CLI (an independent implementation from gix).
pub struct GitRepo {
    pub path: PathBuf,
}

impl GitRepo {
    pub fn init(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        let repo = Self {
            path: path.to_path_buf(),
        };
        repo.git(&["init", "-q", "-b", "main"])?;
        Ok(repo)
    }

    /// Runs git in the repository; returns trimmed stdout.
    pub fn git(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("git")
            .args([
                "-c",
                "user.email=test@flotilla.dev",
                "-c",
                "user.name=test",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(&self.path)
            .output()?;
        ensure!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn write(&self, rel: &str, content: &str) -> Result<()> {
        let p = self.path.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, content)?;
        Ok(())
    }

    /// Stages everything and commits; returns the commit id.
    pub fn commit(&self, message: &str) -> Result<String> {
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "--allow-empty", "-m", message])?;
        self.git(&["rev-parse", "HEAD"])
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }
}

/// A raw HTTP/1.1 POST on loopback; returns the status code and body.
pub fn http_post(
    addr: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<(u16, String)> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    http_exchange(addr, head.as_bytes(), body)
}

/// A raw HTTP/1.1 PUT on loopback; returns the status code and body.
pub fn http_put(addr: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    http_exchange(addr, head.as_bytes(), body)
}

/// A raw HTTP/1.1 GET on loopback; returns the status code and body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_exchange(addr, head.as_bytes(), b"")
}

/// Sends a request head and body, reads the whole response (the server closes the connection).
fn http_exchange(addr: &str, head: &[u8], body: &[u8]) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(head)?;
    // The server may answer (413) before reading everything; a failed write is not an error here.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// In-process agents, one per cluster, on their own runtime; dropping this stops them.
pub struct InProcessAgents {
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl InProcessAgents {
    /// One agent per cluster of `clusters` named in `names` (labels `region` = eu/us/ap
    /// round-robin), registering with `token`, data under `data_dir`.
    pub fn start(
        hub: &Hub,
        clusters: &SimCluster,
        names: &[String],
        token: &str,
        data_dir: &Path,
    ) -> Result<Self> {
        Self::start_labelled(hub, clusters, names, token, data_dir, |i, _| {
            std::collections::BTreeMap::from([(
                "region".to_string(),
                ["eu", "us", "ap"][i % 3].to_string(),
            )])
        })
    }

    /// [`InProcessAgents::start`] with each cluster's labels chosen by `labels(index, name)`.
    pub fn start_labelled(
        hub: &Hub,
        clusters: &SimCluster,
        names: &[String],
        token: &str,
        data_dir: &Path,
        labels: impl Fn(usize, &str) -> std::collections::BTreeMap<String, String>,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let ca = std::fs::read(hub.pki("ca.pem"))?;
        for (i, name) in names.iter().enumerate() {
            let opts = flotilla_agent::runner::RunOptions {
                link: flotilla_agent::link::HubLink::new(hub.url.clone(), ca.clone()),
                data_dir: data_dir.join(name),
                cluster_name: Some(name.clone()),
                token: Some(token.to_string()),
                labels: labels(i, name),
                cluster: flotilla_agent::cluster_config::ClusterSource::Kubeconfig(
                    clusters.kubeconfig_of(name),
                ),
                identity_secret: None,
                resync: Duration::from_secs(600),
                health_interval: Duration::from_secs(2),
                metrics_listen: None,
                token_file: None,
            };
            let cancel = shutdown.clone();
            runtime.spawn(async move {
                if let Err(e) = flotilla_agent::runner::run(opts, cancel).await {
                    eprintln!("agent: {e}");
                }
            });
        }
        Ok(Self {
            runtime: Some(runtime),
            shutdown,
        })
    }
}

impl Drop for InProcessAgents {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}
