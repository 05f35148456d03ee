"""Multi-process start-up: one call that joins JAX's multi-controller runtime, or does nothing.

JAX scales out with one Python process per host (or per GPU), all running the same program; they
find each other through a coordinator (process 0) and `jax.distributed.initialize`. This module
decides, before any JAX computation, whether this process is part of such a world and joins it:

  1. explicit settings: `config.distributed.*` (or an args object with the same field names);
  2. our environment variables, set by the scripts in `launch/`:
     SHPEFT_COORDINATOR=host:port, SHPEFT_NUM_PROCESSES, SHPEFT_PROCESS_ID,
     SHPEFT_LOCAL_DEVICE_IDS (optional, e.g. "0" or "0,1"), SHPEFT_INIT_TIMEOUT,
     SHPEFT_HEARTBEAT_TIMEOUT, SHPEFT_SHUTDOWN_TIMEOUT (seconds), SHPEFT_DISTRIBUTED=off (force a
     single process);
  3. SLURM (inside `srun`): SLURM_NTASKS > 1, coordinator = first host of SLURM_STEP_NODELIST;
  4. JAX's own detection (`jax.distributed.initialize()` without arguments) for Cloud TPU VMs
     and pod slices (TPU chips on PCI, TPU_WORKER_HOSTNAMES, MEGASCALE_COORDINATOR_ADDRESS for
     multislice), Open MPI (OMPI_COMM_WORLD_SIZE > 1), JAX_COORDINATOR_ADDRESS, or
     `config.distributed = True`;
  5. otherwise: one process, nothing to do.

Why a pre-flight rendezvous: in jax 0.10.2 a failed `jax.distributed.initialize` (unreachable
coordinator, fewer processes than `num_processes`) does not raise; the C++ runtime aborts the
process (SIGABRT, "DEADLINE_EXCEEDED ... RegisterTask") after the timeout, with a message that
does not name the address or the fix. So when the coordinator address is known, all processes
first meet over a plain TCP socket on the coordinator port, with a short timeout. Process 0
checks that every id in 0..N-1 arrives exactly once and that all agree on N; any problem raises
`ConfigError` on every process that can see it, naming the address and the fix. Only then is the
real `jax.distributed.initialize` called (which binds the same port, freed by then).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import socket
import time
from typing import Any, Mapping, Sequence

import ml_collections

from shpeft_jax.errors import ConfigError

_FIELDS = ("mode", "coordinator_address", "num_processes", "process_id", "local_device_ids",
           "initialization_timeout", "preflight", "heartbeat_timeout", "shutdown_timeout")
_DEFAULT_TIMEOUT = 120
_SLURM_PORT_BASE = 20000  # SLURM jobs get port 20000 + job_id % 10000 unless SHPEFT_COORDINATOR is set.


def default_config() -> ml_collections.ConfigDict:
  """`config.distributed`: every field empty means "detect from the environment"."""
  return ml_collections.ConfigDict({
      "mode": "auto",                 # 'auto' (env / SLURM / TPU detection) | 'off' (one process)
      "coordinator_address": "",      # 'host:port' of process 0; '' = from the environment
      "num_processes": 0,             # 0 = from the environment
      "process_id": -1,               # -1 = from the environment
      "local_device_ids": "",         # '' = all local devices; '0' or '0,1' = restrict (1 GPU/process)
      "initialization_timeout": _DEFAULT_TIMEOUT,  # seconds to wait for all processes to arrive
      "preflight": True,              # TCP rendezvous before jax's own (aborting) initialisation
      "heartbeat_timeout": 100,       # seconds before a silent process is declared dead
      # Seconds a finishing process waits at JAX's shutdown barrier for the others (also how long
      # a failed process lingers before the world stops). Must cover process 0's final writes.
      "shutdown_timeout": 300,
  })


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """Where this process sits in the world. `coordinator_address` None: JAX's TPU auto-detection."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None
  source: str            # 'config' | 'env' | 'slurm' | 'jax-auto' | 'tpu'
  initialization_timeout: int = _DEFAULT_TIMEOUT
  preflight: bool = True
  heartbeat_timeout: int = 100
  shutdown_timeout: int = 300


