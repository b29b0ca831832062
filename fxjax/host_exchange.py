"""The host-side exchange between the processes of a run, through JAX's coordination service (its key-value
store), never a device collective: what each process has (`allgather_json`, `gather_json_to_main`), a
process's failure told to the others (`stop_peers`, raised in their waits as `PeerFailed`) and a normal end
(`mark_finished`), and the check that every process was given the run's process count.

Host-only, so it works before JAX's backends start (a process whose peer failed before that must not wait
for the peer's device topology) and from any thread. Joining a run is fxjax.distributed's (`initialize`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax


class DistributedError(RuntimeError, ValueError):
    """A distributed setting that cannot work (or a process that never answered). Also a ValueError, so the
    CLI reports it as `fxjax CMD: error: ...` instead of a traceback."""


_GATHERS: dict[str, int] = {}  # calls per name: every process makes the same calls in the same order
_POLL_MS = 500  # how often a waiting allgather_json checks `cancelled`


class GatherCancelled(RuntimeError):
    """`allgather_json` stopped waiting because its `cancelled()` said so."""


class PeerFailed(DistributedError):
    """Another process of the run failed (it said so through `stop_peers`); this one stops too."""

    def __init__(self, process: int, error: str):
        self.process = process
        super().__init__(f"process {process} of the run failed, so this process stopped too: {error}")


FAILED_DIR = "fxjax/failed/"  # a failed process's one-line error, under its process index
FINISHED_DIR = "fxjax/finished/"  # a process whose command ended normally
_STOP_WAIT_S = 60.0  # how long a failed process waits for the others to stop before it exits regardless
_RUN_SIZE: int | None = None  # process 0's count, where this process was given another (check_process_count)
BARRIER_TIMEOUT_S = 24 * 3600  # a barrier waits for slow peers (a large file written or removed); failed ones
# end the wait at once (PeerFailed), dead ones through JAX's heartbeat


def _client():
    """The coordination service's client when this is one process of several, else None. Reads JAX's
    distributed state only: no backend is started (a process that fails before the backends start must not
    wait for its peers' device topology)."""
    from jax._src.distributed import global_state

    if global_state.client is None or (global_state.num_processes or 1) < 2:
        return None
    return global_state.client


def check_process_count(timeout_s: int) -> None:
    """This process was given the count process 0 was: one given more (3 where the run has 2) joined all the
    same (the coordinator counts process 0's), logged "process 1 of 3" and waited in every exchange for a
    process that never comes. A DistributedError naming both counts (the run's size is process 0's, so the
    error stops the others without waiting for that process)."""
    global _RUN_SIZE
    client = _client()
    if client is None:
        return
    from jax._src.distributed import global_state

    me, count = int(global_state.process_id), int(global_state.num_processes)
    client.key_value_set(f"fxjax/process_count/{me}", str(count))
    if me == 0:
        return
    theirs = int(client.blocking_key_value_get("fxjax/process_count/0", int(timeout_s * 1000)))
    if theirs != count:
        _RUN_SIZE = theirs
        raise DistributedError(f"this process (process {me}) was started as one of {count} processes and process 0 as "
                               f"one of {theirs}: give every process the same count (distributed.num_processes, "
                               "FXJAX_NUM_PROCESSES; in a detected cluster, the cluster's own variables, such as "
                               "SLURM_NTASKS)")


def joined() -> bool:
    """This is one process of several (jax.distributed initialised for more than one); no backend is started."""
    return _client() is not None


def _reports(client, directory: str) -> dict[int, dict]:
    """{process: what it said} under `directory`: FAILED_DIR, {"error": text, "because_of": process or None}
    of the processes that failed; FINISHED_DIR, {} of those whose command ended normally."""
    try:
        entries = client.key_value_dir_get(directory)
    except Exception:  # noqa: BLE001 (the service is gone: nothing more to learn from it)
        return {}
    out = {}
    for key, value in entries:
        try:
            out[int(str(key).rsplit("/", 1)[-1])] = json.loads(value)
        except (ValueError, TypeError):
            continue
    return out


def _raise_if_peer_failed(client) -> None:
    from jax._src.distributed import global_state

    failed = {p: f for p, f in _reports(client, FAILED_DIR).items() if p != global_state.process_id}
    if failed:  # the first process that failed on its own (not one that stopped because of another)
        origin = min((p for p, f in failed.items() if f.get("because_of") is None), default=min(failed))
        raise PeerFailed(origin, str(failed[origin].get("error")))


def mark_finished() -> None:
    """This process's command ended normally (a failed peer then need not wait for it: `stop_peers`)."""
    client = _client()
    if client is not None:
        from jax._src.distributed import global_state

        try:
            client.key_value_set(f"{FINISHED_DIR}{int(global_state.process_id)}", "{}")
        except Exception:  # noqa: BLE001 (the coordination service is gone, or this was said already)
            pass


def stop_peers(error: BaseException | str, *, wait_s: float = _STOP_WAIT_S) -> bool:
    """This process failed with `error`: say so to the other processes of the run (their waits in
    `allgather_json` and `fxjax.device_mesh.barrier` raise `PeerFailed` naming it), then wait up to `wait_s`
    for every one of them to have stopped too or finished (`mark_finished`). True when all did, when there
    is one process, or when the coordination service is already gone (nothing to wait for); False when some
    did not (blocked in a device collective, where nothing can reach them: JAX's heartbeat ends them later),
    and the caller should exit without JAX's shutdown barrier, which would wait for them for minutes."""
    import time

    client = _client()
    if client is None:
        return True
    from jax._src.distributed import global_state

    me, count = int(global_state.process_id), _RUN_SIZE or int(global_state.num_processes)
    because_of = error.process if isinstance(error, PeerFailed) else None
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    try:
        client.key_value_set(f"{FAILED_DIR}{me}", json.dumps({"error": text, "because_of": because_of}))
    except Exception:  # noqa: BLE001 (the coordination service is gone: no peer to tell or wait for)
        return True
    deadline = time.monotonic() + wait_s
    while True:
        if len(set(_reports(client, FAILED_DIR)) | set(_reports(client, FINISHED_DIR))) >= count:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def allgather_json(name: str, value: Any, *, timeout_s: int = 600,
                   cancelled: Callable[[], bool] | None = None) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (``[value]`` with one process).

    Host-only: it goes through the coordination service's key-value store, not a device collective, so it
    may run in any thread (the step-batch producer) without being ordered against the programs the main
    thread dispatches. Each process must call it with the same `name`s in the same order. `cancelled`
    (checked every half second while waiting for a peer) ends the wait with `GatherCancelled`: a peer that
    stopped (its run ended or was preempted) never answers."""
    me, processes = _place()
    if processes == 1:
        return [value]
    client, key, count, size = _publish("allgather_json", name, value)
    out = [json.loads(part) for part in _wait_for_all(client, key, processes, timeout_s, cancelled, size)]
    if count > 1:  # every process has made call count - 1, so read all keys of count - 2: drop this one's
        client.key_value_delete(f"fxjax/{name}/{count - 2}/{me}")
    return out


def _place() -> tuple[int, int]:
    """(this process's index, the number of processes), from JAX's distributed state when joined: no backend
    is started for them (`jax.process_count()` starts one, and on several processes that waits for every
    peer's device topology: a peer that failed before the start-checks exchange left the others there for
    minutes, `join_run`)."""
    from jax._src.distributed import global_state

    if _client() is not None:
        return int(global_state.process_id), int(global_state.num_processes)
    return jax.process_index(), jax.process_count()


def _publish(caller: str, name: str, value: Any) -> tuple[Any, str, int, int]:
    """Write this process's `value` for call number `count` of `name` in the coordination service's
    key-value store (jax.distributed initialised, else DistributedError): (client, the call's key prefix,
    count, the part's length in characters); process p's part is at <prefix>/p."""
    from jax._src.distributed import global_state  # the one handle on the key-value store JAX offers

    client = global_state.client
    if client is None:
        raise DistributedError(f"{caller} needs jax.distributed to be initialized")
    count = _GATHERS[name] = _GATHERS.get(name, -1) + 1
    key = f"fxjax/{name}/{count}"
    part = json.dumps(value)
    client.key_value_set(f"{key}/{_place()[0]}", part)
    return client, key, count, len(part)


def gather_json_to_main(name: str, value: Any, *, timeout_s: int = 600) -> list[Any] | None:
    """Every process's JSON-serialisable `value`, in process order, at process 0 only (None at the others).

    For what only the main process writes (a GRPO step's completions): `allgather_json` would send every
    process's part to every process, N x the bytes through the coordination service on N hosts. The others
    write their part and go on without waiting; process 0 reads the parts and deletes them. Each process
    must call it with the same `name`s in the same order."""
    me, processes = _place()
    if processes == 1:
        return [value]
    client, key, _, size = _publish("gather_json_to_main", name, value)
    if me != 0:
        return None
    out = [json.loads(part) for part in _wait_for_all(client, key, processes, timeout_s, None, size)]
    for p in range(processes):
        client.key_value_delete(f"{key}/{p}")
    return out


_RELIST_BYTES = 64 * 1024  # parts up to this long: list the call's keys again after each wait


def _wait_for_all(client, key: str, processes: int, timeout_s: float,
                  cancelled: Callable[[], bool] | None, part_size: int) -> list[str]:
    """Every process's part of call `key` (<key>/<p>), in process order: one listing of the call's keys
    (key_value_dir_get) once all have arrived, else a wait for the first missing part and, for small parts
    (this process's `part_size` up to _RELIST_BYTES), another listing. A few requests per exchange, not one
    per process: a 64-host pod made 64 gets per process, 4,096 at the coordinator, for each of the exchanges
    a step makes. Large parts (the images' sizes of a run's start) are then waited for one by one instead:
    each listing fetches every part again, some 20 MB a time for two million images."""
    found: dict[int, str] = {}
    while True:
        for name, value in client.key_value_dir_get(key):
            found[int(name.rsplit("/", 1)[-1])] = value
        missing = [p for p in range(processes) if p not in found]
        if missing and part_size > _RELIST_BYTES:
            found.update((p, _wait_for(client, f"{key}/{p}", timeout_s, cancelled)) for p in missing)
        elif missing:
            found[missing[0]] = _wait_for(client, f"{key}/{missing[0]}", timeout_s, cancelled)
            continue
        return [found[p] for p in range(processes)]


def _wait_for(client, key: str, timeout_s: float, cancelled: Callable[[], bool] | None) -> str:
    waited_ms = 0
    while True:
        try:
            return client.blocking_key_value_get(key, _POLL_MS)
        except Exception as err:  # the client raises JaxRuntimeError; only a timeout means "not yet"
            if "DEADLINE_EXCEEDED" not in str(err):
                raise
        _raise_if_peer_failed(client)
        if cancelled is not None and cancelled():
            raise GatherCancelled(f"stopped waiting for {key}")
        waited_ms += _POLL_MS
        if waited_ms >= timeout_s * 1000:
            raise DistributedError(f"no process wrote {key} within {timeout_s} s (a process stopped or hangs)")


__all__ = ["DistributedError", "GatherCancelled", "PeerFailed", "BARRIER_TIMEOUT_S", "allgather_json",
           "gather_json_to_main", "joined", "mark_finished", "stop_peers", "check_process_count"]
