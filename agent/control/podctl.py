"""``podctl``: the field technician's tool. Talks to the running daemon over its control socket.

Exit codes: 0 done; 1 the daemon answered with an error (unknown id, bad value...); 2 usage;
3 the daemon is not running; 4 permission denied (socket or policy).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from agent import __version__
from agent.control import render
from agent.control.protocol import Client, DaemonNotRunning, SocketPermissionDenied
from agent.interlocks.config import DEFAULT_MAX_OVERRIDE_S

DEFAULT_SOCKET = Path("/run/podagent/podagent.sock")
DEFAULT_CONFIG = Path("/etc/podagent/podagent.toml")
EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED = 1, 2, 3, 4
EXIT_STATUS = (
    "0 done; 1 the daemon answered with an error (unknown id, bad value...); 2 usage; "
    "3 the daemon is not running; 4 permission denied (socket or policy)."
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Look at and steer the pod's agent (podagent) through its control socket.",
)
config_app = typer.Typer(no_args_is_help=True, help="Config file tools (no daemon needed).")
app.add_typer(config_app, name="config")


def _console(stderr: bool = False) -> Console:
    tty_out = (sys.stderr if stderr else sys.stdout).isatty()
    # Not a terminal: no colour codes, and a fixed width so tables do not wrap in a ticket or a pipe.
    width = None if tty_out else int(os.environ.get("COLUMNS", "120"))
    return Console(stderr=stderr, highlight=False, width=width, emoji=False)


out = _console()
err_out = _console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _socket(ctx: typer.Context) -> Path:
    path: Path = ctx.obj["socket"]
    return path


def _fail(message: str, code: int) -> NoReturn:
    err_out.print(Text(f"podctl: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _not_running(err: DaemonNotRunning) -> NoReturn:
    _fail(
        f"podagent is not running ({err.reason} at {err.path}); start it with `systemctl start podagent`"
        f" or `podagent run --config {DEFAULT_CONFIG}`",
        EXIT_NOT_RUNNING,
    )


def _connect(ctx: typer.Context, timeout_s: float = 10.0) -> Client:
    try:
        return Client(_socket(ctx), timeout_s=timeout_s)
    except DaemonNotRunning as err:
        _not_running(err)
    except SocketPermissionDenied as err:
        _fail(f"permission denied on {err.path}: join the podagent group or use sudo", EXIT_DENIED)


def call(ctx: typer.Context, op: str, *, timeout_s: float = 10.0, **args: Any) -> dict[str, Any]:
    """One request; prints the daemon's error and exits non-zero when it refuses."""
    with _connect(ctx, timeout_s) as client:
        try:
            reply = client.request(op, **args)
        except (ConnectionError, TimeoutError, OSError) as err:
            _fail(f"lost the daemon while waiting for {op}: {err}", EXIT_NOT_RUNNING)
    if not reply.get("ok"):
        message = str(reply.get("error", "unknown error"))
        _fail(message, EXIT_DENIED if message.startswith("permission denied") else EXIT_ERROR)
    return reply


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s`` / ``10m`` / ``2h`` / ``1d`` -> seconds. A bare number is refused: ``30`` could be
    meant as minutes, and an override for the wrong length is a safety matter."""
    m = _DURATION.match(text)
    if m is None:
        hint = f" (did you mean {text.strip()}m or {text.strip()}s?)" if text.strip().isdigit() else ""
        raise typer.BadParameter(f"{text!r}: a duration needs a unit, like 30s, 10m, 2h, 1d{hint}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def fmt_limit(seconds: float) -> str:
    """3600 -> ``1h``, 5400 -> ``90m``: the largest unit that says it exactly."""
    for unit in ("d", "h", "m"):
        if seconds % _UNIT_S[unit] == 0:
            return f"{int(seconds // _UNIT_S[unit])}{unit}"
    return f"{seconds:g}s"


OVERRIDE_FOR_HELP = (
    f"How long, with a unit: 30m, 2h. The daemon grants at most {fmt_limit(DEFAULT_MAX_OVERRIDE_S)} "
    "(interlocks.max_override_s in its config)."
)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"podctl {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _global(
    ctx: typer.Context,
    socket: Annotated[
        Path,
        # readable=False: Click would test the socket with access(R_OK) and print its own "Invalid
        # value" line; connecting is the test, and its refusal becomes "podctl: permission denied".
        typer.Option(
            "--socket", envvar="PODAGENT_SOCKET", readable=False, help="The daemon's control socket."
        ),
    ] = DEFAULT_SOCKET,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Show the version and exit."),
    ] = False,
) -> None:
    ctx.obj = {"socket": socket}


# ---------------------------------------------------------------------- read commands


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The pod on one screen: power vs budget, cooling, interlocks and caps, stale devices, MQTT."""
    reply = call(ctx, "status")
    if as_json:
        _print_json(reply["status"])
    else:
        out.print(render.render_status(reply["status"]))


