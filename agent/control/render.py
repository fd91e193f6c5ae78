"""How podctl shows things to a person: units a technician reads at a glance, red for what needs action.

Every function takes the daemon's JSON answer (a dict) and returns a rich renderable; on a
non-terminal rich drops the colours, so the same code prints plain text into a pipe or a ticket.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

BOOL_METRICS = ("_on", "running", "tripped", "leak", "pump_fault", "lost", "pump_running")
# (metric, value) combinations that need someone to act (red).
ALARM_WHEN = {
    "leak": 1.0,
    "pump_fault": 1.0,
    "tripped": 1.0,
    "lost": 1.0,
    "pump_running": 0.0,
    "running": 0.0,
}


def _is_bool(metric: str) -> bool:
    return metric.startswith("throttle_") or any(metric.endswith(s) for s in BOOL_METRICS)


def fmt_value(metric: str, value: float | None, unit: str = "") -> str:
    """``power_w`` 12345 -> ``12.35 kW``; ``supply_temp_c`` -> ``31.2 C``; None -> ``n/a``."""
    if value is None:
        return "n/a"
    if metric == "alarms":
        return f"0x{int(value):04x}" if value else "none"
    if _is_bool(metric):
        if metric.endswith(("_on", "running")):
            return "on" if value else "off"
        return "yes" if value else "no"
    suffix = metric.rsplit("_", 1)[-1]
    if suffix == "w":
        return f"{value / 1000:.2f} kW" if abs(value) >= 1000 else f"{value:.0f} W"
    if suffix == "wh":
        return f"{value / 1000:.1f} kWh" if abs(value) >= 10000 else f"{value:.0f} Wh"
    if suffix == "mj":
        return f"{value / 3.6e9:.2f} kWh"  # NVML energy counter (mJ) in the unit a bill uses
    if suffix == "bytes":
        return f"{value / 2**30:.1f} GiB"
    if suffix == "s":
        return fmt_duration(value)
    simple = {
        "c": "C",
        "kw": "kW",
        "a": "A",
        "v": "V",
        "lpm": "L/min",
        "kpa": "kPa",
        "pct": "%",
        "mhz": "MHz",
    }
    if suffix in simple:
        digits = 0 if suffix in ("v", "pct", "mhz") else 2 if suffix == "a" else 1
        return f"{value:.{digits}f} {simple[suffix]}"
    if float(value).is_integer():
        return f"{int(value)} {unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


def natural_key(text: str) -> tuple[tuple[int, str, int], ...]:
    """Sort key: ``gpu2`` before ``gpu10``, ``pdu-a9`` before ``pdu-a10`` (digits compare as numbers)."""
    return tuple((0, p, 0) if i % 2 == 0 else (1, "", int(p)) for i, p in enumerate(re.split(r"(\d+)", text)))


def natural_sorted(ids: Iterable[str]) -> list[str]:
    return sorted(ids, key=natural_key)


def compress_ids(ids: Iterable[str]) -> str:
    """``gpu48 gpu49 ... gpu63 gpu2`` -> ``gpu2, gpu48-63``: 72 GPUs fit on a line."""
    parsed: dict[str, list[int]] = {}
    plain: list[str] = []
    for i in ids:
        m = re.fullmatch(r"(.*?)(\d+)", i)
        if m is None:
            plain.append(i)
        else:
            parsed.setdefault(m.group(1), []).append(int(m.group(2)))
    out = list(plain)
    for prefix, found in sorted(parsed.items()):
        nums = sorted(set(found))
        start = prev = nums[0]
        for n in [*nums[1:], None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            out.append(f"{prefix}{start}" if start == prev else f"{prefix}{start}-{prev}")
            if n is not None:
                start = prev = n
    return ", ".join(out)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_wall(ts: float | None) -> str:
    if ts is None:
        return "n/a"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def style_for(metric: str, value: float | None, quality: str = "good") -> str:
    if quality == "error" or value is None:
        return "bold red"
    if quality == "stale":
        return "yellow"
    if metric in ALARM_WHEN and value == ALARM_WHEN[metric]:
        return "bold red"
    if metric == "temp_c":
        return "bold red" if value >= 85 else "yellow" if value >= 80 else ""
    if metric == "supply_temp_c":
        return "bold red" if value >= 40 else "yellow" if value >= 35 else ""
    if metric.startswith("throttle_hw") and value:
        return "yellow"
    return ""


def reading_text(r: Mapping[str, Any] | None, metric: str | None = None) -> Text:
    if r is None:
        return Text("n/a", style="dim")
    m = metric or str(r["metric"])
    return Text(fmt_value(m, r["value"], r.get("unit", "")), style=style_for(m, r["value"], r["quality"]))


# ---------------------------------------------------------------------- status


def render_status(s: Mapping[str, Any]) -> RenderableType:
    parts: list[RenderableType] = []
    head = Text()
    head.append(f"podagent {s['site']}/{s['pod']}", style="bold")
    head.append("  ")
    head.append("ready" if s.get("ready") else "starting", style="green" if s.get("ready") else "yellow")
    head.append(f"  up {fmt_duration(s.get('uptime_s'))}")
    unacked = s.get("unacked_events", 0)
    head.append("  unacked events: ")
    head.append(str(unacked), style="bold red" if unacked else "green")
    head.append(f"   {time.strftime('%H:%M:%S', time.localtime(s.get('ts', 0) / 1000))}", style="dim")
    parts.append(head)

    parts.append(_power_line(s))
    grid = _grid_line(s.get("power"))
    if grid is not None:
        parts.append(grid)
    parts.append(_gpu_line(s.get("gpus", [])))
    parts.append(_cooling_table(s.get("cooling", [])))
    parts.extend(_interlock_parts(s.get("interlocks")))
    stale = s.get("stale_devices", [])
    line = Text("Stale/failed devices: ", style="bold")
    if stale:
        devices = s.get("devices", {})
        line.append(
            ", ".join(
                f"{d} ({devices.get(d, {}).get('error') or devices.get(d, {}).get('status')})"
                for d in natural_sorted(stale)
            ),
            style="bold red",
        )
    else:
        line.append("none", style="green")
    parts.append(line)
    mqtt = s.get("mqtt")
    if mqtt is not None:
        parts.append(_mqtt_line(mqtt))
    return Group(*parts)


def _grid_line(p: Mapping[str, Any] | None) -> Text | None:
    """Budget, allocation, battery and grid ramp (the power service), when it runs."""
    if not p:
        return None
    t = Text("Grid    ", style="bold")
    budget, alloc, bat, ramp = (
        p.get("budget") or {},
        p.get("allocation") or {},
        p.get("battery"),
        p.get("ramp") or {},
    )
    if budget.get("pod_budget_w") is not None:
        t.append(f"budget {fmt_value('power_w', budget['pod_budget_w'])} ({budget.get('source')})  ")
    if ramp.get("grid_w") is not None:
        t.append(f"import {fmt_value('power_w', ramp['grid_w'])}  ")
    if ramp.get("limit_w_per_s"):
        t.append(
            f"ramp {fmt_value('power_w', ramp.get('grid_ramp_w_per_s') or 0)}/s of "
            f"{fmt_value('power_w', ramp['limit_w_per_s'])}/s  "
        )
    if alloc.get("capped_gpus"):
        t.append(f"{alloc['capped_gpus']} GPUs capped by budget  ", style="yellow")
    if bat:
        soc = bat.get("soc_pct")
        t.append("battery ")
        t.append(f"{soc:.0f}%" if soc is not None else "n/a", style="bold red" if soc is None else "")
        if bat.get("power_w") is not None:
            t.append(f" {fmt_value('power_w', bat['power_w'])}")
        if bat.get("faults") or bat.get("error"):
            t.append(f" fault {bat.get('faults') or bat.get('error')}", style="bold red")
    return t if t.plain.strip() != "Grid" else None


def _power_line(s: Mapping[str, Any]) -> Text:
    t = Text("Power   ", style="bold")
    pod = s.get("pod_power")
    watts = s.get("pod_power_w")
    t.append("pod ")
    t.append_text(reading_text(pod, "power_w") if pod else Text("n/a", style="bold red"))
    if pod and pod.get("error"):
        t.append(f" ({pod['error']})", style="red")
    budget = s.get("budget_w")
    if budget:
        t.append(" of budget ")
        t.append(fmt_value("power_w", budget))
        if watts is not None:
            pct = 100 * watts / budget
            t.append(f" ({pct:.0f}%)", style="bold red" if pct > 100 else "yellow" if pct > 90 else "green")
    else:
        t.append("  (no fleet budget set)", style="dim")
    return t


def _gpu_line(gpus: list[Mapping[str, Any]]) -> Text:
    t = Text("GPUs    ", style="bold")
    if not gpus:
        return t + Text("none reported", style="dim")
    total = sum((g["power_w"] or {}).get("value") or 0.0 for g in gpus)
    bad = [g["device"] for g in gpus if (g["temp_c"] or {}).get("quality") != "good"]
    t.append(f"{len(gpus)} GPUs drawing {fmt_value('power_w', total)}; hottest ")
    temps = sorted(
        (g for g in gpus if (g["temp_c"] or {}).get("value") is not None),
        key=lambda g: g["temp_c"]["value"],
        reverse=True,
    )
    for i, g in enumerate(temps[:3]):
        if i:
            t.append(", ")
        t.append(f"{g['device']} ")
        t.append_text(reading_text(g["temp_c"], "temp_c"))
        limit, default = g.get("power_limit_w"), g.get("default_power_limit_w")
        if limit and default and limit["value"] is not None and limit["value"] < (default["value"] or 0):
            t.append(f" capped {fmt_value('power_w', limit['value'])}", style="yellow")
    if bad:
        t.append(f"; no data: {', '.join(bad)}", style="bold red")
    return t


def _cooling_table(cooling: list[Mapping[str, Any]]) -> RenderableType:
    table = Table(title=None, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left")
    table.add_column("Cooling", style="bold", no_wrap=True)
    # Short headers so 80 columns hold every one uncut: "pump" is a CDU's pump or a chiller's
    # compressor running, "alarm" a CDU's leak or a chiller's trip.
    for col in ("supply", "return", "flow", "pump", "alarm", "load", "setpt"):
        table.add_column(col, justify="right", no_wrap=True)
    for unit in sorted(cooling, key=lambda u: natural_key(str(u["device"]))):
        m = unit["metrics"]
        if unit["kind"] == "cdu":
            table.add_row(
                unit["device"],
                reading_text(m.get("supply_temp_c")),
                reading_text(m.get("return_temp_c")),
                reading_text(m.get("flow_lpm")),
                _pump(m),
                reading_text(m.get("leak")),
                reading_text(m.get("heat_removed_kw") or m.get("gpu_heat_load_kw")),
                reading_text(m.get("setpoint_c")),
            )
        else:
            table.add_row(
                unit["device"],
                reading_text(m.get("supply_temp_c")),
                reading_text(m.get("return_temp_c")),
                Text(""),
                reading_text(m.get("running")),
                reading_text(m.get("tripped")),
                reading_text(m.get("load_kw")),
                reading_text(m.get("setpoint_c")),
            )
    if not cooling:
        table.add_row(Text("no CDU or chiller configured", style="dim"), *[""] * 7)
    return table


def _pump(m: Mapping[str, Any]) -> Text:
    t = reading_text(m.get("pump_running"))
    fault = m.get("pump_fault")
    if fault is not None and fault["value"]:
        t.append(" FAULT", style="bold red")
    return t


def _interlock_parts(status: Mapping[str, Any] | None) -> list[RenderableType]:
    if status is None:
        return [Text.assemble(("Interlocks ", "bold"), ("interlock service not running", "bold red"))]
    out: list[RenderableType] = []
    active = status.get("active", [])
    head = Text("Interlocks ", style="bold")
    if active:
        head.append(f"{len(active)} active", style="bold red")
    else:
        head.append("none active", style="green")
    if status.get("config_hash"):
        # Which interlock settings are in force: the same hash as the MQTT birth and reload event.
        head.append(f"  config {status['config_hash']}", style="dim")
    out.append(head)
    if active:
        out.append(interlock_table(active))
    caps = {g: c for g, c in status.get("caps", {}).items() if c.get("state") != "default"}
    if caps:
        out.append(caps_table(caps))
    overrides = status.get("overrides", [])
    if overrides:
        out.append(overrides_table(overrides))
    return out


def interlock_table(active: Iterable[Mapping[str, Any]], *, detail: bool = False) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("Active interlock", style="bold red")
    for col in ("device", "since", "cap", "GPUs", "id", *(("inputs",) if detail else ())):
        table.add_column(col)
    now = time.time()
    for a in sorted(active, key=lambda a: (natural_key(str(a.get("device", ""))), str(a.get("interlock")))):
        name = Text(a.get("interlock", "?"))
        if a.get("overridden"):
            name.append(" (overridden)", style="yellow")
        inputs = (a.get("detail") or {}).get("inputs") or {}
        table.add_row(
            name,
            a.get("device", ""),
            fmt_duration(now - a["since_wall"]) + " ago" if a.get("since_wall") else "",
            fmt_value("power_w", a.get("cap_w")) if a.get("cap_w") is not None else "",
            compress_ids(a.get("gpus", [])),
            a.get("id", ""),
            *((" ".join(f"{k}={v}" for k, v in inputs.items()),) if detail else ()),
        )
    return table


def caps_table(caps: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("Capped GPUs", style="bold")
    for col in ("cap", "applied", "default", "by", "state"):
        table.add_column(col)
    # GPUs capped alike share a row: a loop-wide cap on 72 GPUs is one line, not a screenful.
    groups: dict[tuple[Any, ...], list[str]] = {}
    for gpu, c in caps.items():
        key = (c.get("cap_w"), c.get("applied_w"), c.get("default_w"), tuple(c.get("by", [])), c.get("state"))
        groups.setdefault(key, []).append(gpu)
    for gpus in sorted(groups.values(), key=lambda ids: natural_key(natural_sorted(ids)[0])):
        c = caps[gpus[0]]
        table.add_row(
            compress_ids(gpus),
            Text(fmt_value("power_w", c.get("cap_w")), style="yellow"),
            fmt_value("power_w", c.get("applied_w")),
            fmt_value("power_w", c.get("default_w")),
            ", ".join(c.get("by", [])),
            str(c.get("state", "")),
        )
    return table


def overrides_table(overrides: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("Override", style="bold yellow")
    for col in ("interlock", "device", "expires in", "by", "reason"):
        table.add_column(col)
    now = time.time()
    for o in overrides:
        expires = o.get("expires_wall")
        table.add_row(
            o.get("id", ""),
            o.get("interlock", ""),
            o.get("device", ""),
            fmt_duration(max(0.0, expires - now)) if expires else "",
            o.get("by", ""),
            o.get("reason", ""),
        )
    return table


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _mqtt_line(mqtt: Any) -> Text:
    """The fleet link and its spool on one line: ``MQTT    connected 10.0.0.5:8883 (v5)  spool 14
    (15.1 KiB)  dropped 0`` (``podctl status --json`` has every counter)."""
    t = Text("MQTT    ", style="bold", no_wrap=True, overflow="ellipsis")
    if not isinstance(mqtt, Mapping):
        return t + Text(str(mqtt))
    link = mqtt.get("link")
    if link is None and mqtt.get("connected") is not None:
        link = "connected" if mqtt["connected"] else "disconnected"
    up = link == "connected"
    t.append(str(link or "unknown"), style="green" if up else "bold red")
    if mqtt.get("broker"):
        t.append(f" {mqtt['broker']}")
    if mqtt.get("protocol"):
        t.append(f" (v{mqtt['protocol']})", style="dim")
    depth = mqtt.get("spool_depth")
    if depth is not None:
        t.append("  spool ")
        t.append(str(depth), style="yellow" if depth and not up else "")
        if mqtt.get("spool_bytes") is not None:
            t.append(f" ({fmt_bytes(mqtt['spool_bytes'])})")
    dropped = sum(
        int(mqtt.get(k) or 0) for k in ("dropped_telemetry", "spool_dropped") if isinstance(mqtt.get(k), int)
    )
    t.append("  dropped ")
    t.append(str(dropped), style="bold red" if dropped else "")
    if mqtt.get("last_error") and not up:
        t.append(f"  {mqtt['last_error']}", style="red")
    return t


# ---------------------------------------------------------------------- other views


def device_order(devices: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Natural order, each device followed by the ones it polls (gpus, then gpu0, gpu1 ... gpu10)."""
    children: dict[str, list[Mapping[str, Any]]] = {}
    top: list[Mapping[str, Any]] = []
    known = {str(d["id"]) for d in devices}
    for d in devices:
        parent = d.get("parent")
        if parent and parent in known:
            children.setdefault(str(parent), []).append(d)
        else:
            top.append(d)
    ordered: list[Mapping[str, Any]] = []
    for d in sorted(top, key=lambda d: natural_key(str(d["id"]))):
        ordered.append(d)
        ordered.extend(sorted(children.get(str(d["id"]), []), key=lambda c: natural_key(str(c["id"]))))
    return ordered


