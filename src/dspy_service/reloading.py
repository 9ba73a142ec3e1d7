"""Reloading the programs without a restart (SIGHUP): the models file is read again and every
program built anew, completely, before anything the service serves changes.

- Built off the event loop: parsing the file, re-importing the modules of PROGRAMS_PATH (their
  modules are forgotten first, so changed code takes effect), building and loading each program,
  its pins and the LMs, exactly as start-up does (`build_programs`). Any problem (bad YAML, a module
  that fails to import, a bad pin, ...) is a ConfigError: logged as `programs.reload_failed` with
  its message, the modules of the old programs are put back, and the old set keeps serving.
- Swapped in one synchronous step on the event loop: the predictor routes new requests to the new
  set; `Services` shows it (/config, /v1/programs). A request in flight already holds its route (its
  program) and finishes on it. Breakers, budgets and cost totals are the same objects before and
  after: a model that stays keeps its breaker, a new model gets a new one, prices are updated in place.
- Every program is built anew, changed or not, so that a changed model (its provider id, address,
  timeout) reaches the pinned predictors of unchanged programs too. Each program's `loaded_at` is
  therefore the time of the reload that built it; its fingerprint says whether it changed (an
  unchanged fingerprint keeps its cache entries, a changed one turns them into misses).
- The old set is retired once nothing can still use it: after the request deadline (every request
  routed to it has ended) and the program threads of ended requests have returned (bounded), its
  LMs' connections are closed, the breakers of models no longer configured are dropped, and the
  garbage collector frees the old programs (`programs.retired`).
- One reload at a time: a SIGHUP during a reload asks for one more after it, with the file as it is
  then. Budgets are read at start-up: a file whose `budgets:` changed is refused (restart instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from dspy_service.costs import Price
from dspy_service.errors import ConfigError
from dspy_service.logs import get_logger
from dspy_service.models_config import ModelsConfig, load_models_config
from dspy_service.programs import LanguageModels, LoadedProgram, forget_program_modules
from dspy_service.services import (
    Services,
    build_breaker,
    build_price_lookup,
    build_programs,
    check_budgets_priced,
    provider_credentials,
)

_log = get_logger("dspy_service.reloading")

_T = TypeVar("_T")

# Beyond the request deadline, what a request may spend before its upstream call starts (the
# Redis lookups of the cache and the budgets) and after it ends (storing the answer).
_RETIRE_MARGIN_SECS = 2.0


@dataclass(frozen=True, slots=True)
class _ProgramSet:
    config: ModelsConfig
    programs: dict[str, LoadedProgram]
    lms: LanguageModels
    prices: dict[str, Price | None]


class ProgramReloader:
    """Reloads `services`' programs from the models file; `request()` is the SIGHUP handler."""

    def __init__(self, services: Services, *, base_url: str | None) -> None:
        self._services = services
        self._api_key, self._base_url = provider_credentials(services.settings, base_url)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._retiring: set[asyncio.Task[None]] = set()
        settings = services.settings
        self._retire_after = (
            settings.request_timeout_secs + 2 * settings.redis_timeout_secs + _RETIRE_MARGIN_SECS
        )

    def request(self) -> None:
        """Reload now, or once more after the reload under way (on the event loop)."""
        if self._task is not None and not self._task.done():
            self._again = True
            _log.info("programs.reload_queued", detail="a reload is under way; one more follows it")
            return
        self._task = asyncio.get_running_loop().create_task(self._reload_while_asked())

    async def _reload_while_asked(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        """Build the models file's programs and serve them; False if they could not be built (the
        old set keeps serving) or the service is stopping."""
        async with self._lock:
            services = self._services
            if services.lifecycle.draining:
                _log.info("programs.reload_skipped", reason="the service is stopping")
                return False
            started = time.perf_counter()
            _log.info("programs.reloading", models_config=str(services.settings.models_config))
            try:
                new = await _in_own_thread(self._build)
            except ConfigError as exc:
                _log.error("programs.reload_failed", problem=str(exc))
                return False
            except Exception as exc:  # DSPy and the user's code ran: no failure of theirs may end the service
                _log.exception("programs.reload_failed", problem=f"{type(exc).__name__}: {exc}")
                return False
            if services.lifecycle.draining:  # SIGTERM came while it was being built
                _log.info("programs.reload_skipped", reason="the service is stopping")
                return False
            old = self._swap(new)
            _log.info(
                "programs.reloaded",
                variants={key: program.fingerprint for key, program in new.programs.items()},
                changed=sorted(
                    key
                    for key, program in new.programs.items()
                    if key in old.programs and old.programs[key].fingerprint != program.fingerprint
                ),
                added=sorted(new.programs.keys() - old.programs.keys()),
                removed=sorted(old.programs.keys() - new.programs.keys()),
                models=sorted(new.config.models),
                secs=round(time.perf_counter() - started, 3),
            )
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retired)
            return True

    def _build(self) -> _ProgramSet:
        """The new set, built completely (in a thread of its own); ConfigError for any problem."""
        services = self._services
        settings = services.settings
        config = load_models_config(settings.models_config)
        if config.budgets != services.models_config.budgets:
            raise ConfigError(
                f"{config.source}: budgets: changed; budgets are read at start-up, so restart the "
                "service to change them (the rest of the file was not reloaded either)"
            )
        prices = build_price_lookup(config)
        check_budgets_priced(config, prices)
        forgotten = _forget_modules(settings.program_dirs)
        try:
            programs, lms = build_programs(
                settings,
                config,
                services.metrics,
                services.tracing,
                api_key=self._api_key,
                base_url=self._base_url,
            )
        except BaseException:
            # The old programs keep serving: their modules go back, the half-imported new ones go.
            _restore_modules(settings.program_dirs, forgotten)
            raise
        return _ProgramSet(config=config, programs=programs, lms=lms, prices=prices)

    def _swap(self, new: _ProgramSet) -> _ProgramSet:
        """Serve `new` from now on; return the set it replaces. Synchronous: no request sees half."""
        services = self._services
        old = _ProgramSet(
            config=services.models_config, programs=services.programs, lms=services.lms, prices={}
        )
        for key in new.config.models:  # before the predictor may route to a new model
            if key not in services.breakers:
                services.breakers[key] = build_breaker(key, services.settings, services.metrics)
        services.prices.update(new.prices)  # kept: a request in flight may still price a dropped model
        services.predictor.replace_programs(new.config, new.programs, new.lms)
        services.models_config, services.programs, services.lms = new.config, new.programs, new.lms
        return old

    async def _retire(self, old: _ProgramSet) -> None:
        """Once no request can use the old set any more: close its LMs' connections, drop the
        breakers of models that are gone, and let the collector free the old programs."""
        await asyncio.sleep(self._retire_after)  # every request routed to the old set has ended
        threads = self._services.threads
        if threads is not None and threads.abandoned:
            # Threads of ended requests may still run an old program: wait for them, within bounds.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retire_after):
                    await threads.wait_idle()
        await old.lms.aclose()
        services = self._services
        dropped = [key for key in services.breakers if key not in services.models_config.models]
        for key in dropped:
            del services.breakers[key]
            with contextlib.suppress(KeyError):  # its gauge, where this process still has it
                services.metrics.breaker_state.remove(key)
        del old
        if len(self._retiring) > 1:  # another set retires after this one: it collects for both
            _log.info("programs.retired", dropped_breakers=dropped)
            return
        freed, gc_secs = _collect_and_freeze()
        _log.info("programs.retired", dropped_breakers=dropped, freed_objects=freed, gc_secs=gc_secs)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("programs.retire_failed", error=type(exc).__name__, detail=str(exc))


