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
    // Piped, every frame is appended and nothing is a terminal sequence.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    assert!(stdout.matches("CLUSTER ").count() >= 2, "{stdout}");
    Ok(())
}

/// On a terminal (a pseudo-terminal from util-linux `script`) the table is redrawn in place:
/// each new frame moves back over the last one and clears it.
#[test]
fn on_a_terminal_the_demo_redraws_its_table_in_place() -> Result<()> {
    let demo = format!(
        "{} demo --clusters 2 --exit-when-synced",
        bin("flotilla").display()
    );
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &demo, "/dev/null"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("the change reached all 2 clusters"),
        "{stdout}"
    );
    let redraws = stdout.matches("F\x1b[J").count();
    assert!(redraws >= 2, "{redraws} redraws in:\n{stdout:?}");
    Ok(())
}