# ---------------------------------------------------------------------------------------------
# Parsing and validation (pure functions; no sockets, no JAX).


def parse_address(address: str) -> tuple[str, int]:
  """'host:port' or '[ipv6]:port' -> (host, port); ConfigError on anything else."""
  fix = ("Give the coordinator as host:port, e.g. 10.0.0.1:12355 or node01:12355 "
         "(IPv6: [::1]:12355), where host is process 0's machine and port is free there.")
  if not isinstance(address, str) or not address.strip():
    raise ConfigError(f"Empty coordinator address. {fix}")
  address = address.strip()
  m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", address) or re.fullmatch(
      r"([A-Za-z0-9_.\-]+):(\d+)", address)
  if not m:
    raise ConfigError(f"Malformed coordinator address {address!r}. {fix}")
  host, port = m.group(1), int(m.group(2))
  if address.startswith("["):
    try:
      ipaddress.IPv6Address(host)
    except ValueError as e:
      raise ConfigError(f"Malformed IPv6 coordinator address {address!r}: {e}. {fix}") from e
  if not 1 <= port <= 65535:
    raise ConfigError(f"Coordinator port {port} in {address!r} is out of range 1..65535. {fix}")
  return host, port


def parse_slurm_nodelist(nodelist: str) -> list[str]:
  """Expands a SLURM hostlist ('gpu[01-03,07],login1') into host names, in order."""
  hosts: list[str] = []
  # Split on commas that are not inside brackets.
  parts, depth, cur = [], 0, ""
  for ch in nodelist.strip():
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
    else:
      cur += ch
  if cur:
    parts.append(cur)
  for part in parts:
    m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
    if not m:
      hosts.append(part)
      continue
    prefix, ranges, suffix = m.groups()
    for rng in ranges.split(","):
      if "-" in rng:
        lo, hi = rng.split("-", 1)
        width = len(lo)
        hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
      else:
        hosts.append(f"{prefix}{rng}{suffix}")
  if not hosts:
    raise ConfigError(f"Empty SLURM node list {nodelist!r}; set SHPEFT_COORDINATOR=host:port.")
  return hosts


def _parse_device_ids(value: Any, what: str) -> tuple[int, ...] | None:
  if value is None or value == "" or value == ():
    return None
  if isinstance(value, int):
    return (value,)
  if isinstance(value, str):
    items = [v.strip() for v in value.split(",") if v.strip()]
  else:
    items = list(value)
  try:
    ids = tuple(int(v) for v in items)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{what}={value!r} is not a comma-separated list of device numbers "
                      "(e.g. '0' or '0,1').") from e
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ConfigError(f"{what}={value!r}: device numbers must be distinct and >= 0.")
  return ids


def _parse_int(value: Any, what: str) -> int:
  try:
    return int(str(value).strip())
  except ValueError as e:
    raise ConfigError(f"{what}={value!r} is not an integer.") from e


def validate(spec: DistributedSpec) -> DistributedSpec:
  """Raises ConfigError on an inconsistent world before anything waits on the network."""
  if spec.coordinator_address is None:  # TPU auto-detection fills everything in.
    return spec
  parse_address(spec.coordinator_address)
  n, i = spec.num_processes, spec.process_id
  where = f"(from {spec.source})"
  if n is None or n < 1:
    raise ConfigError(f"num_processes={n} {where} must be >= 1: the total number of processes "
                      "started (hosts x processes per host).")
  if i is None or not 0 <= i < n:
    raise ConfigError(f"process_id={i} {where} must be in 0..{n - 1} for num_processes={n}: "
                      "every process needs a distinct id, 0 on the coordinator's host. Check "
                      "SHPEFT_PROCESS_ID / SLURM_PROCID and the process count.")
  if spec.initialization_timeout <= 0:
    raise ConfigError(f"initialization_timeout={spec.initialization_timeout} must be > 0 seconds.")
  return spec


