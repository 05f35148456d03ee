"""Multi-process JAX on one machine: the same code path as a TPU pod or a SLURM job, on CPU.

Every multi-process test starts real OS processes on 127.0.0.1 that join one world through
`shpeft_jax.distributed.maybe_initialize` (SHPEFT_* variables, as launch/local_multiprocess.sh
sets them) and talk over gloo CPU collectives. Results are checked against an independent
reference: a numpy loop for the data-parallel step, a single-process run of the trainer for the
SH-PEFT training. Child processes run in their own session and are killed on any failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import ml_collections
import numpy as np
import pytest

from shpeft_jax import distributed
from shpeft_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers: start N processes, collect their output, never leave one behind.


def _child_env(extra: dict[str, str]) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "SHPEFT_", "OMPI_", "TPU_", "JAX_COORDINATOR"))}
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def run_processes(argv: list[str], envs: list[dict[str, str]], logdir: pathlib.Path,
                  timeout: float) -> list[tuple[int, str]]:
  """Starts `argv` once per env, waits for all (at most `timeout` s); returns (rc, output)."""
  return run_processes_each([argv] * len(envs), envs, logdir, timeout)


def run_processes_each(argvs: list[list[str]], envs: list[dict[str, str]], logdir: pathlib.Path,
                       timeout: float) -> list[tuple[int, str]]:
  """Starts argvs[i] with envs[i]; waits for all (at most `timeout` s); returns (rc, output)."""
  logdir.mkdir(parents=True, exist_ok=True)
  procs, logs = [], []
  try:
    for argv, extra in zip(argvs, envs):
      i = len(procs)
      log = open(logdir / f"process_{i}.log", "w+")
      logs.append(log)
      procs.append(subprocess.Popen(argv, env=_child_env(extra), stdout=log,
                                    stderr=subprocess.STDOUT, cwd=str(REPO),
                                    start_new_session=True))
    deadline = time.monotonic() + timeout
    for p in procs:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:  # Hung: kill its whole session (it may have spawned threads/children).
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        p.wait()
  out = []
  for p, log in zip(procs, logs):
    log.seek(0)
    out.append((p.returncode, log.read()))
    log.close()
  return out


def world_envs(n: int, port: int | None = None, timeout: int = 30, **extra) -> list[dict]:
  port = port or distributed.free_port()
  return [{**distributed.process_env(f"127.0.0.1:{port}", n, i, init_timeout=timeout),
           **extra} for i in range(n)]


def _result_line(output: str, tag: str = "RESULT") -> dict:
  for line in output.splitlines():
    if line.startswith(tag + " "):
      return json.loads(line[len(tag) + 1:])
  raise AssertionError(f"no {tag} line in the output:\n{output[-4000:]}")


# ---------------------------------------------------------------------------------------------
# Parsing and resolution (no processes).


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:12355", ("127.0.0.1", 12355)),
    ("node-01.cluster:80", ("node-01.cluster", 80)),
    ("[::1]:1234", ("::1", 1234)),
    (" 10.0.0.2:65535 ", ("10.0.0.2", 65535)),
])
def test_parse_address_accepts_host_port(address, expected):
  assert distributed.parse_address(address) == expected


@pytest.mark.parametrize("address,fragment", [
    ("127.0.0.1", "Malformed"), ("", "Empty"), ("host:0", "out of range"),
    ("host:70000", "out of range"), ("http://host:1234", "Malformed"), ("[zz::1]:12", "IPv6"),
    ("host:12ab", "Malformed"),
])
def test_parse_address_rejects_malformed(address, fragment):
  with pytest.raises(ConfigError, match=fragment) as e:
    distributed.parse_address(address)
  assert "host:port" in str(e.value)


@pytest.mark.parametrize("nodelist,hosts", [
    ("node5", ["node5"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("r1n[001-002]-ib,x", ["r1n001-ib", "r1n002-ib", "x"]),
])
def test_parse_slurm_nodelist(nodelist, hosts):
  assert distributed.parse_slurm_nodelist(nodelist) == hosts


def test_resolve_single_process_without_settings():
  assert distributed.resolve(None, environ={}) is None
  assert distributed.resolve(ml_collections.ConfigDict({"seed": 0}), environ={}) is None


def test_resolve_from_shpeft_env():
  env = {"SHPEFT_COORDINATOR": "10.0.0.1:1234", "SHPEFT_NUM_PROCESSES": "4",
         "SHPEFT_PROCESS_ID": "3", "SHPEFT_LOCAL_DEVICE_IDS": "0,1", "SHPEFT_INIT_TIMEOUT": "7"}
  spec = distributed.resolve(None, environ=env)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("10.0.0.1:1234", 4, 3)
  assert spec.local_device_ids == (0, 1) and spec.initialization_timeout == 7
  assert spec.source == "env"
  assert distributed.resolve(None, environ={**env, "SHPEFT_DISTRIBUTED": "off"}) is None


@pytest.mark.parametrize("env,fragment", [
    ({"SHPEFT_COORDINATOR": "h:1", "SHPEFT_NUM_PROCESSES": "2", "SHPEFT_PROCESS_ID": "2"},
     r"process_id=2 .* must be in 0\.\.1"),
    ({"SHPEFT_COORDINATOR": "h:1", "SHPEFT_NUM_PROCESSES": "0", "SHPEFT_PROCESS_ID": "0"},
     "num_processes=0"),
    ({"SHPEFT_COORDINATOR": "h:1", "SHPEFT_NUM_PROCESSES": "2"}, "SHPEFT_PROCESS_ID missing"),
    ({"SHPEFT_COORDINATOR": "h", "SHPEFT_NUM_PROCESSES": "2", "SHPEFT_PROCESS_ID": "0"},
     "Malformed coordinator"),
    ({"SHPEFT_COORDINATOR": "h:1", "SHPEFT_NUM_PROCESSES": "two", "SHPEFT_PROCESS_ID": "0"},
     "not an integer"),
    ({"SHPEFT_COORDINATOR": "h:1", "SHPEFT_NUM_PROCESSES": "2", "SHPEFT_PROCESS_ID": "0",
      "SHPEFT_LOCAL_DEVICE_IDS": "0,x"}, "comma-separated"),
])
def test_resolve_rejects_bad_env(env, fragment):
  with pytest.raises(ConfigError, match=fragment):
    distributed.resolve(None, environ=env)


def test_resolve_slurm():
  env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
         "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
  spec = distributed.resolve(None, environ=env)
  # Port 20000 + job id % 10000: the same on every task of the job, different across jobs.
  assert spec.coordinator_address == "gpu07:23456"
  assert (spec.num_processes, spec.process_id, spec.source) == (8, 5, "slurm")
  assert spec.local_device_ids is None  # One process per host sees all its GPUs.
  spec = distributed.resolve(None, environ={**env, "SHPEFT_COORDINATOR": "10.1.1.1:999",
                                             "SHPEFT_LOCAL_DEVICE_IDS": "1"})
  assert spec.coordinator_address == "10.1.1.1:999" and spec.local_device_ids == (1,)
  # A one-task allocation is a plain single process; so is the batch script itself (no step).
  assert distributed.resolve(None, environ={**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  batch_script = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.resolve(None, environ={**batch_script, "SLURM_PROCID": "0"}) is None


def test_resolve_config_wins_and_must_be_complete():
  env = {"SHPEFT_COORDINATOR": "10.0.0.1:1234", "SHPEFT_NUM_PROCESSES": "4",
         "SHPEFT_PROCESS_ID": "3"}
  config = ml_collections.ConfigDict({"distributed": distributed.default_config()})
  config.distributed.coordinator_address = "127.0.0.1:5555"
  config.distributed.num_processes = 2
  config.distributed.process_id = 1
  spec = distributed.resolve(config, environ=env)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.source) == (
      "127.0.0.1:5555", 2, 1, "config")
  config.distributed.process_id = -1
  with pytest.raises(ConfigError, match="incomplete"):
    distributed.resolve(config, environ=env)
  config.distributed.mode = "off"
  assert distributed.resolve(config, environ=env) is None
  # An argparse-style namespace with the same field names works too.
  args = type("Args", (), dict(coordinator_address="h:1", num_processes=2, process_id=0))()
  assert distributed.resolve(args, environ={}).coordinator_address == "h:1"
  # `config.distributed = True` (configs/common.py) asks JAX to detect the world itself.
  forced = distributed.resolve(ml_collections.ConfigDict({"distributed": True}), environ={})
  assert forced.source == "jax-auto" and forced.coordinator_address is None


# ---------------------------------------------------------------------------------------------
# Pre-flight rendezvous, in threads (it is plain sockets; JAX is not involved).


def _preflight_world(ids_and_counts, port, timeout=3.0):
  """Runs preflight for each (process_id, num_processes) in a thread; returns {i: exc or None}."""
  results = {}

  def one(i, n):
    spec = distributed.DistributedSpec(f"127.0.0.1:{port}", n, i, None, "test",
                                       initialization_timeout=timeout)
    try:
      distributed.preflight(spec)
      results[i] = None
    except ConfigError as e:
      results[i] = e

  threads = [threading.Thread(target=one, args=(i, n)) for i, n in ids_and_counts]
  for th in threads:
    th.start()
  for th in threads:
    th.join(timeout + 15)
  assert not any(th.is_alive() for th in threads), "preflight hung past its timeout"
  return results


def test_preflight_complete_world_meets():
  port = distributed.free_port()
  results = _preflight_world([(0, 3), (1, 3), (2, 3)], port)
  assert results == {0: None, 1: None, 2: None}
  # The port is free again for jax's coordinator.
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))


def test_preflight_missing_process_fails_within_timeout():
  t0 = time.monotonic()
  results = _preflight_world([(0, 3), (1, 3)], distributed.free_port(), timeout=2.0)
  assert time.monotonic() - t0 < 10
  assert "missing process ids [2]" in str(results[0])
  assert "only 2 of num_processes=3" in str(results[0])
  assert "only 2 of num_processes=3" in str(results[1])  # Relayed to the waiting worker.


def test_preflight_disagreeing_counts_and_duplicate_ids():
  results = _preflight_world([(0, 2), (1, 3)], distributed.free_port())
  assert "num_processes=3 but process 0 with num_processes=2" in str(results[0])
  assert "num_processes=3 but process 0 with num_processes=2" in str(results[1])
  results = _preflight_world([(0, 3), (1, 3), (1, 3)], distributed.free_port())
  assert "claim process_id=1" in str(results[0])


def test_preflight_unreachable_coordinator_fails_within_timeout():
  port = distributed.free_port()  # Nothing listens there.
  t0 = time.monotonic()
  results = _preflight_world([(1, 2)], port, timeout=1.5)
  assert 1.4 < time.monotonic() - t0 < 8
  msg = str(results[1])
  assert f"could not reach the coordinator 127.0.0.1:{port} within 1.5s" in msg
  assert "process 0 is running" in msg


def test_preflight_port_in_use_on_coordinator():
  with socket.socket() as s:
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    results = _preflight_world([(0, 2)], port)
  assert "cannot listen on the coordinator port" in str(results[0])


# ---------------------------------------------------------------------------------------------
# Real processes: jax.distributed over gloo on 127.0.0.1.


_DP_WORKER = textwrap.dedent("""
    import json, sys
    from shpeft_jax import distributed
    spec = distributed.maybe_initialize()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    # 2 processes x 2 CPU devices: 'data' spans the processes, 'fsdp' the devices of one process,
    # like hosts x chips on a pod slice.
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "fsdp"))
    rng = np.random.RandomState(0)
    x_all = rng.randn(16, 6).astype(np.float32)
    y_all = rng.randn(16, 2).astype(np.float32)
    pid, n = jax.process_index(), jax.process_count()
    local = slice(pid * 16 // n, (pid + 1) * 16 // n)      # this process's part of every batch
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.make_array_from_process_local_data(batch_sh, x_all[local])
    y = jax.make_array_from_process_local_data(batch_sh, y_all[local])
    w_sh = NamedSharding(mesh, P("fsdp", None))             # weights sharded FSDP-style
    w = jax.jit(lambda: jnp.zeros((6, 2)), out_shardings=w_sh)()
    @jax.jit
    def step(w, x, y):
      g = jax.grad(lambda w: jnp.mean(jnp.sum((x @ w - y) ** 2, -1)))(w)
      return w - 0.05 * g
    for _ in range(5):
      w = step(w, x, y)
    full = jax.jit(lambda w: w, out_shardings=NamedSharding(mesh, P()))(w)
    print("RESULT " + json.dumps({"process": pid, "count": n, "devices": jax.device_count(),
                                  "w": np.asarray(full.addressable_data(0)).tolist()}), flush=True)
""")


def test_two_processes_data_parallel_sgd_matches_numpy(tmp_path):
  script = tmp_path / "dp_worker.py"
  script.write_text(_DP_WORKER)
  envs = world_envs(2, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  outs = run_processes([sys.executable, str(script)], envs, tmp_path / "logs", timeout=90)
  for rc, out in outs:
    assert rc == 0, out[-4000:]
  results = [_result_line(out) for _, out in outs]
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["count"] == 2 and r["devices"] == 4 for r in results)
  # Reference: full-batch gradient descent in numpy on the whole (global) batch.
  rng = np.random.RandomState(0)
  x = rng.randn(16, 6).astype(np.float64)
  y = rng.randn(16, 2).astype(np.float64)
  w = np.zeros((6, 2))
  for _ in range(5):
    w -= 0.05 * (2.0 / 16) * x.T @ (x @ w - y)
  for r in results:
    np.testing.assert_allclose(np.asarray(r["w"]), w, rtol=1e-5, atol=1e-6)


_INIT_WORKER = textwrap.dedent("""
    import sys, time
    from shpeft_jax import distributed
    from shpeft_jax.errors import ConfigError
    t0 = time.monotonic()
    try:
      distributed.maybe_initialize()
    except ConfigError as e:
      print(f"CONFIG_ERROR after {time.monotonic() - t0:.1f}s: {e}", flush=True)
      sys.exit(2)
    import jax
    print(f"JOINED process {jax.process_index()} of {jax.process_count()}", flush=True)
""")


def test_wrong_process_count_and_address_fail_fast_not_hang(tmp_path):
  """Only process 0 of a 2-process world starts; a worker points at a port nobody serves."""
  script = tmp_path / "init_worker.py"
  script.write_text(_INIT_WORKER)
  lonely_coordinator = world_envs(2, timeout=3)[0]
  lost_worker = world_envs(2, timeout=3)[1]
  t0 = time.monotonic()
  outs = run_processes([sys.executable, str(script)], [lonely_coordinator, lost_worker],
                       tmp_path / "logs", timeout=60)
  elapsed = time.monotonic() - t0
  assert elapsed < 30, f"took {elapsed:.0f}s: initialisation did not time out promptly"
  (rc0, out0), (rc1, out1) = outs
  assert rc0 == 2 and rc1 == 2, (out0[-2000:], out1[-2000:])  # ConfigError exit, not SIGABRT.
  assert "CONFIG_ERROR" in out0 and "missing process ids [1]" in out0
  assert lonely_coordinator["SHPEFT_COORDINATOR"] in out0
  assert "CONFIG_ERROR" in out1 and "could not reach the coordinator" in out1
  assert lost_worker["SHPEFT_COORDINATOR"] in out1


def test_two_processes_join_through_slurm_variables(tmp_path):
  """srun's variables alone (no SHPEFT_*) bring up the world, as launch/slurm.sbatch relies on."""
  script = tmp_path / "init_worker.py"
  script.write_text(_INIT_WORKER)
  port = distributed.free_port()
  envs = [{"SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
           "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_STEP_NODELIST": "localhost",
           "SHPEFT_COORDINATOR": f"127.0.0.1:{port}", "SHPEFT_INIT_TIMEOUT": "30"}
          for i in range(2)]
  outs = run_processes([sys.executable, str(script)], envs, tmp_path / "logs", timeout=60)
  for i, (rc, out) in enumerate(outs):
    assert rc == 0 and f"JOINED process {i} of 2" in out, out[-3000:]


# ---------------------------------------------------------------------------------------------
# The trainer itself: `python -m shpeft_jax.main` in 2 processes vs 1 process.

_TRAIN_FLAGS = [
    "--config", str(REPO / "configs" / "common.py"),
    "--config.model.name=test_tiny", "--config.model.image_size=16",
    "--config.peft.method=shpeft", "--config.peft.k_percent=5", "--config.peft.score_batches=2",
    "--config.peft.score_chunk=2",
    "--config.optim.lr=0.1",
    "--config.train.batch_size=8", "--config.train.eval_batch_size=64",
    "--config.train.num_steps=6", "--config.train.eval_every=3", "--config.train.log_every=1",
    "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2",
    "--config.train.progress_bar=False",
]


def _train_argv(workdir) -> list[str]:
  # One XLA cache for all runs of the test: the resumed run reuses the single run's programs.
  cache = pathlib.Path(workdir).parent / "xla_cache"
  return [sys.executable, "-m", "shpeft_jax.main", *_TRAIN_FLAGS,
          f"--config.compilation_cache_dir={cache}", "--workdir", str(workdir)]


def _train_lines(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [l for l in map(json.loads, f) if l["kind"] == "train"]


def _flat_params(workdir) -> dict[str, np.ndarray]:
  from shpeft_jax import checkpoints, utils  # pylint: disable=g-import-not-at-top
  params, _ = checkpoints.load_params(os.path.join(workdir, "export", "model"))
  return utils.flatten_names(params)


def _assert_same_params(a: dict, b: dict, what: str):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=2e-5, atol=2e-6, err_msg=f"{what}: {name}")


@pytest.mark.slow
def test_trainer_two_processes_match_one_process_and_checkpoint_restores(tmp_path):
  """SH-PEFT (score -> select -> 6 SGD steps, evals, checkpoints) in a 2-process world equals the
  single-process run with the same global batch; its step-3 checkpoint (FSDP-sharded over 4
  devices) resumes in one process on one device."""
  single, multi, resumed = tmp_path / "single", tmp_path / "multi", tmp_path / "resumed"
  # The 2-process world comes from launch/local_multiprocess.sh (as a user would start it); the
  # single-process reference runs alongside (3 processes at once).
  mp_logs = tmp_path / "mp_logs"
  # 2 processes x 2 CPU devices, mesh data=2 (across processes) x fsdp=2 (within a process):
  # data parallelism between hosts and FSDP-sharded params/optimizer state inside each.
  launcher = [str(LAUNCH / "local_multiprocess.sh"), "-n", "2", "-d", "2", "-t", "120",
              "-l", str(mp_logs), "--", *_train_argv(multi)[3:], "--config.mesh.fsdp=2"]
  outs = run_processes_each([launcher, _train_argv(single)],
                            [{"PYTHON": sys.executable}, {}], tmp_path / "logs", timeout=600)
  for rc, out in outs:
    assert rc == 0, out[-5000:]
  log1 = (mp_logs / "process_1.log").read_text()
  assert "process 1 of 2" in log1, log1[-3000:]  # main.py's start-up line.
  assert "Mesh {'data': 2, 'fsdp': 2} over 4 devices (2 processes)" in log1

  # Same trainable mask (scores from the same data), same loss at every step, same params.
  from shpeft_jax.peft import mask_io  # pylint: disable=g-import-not-at-top
  p_single, p_multi = _flat_params(single), _flat_params(multi)
  from shpeft_jax import utils  # pylint: disable=g-import-not-at-top
  m_single = utils.flatten_names(mask_io.load_mask(str(single / "mask.npz"),
                                                   utils.unflatten_names(p_single)))
  m_multi = utils.flatten_names(mask_io.load_mask(str(multi / "mask.npz"),
                                                  utils.unflatten_names(p_multi)))
  for name, m in m_single.items():
    if m is not None:
      np.testing.assert_array_equal(np.asarray(m_multi[name]), np.asarray(m), err_msg=name)
  ls, lm = _train_lines(single), _train_lines(multi)
  assert [l["step"] for l in lm] == [1, 2, 3, 4, 5, 6]  # One writer: process 0 only.
  np.testing.assert_allclose([l["loss"] for l in lm], [l["loss"] for l in ls], rtol=1e-5)
  assert all(l["update_norm"] > 0 for l in lm)  # The params really moved.
  _assert_same_params(p_single, p_multi, "2 processes vs 1")
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "6"]

  # The 2-process checkpoint of step 3 restores in ONE process, which finishes steps 4..6.
  shutil.copytree(multi, resumed)
  for name in ("checkpoints/6", "export", "best", "best.json", "results.json", "metrics.jsonl",
               "tb"):
    path = resumed / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
  (rc, out), = run_processes(_train_argv(resumed), [{}], tmp_path / "resume_logs", timeout=300)
  assert rc == 0, out[-5000:]
  assert "Resumed from the checkpoint at step 3" in out
  assert [l["step"] for l in _train_lines(resumed)] == [4, 5, 6]
  _assert_same_params(p_single, _flat_params(resumed), "2-process checkpoint resumed in 1")


