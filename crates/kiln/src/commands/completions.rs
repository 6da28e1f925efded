//! `kiln completions SHELL`: the shell completion script for the whole command line,
//! on stdout, generated from the clap definition by `clap_complete`.

use clap::{Args, CommandFactory};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    write_script(args.shell, &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
    Ok(ExitCode::SUCCESS)
}

fn write_script(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut command = crate::cli::Cli::command();
    clap_complete::generate(shell, &mut command, "kiln", out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        write_script(shell, &mut out);
        String::from_utf8(out).expect("a completion script is text")
    }

    #[test]
    fn every_shell_completes_subcommands_and_their_options() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            for word in ["submit", "completions", "public-read", "max-attempts"] {
                assert!(
                    text.contains(word),
                    "the {shell} script does not complete {word}"
                );
            }
        }
    }

    #[test]
    fn the_bash_script_parses() {
        let mut bash = std::process::Command::new("bash")
            .args(["-n", "/dev/stdin"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("running bash -n on the script (install bash)");
        let mut stdin = bash.stdin.take().expect("piped stdin");
        std::io::Write::write_all(&mut stdin, script(Shell::Bash).as_bytes()).expect("writing");
        drop(stdin);
        assert!(
            bash.wait().expect("bash runs").success(),
            "bash -n refuses the script"
        );
    }
}