def _settings(obj: Any) -> dict[str, Any]:
  """Reads the distributed fields from a ConfigDict (its `.distributed`), a mapping or an args."""
  if obj is None:
    return {}
  sub = obj.get("distributed") if isinstance(obj, Mapping) or hasattr(obj, "get") else None
  if sub is None:
    sub = getattr(obj, "distributed", None)
  if isinstance(sub, bool):  # `config.distributed = True`: force JAX's own auto-detection.
    return {"force": sub}
  src = obj if sub is None else sub
  out = {}
  for f in _FIELDS:
    if isinstance(src, Mapping) or (hasattr(src, "get") and not hasattr(src, f)):
      v = src.get(f, None)
    else:
      v = getattr(src, f, None)
    out[f] = v
  return out


def _is_set(v: Any) -> bool:
  return v is not None and v != "" and not (isinstance(v, int) and not isinstance(v, bool) and v < 0)


def _tpu_present() -> bool:
  """True on a Cloud TPU VM with TPU chips attached (checked on PCI, no JAX backend needed)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return chips > 0
  except Exception:  # pylint: disable=broad-except
    return False


def resolve(config: Any = None, environ: Mapping[str, str] | None = None) -> DistributedSpec | None:
  """Decides the world this process belongs to; None means a plain single process.

  Pure apart from the TPU probe: reads `config` and `environ` (default os.environ) only.
  """
  env = os.environ if environ is None else environ
  s = _settings(config)
  mode = (s.get("mode") or "auto").lower()
  if env.get("SHPEFT_DISTRIBUTED", "").lower() in ("off", "0", "false", "no"):
    mode = "off"
  if mode not in ("auto", "off"):
    raise ConfigError(f"distributed.mode={mode!r}: use 'auto' or 'off'.")
  if mode == "off":
    return None

  timeout = s.get("initialization_timeout")
  if env.get("SHPEFT_INIT_TIMEOUT"):
    timeout = _parse_int(env["SHPEFT_INIT_TIMEOUT"], "SHPEFT_INIT_TIMEOUT")
  heartbeat = env.get("SHPEFT_HEARTBEAT_TIMEOUT") or s.get("heartbeat_timeout") or 100
  shutdown = env.get("SHPEFT_SHUTDOWN_TIMEOUT") or s.get("shutdown_timeout") or 300
  common = dict(
      initialization_timeout=int(timeout) if _is_set(timeout) else _DEFAULT_TIMEOUT,
      preflight=bool(s["preflight"]) if s.get("preflight") is not None else True,
      heartbeat_timeout=_parse_int(heartbeat, "heartbeat_timeout"),
      shutdown_timeout=_parse_int(shutdown, "shutdown_timeout"),
  )

  addr, n, i = s.get("coordinator_address"), s.get("num_processes"), s.get("process_id")
  explicit = [_is_set(addr), _is_set(n) and n != 0, _is_set(i)]
  if any(explicit):
    if not all(explicit):
      raise ConfigError(
          "distributed settings are incomplete: coordinator_address="
          f"{addr!r}, num_processes={n!r}, process_id={i!r}. Set all three (or none, to detect "
          "them from SHPEFT_* / SLURM / TPU).")
    return validate(DistributedSpec(
        str(addr), int(n), int(i),
        _parse_device_ids(s.get("local_device_ids"), "distributed.local_device_ids"),
        "config", **common))

  keys = ("SHPEFT_COORDINATOR", "SHPEFT_NUM_PROCESSES", "SHPEFT_PROCESS_ID")
  present = [k for k in keys if env.get(k, "") != ""]
  slurm_n = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
  # Only inside an `srun` step (SLURM_STEP_NODELIST, as JAX's own detection): a batch script
  # itself also sees SLURM_NTASKS and SLURM_PROCID=0 but is one process.
  in_slurm = (bool(slurm_n) and "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env
              and _parse_int(slurm_n, "SLURM_NTASKS") > 1)
  if present and (len(present) == 3 or not in_slurm):
    missing = [k for k in keys if k not in present]
    if missing:
      raise ConfigError(f"{', '.join(present)} set but {', '.join(missing)} missing: set all "
                        "three (see launch/local_multiprocess.sh), or none.")
    return validate(DistributedSpec(
        env["SHPEFT_COORDINATOR"],
        _parse_int(env["SHPEFT_NUM_PROCESSES"], "SHPEFT_NUM_PROCESSES"),
        _parse_int(env["SHPEFT_PROCESS_ID"], "SHPEFT_PROCESS_ID"),
        _parse_device_ids(env.get("SHPEFT_LOCAL_DEVICE_IDS"), "SHPEFT_LOCAL_DEVICE_IDS"),
        "env", **common))

  if in_slurm:
    # SHPEFT_COORDINATOR (set by launch/slurm.sbatch from `scontrol show hostnames`) wins; the
    # process count and ids always come from SLURM, so they cannot disagree with srun.
    addr = env.get("SHPEFT_COORDINATOR")
    if not addr:
      nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
      if not nodelist:
        raise ConfigError("SLURM step without a node list: set SHPEFT_COORDINATOR=host:port.")
      port = _SLURM_PORT_BASE + _parse_int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 10000
      addr = f"{parse_slurm_nodelist(nodelist)[0]}:{port}"
    return validate(DistributedSpec(
        addr, _parse_int(slurm_n, "SLURM_NTASKS"), _parse_int(env["SLURM_PROCID"], "SLURM_PROCID"),
        _parse_device_ids(env.get("SHPEFT_LOCAL_DEVICE_IDS"), "SHPEFT_LOCAL_DEVICE_IDS"),
        "slurm", **common))

  # Environments JAX detects by itself (TPU pod slices, Open MPI, JAX's own variables): call
  # jax.distributed.initialize() without arguments and let it fill everything in.
  ompi_n = env.get("OMPI_COMM_WORLD_SIZE", "")
  if (env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
      or (ompi_n.isdigit() and int(ompi_n) > 1)
      or "," in env.get("TPU_WORKER_HOSTNAMES", "") or s.get("force")):
    return DistributedSpec(None, None, None, None, "jax-auto", **common)
  if _tpu_present():
    return DistributedSpec(None, None, None, None, "tpu", **common)
  return None


# ---------------------------------------------------------------------------------------------
# Pre-flight rendezvous over plain TCP.


def _send(sock: socket.socket, msg: dict) -> None:
  sock.sendall((json.dumps(msg) + "\n").encode())


def _recv(sock: socket.socket, deadline: float) -> dict | None:
  buf = b""
  while not buf.endswith(b"\n"):
    left = deadline - time.monotonic()
    if left <= 0:
      return None
    sock.settimeout(left)
    try:
      chunk = sock.recv(4096)
    except (socket.timeout, OSError):
      return None
    if not chunk:
      return None
    buf += chunk
  try:
    return json.loads(buf.decode())
  except ValueError:
    return None


def _bind(port: int) -> socket.socket:
  """Listens on all interfaces like jax's coordinator ('[::]:port'), IPv4 too."""
  if socket.has_dualstack_ipv6():
    return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                reuse_port=False)
  return socket.create_server(("", port))


