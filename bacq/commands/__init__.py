"""The ``bacq`` command's subcommands, one module per group; ``bacq.cli`` is the entry point.

Touches nothing when imported. Each module of this package defines
``register(sub, common)``: it adds its subcommands to ``sub`` (the ``bacq`` parser's
subparsers; ``common`` is the parent parser holding ``--debug``) and sets ``func`` on each, a
function taking the parsed arguments and returning an exit code (or a coroutine returning one).
Modules import only ``argparse`` and ``bacq.commands.common`` at the top: whatever a command
needs to run (NATS, pydantic, rich, Docker…) is imported inside the command, so ``bacq --help``
and ``bacq version`` start fast. Adding a group is a new module here plus its name in
``bacq.cli.GROUPS`` and its commands in ``bacq.cli.COMMANDS``; adding a command is its line of
help in ``bacq.commands.common.COMMAND_HELP`` (``add_command`` reads it; ``bacq --help`` alone
is built from that table, without the groups).
"""