def _collect_and_freeze() -> tuple[int, float]:
    """Free the retired programs and freeze what lives on; the objects freed and the seconds taken.

    Start-up froze everything it built (app.py's lifespan: the collector then stops scanning it),
    the old programs included: frozen, they could never be freed (they hold cycles), with whatever their
    modules loaded. Unfrozen, they are collected, and the new set is frozen in their place. The
    price is one full collection per reload, which stops every thread: 60-140 ms measured here
    with the example program, once, when the old set retires (seconds after the swap)."""
    started = time.perf_counter()
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    return freed, round(time.perf_counter() - started, 3)


def _forget_modules(dirs: Sequence[Path]) -> dict[str, ModuleType]:
    """Forget the modules imported from PROGRAMS_PATH (so they are imported anew); return them."""
    before = dict(sys.modules)
    forget_program_modules(dirs)
    return {name: module for name, module in before.items() if name not in sys.modules}


def _restore_modules(dirs: Sequence[Path], forgotten: dict[str, ModuleType]) -> None:
    forget_program_modules(dirs)
    sys.modules.update(forgotten)


async def _in_own_thread(build: Callable[[], _T]) -> _T:
    """`build()` in a thread of its own, awaited without blocking the event loop.

    Why a thread is safe with DSPy: DSPy's global settings are one process-wide dict that only
    `dspy.configure` writes, and only from the thread (and task) that configured it first (start-up,
    on the event loop): a user's module calling it at import fails the same way on the loop or
    here, and is refused as an import error. Per-request settings (`dspy.context`) are a ContextVar,
    copied into the thread as `asyncio.to_thread` would. Building modules, loading state and
    building LMs only read settings; the async clients of the LMs are made lazily, per event loop, on
    first use. The import system has its own locks. What a build changes in the process
    (`sys.modules`, `sys.path`) it changes the same way wherever it runs, while program threads run.

    A daemon thread rather than the loop's executor: a user's module that hangs at import must not
    hold up the process's exit (asyncio waits for the default executor's threads at shutdown).
    The GIL is shared: while a build runs, the loop gets the interpreter at least every 5 ms.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # the waiter may have been cancelled (shutdown)
            outcome()

    def run() -> None:
        try:
            result = context.run(build)
        except BaseException as exc:  # handed to the waiter, which re-raises it
            # A user's module calling sys.exit() at import fails the reload, not the service.
            error = exc if isinstance(exc, Exception) else RuntimeError(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, lambda: done.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: done.set_result(result))

    threading.Thread(target=run, name="dspy-service-reload", daemon=True).start()
    return await done
