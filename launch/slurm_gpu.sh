#!/usr/bin/env bash
# Multi-node GPU training of fractal-jax under SLURM: writes an sbatch script (and
# submits it with --submit). `launch/slurm_gpu.sh --help` says how.
set -euo pipefail

PROG=$0
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG --config=CONFIG --workdir=WORKDIR [options] [-- main.py flags]

Writes an sbatch script that trains fractal-jax on --nodes nodes of --gpus_per_node
GPUs: one process per node (srun, --ntasks-per-node=1), each driving all of its
node's GPUs, all of them running
  python -m fractal_jax.main --config=CONFIG --workdir=WORKDIR FLAGS...
FLAGS after '--' pass through unchanged, e.g. -- --config.train.global_batch=1024
(every field of config.train, config.model, ... is listed in fractal_jax/config.py, base_config()).
With --submit it also runs 'sbatch SCRIPT'; with --dry_run it prints the script and
the sbatch command and writes nothing.

Example:
  $PROG --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 --config=configs/fractalmar_64.py \
      --workdir=/shared/runs/fractalmar_64 --submit -- --config.data.root=/shared/imagenet --config.train.global_batch=1024

Multi-host start-up (nodes > 1): the script exports, explicitly,
  JAX_COORDINATOR_ADDRESS  the job's first node (scontrol show hostnames \$SLURM_JOB_NODELIST) and --port
  JAX_NUM_PROCESSES        \$SLURM_NTASKS
  JAX_PROCESS_ID           \$SLURM_PROCID, set inside each srun task
which fractal_jax/distributed.py passes to jax.distributed.initialize (explicit
rather than JAX's own SLURM detection: it does not depend on how srun lays out
tasks or on which SLURM variables a site exports). One node: no variables, no
jax.distributed.

The environment: the compute nodes must see this checkout ($REPO_ROOT, the job's
working directory) and a virtual environment with the GPU build of JAX:
  python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . "jax[cuda12]"
The workdir must be on a filesystem that every node sees (checkpoints are written
by all processes together): for nodes > 1 an obviously node-local path is refused
(/tmp, /var/tmp, /dev/shm, /run, /local, /localscratch, /scratch/local, \$TMPDIR).