@app.command()
def watch(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    iterations: Annotated[int, typer.Option(hidden=True, help="Stop after N screens (0: never).")] = 0,
) -> None:
    """`podctl status`, refreshed like top. q or Ctrl-C quits."""
    client = _connect(ctx)
    fd = sys.stdin.fileno()
    interactive = os.isatty(fd)
    saved = termios.tcgetattr(fd) if interactive else None
    lost: str | None = None
    try:
        if interactive:
            tty.setcbreak(fd)  # keys without Enter; Ctrl-C still raises KeyboardInterrupt
        with Live(console=out, screen=interactive, auto_refresh=False, transient=not interactive) as live:
            shown = 0
            while True:
                try:
                    reply = client.request("status")
                except (ConnectionError, TimeoutError, OSError) as err:
                    lost = str(err)
                    break
                body = (
                    render.render_status(reply["status"])
                    if reply.get("ok")
                    else Text(str(reply.get("error")))
                )
                live.update(Group(body, Text("q: quit", style="dim")), refresh=True)
                shown += 1
                if iterations and shown >= iterations:
                    break
                if _key_within(fd if interactive else None, interval) in ("q", "Q"):
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        client.close()
    if lost is not None:
        _fail(f"lost the daemon: {lost}", EXIT_NOT_RUNNING)


def _key_within(fd: int | None, timeout_s: float) -> str | None:
    if fd is None:
        time.sleep(timeout_s)
        return None
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 32)
            if not data:
                return None
            return data.decode(errors="replace")[-1]
    return None


