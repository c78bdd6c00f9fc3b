//! `flotilla demo`, the README's first command, runs to completion on a fresh machine: a hub, a
//! kubesim fleet and agents converge on an app from git, then on a new commit.

use std::process::Command;

use anyhow::Result;
use flotilla_e2e::bin;

#[test]
fn demo_converges_twice_and_exits_when_synced() -> Result<()> {
    let out = Command::new(bin("flotilla"))
        .args(["demo", "--clusters", "4", "--exit-when-synced"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4/4 clusters run"), "{stdout}");
    assert!(
        stdout.contains("the change reached all 4 clusters"),
        "{stdout}"
    );
    for name in ["eu-1", "us-1", "ap-1", "eu-2"] {
        assert!(stdout.contains(name), "{name} missing from:\n{stdout}");
    }
    Ok(())
}
