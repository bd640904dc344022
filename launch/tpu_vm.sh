#!/usr/bin/env bash
# Cloud TPU VM / pod slice lifecycle for fractal-jax with gcloud:
# create, install, train, logs, stop, delete. `launch/tpu_vm.sh --help` says how.
set -euo pipefail

PROG=$0
# The repository that `install` clones on the workers. A placeholder: set it with
# --repo (or the environment variable FRACTAL_JAX_REPO), or edit this line.
DEFAULT_REPO="https://github.com/YOUR_GITHUB_USER/fractal-jax.git"
SCRIPT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND [options] [-- main.py flags]

Cloud TPU VM / pod slice lifecycle for fractal-jax, with gcloud:
  create    create the TPU VM (single host) or pod slice (several hosts)
  install   on every worker: fetch the repository and pip-install it with jax[tpu]
  train     on every worker: start python -m fractal_jax.main in the background (nohup)
  logs      print the end of a worker's training log (worker 0 unless --worker=N)
  stop      on every worker: SIGTERM the run (it checkpoints the current step, then exits)
  delete    delete the TPU VM / pod slice

Typical session:
  $PROG create  --name=fjax --zone=us-central2-b --accelerator=v4-8
  $PROG install --name=fjax --zone=us-central2-b --repo=https://github.com/ME/fractal-jax.git
  $PROG train   --name=fjax --zone=us-central2-b --accelerator=v4-8 \\
      --config=configs/fractalmar_64.py --workdir=gs://BUCKET/fractalmar_64 -- --config.data.root=gs://BUCKET/imagenet
  $PROG logs    --name=fjax --zone=us-central2-b
  $PROG delete  --name=fjax --zone=us-central2-b

Common options (--opt=VALUE or --opt VALUE; dashes and underscores are the same):
  --name=NAME           TPU name (required)
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
a single-host type.

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
Usage: $PROG create --name=NAME --zone=ZONE --accelerator=TYPE [--version=RUNTIME] [--spot | --preemptible] [--project=P] [--dry_run]

Runs: gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME [--spot|--preemptible]

  --accelerator=TYPE   required; e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-8, v5litepod-64, v6e-8
  --version=RUNTIME    TPU software version; default by family: v2/v3/v4 tpu-ubuntu2204-base,
                       v5litepod (v5e) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot               a Spot TPU (cheaper, can be preempted: 'train' again resumes from the checkpoint)
  --preemptible        a preemptible TPU (the older kind of Spot; not both)

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

  --repo=URL           git URL cloned on the workers (default: \$FRACTAL_JAX_REPO, else the
                       placeholder $DEFAULT_REPO, which must be replaced)
  --repo=DIR           a local git checkout instead: its committed HEAD is packed (git archive)
                       and copied to every worker with gcloud ... scp (uncommitted changes are not)
  --branch=BRANCH      branch or tag to clone (default: main)
  --python=PYTHON      Python >= 3.11 for the virtual environment (default: python3.11; installed
                       with apt-get when missing: the TPU images are Ubuntu 22.04, whose python3 is 3.10)
  --remote_dir=DIR     checkout on the workers, relative to the home directory (default: fractal-jax)

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_train() {
  cat <<EOF
Usage: $PROG train --name=NAME --zone=ZONE --config=CONFIG --workdir=WORKDIR [--accelerator=TYPE] [--log=FILE] [--project=P] [--dry_run] [-- FLAGS...]

On every worker, in the background (nohup), appending to DIR/LOG:
  .venv/bin/python -m fractal_jax.main --config=CONFIG --workdir=WORKDIR FLAGS...
FLAGS after '--' pass through unchanged, e.g. -- --config.train.batch_size=1024 --config.model.dtype=bfloat16
A rerun with the same workdir resumes from its newest checkpoint. A worker already
running a job started by this script refuses to start another ('stop' first).

  --config=CONFIG      config file, relative to the checkout (e.g. configs/fractalmar_64.py) (required)
  --workdir=WORKDIR    checkpoints and metrics (required); must be gs://BUCKET/... unless --accelerator
                       names a single-host type (v4-8, v5litepod-8, v6e-8, ...): a pod slice's hosts
                       write one checkpoint, and a local path would be on each worker's own disk
  --accelerator=TYPE   the slice's type; only used for the workdir rule above
  --log=FILE           log file, relative to the checkout (default: train.log; 'logs' reads it)
  --coordinator_port=PORT  port of jax.distributed's coordinator on worker 0 (default: 8482)

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
Usage: $PROG delete --name=NAME --zone=ZONE [--yes] [--project=P] [--dry_run]

Runs: gcloud compute tpus tpu-vm delete NAME --zone=ZONE (gcloud asks to confirm unless --yes).
Everything on the workers' disks goes with it; a gs:// workdir stays.

  --yes   do not ask (passes --quiet to gcloud)

Not tested against Google Cloud (written without cloud access): check with --dry_run.
EOF
}