def _preflight_coordinator(spec: DistributedSpec, port: int, deadline: float) -> None:
  addr, n = spec.coordinator_address, spec.num_processes
  try:
    server = _bind(port)
  except OSError as e:
    raise ConfigError(
        f"Process 0 cannot listen on the coordinator port {port} ({addr}): {e}. Another job (or "
        "a previous run still exiting) holds it: pick a free port in the coordinator address "
        "on every process.") from e
  arrived: dict[int, socket.socket] = {}
  problem = None
  try:
    while len(arrived) < n - 1 and problem is None:
      left = deadline - time.monotonic()
      if left <= 0:
        break
      server.settimeout(left)
      try:
        conn, _ = server.accept()
      except (socket.timeout, OSError):
        break
      hello = _recv(conn, min(deadline, time.monotonic() + 10))
      if not hello or "process_id" not in hello:
        conn.close()  # Not one of ours (a port scanner, a stale client): ignore it.
        continue
      pid, their_n = hello["process_id"], hello["num_processes"]
      if their_n != n:
        problem = (f"process {pid} was started with num_processes={their_n} but process 0 with "
                   f"num_processes={n}: give every process the same count.")
      elif pid == 0 or pid in arrived or not 0 < pid < n:
        problem = (f"two processes claim process_id={pid} (or it is out of 0..{n - 1}): "
                   "give each process a distinct id.")
      if problem:
        _send(conn, {"error": problem})
        conn.close()
        break
      arrived[pid] = conn
    if problem is None and len(arrived) < n - 1:
      missing = sorted(set(range(1, n)) - set(arrived))
      problem = (f"only {len(arrived) + 1} of num_processes={n} processes reached the "
                 f"coordinator {addr} within {spec.initialization_timeout}s; missing process ids "
                 f"{missing}. Start all {n} processes with this coordinator address (same host:port "
                 f"everywhere, reachable from every host), or fix num_processes to the number "
                 "actually started.")
    for conn in arrived.values():
      _send(conn, {"error": problem} if problem else {"ok": True})
    # Let the clients close first, so the port is not left in TIME_WAIT on this side.
    for conn in arrived.values():
      _recv(conn, time.monotonic() + 5)
  finally:
    for conn in arrived.values():
      conn.close()
    server.close()
  if problem:
    raise ConfigError(f"Distributed start-up failed: {problem}")


