"""Man pages generated from the command lines themselves: podagent(1) from its argparse parser,
podctl(1) from its Click tree, so a page cannot drift from ``--help``.

``python -m agent.manpages DIR`` writes DIR/podagent.1 and DIR/podctl.1 (``make man``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import typer

from agent import __version__

_FOOTER = (
    ".SH FILES\n"
    ".TP\n/etc/podagent/podagent.toml\n"
    "The agent's config (every key: /usr/share/doc/podagent/example.toml).\n"
    ".TP\n/run/podagent/podagent.sock\nThe control socket podctl talks to.\n"
    ".TP\n/var/lib/podagent/\nState: the MQTT spool and the audit log.\n"
    ".SH SEE ALSO\n"
)


def _esc(text: str) -> str:
    """Roff-safe text: backslashes doubled, a leading dot or quote neutralised, one line per paragraph."""
    lines = []
    for raw in text.replace("\\", "\\\\").replace("-", "\\-").splitlines():
        line = raw.strip()
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _header(name: str, summary: str) -> str:
    date = dt.date.today().isoformat()
    return (
        f'.TH {name.upper()} 1 "{date}" "podagent {__version__}" "podagent manual"\n'
        f".SH NAME\n{name} \\- {_esc(summary)}\n"
    )


def _argparse_options(parser: argparse.ArgumentParser) -> str:
    text = ""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        flags = ", ".join(action.option_strings) or (action.metavar or action.dest)
        text += f".TP\n.B {_esc(str(flags))}\n{_esc(action.help or '')}\n"
    return text


def podagent_page(parser: argparse.ArgumentParser) -> str:
    page = _header("podagent", parser.description or "")
    page += ".SH SYNOPSIS\n.B podagent\n[\\-\\-version] COMMAND [ARGS]\n"
    page += f".SH DESCRIPTION\n{_esc(parser.description or '')}\n"
    page += ".SH OPTIONS\n" + _argparse_options(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    page += ".SH COMMANDS\n"
    for child in sub.choices.values():
        usage = child.format_usage().removeprefix("usage: ").strip()
        page += f'.SS "{_esc(usage)}"\n{_esc(child.description or "")}\n' + _argparse_options(child)
    page += (
        ".SH ENVIRONMENT\n.TP\nPODAGENT_EVENT_LOOP\n"
        "uvloop (the default) or asyncio: the event loop podagent run runs on. asyncio is Python's own "
        "loop, for a suspected loop bug; the start\\-up log line says which loop runs.\n"
    )
    return page + _FOOTER + ".BR podctl (1),\n.BR systemctl (1)\n"


def _click_params(ctx: typer.Context, command: Any) -> str:
    text = ""
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or getattr(param, "hidden", False):
            continue
        text += f".TP\n.B {_esc(record[0])}\n{_esc(record[1])}\n"
    return text


def _click_commands(ctx: typer.Context, group: Any, prefix: str) -> str:
    text = ""
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub_ctx = typer.Context(command, info_name=name, parent=ctx)
        if hasattr(command, "list_commands"):  # a group (podctl config ...)
            text += _click_commands(sub_ctx, command, f"{prefix} {name}")
            continue
        usage = " ".join(command.collect_usage_pieces(sub_ctx))
        text += f'.SS "{_esc(f"{prefix} {name} {usage}")}"\n{_esc(command.help or "")}\n'
        text += _click_params(sub_ctx, command)
    return text


def podctl_page(command: Any, epilog: str = "") -> str:
    """``command``: the Click group Typer builds (Typer vendors Click: its classes are not public)."""
    ctx = typer.Context(command, info_name="podctl")
    page = _header("podctl", (command.help or "").split("\n")[0])
    page += ".SH SYNOPSIS\n.B podctl\n[\\-\\-socket PATH] COMMAND [ARGS] [\\-\\-json]\n"
    page += f".SH DESCRIPTION\n{_esc(command.help or '')}\n"
    page += ".SH OPTIONS\n" + _click_params(ctx, command)
    page += ".SH COMMANDS\n" + _click_commands(ctx, command, "podctl")
    if epilog:
        page += f".SH EXIT STATUS\n{_esc(epilog)}\n"
    return page + _FOOTER + ".BR podagent (1)\n"


def write_pages(directory: Path) -> list[Path]:
    from agent.cli import build_parser
    from agent.control import podctl

    directory.mkdir(parents=True, exist_ok=True)
    group = typer.main.get_command(podctl.app)
    pages = {
        "podagent.1": podagent_page(build_parser()),
        "podctl.1": podctl_page(group, podctl.EXIT_STATUS),
    }
    written = []
    for name, text in pages.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/man")
    for path in write_pages(directory):
        print(path)


if __name__ == "__main__":
    main()
