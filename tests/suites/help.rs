//! Every binary explains itself: each flag and argument of every (sub)command has a description in
//! `--help`, and the agent's `run` flags each read a `FLOTILLA_*` variable (as the README says).

use std::process::Command;

use anyhow::{Result, ensure};
use flotilla_e2e::bin;

/// `--help` of one command line, e.g. `["flotilla", "app", "sync"]`.
fn help(command: &[&str]) -> Result<String> {
    let out = Command::new(bin(command[0]))
        .args(&command[1..])
        .arg("--help")
        .output()?;
    ensure!(out.status.success(), "{command:?} --help failed");
    Ok(String::from_utf8(out.stdout)?)
}

/// One entry of an `Options:` or `Arguments:` section: its spelling and its description (the text
/// after the spelling, or the more indented lines below it), without clap's bracketed notes.
struct Entry {
    spelling: String,
    description: String,
    env: bool,
}

fn entries(text: &str) -> (Vec<Entry>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let (mut entries, mut subcommands, mut section) = (Vec::new(), Vec::new(), "");
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let body = line.trim_start();
        if section == "Commands" && indent == 2 {
            let name = body.split_whitespace().next().unwrap_or_default();
            if !name.is_empty() && name != "help" {
                subcommands.push(name.to_string());
            }
            continue;
        }
        let is_entry = (2..=6).contains(&indent)
            && (body.starts_with('-') || body.starts_with('<') || body.starts_with('['));
        if !matches!(section, "Options" | "Arguments") || !is_entry {
            continue;
        }
        // The spelling ends at the first run of two spaces; what follows is the description.
        let (spelling, rest) = body.split_once("  ").unwrap_or((body, ""));
        let mut text = rest.trim().to_string();
        for next in &lines[i + 1..] {
            let deeper = next.len() - next.trim_start().len() > indent + 2;
            if !deeper || next.trim().is_empty() {
                break;
            }
            text.push(' ');
            text.push_str(next.trim());
        }
        let env = text.contains("[env: ");
        let mut description = text.clone();
        while let Some(start) = description.find('[') {
            let end = description[start..]
                .find(']')
                .map_or(description.len(), |e| start + e + 1);
            description.replace_range(start..end, "");
        }
        entries.push(Entry {
            spelling: spelling.to_string(),
            description: description.trim().to_string(),
            env,
        });
    }
    (entries, subcommands)
}

/// Every (sub)command of `binary` with its entries, depth first.
fn walk(command: Vec<&str>, out: &mut Vec<(String, Entry)>) -> Result<()> {
    let text = help(&command)?;
    let (found, subcommands) = entries(&text);
    ensure!(
        !found.is_empty(),
        "{command:?} --help lists no options:\n{text}"
    );
    for e in found {
        out.push((command.join(" "), e));
    }
    for sub in &subcommands {
        let mut next = command.clone();
        next.push(sub);
        walk(next, out)?;
    }
    Ok(())
}

#[test]
fn every_flag_and_argument_of_every_binary_is_described() -> Result<()> {
    let mut all = Vec::new();
    for binary in ["flotilla", "flotilla-hub", "flotilla-agent", "kubesim"] {
        walk(vec![binary], &mut all)?;
    }
    // The walk found the deep ones too, so an empty result cannot pass.
    ensure!(
        all.iter()
            .any(|(c, e)| c == "flotilla app diff" && e.spelling.starts_with("--cluster")),
        "the walk missed `flotilla app diff --cluster`"
    );
    let agent_run = all
        .iter()
        .filter(|(c, _)| c == "flotilla-agent run")
        .count();
    ensure!(
        agent_run >= 10,
        "flotilla-agent run: {agent_run} flags found"
    );
    let undescribed: Vec<String> = all
        .iter()
        .filter(|(_, e)| e.description.is_empty())
        .map(|(c, e)| format!("{c} {}", e.spelling))
        .collect();
    ensure!(
        undescribed.is_empty(),
        "without a description:\n{}",
        undescribed.join("\n")
    );
    let no_env: Vec<&str> = all
        .iter()
        .filter(|(c, e)| c == "flotilla-agent run" && !e.env && !e.spelling.starts_with("-h"))
        .map(|(_, e)| e.spelling.as_str())
        .collect();
    ensure!(
        no_env.is_empty(),
        "flotilla-agent run flags without a FLOTILLA_* variable: {no_env:?}"
    );
    Ok(())
}