def _preflight_worker(spec: DistributedSpec, host: str, port: int, deadline: float) -> None:
  addr = spec.coordinator_address
  timeout = spec.initialization_timeout
  fix = (f"Check that process 0 is running, that {addr} is process 0's host and port as seen "
         "from this host (not 127.0.0.1 across machines), that the firewall allows the port, and "
         "that every process uses the same address.")
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ConfigError(f"Coordinator host {host!r} in {addr} cannot be resolved: {e}. {fix}") from e
  last_err: Exception | None = None
  sock = None
  while sock is None:
    for family, kind, proto, _, sockaddr in infos:
      left = deadline - time.monotonic()
      if left <= 0:
        break
      s = socket.socket(family, kind, proto)
      s.settimeout(min(left, 2.0))
      try:
        s.connect(sockaddr)
        sock = s
        break
      except OSError as e:
        last_err = e
        s.close()
    if sock is None:
      if time.monotonic() >= deadline:
        raise ConfigError(
            f"Process {spec.process_id} could not reach the coordinator {addr} within {timeout}s "
            f"(last error: {last_err}). {fix}")
      time.sleep(0.2)
  try:
    _send(sock, {"process_id": spec.process_id, "num_processes": spec.num_processes})
    # A little longer than process 0's own deadline, so that its verdict (e.g. which ids are
    # missing) reaches us rather than a bare timeout.
    reply = _recv(sock, deadline + 5)
  finally:
    sock.close()
  if reply is None:
    raise ConfigError(
        f"Process {spec.process_id} reached {addr} but process 0 did not confirm within "
        f"{timeout}s: not all num_processes={spec.num_processes} processes started (or "
        f"something else listens on that port). Start every process, or fix num_processes.")
  if "error" in reply:
    raise ConfigError(f"Distributed start-up failed (reported by process 0 at {addr}): "
                      f"{reply['error']}")