@app.command()
def devices(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every device and GPU: status, age of its data, failing metrics."""
    reply = call(ctx, "devices")
    if as_json:
        _print_json(reply["devices"])
    else:
        out.print(render.render_devices(reply["devices"]))


@app.command()
def device(
    ctx: typer.Context, device_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Every metric of one device: value, unit, age, quality."""
    reply = call(ctx, "device", id=device_id)
    if as_json:
        _print_json(reply["device"])
    else:
        out.print(render.render_device(reply["device"]))


@app.command()
def interlocks(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Active interlocks, GPU caps and overrides."""
    reply = call(ctx, "interlocks")
    if as_json:
        _print_json({"running": reply["running"], "interlocks": reply["interlocks"]})
    else:
        out.print(render.render_interlocks(reply))


@app.command()
def events(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="How far back: 30s, 10m, 2h, 1d.")] = "1h",
    limit: Annotated[int, typer.Option(min=1, max=2000)] = 200,
    unacked: Annotated[bool, typer.Option("--unacked", help="Only events waiting for an ack.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recent events (trips, clears, actions, overrides, device up/down, commands)."""
    since_wall = time.time() - parse_duration(since)
    if follow:
        _follow(ctx, since_wall, as_json)
        return
    reply = call(ctx, "events", since_wall=since_wall, limit=limit, unacked=unacked)
    if as_json:
        _print_json(reply["events"])
        return
    if not reply["events"]:
        out.print(Text(f"no events in the last {since}", style="dim"))
    for e in reply["events"]:
        out.print(render.event_line(e), soft_wrap=True)


def _follow(ctx: typer.Context, since_wall: float, as_json: bool) -> None:
    client = _connect(ctx)
    try:
        first = client.request("follow", since_wall=since_wall)
        if not first.get("ok"):
            _fail(str(first.get("error")), EXIT_ERROR)
        for line in client.stream():
            if "event" in line:
                if as_json:
                    sys.stdout.write(json.dumps(line["event"], default=str) + "\n")
                else:
                    out.print(render.event_line(line["event"]), soft_wrap=True)
            elif "dropped" in line and not as_json:
                out.print(
                    Text(f"({line['dropped']} events dropped: this terminal was too slow)", style="yellow")
                )
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


# ---------------------------------------------------------------------- changing commands


@app.command()
def ack(
    ctx: typer.Context, event_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Acknowledge an event (a leak interlock clears only after its ack)."""
    reply = call(ctx, "ack", id=event_id)
    if as_json:
        _print_json(reply["ack"])
    else:
        out.print(Text(reply["ack"]["message"], style="green"))


@app.command(context_settings={"allow_interspersed_args": True})
def override(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(metavar="INTERLOCK | clear ID")],
    device_id: Annotated[str | None, typer.Option("--device", help="The device the override is for.")] = None,
    duration: Annotated[str | None, typer.Option("--for", help=OVERRIDE_FOR_HELP)] = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the audit log).")] = None,
    force: Annotated[bool, typer.Option(help="Override even a safety-critical interlock.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Suspend an interlock on one device for a while (`override INTERLOCK --device ID --for 30m
    --reason TEXT`), or end an override early (`override clear ID`)."""
    if args[0] == "clear":
        if len(args) != 2:
            raise typer.BadParameter("usage: podctl override clear OVERRIDE_ID")
        reply = call(ctx, "override_clear", id=args[1])
        if as_json:
            _print_json(reply["override"])
        else:
            out.print(Text(f"override {args[1]} cleared", style="green"))
        return
    if len(args) != 1:
        raise typer.BadParameter("usage: podctl override INTERLOCK --device ID --for 30m --reason TEXT")
    missing = [n for n, v in (("--device", device_id), ("--for", duration), ("--reason", reason)) if not v]
    if missing:
        raise typer.BadParameter(f"override needs {', '.join(missing)}")
    assert duration is not None
    reply = call(
        ctx,
        "override",
        interlock=args[0],
        device=device_id,
        duration_s=parse_duration(duration),
        reason=reason,
        force=force,
    )
    o = reply["override"]
    if as_json:
        _print_json(o)
    else:
        out.print(
            Text(
                f"override {o.get('id')}: {o.get('interlock')} suspended on {o.get('device')} until "
                f"{render.fmt_wall(o.get('expires_wall'))}",
                style="yellow",
            )
        )


@app.command()
def poll(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="DEVICE")],
    raw: Annotated[bool, typer.Option("--raw/--no-raw", help="Also read raw registers/OIDs.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Poll a device now and show what it answered (raw and scaled when the driver can)."""
    reply = call(ctx, "poll", device=device_id, raw=raw, timeout_s=60.0)
    payload = {k: v for k, v in reply.items() if k not in ("v", "ok")}
    if as_json:
        _print_json(payload)
    else:
        out.print(render.render_poll(payload))
    if payload.get("error"):
        raise typer.Exit(EXIT_ERROR)


@app.command()
def reload(ctx: typer.Context) -> None:
    """Re-read the daemon's config file (kept as is when the new one is invalid)."""
    reply = call(ctx, "reload")
    out.print(Text(f"config reloaded ({reply.get('reloads')} reloads since start)", style="green"))


# ---------------------------------------------------------------------- without the daemon


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(metavar="FILE")] = DEFAULT_CONFIG) -> None:
    """Validate a config file and print every problem (same as `podagent check-config`)."""
    from agent.cli import check_config

    raise typer.Exit(check_config(file))


@app.command()
def probe(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE")],
    config: Annotated[
        Path, typer.Option("--config", help="The agent config naming the device.")
    ] = DEFAULT_CONFIG,
    raw: Annotated[bool, typer.Option("--raw/--no-raw", help="Also read raw registers/OIDs.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Run one device's driver once, directly (no daemon needed): open, poll, close."""
    from agent.config import ConfigError, load_config
    from agent.logs import configure_logging

    configure_logging("warning", "console")  # the driver's own log lines go to stderr, not into --json
    try:
        cfg = load_config(config)
    except ConfigError as err:
        err_out.print(err.render(), markup=False)
        raise typer.Exit(EXIT_ERROR) from None
    dev = next((d for d in cfg.device if d.id == device_id), None)
    if dev is None:
        _fail(f"{config} has no device {device_id!r} (it has {', '.join(d.id for d in cfg.device)})", 2)
    payload = asyncio.run(_probe(dev, raw=raw))
    if as_json:
        _print_json(payload)
    else:
        out.print(render.render_poll(payload))
    if payload.get("error"):
        raise typer.Exit(EXIT_ERROR)


async def _probe(cfg: Any, *, raw: bool) -> dict[str, Any]:
    from agent.app import build_driver
    from agent.control.server import jsonable_raw
    from agent.drivers.base import AuthError, DeviceError, DeviceUnavailable

    driver = build_driver(cfg)
    payload: dict[str, Any] = {"device": cfg.id, "polled": cfg.id, "error": None, "readings": [], "raw": None}
    budget = cfg.timeout_s * (cfg.retries + 1) + 1.0
    opened = False
    try:
        async with asyncio.timeout(budget):
            await driver.open()
            opened = True
            readings = await driver.poll()
        now = time.monotonic()
        payload["readings"] = [
            {
                "device": r.device,
                "metric": r.metric if r.device == cfg.id else f"{r.device}.{r.metric}",
                "value": r.value,
                "unit": r.unit,
                "age_s": round(now - r.ts_mono, 2),
                "quality": str(r.quality),
                "error": r.error,
            }
            for r in readings
        ]
        poll_raw = getattr(driver, "poll_raw", None)
        if raw and callable(poll_raw):
            async with asyncio.timeout(budget):
                payload["raw"] = jsonable_raw(await poll_raw())
    except AuthError as err:
        payload["error"] = f"authentication failed: {err.reason}"
    except (DeviceUnavailable, DeviceError) as err:
        payload["error"] = err.reason
    except TimeoutError:
        payload["error"] = f"no answer within {budget:.1f} s"
    finally:
        if opened:
            try:
                async with asyncio.timeout(budget):
                    await driver.close()
            except Exception as err:  # closing is best effort; the reading is what was asked for
                payload.setdefault("close_error", str(err))
    return payload


def _enable_completion() -> None:
    """``_PODCTL_COMPLETE=source_bash podctl`` (or ``source_zsh``) prints the completion script;
    Typer registers its shell classes only with its own --install-completion options, which podctl
    does not carry (installers put the scripts in place: systemd/install.sh, the .deb)."""
    try:
        from typer._completion_classes import completion_init
    except ImportError:  # an older Typer: completion as Click itself does it
        return
    completion_init()


def main(argv: list[str] | None = None) -> None:
    """Every failure ends as one ``podctl: ...`` line on stderr and its exit code (see EXIT_STATUS)."""
    _enable_completion()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="podctl", standalone_mode=False)
    except typer.Abort:
        code = 130
    except KeyboardInterrupt:
        code = 130
    except typer.TyperException as err:  # Click's usage errors and bad parameters (Click is vendored)
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        sub = getattr(getattr(err, "ctx", None), "command_path", "podctl")
        err_out.print(Text(f"podctl: {message} (see `{sub} --help`)", style="bold red"), soft_wrap=True)
        code = int(getattr(err, "exit_code", EXIT_USAGE))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
