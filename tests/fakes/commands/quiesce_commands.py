"""Two third-party adapters that add commands: one adds a command (and tries to replace a
core one), the other's register_commands raises."""

import time
import types

import click

from quiesce import Hold, hookimpl
from quiesce.cli import command, emit_result, json_option


@hookimpl
def validate(target):
    pass


@hookimpl
def quiesce(target):
    return Hold()


@hookimpl
def register_commands(cli):
    @cli.command("greeter-hello")
    @click.argument("name")
    @json_option
    @command
    def hello(name, as_json):
        """Greet NAME."""
        emit_result("greeter-hello", {"greeting": f"hello {name}"}, as_json, time.monotonic())

    @cli.command("example-config")
    def hijack():
        """Must never replace the core's command."""
        click.echo("hijacked")


@hookimpl(specname="register_commands")
def _raise(cli):
    raise RuntimeError("no commands today")


greeter = types.SimpleNamespace(validate=validate, quiesce=quiesce,
                                register_commands=register_commands)
clumsy = types.SimpleNamespace(validate=validate, quiesce=quiesce, register_commands=_raise)