def preflight(spec: DistributedSpec) -> None:
  """All processes meet at the coordinator port; ConfigError (never a hang) if the world is wrong."""
  validate(spec)
  if spec.coordinator_address is None or spec.num_processes == 1:
    return
  host, port = parse_address(spec.coordinator_address)
  deadline = time.monotonic() + spec.initialization_timeout
  if spec.process_id == 0:
    _preflight_coordinator(spec, port, deadline)
  else:
    _preflight_worker(spec, host, port, deadline)


# ---------------------------------------------------------------------------------------------
# Initialisation.


def maybe_initialize(config: Any = None, environ: Mapping[str, str] | None = None
                     ) -> DistributedSpec | None:
  """Joins the multi-process world described by `config` / the environment; None if single.

  Call first thing in `main`, before anything touches `jax.devices()`. Idempotent: a second call
  in an already initialised process returns the same spec without re-initialising.
  """
  import jax  # pylint: disable=g-import-not-at-top

  spec = resolve(config, environ)
  if spec is None:
    return None
  if jax.distributed.is_initialized():
    return spec
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise ConfigError(
        "JAX devices were already used before joining the multi-process world; call "
        "shpeft_jax.distributed.maybe_initialize(config) first thing in main, before any "
        "jax.devices() / jnp computation.")
  # CPU runs (tests, launch/local_multiprocess.sh) need a cross-process collectives backend; gloo
  # is jax 0.10's default, set it if a user config switched it off.
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

  if spec.coordinator_address is not None and spec.preflight:
    t0 = time.monotonic()
    preflight(spec)
    logging.info("Pre-flight: %d processes met at %s in %.1fs.", spec.num_processes,
                 spec.coordinator_address, time.monotonic() - t0)

  kwargs: dict[str, Any] = dict(
      initialization_timeout=spec.initialization_timeout,
      heartbeat_timeout_seconds=spec.heartbeat_timeout,
      shutdown_timeout_seconds=spec.shutdown_timeout)
  if spec.coordinator_address is not None:
    kwargs.update(coordinator_address=spec.coordinator_address,
                  num_processes=spec.num_processes, process_id=spec.process_id,
                  # Everything is explicit: keep JAX's SLURM detection from restricting a
                  # one-process-per-host job to a single GPU.
                  cluster_detection_method="deactivate")
    if spec.local_device_ids is not None:
      kwargs["local_device_ids"] = list(spec.local_device_ids)
  logging.info(
      "Joining the multi-process world (%s): coordinator=%s num_processes=%s process_id=%s. If "
      "this process aborts with DEADLINE_EXCEEDED, another process is missing or cannot reach "
      "the coordinator.", spec.source, spec.coordinator_address or "auto",
      spec.num_processes or "auto", spec.process_id if spec.process_id is not None else "auto")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"jax.distributed.initialize failed ({spec.source}, coordinator="
        f"{spec.coordinator_address or 'auto-detected'}, num_processes={spec.num_processes}, "
        f"process_id={spec.process_id}): {e}. Check the coordinator host:port is process 0's and "
        "reachable, and that every process got the same count and a distinct id.") from e
  logging.info("Process %d of %d: %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return spec


def is_main_process() -> bool:
  """True on the process that writes logs, metrics and plots (orbax saves involve all)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port free right now on `host` (for local tests and launch/local_multiprocess.sh)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(coordinator: str, num_processes: int, process_id: int,
                local_device_ids: Sequence[int] | None = None,
                init_timeout: int | None = None) -> dict[str, str]:
  """The SHPEFT_* variables that make `maybe_initialize` join a world (used by tests/launchers)."""
  env = {"SHPEFT_COORDINATOR": coordinator, "SHPEFT_NUM_PROCESSES": str(num_processes),
         "SHPEFT_PROCESS_ID": str(process_id)}
  if local_device_ids is not None:
    env["SHPEFT_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in local_device_ids)
  if init_timeout is not None:
    env["SHPEFT_INIT_TIMEOUT"] = str(init_timeout)
  return env
