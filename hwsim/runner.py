"""Runs a simulated pod: physics on a real-time tick, protocol servers, control socket, manifest.

Everything runs in one asyncio loop; the NVML fake in other processes reads a shared-memory copy of
the GPU states that the tick publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from hwsim.faults import FaultError, apply_fault
from hwsim.physics import Physics
from hwsim.podspec import PodSpec
from hwsim.scenario import Scenario, Step

log = structlog.get_logger("hwsim")

PROFILE_OF_VENDOR = {"apc": "apc-rpdu2", "raritan": "raritan-pdu2", "modbus": "modbus-pdu"}


class PodRunner:
    def __init__(
        self,
        spec: PodSpec,
        *,
        seed: int = 1,
        speed: float = 1.0,
        run_dir: Path,
        manifest_path: Path | None = None,
        scenario: Scenario | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.spec = spec
        self.speed = speed
        self.run_dir = run_dir
        self.manifest_path = manifest_path or run_dir / "manifest.json"
        self.control_path = run_dir / "control.sock"
        self.nvml_path = run_dir / "nvml.shm"
        self.host = host
        self.physics = Physics(spec, seed=seed)
        self.scenario = scenario
        self.faults: dict[tuple[str, str], float] = {}
        self.ticks = 0
        self.late_ticks = 0
        # Bumped by every tick and command that changes the state: the SNMP agents encode each
        # value once per generation (hwsim/snmp_wire.py), however often they are asked.
        self.generation = 0
        self._handles: list[Any] = []
        self._nvml: Any = None
        self._control: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._started = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> dict[str, Any]:
        from hwsim.modbus_devices import start_modbus_rtu_bus, start_modbus_tcp
        from hwsim.nvml.shm import NvmlShmWriter
        from hwsim.snmp_pdu import start_snmp_agent

        self.run_dir.mkdir(parents=True, exist_ok=True)
        st = self.physics.state
        manifest: dict[str, Any] = {
            "pod": self.spec.name,
            "pid": os.getpid(),
            "seed": self.physics.seed,
            "speed": self.speed,
            "tick_s": self.spec.tick_s,
            "run_dir": str(self.run_dir),
            "control": str(self.control_path),
            "snmp": [],
            "modbus": [],
        }
        try:
            self._nvml = NvmlShmWriter(self.nvml_path, len(st.gpus))
            self._nvml.publish(st, self.physics.smoothing)
            manifest["nvml"] = {"library": "hwsim", "state": str(self.nvml_path), "gpus": len(st.gpus)}
            for p in self.spec.pdu:
                if p.snmp is None:
                    continue
                ep = p.snmp
                handle = await start_snmp_agent(
                    st.pdu(p.id),
                    host=self.host,
                    port=ep.port,
                    version=ep.version,
                    community=ep.community,
                    v3_user=ep.user,
                    v3_auth_key=ep.auth_key,
                    v3_priv_key=ep.priv_key,
                    generation=self._generation,
                )
                self._handles.append(handle)
                entry = handle.manifest_entry()
                entry["profile"] = PROFILE_OF_VENDOR[p.vendor]
                manifest["snmp"].append(entry)
            buses: dict[str, dict[int, tuple[Any, str]]] = {}
            tcp_units: list[tuple[Any, str, int, int]] = []
            for p in self.spec.pdu:
                if p.modbus is not None:
                    self._place_modbus(st.pdu(p.id), "modbus-pdu", p.modbus, buses, tcp_units)
            for c in self.spec.cdu:
                self._place_modbus(st.cdu(c.id), "generic-cdu", c.modbus, buses, tcp_units)
            for ch in self.spec.chiller:
                self._place_modbus(st.chiller(ch.id), "generic-chiller", ch.modbus, buses, tcp_units)
            if self.spec.battery is not None and st.battery is not None:
                self._place_modbus(st.battery, "generic-bms", self.spec.battery.modbus, buses, tcp_units)
            if self.spec.site_meter is not None and st.site_meter is not None:
                meter_ep = self.spec.site_meter.modbus
                self._place_modbus(st.site_meter, "generic-site-meter", meter_ep, buses, tcp_units)
            for device, profile, unit, port in tcp_units:
                handle = await start_modbus_tcp(device, profile=profile, unit=unit, host=self.host, port=port)
                self._handles.append(handle)
                manifest["modbus"].extend(handle.manifest_entries())
            for bus, units in buses.items():
                handle = await start_modbus_rtu_bus(units, link_dir=self.run_dir, name=bus)
                self._handles.append(handle)
                manifest["modbus"].extend(handle.manifest_entries())
            manifest["topology"] = self.topology()
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()
            self._control = await asyncio.start_unix_server(self._serve_control, path=str(self.control_path))
        except BaseException:
            await self.close()
            raise
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(self.manifest_path)
        self.manifest = manifest
        return manifest

    @staticmethod
    def _place_modbus(
        device: Any,
        profile: str,
        ep: Any,
        buses: dict[str, dict[int, tuple[Any, str]]],
        tcp_units: list[tuple[Any, str, int, int]],
    ) -> None:
        if ep.transport == "rtu":
            buses.setdefault(ep.bus, {})[ep.unit] = (device, profile)
        else:
            tcp_units.append((device, profile, ep.unit, ep.port))

    def topology(self) -> dict[str, Any]:
        """Which GPUs each PDU, outlet and cooling loop serves: what an agent config needs."""
        st = self.physics.state
        gpus_of_server: dict[int, list[str]] = {}
        for g in st.gpus:
            gpus_of_server.setdefault(g.server, []).append(f"gpu{g.index}")
        pdus: dict[str, Any] = {}
        for p in self.spec.pdu:
            pdu = st.pdu(p.id)
            outlet_gpus = {
                str(o.index): gpus_of_server[o.server] for o in pdu.outlets if o.server is not None
            }
            pdus[p.id] = {
                "vendor": p.vendor,
                "rating_a": p.rating_a,
                "partner": p.partner,
                "gpus": [g for s in p.servers for g in gpus_of_server[s]],
                "outlet_gpus": outlet_gpus,
                "measures": p.measures,
            }
        cdus = {
            c.id: {
                "gpus": [g for s in c.servers for g in gpus_of_server[s]],
                "nominal_flow_lpm": c.nominal_flow_lpm,
                "min_flow_lpm": c.min_flow_lpm if c.min_flow_lpm is not None else 0.5 * c.nominal_flow_lpm,
            }
            for c in self.spec.cdu
        }
        chillers = {ch.id: {"cdus": ch.cdus} for ch in self.spec.chiller}
        topo: dict[str, Any] = {"gpus": len(st.gpus), "pdus": pdus, "cdus": cdus, "chillers": chillers}
        # Each server's GPUs in local index order (what its node agent's NVML shows: 0..k-1).
        topo["servers"] = {str(s): gpus for s, gpus in sorted(gpus_of_server.items())}
        if self.spec.battery is not None:
            b = self.spec.battery
            topo["battery"] = {
                "id": b.id,
                "capacity_kwh": b.capacity_kwh,
                "max_charge_kw": b.max_charge_kw,
                "max_discharge_kw": b.max_discharge_kw,
            }
        if self.spec.site_meter is not None:
            topo["site_meter"] = {"id": self.spec.site_meter.id}
        return topo

    async def close(self) -> None:
        if self._control is not None:
            self._control.close()
            with contextlib.suppress(Exception):
                await self._control.wait_closed()
            self._control = None
        for handle in reversed(self._handles):
            with contextlib.suppress(Exception):
                result = handle.close()
                if asyncio.iscoroutine(result):
                    await result
        self._handles.clear()
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.close()
            self._nvml = None
        for path in (self.control_path, self.manifest_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stop(self) -> None:
        self._stop.set()

    def _generation(self) -> int:
        return self.generation

    async def run(self) -> None:
        """Tick until stopped. Deadlines are absolute, so ticks do not drift; a late tick is
        counted and the physics still advances by the time that passed (speed x wall time)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        tick = self.spec.tick_s
        start = loop.time()
        last = start
        steps = list(self.scenario.step) if self.scenario else []
        k = 0
        while not self._stop.is_set():
            k += 1
            deadline = start + k * tick
            now = loop.time()
            if deadline > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), deadline - now)
                if self._stop.is_set():
                    break
            else:
                self.late_ticks += 1
                # Far behind (suspended, debugger): re-anchor instead of bursting.
                if now - deadline > 10 * tick:
                    start = now - k * tick
            now = loop.time()
            self.tick((now - last) * self.speed)
            last = now
            while steps and steps[0].at_s <= self.physics.state.sim_time_s:
                self._run_step(steps.pop(0))

    def tick(self, sim_dt: float) -> None:
        if self._nvml is not None:
            for index, watts in self._nvml.take_limit_requests():
                self.physics.set_power_limit(index, watts)
            for index, op, profile, param, value in self._nvml.take_smoothing_requests():
                with contextlib.suppress(ValueError):  # the fake validated it; a stale slot is dropped
                    self.physics.smoothing_request(index, op, profile, param, value)
        self.physics.step(sim_dt)
        self.generation += 1
        if self._nvml is not None:
            self._nvml.publish(self.physics.state, self.physics.smoothing)
        self.ticks += 1

    def _run_step(self, step: Step) -> None:
        if step.fault is not None:
            self.inject(step.fault, step.device, clear=step.clear, value=step.value, point=step.point)
        elif step.workload is not None:
            self.set_workload(step.workload, step.level)

    # ------------------------------------------------------------------ commands
    def inject(
        self,
        name: str,
        device: str | None,
        *,
        clear: bool,
        value: float | str | None = None,
        point: str | None = None,
    ) -> dict[str, Any]:
        result = apply_fault(self.physics, name, device, clear=clear, value=value, point=point)
        self.generation += 1
        key = (result.name, result.device)
        if result.active:
            self.faults[key] = self.physics.state.sim_time_s
        else:
            self.faults.pop(key, None)
        log.info("fault", fault=name, device=result.device, active=result.active)
        return {"fault": result.name, "device": result.device, "active": result.active}

    def set_workload(self, profile: str, level: float | None) -> dict[str, Any]:
        w = self.physics.workload
        update: dict[str, Any] = {"profile": profile}
        if level is not None:
            update["level"] = level
        self.physics.workload = type(w).model_validate({**w.model_dump(), **update})
        log.info("workload", profile=profile, level=level)
        return {"workload": profile, "level": self.physics.workload.level}

    def status(self) -> dict[str, Any]:
        return {
            **self.physics.summary(),
            "faults": [
                {"fault": n, "device": d, "since_s": round(t, 2)} for (n, d), t in self.faults.items()
            ],
            "ticks": self.ticks,
            "late_ticks": self.late_ticks,
            "speed": self.speed,
        }

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "state":
            # Each GPU's power smoothing and filler floor beside the pod's state (tests check them).
            smoothing = [dataclasses.asdict(sm) for sm in self.physics.smoothing]
            return {"ok": True, "state": dataclasses.asdict(self.physics.state), "smoothing": smoothing}
        if cmd == "fault":
            name = request.get("name")
            if not isinstance(name, str):
                return {"ok": False, "error": "fault needs a name"}
            return {
                "ok": True,
                **self.inject(
                    name,
                    request.get("device"),
                    clear=bool(request.get("clear", False)),
                    value=request.get("value"),
                    point=request.get("point"),
                ),
            }
        if cmd == "workload":
            return {"ok": True, **self.set_workload(str(request.get("profile")), request.get("level"))}
        return {"ok": False, "error": f"unknown command {cmd!r} (status, state, fault, workload)"}

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("request must be a JSON object")
                    reply = self.handle(request)
                except (ValueError, FaultError) as err:
                    reply = {"ok": False, "error": str(err)}
                except Exception as err:  # a bug in a command must not kill the pod
                    log.exception("control command failed")
                    reply = {"ok": False, "error": f"internal error: {err}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def control_request(socket_path: str | Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Blocking one-shot request to a running pod's control socket (for the CLI, tests, benches)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply
