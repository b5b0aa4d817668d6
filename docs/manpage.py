"""Write quiesce(1), the man page, from the CLI itself: `make man` (docs/quiesce.1).

Every command's help, options and the exit codes come from the click definitions, so the
page says what --help says; tests/test_docs.py fails when docs/quiesce.1 is stale.
"""

from __future__ import annotations

import inspect
import sys

import click

from quiesce import cli as quiesce_cli


def roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on any line."""
    lines = text.replace("\\", "\\e").replace("-", "\\-").splitlines()
    return "\n".join("\\&" + line if line[:1] in {".", "'"} else line for line in lines)


def paragraphs(text: str) -> str:
    """click's help text: \\b marks a block kept as written (no filling)."""
    out = []
    for block in inspect.cleandoc(text or "").split("\n\n"):
        block = block.strip("\n")
        if block.startswith("\b\n"):
            out.append(".PP\n.nf\n" + roff(block[2:]) + "\n.fi")
        elif block.strip():
            out.append(".PP\n" + roff(" ".join(block.split())))
    return "\n".join(out)


def options(ctx: click.Context, command: click.Command) -> str:
    out = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue  # hidden
        names, help_text = record
        out.append(f".TP\n.B {roff(names)}\n{roff(help_text)}")
    return "\n".join(out)


def page() -> str:
    root = click.Context(quiesce_cli.cli, info_name="quiesce")
    intro, _, description = inspect.cleandoc(quiesce_cli.cli.help).partition("\n\n")
    exit_codes = quiesce_cli.EXIT_CODES.replace("Exit codes:\n", "", 1)
    lines = [
        '.TH QUIESCE 1 "" "quiesce" "User Commands"',
        ".SH NAME",
        "quiesce \\- " + roff(intro.strip().rstrip(".")),
        ".SH SYNOPSIS",
        ".B quiesce",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        paragraphs(description),
        ".SH OPTIONS",
        options(root, quiesce_cli.cli),
        ".SH COMMANDS",
    ]
    for name in quiesce_cli.cli.all_commands(root):  # the adapters' commands too
        command = quiesce_cli.cli.get_command(root, name)
        if command is None or command.hidden:
            continue
        ctx = click.Context(command, info_name=name, parent=root)
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += [f".SS {roff(name)}", f".B quiesce {roff(name)}", roff(usage),
                  paragraphs(command.help or ""), options(ctx, command)]
    lines += [".SH EXIT STATUS", paragraphs(exit_codes),
              ".SH ENVIRONMENT",
              ".TP\n.B QUIESCE_CONFIG\nThe config file, unless \\-\\-config names one.",
              ".SH FILES",
              ".TP\n.I /etc/quiesce/quiesce.toml\nThe config (chmod 600); "
              "\\fBquiesce example\\-config\\fR prints a commented one.",
              ".TP\n.I /var/log/quiesce/\nquiesce.log and the host scripts' logs.",
              ".SH SEE ALSO",
              "The documentation in the docs/ directory of the source distribution: "
              "azure.md, adapters/*.md, writing\\-adapters.md."]
    return "\n".join(line for line in lines if line) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