def render_devices(devices: list[Mapping[str, Any]]) -> RenderableType:
    """One row per device; errors under the table, each on its own line (a long SNMP or Modbus
    error would otherwise squeeze a column to a word per line at 80 columns)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    numeric = ("age", "metrics", "bad", "polls", "fails")
    for col in ("device", "kind", "status", *numeric):
        table.add_column(col, justify="right" if col in numeric else "left", no_wrap=True)
    errors: list[Text] = []
    for d in device_order(devices):
        status = d.get("status") or "unknown"
        style = "green" if status == "ok" else "bold red" if status in ("error", "stale") else "yellow"
        name = d["id"] if not d.get("parent") else f"  {d['id']}"
        table.add_row(
            name,
            d.get("kind", ""),
            Text(status, style=style),
            fmt_duration(d.get("age_s")),
            str(d.get("metrics", "")),
            Text(str(d.get("not_good", "")), style="bold red" if d.get("not_good") else ""),
            str(d.get("polls") if d.get("polls") is not None else ""),
            str(d.get("failures") if d.get("failures") is not None else ""),
        )
        if d.get("error"):
            errors.append(Text.assemble((f"{d['id']}: ", "bold"), (str(d["error"]), "red")))
    return Group(table, *errors) if errors else table


def metrics_table(readings: Iterable[Mapping[str, Any]], *, title: str | None = None) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("age", justify="right")
    table.add_column("quality")
    table.add_column("error")
    for r in readings:
        q = r["quality"]
        table.add_row(
            r["metric"],
            reading_text(r),
            r.get("unit", ""),
            fmt_duration(r.get("age_s")),
            Text(q, style="green" if q == "good" else "bold red" if q == "error" else "yellow"),
            Text(r.get("error") or "", style="red"),
        )
    return table


def render_device(d: Mapping[str, Any]) -> RenderableType:
    head = Text(d["id"], style="bold")
    if d.get("parent"):
        head.append(f" (polled by {d['parent']})", style="dim")
    status = d.get("status") or "unknown"
    head.append("  ")
    head.append(status, style="green" if status == "ok" else "bold red")
    if d.get("error"):
        head.append(f"  {d['error']}", style="red")
    parts: list[RenderableType] = [head]
    if d.get("info"):
        parts.append(Text("  ".join(f"{k}: {v}" for k, v in d["info"].items()), style="dim"))
    parts.append(metrics_table(d.get("metrics", [])))
    return Group(*parts)


def render_interlocks(payload: Mapping[str, Any]) -> RenderableType:
    status = payload.get("interlocks")
    if not payload.get("running") or status is None:
        return Text("interlock service not running", style="bold red")
    parts: list[RenderableType] = []
    active = status.get("active", [])
    parts.append(
        interlock_table(active, detail=True) if active else Text("no interlock active", style="green")
    )
    caps = status.get("caps", {})
    if caps:
        parts.append(caps_table(caps))
    overrides = status.get("overrides", [])
    parts.append(overrides_table(overrides) if overrides else Text("no overrides", style="dim"))
    return Group(*parts)


def event_line(e: Mapping[str, Any]) -> Text:
    sev = e.get("severity", "info")
    style = "bold red" if sev == "critical" else "yellow" if sev == "warning" else ""
    t = Text(time.strftime("%H:%M:%S", time.localtime(e["ts_wall"])) + " ", style="dim")
    t.append(f"{sev:<8} ", style=style)
    t.append(f"{e['kind']:<18} ")
    t.append(e.get("message", ""), style=style)
    t.append(f"  [{e['id']}]", style="dim")
    if e.get("needs_ack"):
        acked = e.get("acked_by")
        t.append(f" acked by {acked}" if acked else " NEEDS ACK", style="green" if acked else "bold red")
    return t


def render_poll(payload: Mapping[str, Any]) -> RenderableType:
    parts: list[RenderableType] = []
    head = Text(f"{payload['device']}: polled now", style="bold")
    if payload.get("polled") and payload["polled"] != payload["device"]:
        head.append(f" (via {payload['polled']})", style="dim")
    if payload.get("error"):
        head.append(f"  poll failed: {payload['error']}", style="bold red")
    parts.append(head)
    parts.append(metrics_table(payload.get("readings", []), title="scaled"))
    raw = payload.get("raw")
    if raw:
        parts.append(raw_table(raw))
    elif payload.get("raw_error"):
        parts.append(Text(f"raw read failed: {payload['raw_error']}", style="red"))
    return Group(*parts)


def raw_table(raw: list[Any]) -> Table:
    table = Table(title="raw", box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    first = raw[0] if raw else {}
    if isinstance(first, Mapping) and "oid" in first:
        table.add_column("OID")
        table.add_column("raw value", justify="right")
        for item in raw:
            table.add_row(item["oid"], str(item["value"]))
    elif isinstance(first, Mapping):
        cols = list(first)
        for c in cols:
            table.add_column(c)
        for item in raw:
            table.add_row(*[str(item.get(c)) for c in cols])
    else:
        table.add_column("raw")
        for item in raw:
            table.add_row(str(item))
    return table