usage_error() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG ${subcommand:+$subcommand }--help' for usage." >&2
  exit 2
}

warn() { echo "$PROG: warning: $*" >&2; }

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
opt_follow=0 opt_spot=0 opt_preemptible=0 opt_yes=0 opt_dry_run=0
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
        dry_run | follow | spot | preemptible | yes)
          [[ $arg != *=* ]] || usage_error "--$key takes no value"
          printf -v "opt_$key" '%s' 1
          ;;
        name | zone | project | accelerator | version | repo | branch | python | remote_dir | config | workdir | log | \
          coordinator_port | worker | lines)
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

case $subcommand in
  "")
    if ((help)); then
      usage
      exit 0
    fi
    usage >&2
    exit 2
    ;;
  create | install | train | logs | stop | delete)
    if ((help)); then
      "usage_$subcommand"
      exit 0
    fi
    ;;
  *) usage_error "unknown subcommand: $subcommand (create, install, train, logs, stop, delete)" ;;
esac

require() {
  local var="opt_$1"
  [[ -n ${!var} ]] || usage_error "--$1 is required for '$subcommand' ($2)"
}

require name "the TPU's name, e.g. --name=fjax"
require zone "e.g. --zone=us-central2-b"
[[ $opt_name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  usage_error "--name=$opt_name: lower-case letters, digits and dashes, starting with a letter"
[[ $opt_zone =~ ^[a-z0-9-]+$ ]] || usage_error "--zone=$opt_zone is not a zone name (e.g. us-central2-b)"
if ((have_passthrough)) && [[ $subcommand != train ]]; then
  usage_error "flags after '--' are for 'train' only"
fi
[[ $opt_coordinator_port =~ ^[0-9]+$ ]] || usage_error "--coordinator_port must be a number"
# The workers' shells start in the home directory: a ~/ prefix is the same as none.
remote_dir=${opt_remote_dir#\~/}
[[ -n $remote_dir ]] || usage_error "--remote_dir must not be empty"
rdir=$(q "$remote_dir")

gcloud_common=(--zone="$opt_zone")
if [[ -n $opt_project ]]; then gcloud_common+=(--project="$opt_project"); fi

tpu_ssh() { # WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$opt_name" "${gcloud_common[@]}" --worker="$1" --command="$2"
}

# The same test on the workers: is the run that 'train' started (pid in LOG.pid) still going?
pidfile=$(q "$opt_log.pid")
running="[ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null"

case $subcommand in
  create)
    require accelerator "e.g. --accelerator=v4-8 or --accelerator=v5litepod-64"
    version=$opt_version
    if [[ -z $version ]]; then
      version=$(default_version "$opt_accelerator") ||
        usage_error "no default --version for $opt_accelerator: give the TPU software version, e.g. --version=tpu-ubuntu2204-base"
    fi
    if ((opt_spot && opt_preemptible)); then usage_error "--spot and --preemptible: one or the other"; fi
    cmd=(gcloud compute tpus tpu-vm create "$opt_name" "${gcloud_common[@]}" --accelerator-type="$opt_accelerator"
      --version="$version")
    if ((opt_spot)); then cmd+=(--spot); fi
    if ((opt_preemptible)); then cmd+=(--preemptible); fi
    run "${cmd[@]}"
    ;;

  install)
    [[ -n $opt_repo ]] || usage_error "--repo must not be empty"
    [[ -n $opt_branch ]] || usage_error "--branch must not be empty"
    if [[ -d $opt_repo ]]; then
      # A local checkout: pack its HEAD and copy it to every worker.
      git -C "$opt_repo" rev-parse --verify -q HEAD >/dev/null ||
        usage_error "--repo=$opt_repo is a directory but not a git checkout with a commit"
      if [[ -n $(git -C "$opt_repo" status --porcelain --untracked-files=no) ]]; then
        warn "$opt_repo has uncommitted changes: only its committed HEAD is copied"
      fi
      archive="${TMPDIR:-/tmp}/fractal-jax-$opt_name.tar.gz"
      remote_archive="fractal-jax-src-$opt_name.tar.gz"
      run git -C "$opt_repo" archive --format=tar.gz --output="$archive" HEAD
      run gcloud compute tpus tpu-vm scp "$archive" "$opt_name:$remote_archive" "${gcloud_common[@]}" --worker=all
      fetch="mkdir -p $rdir && tar -xzf $(q "$remote_archive") -C $rdir && rm -f $(q "$remote_archive")"
    else
      if [[ $opt_repo == "$DEFAULT_REPO" ]]; then
        msg="--repo is the placeholder $DEFAULT_REPO: give the repository's URL (--repo=URL or FRACTAL_JAX_REPO), or a local checkout (--repo=.)"
        if ((opt_dry_run)); then warn "$msg"; else usage_error "$msg"; fi
      fi
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
    ;;

  train)
    require config "e.g. --config=configs/fractalmar_64.py"
    require workdir "e.g. --workdir=gs://BUCKET/fractalmar_64"
    if [[ $opt_workdir != gs://* ]]; then
      if [[ -z $opt_accelerator ]]; then
        usage_error "--workdir=$opt_workdir is not gs://...: a pod slice's hosts write one checkpoint, so a local path is allowed only with --accelerator naming a single-host type (v4-8, v5litepod-8, v6e-8, ...)"
      elif ! single_host "$opt_accelerator"; then
        usage_error "--accelerator=$opt_accelerator spans several hosts: --workdir must be gs://BUCKET/... (got $opt_workdir)"
      fi
      warn "--workdir=$opt_workdir is on the TPU VM's own disk (relative paths: under ~/$remote_dir): 'delete' deletes it"
    fi
    config_file=${opt_config%%:*}
    if [[ $config_file != /* && ! -f $SCRIPT_ROOT/$config_file ]]; then
      warn "--config=$opt_config: no $config_file in this checkout ($SCRIPT_ROOT)"
    fi
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
    script="set -eu; cd $rdir;"
    script+=" if $running; then echo \"\$(hostname): a run is going on (pid \$(cat $pidfile)): run stop first\" >&2; exit 1; fi;"
    script+=" $coordinator"
    script+=" set -- $(quote_cmd "${main[@]}");"
    script+=" printf \"=== %s %s process %s:\" \"\$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \"\$(hostname)\" \"\${JAX_PROCESS_ID:-0}\" >>$log;"
    script+=" printf \" %s\" \"\$@\" >>$log; echo >>$log;"
    script+=" nohup \"\$@\" >>$log 2>&1 </dev/null & echo \$! >$pidfile;"
    script+=" echo \"\$(hostname): started pid \$(cat $pidfile), log $(q "$remote_dir/$opt_log")\""
    tpu_ssh all "$script"
    ;;

  logs)
    [[ $opt_worker =~ ^[0-9]+$ ]] || usage_error "--worker must be a worker number (0, 1, ...)"
    [[ $opt_lines =~ ^[0-9]+$ ]] || usage_error "--lines must be a number"
    tail_cmd=(tail -n "$opt_lines")
    if ((opt_follow)); then tail_cmd+=(-F); fi
    tpu_ssh "$opt_worker" "cd $rdir && $(quote_cmd "${tail_cmd[@]}") $(q "$opt_log")"
    ;;

  stop)
    script="cd $rdir && if $running; then kill -TERM \"\$(cat $pidfile)\" &&"
    script+=" echo \"\$(hostname): sent SIGTERM to pid \$(cat $pidfile) (it checkpoints, then exits)\";"
    script+=" else echo \"\$(hostname): no run going on\"; fi"
    tpu_ssh all "$script"
    ;;

  delete)
    cmd=(gcloud compute tpus tpu-vm delete "$opt_name" "${gcloud_common[@]}")
    if ((opt_yes)); then cmd+=(--quiet); fi
    run "${cmd[@]}"
    ;;
esac