# ---------------------------------------------------------------------------------------------
# launch/ scripts: syntax, usage, and their wiring run against stand-ins for python / srun /
# gcloud (the real commands cannot run here; the stand-ins record or execute what they get).

LAUNCH = REPO / "launch"
SCRIPTS = ["local_multiprocess.sh", "multi_gpu.sh", "slurm.sbatch", "tpu_vm.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_syntax_and_usage(script):
  path = LAUNCH / script
  assert os.access(path, os.X_OK), f"{script} is not executable"
  subprocess.run(["bash", "-n", str(path)], check=True)
  if shutil.which("shellcheck"):
    res = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
  res = subprocess.run(["bash", str(path), "-h"], capture_output=True, text=True, timeout=30,
                       env=_child_env({}))
  assert res.returncode == 0 and "Usage:" in res.stdout, res.stdout + res.stderr
  assert "Data:" in res.stdout and "Checkpoints:" in res.stdout  # Placement is documented.


def _fake_python(tmp_path) -> str:
  """A `python3` stand-in that runs the init worker (joins the world, prints argv)."""
  worker = tmp_path / "init_worker.py"
  worker.write_text(_INIT_WORKER + "print('ARGV', sys.argv[1:], flush=True)\n")
  fake = tmp_path / "fake_python"
  fake.write_text(f'#!/bin/bash\nexec {sys.executable} {worker} "$@"\n')
  fake.chmod(0o755)
  return str(fake)


def test_local_multiprocess_script_starts_a_world(tmp_path):
  env = _child_env({"PYTHON": _fake_python(tmp_path)})
  logs = tmp_path / "logs"
  res = subprocess.run([str(LAUNCH / "local_multiprocess.sh"), "-n", "2", "-d", "2", "-l",
                        str(logs), "--", "--config", "c.py", "--workdir", "/tmp/w"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
  assert res.returncode == 0, res.stderr[-3000:]
  for i in range(2):
    out = (logs / f"process_{i}.log").read_text()
    assert f"JOINED process {i} of 2" in out, out[-2000:]
    assert "'-m', 'shpeft_jax.main', '--config', 'c.py', '--workdir', '/tmp/w'" in out


def test_local_multiprocess_script_reports_a_failed_process(tmp_path):
  """Process 1 exits with an error: the script stops the others and fails, within seconds."""
  worker = tmp_path / "fail_worker.py"
  worker.write_text(_INIT_WORKER + textwrap.dedent("""
      if jax.process_index() == 1:
        sys.exit(5)
      time.sleep(300)
  """))
  fake = tmp_path / "fake_python"
  fake.write_text(f'#!/bin/bash\nexec {sys.executable} {worker} "$@"\n')
  fake.chmod(0o755)
  env = _child_env({"PYTHON": str(fake), "SHPEFT_SHUTDOWN_TIMEOUT": "3"})
  t0 = time.monotonic()
  res = subprocess.run([str(LAUNCH / "local_multiprocess.sh"), "-n", "2", "-l",
                        str(tmp_path / "logs"), "--", "--x"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO),
                       start_new_session=True)
  assert res.returncode == 1
  assert "Process 1 failed" in res.stderr
  assert time.monotonic() - t0 < 60


def test_slurm_sbatch_with_stand_in_srun(tmp_path):
  """slurm.sbatch under a fake `srun` (runs SLURM_NTASKS local tasks) and `scontrol`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && '
                                    'echo localhost && echo otherhost\n')
  (bin_dir / "srun").write_text(textwrap.dedent("""\
      #!/bin/bash
      while [[ "$1" == --* ]]; do echo "srun option $1" >&2; shift; done
      pids=()
      for ((i = 0; i < SLURM_NTASKS; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \
          "$@" > "$SRUN_LOGS/task_$i.log" 2>&1 &
        pids+=($!)
      done
      status=0
      for p in "${pids[@]}"; do wait $p || status=1; done
      exit $status
  """))
  for f in ("scontrol", "srun"):
    (bin_dir / f).chmod(0o755)
  env = _child_env({
      "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": _fake_python(tmp_path),
      "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost,otherhost", "SLURM_NTASKS": "2",
      "SLURM_JOB_NUM_NODES": "1", "SHPEFT_PORT": str(distributed.free_port()),
      "SHPEFT_INIT_TIMEOUT": "30", "SRUN_LOGS": str(tmp_path)})
  res = subprocess.run([str(LAUNCH / "slurm.sbatch"), "--config", "c.py", "--workdir", "/w"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
  assert res.returncode == 0, res.stderr[-3000:]
  assert "srun option --kill-on-bad-exit=1" in res.stderr
  assert f"coordinator localhost:{env['SHPEFT_PORT']}" in res.stderr
  for i in range(2):
    out = (tmp_path / f"task_{i}.log").read_text()
    assert f"JOINED process {i} of 2" in out, out[-2000:]
    assert "'--config', 'c.py', '--workdir', '/w'" in out


def test_tpu_vm_script_issues_the_gcloud_commands(tmp_path):
  """tpu_vm.sh `all` against a recording `gcloud`: create, copy + install, run on all, fetch."""
  record = tmp_path / "gcloud.jsonl"
  copies = tmp_path / "copied"
  copies.mkdir()
  fake = tmp_path / "gcloud"
  fake.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, shutil, sys
      with open({str(record)!r}, "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
      if sys.argv[4] == "scp":
        src = sys.argv[5] if not sys.argv[5].startswith("--") else sys.argv[6]
        if os.path.isfile(src):
          shutil.copy(src, {str(copies)!r})
  """))
  fake.chmod(0o755)
  config = tmp_path / "my_config.py"
  config.write_text("def get_config():\n  pass\n")
  env = _child_env({"GCLOUD": str(fake), "TPU_NAME": "shpeft-test", "ZONE": "us-central2-b",
                    "ACCELERATOR_TYPE": "v4-32", "PROJECT": "my-proj"})
  res = subprocess.run([str(LAUNCH / "tpu_vm.sh"), "all", str(config), "/mnt/gcs/runs/busi",
                        str(tmp_path / "back"), "--config.train.num_steps=5"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
  assert res.returncode == 0, res.stderr
  calls = [json.loads(l) for l in record.read_text().splitlines()]
  subs = [c[3] for c in calls]
  assert subs == ["create", "scp", "ssh", "scp", "ssh", "scp"]
  assert all(c[:3] == ["compute", "tpus", "tpu-vm"] for c in calls)
  assert all("--zone=us-central2-b" in c and "--project=my-proj" in c for c in calls)
  assert "--accelerator-type=v4-32" in calls[0] and "shpeft-test" in calls[0]
  # Source archive to every worker, then install on every worker.
  assert "--worker=all" in calls[1] and "--worker=all" in calls[2]
  install = next(a for a in calls[2] if a.startswith("--command="))
  assert "jax[tpu]==0.10.2" in install and "pip install -q -e shpeft_jax" in install
  archive = next(copies.glob("shpeft_src*.tar.gz"))
  listing = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True).stdout
  assert "shpeft_jax/distributed.py" in listing and "launch/tpu_vm.sh" in listing
  # The config goes to every worker; the trainer runs on every worker at once.
  assert "shpeft-test:shpeft_jax/configs/launch_my_config.py" in calls[3]
  assert (copies / "my_config.py").exists()
  run = next(a for a in calls[4] if a.startswith("--command="))
  assert "--worker=all" in calls[4] and "$HOME/shpeft_venv/bin/python" in run
  assert ("-m shpeft_jax.main --config configs/launch_my_config.py "
          "--workdir /mnt/gcs/runs/busi --config.train.num_steps=5 2>&1 | tee") in run
  # The workdir comes back from worker 0.
  assert calls[5][4:7] == ["--recurse", "shpeft-test:/mnt/gcs/runs/busi", str(tmp_path / "back")]
  assert "--worker=0" in calls[5]


def test_main_reports_a_missing_process_as_an_error(tmp_path):
  """`python -m shpeft_jax.main` as process 0 of a 2-process world nobody else joins."""
  env = world_envs(2, timeout=3)[0]
  t0 = time.monotonic()
  (rc, out), = run_processes(_train_argv(tmp_path / "w"), [env], tmp_path / "logs", timeout=120)
  assert rc == 2, out[-3000:]
  assert "error: ConfigError: Distributed start-up failed" in out
  assert "missing process ids [1]" in out and env["SHPEFT_COORDINATOR"] in out
  assert time.monotonic() - t0 < 90
  assert not (tmp_path / "w").exists()  # Nothing was started.


@pytest.mark.slow
def test_sigterm_in_a_two_process_world_checkpoints_one_agreed_step(tmp_path):
  """SLURM's scancel / a TPU VM's preemption send SIGTERM to every process: both finish the same
  step (JAX's preemption sync point), save it together, print the Ctrl-C line, exit 143; one
  process then resumes from that step and ends as an uninterrupted run does."""
  from shpeft_jax import params_io  # pylint: disable=g-import-not-at-top
  steps = 400
  flags_ = [a if not a.startswith("--config.train.num_steps=") else
            f"--config.train.num_steps={steps}" for a in _TRAIN_FLAGS]
  flags_ = [a for a in flags_ if not a.startswith(("--config.train.eval_every",
                                                   "--config.train.log_every"))]
  flags_ += ["--config.train.eval_every=0", "--config.train.log_every=100"]
  workdir = tmp_path / "multi"
  argv = [sys.executable, "-m", "shpeft_jax.main", *flags_, "--workdir", str(workdir),
          f"--config.compilation_cache_dir={tmp_path / 'xla_cache'}"]
  logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen(argv, env=_child_env(env), stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(REPO), start_new_session=True)
           for env, log in zip(world_envs(2, timeout=60), logs)]
  try:
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
      done = params_io.complete_steps(str(workdir / "checkpoints"))
      if done and done[-1] >= 6:
        break
      time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "a process ended before its checkpoint"
    for p in procs:
      p.send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  for p, out in zip(procs, outs):
    assert p.returncode == 143, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
  saved = params_io.complete_steps(str(workdir / "checkpoints"))[-1]
  assert 6 <= saved < steps
  for out in outs:
    assert "SIGTERM: saved the checkpoint of step" in out or "interrupted" in out, out[-3000:]
  line = [l for l in outs[0].splitlines() if l.startswith("interrupted")]
  assert len(line) == 1 and f"last complete checkpoint: step {saved}" in line[0], outs[0][-3000:]
  (rc, out), = run_processes(argv, [{}], tmp_path / "resume_logs", timeout=600)
  assert rc == 0, out[-5000:]
  assert f"Resumed from the checkpoint at step {saved}" in out
