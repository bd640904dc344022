#!/usr/bin/env bash
# Cloud TPU VM / pod slice lifecycle for fractal-jax with gcloud: create (directly or as a
# queued resource), install, train, resume after preemption, logs, status, list, stop, delete.
# `launch/tpu_vm.sh --help` says how.
set -euo pipefail

PROG=$0
SCRIPT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The repository that `install` clones on the workers. Its one home is REPO_URL in setup.py
# (the notebook's badge and default use the same); --repo or FRACTAL_JAX_REPO override it.
DEFAULT_REPO=$(sed -n 's/^REPO_URL = "\(.*\)"$/\1/p' "$SCRIPT_ROOT/setup.py" 2>/dev/null || true)
PLACEHOLDER_OWNER=YOUR_GITHUB_USER # REPO_URL's owner until the project's URL is set there

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND [options] [-- main.py flags]

Cloud TPU VM / pod slice lifecycle for fractal-jax, with gcloud:
  create    create the TPU VM (single host) or pod slice (several hosts); --queued: as a queued resource
  install   on every worker: fetch the repository and pip-install it with jax[tpu]
  train     on every worker: start python -m fractal_jax.main in the background (nohup)
  resume    after a preemption: delete what is left, create it again, install, train (same gs:// workdir)
  logs      print the end of a worker's training log (worker 0 unless --worker=N)
  status    the state of the TPU VM and of the queued resource called --name
  list      the TPU VMs and queued resources of the zone
  stop      on every worker: SIGTERM the run (it checkpoints the current step, then exits)
  delete    delete the TPU VM / pod slice (--queued: the queued resource and its slice)

Typical session:
  $PROG create  --name=fjax --zone=us-central2-b --accelerator=v4-8
  $PROG install --name=fjax --zone=us-central2-b --repo=https://github.com/ME/fractal-jax.git
  $PROG train   --name=fjax --zone=us-central2-b --accelerator=v4-8 \\
      --config=configs/fractalmar_64.py --workdir=gs://BUCKET/fractalmar_64 -- --config.data.root=gs://BUCKET/imagenet
  $PROG logs    --name=fjax --zone=us-central2-b
  $PROG delete  --name=fjax --zone=us-central2-b

Spot capacity through a queued resource (the usual way to get v5e, v5p and v6e), resumed after preemption:
  $PROG create  --name=fjax --zone=us-west4-a --accelerator=v5litepod-16 --queued --spot --valid_until_duration=6h --wait
  $PROG install --name=fjax --zone=us-west4-a --repo=https://github.com/ME/fractal-jax.git
  $PROG train   --name=fjax --zone=us-west4-a --accelerator=v5litepod-16 \\
      --config=configs/fractalmar_64.py --workdir=gs://BUCKET/fractalmar_64 -- --config.data.root=gs://BUCKET/imagenet
  $PROG status  --name=fjax --zone=us-west4-a
  $PROG resume  --name=fjax --zone=us-west4-a --accelerator=v5litepod-16 --queued --spot --valid_until_duration=6h \\
      --repo=https://github.com/ME/fractal-jax.git --config=configs/fractalmar_64.py \\
      --workdir=gs://BUCKET/fractalmar_64 -- --config.data.root=gs://BUCKET/imagenet
  $PROG delete  --name=fjax --zone=us-west4-a --queued --yes

Common options (--opt=VALUE or --opt VALUE; dashes and underscores are the same):
  --name=NAME           TPU name, also the queued resource's (required, except for 'list')
  --zone=ZONE           zone, e.g. us-central2-b (v4), us-west4-a (v5e), europe-west4-a (v6e) (required)
  --project=PROJECT     Google Cloud project (default: gcloud's configured project)
  --accelerator=TYPE    accelerator type, e.g. v4-8, v4-32, v5litepod-8, v5litepod-64, v6e-8
  --remote_dir=DIR      checkout on the workers, relative to the home directory (default: fractal-jax)
  --dry_run             print the commands instead of running them (nothing is contacted)
  -h, --help            this help; '$PROG SUBCOMMAND --help' for a subcommand's

Single host or several: an accelerator type whose trailing number is at most 8
(v2-8, v3-8, v4-8, v5p-8, v5litepod-1/4/8, v6e-1/4/8) is one host; any other
(v4-16, v5p-32, v5litepod-16, v5litepod-64, v6e-16, ...) spans several, and then
every worker runs the same command and --workdir must be gs:// (all hosts write
one checkpoint). 'train' refuses a non-gs:// --workdir unless --accelerator names
a single-host type; 'resume' always wants gs:// (the recreated slice has new disks).

Multi-host start-up: on a slice of several workers, 'train' reads the worker list
from the TPU VM metadata server and exports JAX_COORDINATOR_ADDRESS (worker 0,
port --coordinator_port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
fractal_jax/distributed.py passes to jax.distributed.initialize. One slice only
(no multislice).

Not tested against Google Cloud: it was written without cloud access and is tested
by --dry_run and with a stand-in gcloud (tests/test_launch.py). Check the printed
commands with --dry_run first.
EOF
}

usage_create() {
  cat <<EOF
Usage: $PROG create --name=NAME --zone=ZONE --accelerator=TYPE [--version=RUNTIME] [--spot | --preemptible]
         [--queued [--valid_until_duration=DURATION] [--wait]] [--network=N] [--subnetwork=S]
         [--service_account=EMAIL] [--project=P] [--dry_run]

Runs: gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME [--spot|--preemptible]
With --queued: gcloud compute tpus queued-resources create NAME --zone=ZONE --node-id=NAME
         --accelerator-type=TYPE --runtime-version=RUNTIME [--spot] [--valid-until-duration=DURATION]
--network, --subnetwork and --service_account are passed to either as --network, --subnetwork, --service-account.

  --accelerator=TYPE   required; e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-8, v5litepod-64, v6e-8
  --version=RUNTIME    TPU software version; default by family: v2/v3/v4 tpu-ubuntu2204-base,
                       v5litepod (v5e) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot               a Spot TPU (cheaper, can be preempted: 'resume' brings the run back)
  --preemptible        a preemptible TPU (the older kind of Spot; not both; not with --queued)
  --queued             request the slice as a queued resource called NAME (its TPU is NAME too): the
                       request waits in Cloud TPU's queue until capacity is free; 'status' shows its
                       state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)
  --valid_until_duration=DURATION  with --queued: give up if not provisioned within DURATION
                       (gcloud's duration format, e.g. 6h, 2d, 1h30m)
  --wait               with --queued: return only once the queued resource is ACTIVE (polls
                       every --poll_seconds, default 60; fails if it ends FAILED or SUSPENDED)
  --network=NETWORK    VPC network (gcloud's default: "default")
  --subnetwork=SUBNET  subnetwork of that network
  --service_account=EMAIL  service account of the TPU VMs (it needs read/write access to the
                       gs:// workdir and data; gcloud's default: the Compute Engine default account)

Example:
  $PROG create --name=fjax --zone=europe-west4-a --accelerator=v6e-8 --queued --spot \\
      --network=my-vpc --subnetwork=my-subnet --service_account=trainer@my-project.iam.gserviceaccount.com

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_install() {
  cat <<EOF
Usage: $PROG install --name=NAME --zone=ZONE [--repo=URL_OR_DIR] [--branch=BRANCH] [--python=PYTHON] [--remote_dir=DIR] [--project=P] [--dry_run]

On every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...):
fetches the repository into --remote_dir, creates DIR/.venv with --python and runs
  pip install -c constraints.txt -e . "jax[tpu]"
A rerun updates the checkout and the installation.

  --repo=URL           git URL cloned on the workers (default: \$FRACTAL_JAX_REPO, else REPO_URL in
                       setup.py${DEFAULT_REPO:+, now $DEFAULT_REPO}; a URL whose owner is
                       $PLACEHOLDER_OWNER is a placeholder and must be replaced)
  --repo=DIR           a local git checkout instead: its committed HEAD is packed (git archive)
                       and copied to every worker with gcloud ... scp (uncommitted changes are not)
  --branch=BRANCH      branch or tag to clone (default: main)
  --python=PYTHON      Python >= 3.11 for the virtual environment (default: python3.11; installed
                       with apt-get when missing: the TPU images are Ubuntu 22.04, whose python3 is 3.10)
  --remote_dir=DIR     checkout on the workers, relative to the home directory (default: fractal-jax)

Example:
  $PROG install --name=fjax --zone=us-central2-b --repo=. --branch=main

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_train() {
  cat <<EOF
Usage: $PROG train --name=NAME --zone=ZONE --config=CONFIG --workdir=WORKDIR [--accelerator=TYPE] [--log=FILE] [--project=P] [--dry_run] [-- FLAGS...]

On every worker, in the background (nohup), appending to DIR/LOG:
  .venv/bin/python -m fractal_jax.main --config=CONFIG --workdir=WORKDIR FLAGS...
FLAGS after '--' pass through unchanged, e.g. -- --config.train.global_batch=1024 --config.model.dtype=bfloat16
(every field of config.train, config.model, ... is listed in fractal_jax/config.py, base_config()).
A rerun with the same workdir resumes from its newest checkpoint. A worker already
running a job started by this script refuses to start another ('stop' first).

  --config=CONFIG      config file, relative to the checkout (e.g. configs/fractalmar_64.py) (required)
  --workdir=WORKDIR    checkpoints and metrics (required); must be gs://BUCKET/... unless --accelerator
                       names a single-host type (v4-8, v5litepod-8, v6e-8, ...): a pod slice's hosts
                       write one checkpoint, and a local path would be on each worker's own disk
  --accelerator=TYPE   the slice's type; only used for the workdir rule above
  --log=FILE           log file, relative to the checkout (default: train.log; 'logs' reads it)
  --coordinator_port=PORT  port of jax.distributed's coordinator on worker 0 (default: 8482)

Example:
  $PROG train --name=fjax --zone=us-central2-b --accelerator=v4-32 --config=configs/fractalmar_64.py \\
      --workdir=gs://BUCKET/fractalmar_64 -- --config.train.global_batch=1024 --config.model.dtype=bfloat16

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_resume() {
  cat <<EOF
Usage: $PROG resume --name=NAME --zone=ZONE --accelerator=TYPE --config=CONFIG --workdir=gs://...
         [create's options: --version, --spot | --preemptible, --queued, --valid_until_duration,
         --network, --subnetwork, --service_account] [install's options: --repo, --branch, --python]
         [train's options: --log, --coordinator_port] [--poll_seconds=S] [--project=P] [--dry_run] [-- FLAGS...]

Brings a run back after its slice was preempted or deleted. A preempted Spot or
preemptible TPU VM stays PREEMPTED (a queued resource: SUSPENDED) until it is deleted:
it cannot be restarted, only deleted and created again, with new disks. So:
  1. looks at the queued resource and the TPU VM called NAME (gcloud ... describe);
  2. a TPU VM that is READY (and its queued resource ACTIVE): goes to step 7;
     a queued resource still waiting (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING): goes to step 5;
  3. otherwise deletes what is left (queued-resources delete --force, which deletes its TPU
     too, or tpu-vm delete),
  4. creates it again with the options given here (give the ones 'create' had),
  5. with --queued waits until the queued resource is ACTIVE (every --poll_seconds, default 60),
  6. installs (skipped for a READY TPU VM: it still has its installation),
  7. starts training with the same --config, --workdir and FLAGS: fractal_jax.main resumes
     from the newest checkpoint in the gs:// workdir (the run stopped at most
     config.train.checkpoint_every_steps steps after it, or at the step SIGTERM saved).
--workdir must be gs://: the disks of a deleted slice are gone.
Resuming a READY slice on which a run is going on stops at step 7 ('stop' first).
--dry_run prints the commands of a preempted slice's way (steps 1, 3-7).

Example:
  $PROG resume --name=fjax --zone=us-west4-a --accelerator=v5litepod-16 --queued --spot \\
      --repo=https://github.com/ME/fractal-jax.git --config=configs/fractalmar_64.py \\
      --workdir=gs://BUCKET/fractalmar_64 -- --config.data.root=gs://BUCKET/imagenet

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_logs() {
  cat <<EOF
Usage: $PROG logs --name=NAME --zone=ZONE [--worker=N] [--lines=N] [--follow] [--log=FILE] [--project=P] [--dry_run]

Prints the end of the training log of one worker (tail -n LINES DIR/LOG over gcloud ... ssh).

  --worker=N   which worker (default: 0, the one that writes metrics and checkpoints' metadata)
  --lines=N    how many lines (default: 100)
  --follow     keep printing as the log grows (tail -F; Ctrl-C to end)
  --log=FILE   log file, relative to the checkout (default: train.log)

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_status() {
  cat <<EOF
Usage: $PROG status --name=NAME --zone=ZONE [--project=P] [--dry_run]

Prints the state of the queued resource NAME and of the TPU VM NAME, each ABSENT if there is none:
  gcloud compute tpus queued-resources describe NAME --zone=ZONE --format='value(state.state)'
  gcloud compute tpus tpu-vm describe NAME --zone=ZONE --format='value(state)'
A queued resource goes WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE (FAILED when it
was not provisioned in time, SUSPENDED after a preemption); a TPU VM is READY, or
PREEMPTED / TERMINATED after a preemption ('resume').

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_list() {
  cat <<EOF
Usage: $PROG list --zone=ZONE [--project=P] [--dry_run]

Lists the zone's TPU VMs and queued resources:
  gcloud compute tpus tpu-vm list --zone=ZONE
  gcloud compute tpus queued-resources list --zone=ZONE

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_stop() {
  cat <<EOF
Usage: $PROG stop --name=NAME --zone=ZONE [--project=P] [--dry_run]

On every worker: sends SIGTERM to the run that 'train' started (its pid is in DIR/LOG.pid).
fractal_jax.main checkpoints the current step and exits; 'train' again resumes.

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_delete() {
  cat <<EOF
Usage: $PROG delete --name=NAME --zone=ZONE [--queued] [--yes] [--project=P] [--dry_run]

Runs: gcloud compute tpus tpu-vm delete NAME --zone=ZONE (gcloud asks to confirm unless --yes).
With --queued: gcloud compute tpus queued-resources delete NAME --zone=ZONE --force, which
deletes the queued resource and the TPU VM it provisioned (whatever its state).
Everything on the workers' disks goes with it; a gs:// workdir stays.

  --queued   the slice came from 'create --queued'
  --yes      do not ask (passes --quiet to gcloud)

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_error() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG ${subcommand:+$subcommand }--help' for usage." >&2
  exit 2
}

warn() { echo "$PROG: warning: $*" >&2; }
note() { echo "$PROG: $*" >&2; }

# One word, quoted for a POSIX shell only where needed; --opt=VALUE keeps --opt= outside the quotes.
q() {
  local s=$1 sq="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/$sq}"
  fi
}

# A command line that a shell (and Python's shlex.split) reads back as the same words.
quote_cmd() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

run() {
  if ((opt_dry_run)); then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# v4-8, v5litepod-4, v6e-8, ...: a trailing number of at most 8 is one host.
single_host() {
  local n=${1##*-}
  [[ $1 == *-* && $n =~ ^[0-9]+$ ]] && ((10#$n <= 8))
}

default_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

subcommand=""
opt_name="" opt_zone="" opt_project="" opt_accelerator="" opt_version=""
opt_repo=${FRACTAL_JAX_REPO:-$DEFAULT_REPO} opt_branch=main opt_python=python3.11 opt_remote_dir=fractal-jax
opt_config="" opt_workdir="" opt_log=train.log opt_coordinator_port=8482
opt_worker=0 opt_lines=100
opt_network="" opt_subnetwork="" opt_service_account="" opt_valid_until_duration="" opt_poll_seconds=60
opt_follow=0 opt_spot=0 opt_preemptible=0 opt_queued=0 opt_wait=0 opt_yes=0 opt_dry_run=0
help=0 have_passthrough=0
passthrough=()

while (($#)); do
  arg=$1
  shift
  case $arg in
    --)
      have_passthrough=1
      passthrough=("$@")
      break
      ;;
    -h | --help | help)
      if [[ $arg == help && -n $subcommand ]]; then usage_error "unexpected argument: $arg"; fi
      help=1
      ;;
    --*)
      key=${arg#--}
      key=${key%%=*}
      key=${key//-/_}
      case $key in
        dry_run | follow | spot | preemptible | queued | wait | yes)
          [[ $arg != *=* ]] || usage_error "--$key takes no value"
          printf -v "opt_$key" '%s' 1
          ;;
        name | zone | project | accelerator | version | repo | branch | python | remote_dir | config | workdir | log | \
          coordinator_port | worker | lines | network | subnetwork | service_account | valid_until_duration | poll_seconds)
          if [[ $arg == *=* ]]; then
            value=${arg#*=}
          else
            (($#)) || usage_error "--$key needs a value"
            value=$1
            shift
          fi
          printf -v "opt_$key" '%s' "$value"
          ;;
        *) usage_error "unknown option: ${arg%%=*}" ;;
      esac
      ;;
    -*) usage_error "unknown option: $arg" ;;
    *)
      [[ -z $subcommand ]] || usage_error "unexpected argument: $arg"
      subcommand=$arg
      ;;
  esac
done

SUBCOMMANDS="create, install, train, resume, logs, status, list, stop, delete"
case $subcommand in
  "")
    if ((help)); then
      usage
      exit 0
    fi
    usage >&2
    exit 2
    ;;
  create | install | train | resume | logs | status | list | stop | delete)
    if ((help)); then
      "usage_$subcommand"
      exit 0
    fi
    ;;
  *) usage_error "unknown subcommand: $subcommand ($SUBCOMMANDS)" ;;
esac

require() {
  local var="opt_$1"
  [[ -n ${!var} ]] || usage_error "--$1 is required for '$subcommand' ($2)"
}

if [[ $subcommand != list ]]; then
  require name "the TPU's name, e.g. --name=fjax"
  [[ $opt_name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    usage_error "--name=$opt_name: lower-case letters, digits and dashes, starting with a letter"
fi
require zone "e.g. --zone=us-central2-b"
[[ $opt_zone =~ ^[a-z0-9-]+$ ]] || usage_error "--zone=$opt_zone is not a zone name (e.g. us-central2-b)"
if ((have_passthrough)) && [[ $subcommand != train && $subcommand != resume ]]; then
  usage_error "flags after '--' are for 'train' and 'resume' only"
fi
[[ $opt_coordinator_port =~ ^[0-9]+$ ]] || usage_error "--coordinator_port must be a number"
[[ $opt_poll_seconds =~ ^[1-9][0-9]*$ ]] || usage_error "--poll_seconds must be a positive number of seconds"
# The workers' shells start in the home directory: a ~/ prefix is the same as none.
remote_dir=${opt_remote_dir#\~/}
[[ -n $remote_dir ]] || usage_error "--remote_dir must not be empty"
rdir=$(q "$remote_dir")

# Options of 'create' (and of 'resume', which creates again).
if [[ $subcommand == create || $subcommand == resume ]]; then
  require accelerator "e.g. --accelerator=v4-8 or --accelerator=v5litepod-64"
  version=$opt_version
  if [[ -z $version ]]; then
    version=$(default_version "$opt_accelerator") ||
      usage_error "no default --version for $opt_accelerator: give the TPU software version, e.g. --version=tpu-ubuntu2204-base"
  fi
  if ((opt_spot && opt_preemptible)); then usage_error "--spot and --preemptible: one or the other"; fi
  if ((opt_queued && opt_preemptible)); then
    usage_error "--preemptible is not offered for queued resources: use --spot"
  fi
  if [[ -n $opt_valid_until_duration ]]; then
    ((opt_queued)) || usage_error "--valid_until_duration is for queued resources: add --queued"
    [[ $opt_valid_until_duration =~ ^([0-9]+[smhdSMHD])+$ || $opt_valid_until_duration =~ ^P[0-9YMWDTHS.]+$ ]] ||
      usage_error "--valid_until_duration=$opt_valid_until_duration: a duration such as 6h, 2d, 1h30m (or ISO 8601, P1DT6H)"
  fi
  for key in network subnetwork; do
    var="opt_$key"
    [[ -z ${!var} || ${!var} =~ ^[A-Za-z0-9/_.-]+$ ]] || usage_error "--$key=${!var}: a name or resource path, without spaces"
  done
  [[ -z $opt_service_account || $opt_service_account =~ ^[^@[:space:]]+@[^@[:space:]]+$ ]] ||
    usage_error "--service_account=$opt_service_account: an e-mail address, e.g. trainer@PROJECT.iam.gserviceaccount.com"
fi
if ((opt_wait)); then
  [[ $subcommand == create ]] || usage_error "--wait is for 'create' ('resume' always waits)"
  ((opt_queued)) || usage_error "--wait is for queued resources (a direct 'create' returns when the TPU is READY)"
fi

# Options of 'train' (and of 'resume').
if [[ $subcommand == train || $subcommand == resume ]]; then
  require config "e.g. --config=configs/fractalmar_64.py"
  require workdir "e.g. --workdir=gs://BUCKET/fractalmar_64"
  if [[ $opt_workdir != gs://* ]]; then
    if [[ $subcommand == resume ]]; then
      usage_error "--workdir=$opt_workdir is not gs://...: 'resume' creates the slice again with new disks, so only a gs:// workdir still holds the checkpoints"
    elif [[ -z $opt_accelerator ]]; then
      usage_error "--workdir=$opt_workdir is not gs://...: a pod slice's hosts write one checkpoint, so a local path is allowed only with --accelerator naming a single-host type (v4-8, v5litepod-8, v6e-8, ...)"
    elif ! single_host "$opt_accelerator"; then
      usage_error "--accelerator=$opt_accelerator spans several hosts: --workdir must be gs://BUCKET/... (got $opt_workdir)"
    fi
    warn "--workdir=$opt_workdir is on the TPU VM's own disk (relative paths: under ~/$remote_dir): 'delete' deletes it"
  fi
  # The workers run their own checkout (--repo, --branch), which may hold configs this one lacks.
  config_file=${opt_config%%:*}
  if [[ $config_file != /* && ! -f $SCRIPT_ROOT/$config_file ]]; then
    warn "--config=$opt_config: no $config_file in this checkout ($SCRIPT_ROOT)"
  fi
fi

# Options of 'install' (and of 'resume').
if [[ $subcommand == install || $subcommand == resume ]]; then
  [[ -n $opt_repo ]] || usage_error "--repo is required: no REPO_URL in $SCRIPT_ROOT/setup.py (--repo=URL, or --repo=. for this checkout)"
  [[ -n $opt_branch ]] || usage_error "--branch must not be empty"
  if [[ -d $opt_repo ]]; then
    git -C "$opt_repo" rev-parse --verify -q HEAD >/dev/null ||
      usage_error "--repo=$opt_repo is a directory but not a git checkout with a commit"
  elif [[ $opt_repo == *"$PLACEHOLDER_OWNER"* ]]; then
    msg="--repo is the placeholder $opt_repo (REPO_URL in setup.py): give the repository's URL (--repo=URL or FRACTAL_JAX_REPO), or a local checkout (--repo=.)"
    if ((opt_dry_run)); then warn "$msg"; else usage_error "$msg"; fi
  fi
fi

gcloud_common=(--zone="$opt_zone")
if [[ -n $opt_project ]]; then gcloud_common+=(--project="$opt_project"); fi

tpu_ssh() { # WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$opt_name" "${gcloud_common[@]}" --worker="$1" --command="$2"
}

# The same test on the workers: is the run that 'train' started (pid in LOG.pid) still going?
pidfile=$(q "$opt_log.pid")
running="[ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null"

# STATE := the state of the queued resource (KIND=queued-resources) or TPU VM (KIND=tpu-vm) called
# --name, or ABSENT when gcloud finds none. A dry run prints the command and takes ASSUMED.
query_state() { # KIND ASSUMED
  local kind=$1 field=state err_file
  if [[ $kind == queued-resources ]]; then field=state.state; fi
  local cmd=(gcloud compute tpus "$kind" describe "$opt_name" "${gcloud_common[@]}" --format="value($field)")
  if ((opt_dry_run)); then
    printf '%s\n' "$(quote_cmd "${cmd[@]}")"
    STATE=$2
    return
  fi
  printf '+ %s\n' "$(quote_cmd "${cmd[@]}")" >&2
  err_file=$(mktemp)
  if STATE=$("${cmd[@]}" 2>"$err_file"); then
    STATE=${STATE//[[:space:]]/}
    STATE=${STATE:-UNKNOWN}
  elif grep -qiE 'not_found|not found' "$err_file"; then
    STATE=ABSENT
  else
    cat "$err_file" >&2
    rm -f "$err_file"
    echo "$PROG: error: gcloud could not describe the $kind $opt_name (its message is above)" >&2
    exit 1
  fi
  rm -f "$err_file"
}

do_create() {
  local cmd
  if ((opt_queued)); then
    cmd=(gcloud compute tpus queued-resources create "$opt_name" "${gcloud_common[@]}" --node-id="$opt_name"
      --accelerator-type="$opt_accelerator" --runtime-version="$version")
    if ((opt_spot)); then cmd+=(--spot); fi
    if [[ -n $opt_valid_until_duration ]]; then cmd+=(--valid-until-duration="$opt_valid_until_duration"); fi
  else
    cmd=(gcloud compute tpus tpu-vm create "$opt_name" "${gcloud_common[@]}" --accelerator-type="$opt_accelerator"
      --version="$version")
    if ((opt_spot)); then cmd+=(--spot); fi
    if ((opt_preemptible)); then cmd+=(--preemptible); fi
  fi
  if [[ -n $opt_network ]]; then cmd+=(--network="$opt_network"); fi
  if [[ -n $opt_subnetwork ]]; then cmd+=(--subnetwork="$opt_subnetwork"); fi
  if [[ -n $opt_service_account ]]; then cmd+=(--service-account="$opt_service_account"); fi
  run "${cmd[@]}"
}

# Polls the queued resource until it is ACTIVE; fails on a state it will not leave by itself.
wait_active() {
  local start=$SECONDS
  if ((opt_dry_run)); then
    note "dry run: the next command is repeated every $opt_poll_seconds s until the state is ACTIVE (assumed here)"
  fi
  while :; do
    query_state queued-resources ACTIVE
    case $STATE in
      ACTIVE)
        if ((!opt_dry_run)); then note "queued resource $opt_name is ACTIVE"; fi
        return
        ;;
      CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | STATE_UNSPECIFIED | UNKNOWN)
        note "queued resource $opt_name: $STATE after $((SECONDS - start)) s; looking again in $opt_poll_seconds s"
        sleep "$opt_poll_seconds"
        ;;
      *)
        echo "$PROG: error: queued resource $opt_name is $STATE, not ACTIVE: '$PROG status' and 'gcloud compute tpus queued-resources describe $opt_name ${gcloud_common[*]}' say more; 'resume' requests it again" >&2
        exit 1
        ;;
    esac
  done
}

do_install() {
  local fetch archive remote_archive repo branch py script
  if [[ -d $opt_repo ]]; then
    # A local checkout: pack its HEAD and copy it to every worker.
    if [[ -n $(git -C "$opt_repo" status --porcelain --untracked-files=no) ]]; then
      warn "$opt_repo has uncommitted changes: only its committed HEAD is copied"
    fi
    archive="${TMPDIR:-/tmp}/fractal-jax-$opt_name.tar.gz"
    remote_archive="fractal-jax-src-$opt_name.tar.gz"
    run git -C "$opt_repo" archive --format=tar.gz --output="$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$opt_name:$remote_archive" "${gcloud_common[@]}" --worker=all
    fetch="mkdir -p $rdir && tar -xzf $(q "$remote_archive") -C $rdir && rm -f $(q "$remote_archive")"
  else
    repo=$(q "$opt_repo")
    branch=$(q "$opt_branch")
    fetch="if [ -d $rdir/.git ]; then git -C $rdir fetch --depth=1 $repo $branch && git -C $rdir checkout --force FETCH_HEAD;"
    fetch+=" else git clone --depth=1 --branch $branch $repo $rdir; fi"
  fi
  py=$(q "$opt_python")
  script="set -eu; apt_install() { sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q \"\$@\"; };"
  script+=" command -v git >/dev/null || apt_install git;"
  script+=" $fetch; cd $rdir;"
  script+=" if [ ! -x .venv/bin/python ]; then $py -m venv .venv || { rm -rf .venv && apt_install $py $(q "$opt_python-venv") && $py -m venv .venv; }; fi;"
  script+=" .venv/bin/python -m pip install -q --upgrade pip;"
  script+=" .venv/bin/python -m pip install -c constraints.txt -e . \"jax[tpu]\";"
  script+=" echo \"\$(hostname): fractal-jax installed, jax \$(.venv/bin/python -c \"import jax, fractal_jax; print(jax.__version__)\")\""
  tpu_ssh all "$script"
}

do_train() {
  local main log port coordinator script
  main=(.venv/bin/python -m fractal_jax.main --config="$opt_config" --workdir="$opt_workdir" "${passthrough[@]}")
  log=$(q "$opt_log")
  port=$opt_coordinator_port
  # shellcheck disable=SC2016  # expanded on the worker, not here
  coordinator='md() { curl -fsS -H "Metadata-Flavor: Google" "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; };'
  # shellcheck disable=SC2016
  coordinator+=' eps=$(md worker-network-endpoints 2>/dev/null || true); n=$(printf "%s\n" "$eps" | tr , "\n" | grep -c . || true);'
  # shellcheck disable=SC2016
  coordinator+=' if [ "$n" -gt 1 ] && [ -z "${JAX_COORDINATOR_ADDRESS:-}" ]; then first=${eps%%,*};'
  # shellcheck disable=SC2016
  coordinator+=" export JAX_COORDINATOR_ADDRESS=\"\${first##*:}:$port\" JAX_NUM_PROCESSES=\"\$n\" JAX_PROCESS_ID=\"\$(md agent-worker-number)\"; fi;"
  script="set -eu;"
  script+=" if [ ! -x $rdir/.venv/bin/python ]; then echo \"\$(hostname): no $(q "$remote_dir/.venv"): run install first\" >&2; exit 1; fi;"
  script+=" cd $rdir;"
  script+=" if $running; then echo \"\$(hostname): a run is going on (pid \$(cat $pidfile)): run stop first\" >&2; exit 1; fi;"
  script+=" $coordinator"
  script+=" set -- $(quote_cmd "${main[@]}");"
  script+=" printf \"=== %s %s process %s:\" \"\$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \"\$(hostname)\" \"\${JAX_PROCESS_ID:-0}\" >>$log;"
  script+=" printf \" %s\" \"\$@\" >>$log; echo >>$log;"
  script+=" nohup \"\$@\" >>$log 2>&1 </dev/null & echo \$! >$pidfile;"
  script+=" echo \"\$(hostname): started pid \$(cat $pidfile), log $(q "$remote_dir/$opt_log")\""
  tpu_ssh all "$script"
}

delete_queued() {
  local cmd=(gcloud compute tpus queued-resources delete "$opt_name" "${gcloud_common[@]}" --force)
  if ((opt_yes)); then cmd+=(--quiet); fi
  run "${cmd[@]}"
}

delete_tpu() {
  local cmd=(gcloud compute tpus tpu-vm delete "$opt_name" "${gcloud_common[@]}")
  if ((opt_yes)); then cmd+=(--quiet); fi
  run "${cmd[@]}"
}

case $subcommand in
  create)
    do_create
    if ((opt_queued)); then
      if ((opt_wait)); then
        wait_active
      else
        note "queued resource $opt_name requested: '$PROG status --name=$opt_name --zone=$opt_zone' shows when it is ACTIVE; then install"
      fi
    fi
    ;;

  install) do_install ;;

  train) do_train ;;

  resume)
    opt_yes=1 # the deletions below are of a slice that is gone or broken: no questions
    assumed_qr=ABSENT assumed_vm=PREEMPTED
    if ((opt_queued)); then assumed_qr=SUSPENDED assumed_vm=ABSENT; fi
    query_state queued-resources "$assumed_qr"
    qr_state=$STATE
    query_state tpu-vm "$assumed_vm"
    vm_state=$STATE
    if ((opt_dry_run)); then
      note "dry run: shown is the way of a preempted slice (assumed: queued resource $opt_name $qr_state, TPU VM $opt_name $vm_state); a real run goes by the states the describe commands report"
    else
      note "queued resource $opt_name: $qr_state; TPU VM $opt_name: $vm_state"
    fi
    if [[ $qr_state != ABSENT ]] && ((!opt_queued)); then
      usage_error "$opt_name is a queued resource ($qr_state): add --queued (and the other options 'create' had)"
    fi
    if [[ $vm_state == READY && ($qr_state == ACTIVE || $qr_state == ABSENT) ]]; then
      note "$opt_name is READY: nothing to recreate or install; starting training"
    elif ((opt_queued)) && [[ $qr_state =~ ^(CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING)$ ]]; then
      note "queued resource $opt_name is still being provisioned: waiting for it"
      wait_active
      do_install
    else
      if [[ $qr_state != ABSENT ]]; then
        delete_queued # --force: its TPU VM goes too
      elif [[ $vm_state != ABSENT ]]; then
        delete_tpu
      fi
      do_create
      if ((opt_queued)); then wait_active; fi
      do_install
    fi
    do_train
    ;;

  logs)
    [[ $opt_worker =~ ^[0-9]+$ ]] || usage_error "--worker must be a worker number (0, 1, ...)"
    [[ $opt_lines =~ ^[0-9]+$ ]] || usage_error "--lines must be a number"
    tail_cmd=(tail -n "$opt_lines")
    if ((opt_follow)); then tail_cmd+=(-F); fi
    tpu_ssh "$opt_worker" "cd $rdir && $(quote_cmd "${tail_cmd[@]}") $(q "$opt_log")"
    ;;

  status)
    query_state queued-resources ABSENT
    qr_state=$STATE
    query_state tpu-vm ABSENT
    if ((!opt_dry_run)); then
      echo "queued resource $opt_name: $qr_state"
      echo "TPU VM $opt_name: $STATE"
    fi
    ;;

  list)
    run gcloud compute tpus tpu-vm list "${gcloud_common[@]}"
    run gcloud compute tpus queued-resources list "${gcloud_common[@]}"
    ;;

  stop)
    script="cd $rdir && if $running; then kill -TERM \"\$(cat $pidfile)\" &&"
    script+=" echo \"\$(hostname): sent SIGTERM to pid \$(cat $pidfile) (it checkpoints, then exits)\";"
    script+=" else echo \"\$(hostname): no run going on\"; fi"
    tpu_ssh all "$script"
    ;;

  delete)
    if ((opt_queued)); then delete_queued; else delete_tpu; fi
    ;;
esac
