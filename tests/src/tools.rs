//! Tools the suites provision for themselves under `target/test-tools/`, so the README's
//! `cargo test --workspace` passes on a fresh machine with nothing installed by hand.
//!
//! Each tool is set up once per target directory: a file lock serialises the test processes
//! that `cargo test` runs side by side, and a marker file records a finished setup.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// `<target>/test-tools`, beside the profile directories of the running test binary.
fn tools_dir() -> Result<PathBuf> {
    // current_exe: <target>/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe().context("the running test binary's path")?;
    let target = exe
        .ancestors()
        .nth(3)
        .with_context(|| format!("{} is not under <target>/<profile>/deps/", exe.display()))?;
    Ok(target.join("test-tools"))
}

/// Runs `setup` into `dir` unless a previous run finished it, holding `dir.lock` meanwhile.
fn provision(name: &str, setup: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let root = tools_dir()?;
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let lock = File::create(root.join(format!("{name}.lock")))?;
    lock.lock()
        .with_context(|| format!("locking {name}.lock in {}", root.display()))?;
    let dir = root.join(name);
    let ready = dir.join(".ready");
    if !ready.exists() {
        if dir.exists() {
            // An earlier setup was interrupted: start over rather than trust half a venv.
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        setup(&dir).with_context(|| format!("provisioning {name} under {}", dir.display()))?;
        fs::write(&ready, "")?;
    }
    Ok(dir)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A `helm` command for `flotilla-hub --helm-bin`: tests/helm/helm (a `helm template` over the
/// real Helm engine from PyPI's helm-python-sdk) run by a Python that has the engine — the
/// system's if it already does, else a venv under `target/test-tools/helm/` made on first use.
pub fn helm() -> PathBuf {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let provisioned = HELM.get_or_init(|| {
        provision("helm", |dir| {
            let python = if run(Command::new("python3").args(["-c", "import helm_python"])).is_ok()
            {
                PathBuf::from("python3")
            } else {
                let venv = dir.join("venv");
                run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
                    .context("python3 needs its venv module (Debian: python3-venv)")?;
                let python = venv.join("bin/python");
                run(Command::new(&python).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "helm-python-sdk",
                ]))
                .context("installing helm-python-sdk from PyPI into the venv")?;
                python
            };
            let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/helm");
            let launcher = dir.join("helm");
            fs::write(
                &launcher,
                format!(
                    "#!/bin/sh\nexec '{}' '{}' \"$@\"\n",
                    python.display(),
                    wrapper.display()
                ),
            )?;
            fs::set_permissions(&launcher, fs::Permissions::from_mode(0o755))?;
            Ok(())
        })
        .map(|dir| dir.join("helm"))
        .map_err(|e| format!("{e:#}"))
    });
    match provisioned {
        Ok(helm) => helm.clone(),
        Err(e) => panic!("the Helm suite needs the Helm engine and could not set it up: {e}"),
    }
}
