"""Wires the agent together in one TaskGroup: pollers, state, exporters, systemd notify/watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from agent import __version__
from agent.actuators import Actuators, pod_actuators
from agent.aio import loop_name, tasks_with_lost_cancel
from agent.audit import AuditLog
from agent.budget import FleetBudget
from agent.config import AgentConfig, ConfigError, ConfigProblem, load_config
from agent.drivers.base import Driver, driver_class
from agent.events import EventBus, Severity
from agent.inventory import Inventory, build_inventory
from agent.model import DeviceEvent
from agent.poller import Poller
from agent.power.curtail import CurtailOrder
from agent.sdnotify import Notifier, watchdog_interval_s
from agent.state import POD_DEVICE, StateStore

if TYPE_CHECKING:
    from agent.interlocks.service import CapSource, InterlockService

log = structlog.get_logger("podagent")


def build_driver(cfg: Any, *, event_sink: Any = None) -> Driver:
    cls = driver_class(cfg.kind)
    params = inspect.signature(cls).parameters
    if "event_sink" in params and event_sink is not None:
        driver: Driver = cls(cfg, event_sink=event_sink)
    else:
        driver = cls(cfg)
    return driver


def pod_power_devices(inventory: Inventory) -> list[str]:
    """The devices whose power adds up to the pod's (SNMP PDUs; Modbus PDUs with pod_power: a
    branch meter behind a counted PDU would count twice)."""
    return list(inventory.pod_power)


def loop_gpus(inventory: Inventory) -> dict[str, list[str]]:
    """Cooling loop (CDU id) -> the GPUs it cools."""
    return inventory.loop_gpus()


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        inventory: Inventory | None = None,
    ):
        self.config = config
        # What every device is and what it connects (ConfigError if a profile is unusable).
        self.inventory = inventory if inventory is not None else build_inventory(config)
        self.config_path = config_path
        self.store = StateStore()
        self.events = EventBus()
        self.pollers: dict[str, Poller] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.notifier = notifier or Notifier()
        self.ready = asyncio.Event()
        self.started_mono = time.monotonic()
        self.reloads = 0
        self.last_reload_error: str | None = None  # why the last reload was refused
        self._reload_lock = asyncio.Lock()
        self.audit: AuditLog | None = None
        self.interlocks: InterlockService | None = None  # set by the service when it runs
        # What services may change, over this agent's own drivers (each under its device's lock).
        self.actuators: Actuators = pod_actuators(self.pollers, self.store, self.events)
        # Caps from outside the interlocks (the power budget): the interlock engine takes the lowest.
        self.cap_sources: list[CapSource] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._children: set[asyncio.Task[Any]] = set()
        self._recancel_handle: asyncio.TimerHandle | None = None
        self._tasks_before_start: set[asyncio.Task[Any]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._extra_services: list[Any] = []
        self.fleet_budget: FleetBudget | None = None
        self.budget_listeners: list[Callable[[FleetBudget | None], None]] = []
        # The power service's intake for fleet ``curtail`` orders (None: no power service running).
        self.curtail_sink: Callable[[CurtailOrder], None] | None = None
        # name -> callable returning a JSON-able summary (interlocks, mqtt link, spool depth...)
        self.status_providers: dict[str, Callable[[], Any]] = {}
        # callables returning [(prom name, labels, value, help)] for /metrics; names and types are
        # in agent/publish/metrics_catalog.py (a histogram as its _bucket/_sum/_count samples)
        self.metric_sources: list[Callable[[], list[tuple[str, list[tuple[str, str]], float, str]]]] = []
        self._apply_derivations()

    def _apply_derivations(self) -> None:
        self.store.set_derivations(
            pod_power_devices=pod_power_devices(self.inventory), loop_gpus=loop_gpus(self.inventory)
        )

    # ------------------------------------------------------------------ devices
    def on_device_event(self, event: DeviceEvent) -> None:
        # Called from a driver's thread (NVML event wait): hop onto the loop before touching the bus.
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._device_event, event)

    def _device_event(self, event: DeviceEvent) -> None:
        detail = dict(event.detail)
        message = f"{event.device}: {event.kind} " + " ".join(f"{k}={v}" for k, v in detail.items())
        self.events.emit(event.kind, Severity.WARNING, message, device=event.device, detail=detail)

    def _start_poller(self, cfg: Any, driver: Driver | None = None) -> None:
        assert self._tg is not None
        if driver is None:
            driver = build_driver(cfg, event_sink=self.on_device_event)
        poller = Poller(cfg, driver, self.store, self.events)
        self.pollers[cfg.id] = poller
        self._tasks[cfg.id] = self._spawn(poller.run(), f"poll[{cfg.id}]")

    async def _stop_poller(self, device: str) -> None:
        task = self._tasks.pop(device, None)
        self.pollers.pop(device, None)
        if task is not None:
            task.cancel()
            # Wait for it without swallowing a cancel aimed at us (asyncio.wait never raises it).
            await asyncio.wait({task}, timeout=30)

    async def reload(self) -> bool:
        """Re-read the config file, transactionally: parse, validate and build every new driver
        and service setting first; apply only when all of it succeeded (only changed devices
        restart, one by one); otherwise change nothing and emit ``config_reload_failed`` naming
        the file and key. Returns whether it was applied (``last_reload_error`` says why not)."""
        if self.config_path is None:
            return False
        async with self._reload_lock:  # SIGHUP and podctl reload at once: one after the other
            return await self._reload(self.config_path)

    async def _reload(self, path: Path) -> bool:
        try:
            new, inventory, drivers = self._prepare_reload(path)
        except ConfigError as err:
            self._reload_failed(err.render(), [p.model_dump() for p in err.problems], err.problems[0].file)
            return False
        except Exception as err:  # a bug in a loader or a constructor: still refused, never fatal
            log.exception("config reload crashed while preparing; keeping the running config")
            self._reload_failed(f"{path}: {type(err).__name__}: {err}", [], None)
            return False
        old_config, old_inventory = self.config, self.inventory
        changed = sorted(
            dev_id
            for dev_id in old_inventory.devices.keys() | inventory.devices.keys()
            if _device_changed(dev_id, old_config, new, old_inventory, inventory)
        )
        # Apply: nothing below reads a file or can refuse.
        self.config, self.inventory = new, inventory
        self._apply_derivations()
        fresh = new.devices_by_id()
        for dev_id in changed:
            await self._stop_poller(dev_id)
            if dev_id in fresh:
                self._start_poller(fresh[dev_id], drivers[dev_id])
        for service in self._reconfigurable():
            service.apply_config(new, inventory)
        self.reloads += 1
        self.last_reload_error = None
        restart = [
            section
            for section in ("paths", "logging", "prometheus", "mqtt", "control")
            if getattr(old_config, section) != getattr(new, section)
        ]
        if old_config.interlocks.enabled != new.interlocks.enabled:
            restart.append("interlocks.enabled")
        if old_config.power.enabled != new.power.enabled:
            restart.append("power.enabled")
        from agent.interlocks.service import config_hash

        detail = {
            "file": str(self.config_path),
            "changed_devices": changed,
            "interlocks_changed": old_config.interlocks != new.interlocks,
            "power_changed": old_config.power != new.power,
            "interlock_config_hash": config_hash(new.interlocks),
            "restart_needed_for": restart,
        }
        message = f"config reloaded from {self.config_path}: {len(changed)} device(s) restarted" + (
            f"; {', '.join(restart)} take effect on restart" if restart else ""
        )
        self.events.emit("config_reloaded", Severity.INFO, message, detail=detail)
        log.info("config reloaded", **detail)
        return True

    def _prepare_reload(self, path: Path) -> tuple[AgentConfig, Inventory, dict[str, Driver]]:
        """Everything a reload needs, built without touching what runs (raises on any problem)."""
        new = load_config(path)
        inventory = build_inventory(new)
        drivers: dict[str, Driver] = {}
        for i, cfg in enumerate(new.device):
            if not _device_changed(cfg.id, self.config, new, self.inventory, inventory):
                continue
            try:
                drivers[cfg.id] = build_driver(cfg, event_sink=self.on_device_event)
            except (ValueError, OSError, TypeError, KeyError) as err:
                problem = ConfigProblem(
                    key=f"device[{i}](id={cfg.id})", message=f"cannot build its driver: {err}"
                )
                raise ConfigError(path, [problem]) from err
        return new, inventory, drivers

    def _reload_failed(self, text: str, problems: list[dict[str, Any]], file: str | None) -> None:
        self.last_reload_error = text
        first = problems[0] if problems else {}
        self.events.emit(
            "config_reload_failed",
            Severity.WARNING,
            f"config reload refused; keeping the running config: {text.splitlines()[-1]}",
            detail={
                "file": file or str(self.config_path),
                "key": first.get("key"),
                "problems": problems,
            },
        )
        log.error("config reload refused; keeping the running config", problems=text.splitlines()[1:])

    def _reconfigurable(self) -> list[Reconfigurable]:
        """The running services that take new settings on reload (interlocks, power)."""
        found: list[Reconfigurable] = []
        for service in [self.interlocks, *self._extra_services]:
            if isinstance(service, Reconfigurable) and service not in found:
                found.append(service)
        return found

    # ------------------------------------------------------------------ views and inputs
    def summary(self) -> dict[str, Any]:
        """The pod at a glance: what MQTT's retained ``state``, podctl status and /healthz share."""
        now = time.monotonic()
        pod_power = self.store.get(POD_DEVICE, "power_w")
        devices = {
            d: {
                "status": str(h.current_status(now)),
                "age_s": None if h.last_ok_mono is None else round(now - h.last_ok_mono, 2),
                "error": h.last_error,
            }
            for d, h in self.store.health().items()
        }
        out: dict[str, Any] = {
            "site": self.config.pod.site,
            "pod": self.config.pod.id,
            "ready": self.ready.is_set(),
            "uptime_s": round(now - self.started_mono, 1),
            "pod_power_w": None if pod_power is None else pod_power.value,
            "devices": devices,
            "stale_devices": self.store.stale_devices(now),
            "fleet_budget": None if self.fleet_budget is None else self.fleet_budget.to_dict(),
            "unacked_events": len(self.events.unacked()),
        }
        for name, provider in self.status_providers.items():
            out[name] = provider()
        return out

    def set_fleet_budget(self, budget: FleetBudget | None, *, by: str) -> None:
        """The fleet's power budget (MQTT ``set_power_budget``): handed to the interlock engine."""
        self.fleet_budget = budget
        for listener in self.budget_listeners:
            listener(budget)
        if budget is None:
            self.events.emit(
                "budget_cleared", Severity.INFO, f"fleet power budget cleared by {by}", detail={"by": by}
            )
        else:
            self.events.emit(
                "budget_set",
                Severity.INFO,
                f"fleet power budget {budget.watts:.0f} W set by {by}",
                detail={**budget.to_dict(), "by": by},
            )

    # ------------------------------------------------------------------ lifecycle
    def add_service(self, service: Any) -> None:
        """Something with ``async run(agent)`` that lives as long as the agent (exporters, MQTT...)."""
        self._extra_services.append(service)

    def stop(self) -> None:
        self._stop.set()

    def polling_healthy(self) -> bool:
        now = time.monotonic()
        return all(p.healthy(now) for p in self.pollers.values())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        # Not ours to cancel at shutdown (whoever runs us, in tests or an embedding program).
        self._tasks_before_start = asyncio.all_tasks(loop)
        for sig, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self._on_sighup),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, handler)
        # A disk that refuses writes (full, read-only) is the audit log's condition, not ours.
        audit_cfg = self.config.audit
        audit = AuditLog(
            self.config.paths.state_dir / "audit.jsonl",
            max_bytes=audit_cfg.max_bytes,
            backups=audit_cfg.backups,
            safety_keep_s=audit_cfg.safety_keep_days * 86400.0,
        )
        audit.attach(self.events)
        self.audit = audit
        self.metric_sources.append(audit.metrics)
        log.info(
            "podagent starting",
            version=__version__,
            site=self.config.pod.site,
            pod=self.config.pod.id,
            devices=len(self.config.device),
            event_loop=loop_name(asyncio.get_running_loop()),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for cfg in self.config.device:
                    self._start_poller(cfg)
                self._spawn(self._supervise(), "supervisor")
                if self.config.prometheus.enabled:
                    from agent.publish.prometheus import PrometheusExporter

                    self._spawn(PrometheusExporter(self).run(), "prometheus")
                for service in self._extra_services:
                    self._spawn(service.run(self), type(service).__name__)
                await self._stop.wait()
                self.notifier.send("STOPPING=1")
                log.info("podagent stopping")
                # Long enough for the MQTT goodbye (drain, final state, offline) to finish first.
                recancel = loop.call_later(5.0, self._recancel, loop)
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            with contextlib.suppress(UnboundLocalError):
                recancel.cancel()
            if self._recancel_handle is not None:
                self._recancel_handle.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            self._tg = None
            self.notifier.close()
            if self.audit is not None:
                self.audit.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        assert self._tg is not None
        task = self._tg.create_task(coro, name=name)
        self._children.add(task)
        task.add_done_callback(self._children.discard)
        return task

    def _recancel(self, loop: asyncio.AbstractEventLoop) -> None:
        """Python 3.11's asyncio.wait_for (inside aiomqtt, pymodbus, pysnmp) can swallow a cancel
        that lands as its inner future completes; a task that lost its one cancel would hold the
        shutdown forever. Cancel what is still running again, every few seconds, until it stops."""
        stuck = [t for t in self._children if not t.done()]
        # A child of a nested TaskGroup (an MQTT publish worker, say) that lost its cancel is not
        # one of ours, and its group never cancels it twice: re-deliver every pending cancel.
        stuck += [
            t for t in tasks_with_lost_cancel(loop) if t not in stuck and t not in self._tasks_before_start
        ]
        if not stuck:
            return
        log.warning("tasks still running at shutdown; cancelling again", tasks=[t.get_name() for t in stuck])
        for task in stuck:
            task.cancel()
        self._recancel_handle = loop.call_later(3.0, self._recancel, loop)

    def _on_sighup(self) -> None:
        if self._tg is not None:
            self._tg.create_task(self.reload(), name="reload")

    async def _supervise(self) -> None:
        """READY=1 after the first full poll; WATCHDOG=1 only while every poll loop is alive."""
        await asyncio.gather(*(p.first_cycle.wait() for p in list(self.pollers.values())))
        self.ready.set()
        self.notifier.send(f"READY=1\nSTATUS=polling {len(self.pollers)} devices")
        log.info(
            "ready: first poll of every device done",
            devices=len(self.pollers),
            stale=self.store.stale_devices(),
        )
        interval = supervise_interval_s()
        while True:
            if self.polling_healthy():
                self.notifier.send("WATCHDOG=1")
            else:
                stuck = [d for d, p in self.pollers.items() if not p.healthy(time.monotonic())]
                log.error("poll loop stalled; withholding the watchdog kick", stuck=stuck)
            await asyncio.sleep(interval)


# Without a systemd watchdog the supervisor only logs a stalled poll loop (the devices it polls go
# stale and say so meanwhile): every 5 s it woke an otherwise idle agent, and each wake-up of an
# idle process costs ~250 us of CPU (cold caches): 50 us a second, 1 us per register of a pod's
# Modbus units (bench/vs_collectd.py charges the process's whole CPU to them).
STALL_CHECK_S = 30.0


def supervise_interval_s() -> float:
    """How often the supervisor checks the poll loops: half of WatchdogSec under a systemd
    watchdog (systemd's advice; the unit's 30 s gives 15), else ``STALL_CHECK_S``."""
    return watchdog_interval_s() or STALL_CHECK_S


class _Shutdown(Exception):
    pass


@runtime_checkable
class Reconfigurable(Protocol):
    """A service that takes new settings from a reload (validated already; must not fail)."""

    def apply_config(self, config: AgentConfig, inventory: Inventory) -> None: ...


def _device_changed(
    dev_id: str, old: AgentConfig, new: AgentConfig, old_inv: Inventory, new_inv: Inventory
) -> bool:
    """A device restarts on reload when its config or its profile changed (or it came or went)."""
    return old.devices_by_id().get(dev_id) != new.devices_by_id().get(dev_id) or old_inv.devices.get(
        dev_id
    ) != new_inv.devices.get(dev_id)
