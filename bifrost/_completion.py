"""Shell completion scripts generated from the CLI's own parser (so they never drift from it):
subcommands, then each subcommand's options; other words complete as file names."""

from __future__ import annotations

import argparse


def _commands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, list[str]]]:
    """subcommand → (one-line help, option strings)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            opts = [o for a in sub._actions for o in a.option_strings]
            out[name] = (helps.get(name, ""), opts)
    return out


def _bash(parser: argparse.ArgumentParser) -> str:
    cmds = _commands(parser)
    cases = "".join(f"    {name}) opts='{' '.join(opts)}' ;;\n" for name, (_, opts) in cmds.items())
    return (
        "# bifrost completion for bash: source <(bifrost completion bash)\n"
        "_bifrost() {\n"
        '  local cur="${COMP_WORDS[COMP_CWORD]}" opts=""\n'
        '  if [ "$COMP_CWORD" -eq 1 ]; then\n'
        f"    COMPREPLY=($(compgen -W '{' '.join(cmds)} --version -h --help' -- \"$cur\"))\n"
        "    return\n"
        "  fi\n"
        '  case "${COMP_WORDS[1]}" in\n'
        f"{cases}"
        "  esac\n"
        '  if [[ "$cur" == -* ]]; then\n'
        '    COMPREPLY=($(compgen -W "$opts" -- "$cur"))\n'
        "  else\n"
        '    COMPREPLY=($(compgen -f -- "$cur"))\n'
        "  fi\n"
        "}\n"
        "complete -o default -F _bifrost bifrost\n"
    )


def _zsh(parser: argparse.ArgumentParser) -> str:
    # zsh runs the bash function through its bashcompinit layer: one implementation.
    return (
        "# bifrost completion for zsh: source <(bifrost completion zsh)\n"
        "autoload -U +X compinit && compinit\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + _bash(parser).split("\n", 1)[1]
    )


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish(parser: argparse.ArgumentParser) -> str:
    lines = ["# bifrost completion for fish: bifrost completion fish | source"]
    lines.append("complete -c bifrost -l version -d 'Print the version and exit.'")
    for name, (text, opts) in _commands(parser).items():
        lines.append(
            f"complete -c bifrost -f -n __fish_use_subcommand -a {name} -d {_fish_quote(text)}"
        )
        for opt in opts:
            flag = f"-l {opt[2:]}" if opt.startswith("--") else f"-s {opt[1:]}"
            lines.append(f"complete -c bifrost -n '__fish_seen_subcommand_from {name}' {flag}")
    return "\n".join(lines) + "\n"


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (bash, zsh or fish)."""
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](parser)