Options (--opt=VALUE or --opt VALUE; dashes and underscores are the same):
  --config=CONFIG        config file, relative to the checkout, e.g. configs/fractalmar_64.py (required;
                         it must exist: the job runs in this checkout)
  --workdir=WORKDIR      checkpoints and metrics on a shared filesystem (or gs://...) (required)
  --nodes=N              nodes (default: 1)
  --gpus_per_node=G      GPUs per node (default: 8)
  --cpus_per_task=C      CPU cores per node's process, for the input pipeline (default: 16)
  --time=LIMIT           time limit, e.g. 24:00:00 or 2-00:00:00 (default: 24:00:00)
  --partition=P          partition (default: the cluster's default)
  --job_name=NAME        job name (default: fractal-jax)
  --output=PATTERN       log file, relative to the checkout (default: slurm-%x-%j.out)
  --port=PORT            coordinator port on the first node (default: 20000 + job id % 20000)
  --term_before=SECONDS  SIGTERM the processes this long before the time limit, so that they
                         checkpoint the current step (default: 120; 0: no such signal)
  --no_requeue           do not mark the job requeueable (default: #SBATCH --requeue, see below)
  --venv=DIR             virtual environment to activate (default: $REPO_ROOT/.venv; '' for none)
  --setup=COMMAND        a shell line run before training, e.g. --setup='module load cuda/12.4'
                         (repeatable)
  --sbatch=OPTION        another #SBATCH line, e.g. --sbatch=--account=ABC --sbatch=--exclusive
                         (repeatable)
  --script=PATH          where to write the sbatch script (default: ./JOB_NAME.sbatch)
  --submit               submit it (sbatch SCRIPT)
  --dry_run              print the script and the sbatch command; write and submit nothing
  -h, --help             this help

Preemption and restarts: the job is marked '#SBATCH --requeue' (and '--open-mode=append', so the
log keeps what came before): when SLURM preempts it (with a site's PreemptMode=REQUEUE) or a node
fails, SLURM puts it back in the queue and later runs the same script again, with the same
workdir: fractal_jax.main resumes from the newest checkpoint there. Preemption sends SIGTERM first
(the processes checkpoint the current step; the grace period is the site's), and so does the
time limit, --term_before seconds ahead; a job that reached its time limit is not requeued:
submit the same script again (sbatch SCRIPT) and it resumes the same way.

Not tested on a SLURM cluster: it was written without access to one and is tested
by --dry_run and by running the generated script with stand-in scontrol/srun
(tests/test_launch.py). Check the script with --dry_run first.
EOF
}

usage_error() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

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

quote_cmd() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

# Paths that are each node's own disk: a multi-node run's processes would not see one checkpoint.
node_local() {
  case $1 in
    /tmp | /tmp/* | /var/tmp | /var/tmp/* | /dev/shm | /dev/shm/* | /run | /run/* | /local | /local/* | \
      /localscratch | /localscratch/* | /scratch/local | /scratch/local/* | \$TMPDIR* | \$\{TMPDIR\}*)
      return 0
      ;;
  esac
  return 1
}

opt_config="" opt_workdir="" opt_nodes=1 opt_gpus_per_node=8 opt_cpus_per_task=16 opt_time=24:00:00
opt_partition="" opt_job_name=fractal-jax opt_output="slurm-%x-%j.out" opt_port=auto opt_term_before=120
opt_venv="$REPO_ROOT/.venv" opt_script=""
opt_submit=0 opt_dry_run=0 opt_no_requeue=0
setup=() sbatch_extra=() passthrough=()

while (($#)); do
  arg=$1
  shift
  case $arg in
    --)
      passthrough=("$@")
      break
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --*)
      key=${arg#--}
      key=${key%%=*}
      key=${key//-/_}
      case $key in
        submit | dry_run | no_requeue)
          [[ $arg != *=* ]] || usage_error "--$key takes no value"
          printf -v "opt_$key" '%s' 1
          ;;
        config | workdir | nodes | gpus_per_node | cpus_per_task | time | partition | job_name | output | port | \
          term_before | venv | script | setup | sbatch)
          if [[ $arg == *=* ]]; then
            value=${arg#*=}
          else
            (($#)) || usage_error "--$key needs a value"
            value=$1
            shift
          fi
          case $key in
            setup) setup+=("$value") ;;
            sbatch) sbatch_extra+=("$value") ;;
            *) printf -v "opt_$key" '%s' "$value" ;;
          esac
          ;;
        *) usage_error "unknown option: ${arg%%=*}" ;;
      esac
      ;;
    *) usage_error "unexpected argument: $arg (main.py flags go after '--')" ;;
  esac
done

[[ -n $opt_config ]] || usage_error "--config is required (e.g. --config=configs/fractalmar_64.py)"
[[ -n $opt_workdir ]] || usage_error "--workdir is required (a directory on a filesystem every node sees)"
for key in nodes gpus_per_node cpus_per_task; do
  var="opt_$key"
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] || usage_error "--$key must be a positive whole number (got '${!var}')"
done
[[ $opt_term_before =~ ^[0-9]+$ ]] || usage_error "--term_before must be a number of seconds"
[[ $opt_port == auto || $opt_port =~ ^[1-9][0-9]*$ ]] || usage_error "--port must be a port number"
[[ $opt_time =~ ^[0-9][0-9:-]*$ ]] || usage_error "--time=$opt_time: e.g. 24:00:00 or 2-00:00:00"
[[ $opt_job_name =~ ^[A-Za-z0-9_.-]+$ ]] || usage_error "--job_name: letters, digits, _ . - only"
[[ -z $opt_partition || $opt_partition =~ ^[A-Za-z0-9_.,-]+$ ]] || usage_error "--partition=$opt_partition is not a partition name"
[[ -n $opt_output && $opt_output != *[[:space:]]* ]] || usage_error "--output: a path without spaces"
for extra in "${sbatch_extra[@]}"; do
  [[ $extra == --* && $extra != *$'\n'* ]] || usage_error "--sbatch=$extra: give one sbatch option, e.g. --sbatch=--account=ABC"
done
for line in "${setup[@]}"; do
  [[ $line != *$'\n'* ]] || usage_error "--setup: one line per --setup"
done
if ((opt_nodes > 1)) && node_local "$opt_workdir"; then
  usage_error "--workdir=$opt_workdir is node-local: with --nodes=$opt_nodes every node writes one checkpoint, so it must be on a shared filesystem (or gs://...)"
fi
# The job runs in this checkout (#SBATCH --chdir): a config that is not here would end it at start-up.
config_file=${opt_config%%:*}
config_path=$config_file
if [[ $config_file != /* ]]; then config_path=$REPO_ROOT/$config_file; fi
[[ -f $config_path ]] ||
  usage_error "--config=$opt_config: no file $config_path (the job runs in $REPO_ROOT; configs/ holds e.g. configs/fractalmar_64.py)"
script_path=${opt_script:-$opt_job_name.sbatch}
main=(python -m fractal_jax.main --config="$opt_config" --workdir="$opt_workdir" "${passthrough[@]}")

generate() {
  echo "#!/bin/bash"
  echo "# fractal-jax training: $opt_nodes node(s) x $opt_gpus_per_node GPU(s). Written by launch/slurm_gpu.sh."
  echo "#SBATCH --job-name=$opt_job_name"
  echo "#SBATCH --nodes=$opt_nodes"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$opt_gpus_per_node"
  echo "#SBATCH --cpus-per-task=$opt_cpus_per_task"
  echo "#SBATCH --time=$opt_time"
  if [[ -n $opt_partition ]]; then echo "#SBATCH --partition=$opt_partition"; fi
  echo "#SBATCH --output=$opt_output"
  echo "#SBATCH --chdir=$REPO_ROOT"
  if ((opt_term_before > 0)); then echo "#SBATCH --signal=TERM@$opt_term_before"; fi
  if ((!opt_no_requeue)); then
    echo "#SBATCH --requeue"
    echo "#SBATCH --open-mode=append"
  fi
  for extra in "${sbatch_extra[@]}"; do echo "#SBATCH $extra"; done
  echo "set -euo pipefail"
  # shellcheck disable=SC2016  # expanded when the job runs
  echo 'echo "fractal-jax: job ${SLURM_JOB_ID:-} start $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"'
  echo "# A requeued or resubmitted job runs this script again and resumes from the newest checkpoint of"
  echo "# $(q "$opt_workdir")."
  for line in "${setup[@]}"; do echo "$line"; done
  if [[ -n $opt_venv ]]; then
    echo "# shellcheck disable=SC1091"
    echo ". $(q "$opt_venv/bin/activate")"
  fi
  if ((opt_nodes > 1)); then
    echo "# One process per node; fractal_jax/distributed.py hands these to jax.distributed.initialize."
    # shellcheck disable=SC2016  # expanded when the job runs
    echo 'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")'
    if [[ $opt_port == auto ]]; then
      # shellcheck disable=SC2016
      echo 'port=$((20000 + SLURM_JOB_ID % 20000))'
    else
      echo "port=$opt_port"
    fi
    # shellcheck disable=SC2016
    echo 'export JAX_COORDINATOR_ADDRESS="${nodes%%[[:space:]]*}:$port"'
    # shellcheck disable=SC2016
    echo 'export JAX_NUM_PROCESSES="$SLURM_NTASKS"'
    # shellcheck disable=SC2016
    echo 'echo "fractal-jax: $JAX_NUM_PROCESSES processes, coordinator $JAX_COORDINATOR_ADDRESS"'
    echo "# shellcheck disable=SC2016  # expanded in each srun task: its own SLURM_PROCID"
    # shellcheck disable=SC2016
    echo "srun --kill-on-bad-exit=1 bash -c 'export JAX_PROCESS_ID=\"\$SLURM_PROCID\"; exec \"\$@\"' fractal-jax $(quote_cmd "${main[@]}")"
  else
    echo "srun $(quote_cmd "${main[@]}")"
  fi
}

if ((opt_dry_run)); then
  generate
  echo "# dry run: the script above would be written to $script_path and submitted with:"
  quote_cmd sbatch "$script_path"
  echo
  exit 0
fi

mkdir -p "$(dirname "$script_path")"
generate >"$script_path"
echo "wrote $script_path"
if ((opt_submit)); then
  echo "+ $(quote_cmd sbatch "$script_path")" >&2
  sbatch "$script_path"
else
  echo "submit it with: $(quote_cmd sbatch "$script_path")"
fi
