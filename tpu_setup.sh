#!/usr/bin/env bash
# tpu_setup.sh: create a Cloud TPU (a TPU VM or a queued resource), install fxjax and jax[tpu] on every
# worker, and launch `fxjax sft` or `fxjax grpo` on all workers at once. `./tpu_setup.sh --help` explains
# every subcommand, flag and environment variable; `--dry-run` prints the commands without running them.
set -euo pipefail

PROG=tpu_setup.sh
# Parsing and validation use bash builtins only: --dry-run, --help and every argument error work on a
# machine without gcloud (or git, tar, curl).
case ${BASH_SOURCE[0]} in
  */*) SCRIPT_DIR=$(cd "${BASH_SOURCE[0]%/*}" && pwd) ;;
  *) SCRIPT_DIR=$(pwd) ;;
esac

usage() {
  printf '%s\n' \
"Usage: ./$PROG SUBCOMMAND [FLAGS] [-- EXTRA fxjax ARGUMENTS]

Create a Cloud TPU slice, install this project on every worker and run fxjax training on all of them.

Subcommands:
  create     create the TPU VM (or, with --queued, the queued resource and wait until it is ACTIVE);
             an existing one of the same --name is reused
  setup      copy the project onto every worker (--source: this checkout, or a git URL to clone) and
             install it there with \`pip install -e .\` plus jax[tpu], in a virtual environment (--venv)
  launch     run \`fxjax STAGE --config CONFIG [--set KEY=VALUE ...]\` on every worker at once
  all        create, setup and launch
  status     describe the TPU (and queued resource) and print the end of each worker's log
  stop       ask the fxjax that launch started on every worker to save a checkpoint and exit (SIGTERM
             to the pid in LOG_DIR/worker-N.pid); a run still going refuses a second launch
  delete     delete the TPU VM (with --queued: the queued resource and its node)
  worker-run runs ON a worker (launch calls it there): sets the multi-host environment, runs fxjax, logs
  worker-stop runs ON a worker (stop calls it there): the SIGTERM to that worker's fxjax
  help       this text

TPU slice (flag, or the environment variable in brackets):
  --name NAME              TPU (and queued resource) name [FXJAX_TPU_NAME; default fxjax-tpu]
  --type TYPE              accelerator type [FXJAX_TPU_TYPE]: v5litepod-N or v5e-N (v5e; N chips in
                           1 4 8 16 32 64 128 256), v6e-N (same N), v5p-N / v4-N / v3-N / v2-N
                           (N TensorCores, a multiple of 8: 2 per chip, 4 chips per worker). Needed by
                           create and all. Examples: v5litepod-8 (one host), v5p-64 (8 workers), v6e-8.
  --accelerator-type TYPE  the same as --type
  --zone ZONE              Compute Engine zone, e.g. us-east5-a [FXJAX_TPU_ZONE; required]
  --project PROJECT        Google Cloud project id [FXJAX_TPU_PROJECT; required]
  --runtime-version V      TPU software version [FXJAX_TPU_RUNTIME; default by generation:
                           v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
                           v4 and older: tpu-ubuntu2204-base]
  --spot                   Spot capacity (cheaper, can be preempted) [FXJAX_TPU_SPOT=1]
  --preemptible            preemptible TPU VM (not with --queued; prefer --spot) [FXJAX_TPU_PREEMPTIBLE=1]
  --queued                 request a queued resource (gcloud compute tpus queued-resources) instead of
                           creating the TPU VM directly; create waits until it is ACTIVE [FXJAX_TPU_QUEUED=1]
  --queue-timeout SECONDS  how long create waits for the queued resource [FXJAX_TPU_QUEUE_TIMEOUT; 7200]
  --yes                    delete without gcloud's confirmation prompt

Project and install:
  --source DIR|GIT_URL     what to put on the workers [FXJAX_TPU_SOURCE; default: the checkout this
                           script is in]. A directory is packed (git-tracked and untracked, not ignored,
                           files) and copied with \`gcloud compute tpus tpu-vm scp --worker=all\`, over
                           the earlier copy (files the earlier setup shipped and this one does not are
                           removed; other files there, such as outputs, stay); a git URL is cloned on
                           every worker.
  --ref REF                branch, tag or commit of a git --source [FXJAX_TPU_REF; default HEAD]
  --remote-dir DIR         project directory on the workers, relative to the home directory unless
                           absolute [FXJAX_TPU_REMOTE_DIR; default fxjax]
  --venv DIR               virtual environment on the workers, home-relative unless absolute
                           [FXJAX_TPU_VENV; default fxjax-venv]. Created with uv (installed with pip
                           --user, with --break-system-packages where the system Python is externally
                           managed, PEP 668): the TPU images' system Python can be older than the 3.11
                           fxjax needs.
  --python VERSION         Python of that environment [FXJAX_TPU_PYTHON; default 3.12]
  --jax SPEC               the JAX requirement installed with the project [FXJAX_TPU_JAX; default
                           jax[tpu]], together with gcsfs (a gs:// FXJAX_COMPILATION_CACHE needs it)
  --constraints FILE       pip constraints for that install, relative to the project directory unless
                           absolute [FXJAX_TPU_CONSTRAINTS; default constraints.txt: the jax and flax
                           versions the suite runs on]; 'none' installs the newest (give --jax a version
                           then: --jax 'jax[tpu]==X' with --constraints none)

Training:
  --stage sft|grpo         the fxjax command to run [FXJAX_TPU_STAGE; default sft]
  --config PATH            fxjax YAML config [FXJAX_TPU_CONFIG; required by launch and all], relative to
                           the project directory on the workers (it travels with the project) or absolute
  --set KEY=VALUE          a config override passed through to fxjax (repeat for several)
  --env NAME=VALUE         an environment variable for fxjax on every worker (repeat), e.g.
                           --env LIBTPU_INIT_ARGS=... or --env XLA_FLAGS=...
  --log-dir DIR            per-worker logs, home-relative unless absolute [FXJAX_TPU_LOG_DIR; default
                           fxjax-logs]: worker N writes DIR/worker-N.log; a relaunch keeps the earlier
                           one as worker-N.log.<UTC time of its last write>
  --port PORT              port of the jax.distributed coordinator on worker 0 [FXJAX_TPU_PORT; 8482,
                           the port JAX's own Cloud TPU detection uses]
  --detach                 launch returns at once; fxjax runs on under nohup (read the logs with status)
                           [FXJAX_TPU_DETACH=1]
  -- ARGS                  everything after -- is passed to fxjax unchanged, e.g. -- --no-report

General:
  --dry-run                print every command (one per line, prefixed with '+ ', comments with '#')
                           and run nothing; gcloud need not be installed [FXJAX_TPU_DRY_RUN=1]
  -h, --help               this text

Multi-host start-up (how the TPU environment reaches JAX):
  launch runs \`bash tpu_setup.sh worker-run ...\` in the project directory of every worker at once
  (gcloud compute tpus tpu-vm ssh --worker=all). On each worker, worker-run reads two keys from the
  TPU VM's metadata server, the same two that jax.distributed's own Cloud TPU detection reads:
  agent-worker-number (this worker's id) and worker-network-endpoints (all workers, worker 0 first).
  With more than one worker it exports
      FXJAX_COORDINATOR=<worker 0's address>:PORT  FXJAX_NUM_PROCESSES=<workers>  FXJAX_PROCESS_ID=<id>
  and \`fxjax sft\` / \`fxjax grpo\` hand them to fxjax.distributed.initialize, which calls
  jax.distributed.initialize(coordinator_address, num_processes, process_id) before any JAX computation.
  (fxjax.distributed would also detect a TPU VM pod from the same metadata by itself; the explicit
  variables make the join the same on every image and name the coordinator in each worker's log.) Variables
  already set (FXJAX_NUM_PROCESSES, e.g. through --env) win over the metadata; a count given without
  FXJAX_PROCESS_ID takes this worker's number as the id. A single-host slice
  (v5litepod-8, v6e-8, v5p-8) runs one process on all its local chips and sets nothing.
  worker-run writes fxjax's output to LOG_DIR/worker-<id>.log. The fxjax command keeps compiled
  programs in ~/.cache/fxjax/xla on a TPU, so a relaunch reuses them; JAX writes them from process 0
  only, so with several workers pass --env FXJAX_COMPILATION_CACHE=DIR (a folder all workers share, or
  a gs:// bucket) for all of them to skip compiling.

  Every worker needs the model, the data and the config at the same path (copy them with
  \`gcloud compute tpus tpu-vm scp --recurse --worker=all\`, or use a shared mount), and with several
  workers train.output_dir / checkpoint.dir must be a directory all of them share (an NFS/Filestore or
  gcsfuse mount): each process writes its own shards of a checkpoint there.

Examples:
  ./$PROG all --type v5litepod-8 --zone us-west4-a --project my-proj --detach \\
      --config configs/sft.yaml --set mesh.fsdp=8 --set data.batch_size=8 --set model.scan_layers=true \\
      --set model.path=/data/Qwen2.5-VL-3B-Instruct --set 'data.train_files=[/data/train.jsonl]' \\
      --set train.steps=1000
  ./$PROG all --type v5p-64 --zone us-east5-a --project my-proj --queued --spot --detach \\
      --config configs/sft.yaml --set mesh.fsdp=32 --set data.batch_size=32 --set model.scan_layers=true \\
      --set model.path=/mnt/shared/Qwen2.5-VL-7B-Instruct --set 'data.train_files=[/mnt/shared/data/train.jsonl]' \\
      --set train.steps=1000 --set train.output_dir=/mnt/shared/runs/sft
  ./$PROG status --zone us-east5-a --project my-proj --queued
  ./$PROG delete --zone us-east5-a --project my-proj --queued
  (data.batch_size: a multiple of the chips, which split each batch; model.scan_layers: one layer compiled,
  not every layer unrolled)"
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {
  printf '# %s\n' "$*"
}

bool_env() {  # bool_env NAME VALUE: the value of a 0/1 environment variable, or a clear error
  case $2 in
    0 | 1) printf '%s' "$2" ;;
    *) die "$1=$2: use 1 (on) or 0 (off)" ;;
  esac
}

NAME=${FXJAX_TPU_NAME:-fxjax-tpu}
TYPE=${FXJAX_TPU_TYPE:-}
ZONE=${FXJAX_TPU_ZONE:-}
PROJECT=${FXJAX_TPU_PROJECT:-}
RUNTIME=${FXJAX_TPU_RUNTIME:-}
SPOT=$(bool_env FXJAX_TPU_SPOT "${FXJAX_TPU_SPOT:-0}")
PREEMPTIBLE=$(bool_env FXJAX_TPU_PREEMPTIBLE "${FXJAX_TPU_PREEMPTIBLE:-0}")
QUEUED=$(bool_env FXJAX_TPU_QUEUED "${FXJAX_TPU_QUEUED:-0}")
QUEUE_TIMEOUT=${FXJAX_TPU_QUEUE_TIMEOUT:-7200}
SOURCE=${FXJAX_TPU_SOURCE:-$SCRIPT_DIR}
REF=${FXJAX_TPU_REF:-HEAD}
REMOTE_DIR=${FXJAX_TPU_REMOTE_DIR:-fxjax}
VENV=${FXJAX_TPU_VENV:-fxjax-venv}
PYTHON_VERSION=${FXJAX_TPU_PYTHON:-3.12}
CONSTRAINTS=${FXJAX_TPU_CONSTRAINTS:-constraints.txt}
JAX_SPEC=${FXJAX_TPU_JAX:-jax[tpu]}
STAGE=${FXJAX_TPU_STAGE:-sft}
CONFIG=${FXJAX_TPU_CONFIG:-}
LOG_DIR=${FXJAX_TPU_LOG_DIR:-fxjax-logs}
PORT=${FXJAX_TPU_PORT:-8482}
DETACH=$(bool_env FXJAX_TPU_DETACH "${FXJAX_TPU_DETACH:-0}")
DRY_RUN=$(bool_env FXJAX_TPU_DRY_RUN "${FXJAX_TPU_DRY_RUN:-0}")
YES=0
HELP=0
SUBCOMMAND=
SETS=()
ENVS=()
EXTRA=()

parse_args() {
  local arg value inline
  while (($#)); do
    arg=$1
    shift
    if [[ $arg == -- ]]; then
      EXTRA=("$@")
      return
    fi
    inline=0
    value=
    if [[ $arg == --*=* ]]; then
      value=${arg#*=}
      arg=${arg%%=*}
      inline=1
    fi
    case $arg in
      --name | --type | --accelerator-type | --zone | --project | --runtime-version | --queue-timeout | \
        --source | --ref | --remote-dir | --venv | --python | --jax | --constraints | --stage | --config | --set | --env | \
        --log-dir | --port)
        if ((!inline)); then
          (($#)) || die "$arg needs a value"
          value=$1
          # A flag where the value should be is a forgotten value; --flag=--value passes one on purpose.
          [[ $value != --* ]] || die "$arg needs a value (got the flag $value; write $arg=$value if meant)"
          shift
        fi
        [[ -n $value ]] || die "$arg needs a non-empty value"
        ;;
      -*) ((!inline)) || die "$arg takes no value (got $arg=$value)" ;;
    esac
    case $arg in
      --name) NAME=$value ;;
      --type | --accelerator-type) TYPE=$value ;;
      --zone) ZONE=$value ;;
      --project) PROJECT=$value ;;
      --runtime-version) RUNTIME=$value ;;
      --queue-timeout) QUEUE_TIMEOUT=$value ;;
      --source) SOURCE=$value ;;
      --ref) REF=$value ;;
      --remote-dir) REMOTE_DIR=$value ;;
      --venv) VENV=$value ;;
      --python) PYTHON_VERSION=$value ;;
      --constraints) CONSTRAINTS=$value ;;
      --jax) JAX_SPEC=$value ;;
      --stage) STAGE=$value ;;
      --config) CONFIG=$value ;;
      --set) SETS+=("$value") ;;
      --env) ENVS+=("$value") ;;
      --log-dir) LOG_DIR=$value ;;
      --port) PORT=$value ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --queued) QUEUED=1 ;;
      --yes) YES=1 ;;
      --detach) DETACH=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) HELP=1 ;;
      -*) die "unknown flag $arg (see ./$PROG --help)" ;;
      *)
        [[ -z $SUBCOMMAND ]] || die "unexpected argument '$arg' after subcommand '$SUBCOMMAND' (fxjax arguments go after --)"
        SUBCOMMAND=$arg
        ;;
    esac
  done
}

# Accelerator type -> GCLOUD_TYPE (the name gcloud takes), GENERATION, CHIPS, WORKERS (0: decided by the
# TPU service; launch reads the real count from the metadata) and the default runtime version.
parse_type() {
  local t=$1 count
  [[ -n $t ]] || die "no accelerator type: pass --type (e.g. v5litepod-8, v5p-64, v6e-8) or set FXJAX_TPU_TYPE"
  if [[ $t =~ ^v5e-([0-9]+)$ ]]; then
    t=v5litepod-${BASH_REMATCH[1]}  # gcloud's name for v5e
  fi
  [[ $t =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$ ]] ||
    die "accelerator type '$1' is not one of v5litepod-N (or v5e-N), v6e-N, v5p-N, v4-N, v3-N, v2-N"
  GENERATION=${BASH_REMATCH[1]}
  count=${BASH_REMATCH[2]}
  GCLOUD_TYPE=$t
  case $GENERATION in
    v5litepod | v6e)
      case $count in
        1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;;
        *) die "accelerator type '$1': $GENERATION slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
      esac
      CHIPS=$count
      if ((count <= 8)); then WORKERS=1; else WORKERS=0; fi
      if [[ $GENERATION == v6e ]]; then DEFAULT_RUNTIME=v2-alpha-tpuv6e; else DEFAULT_RUNTIME=v2-alpha-tpuv5-lite; fi
      ;;
    *)
      ((count % 8 == 0)) ||
        die "accelerator type '$1': $GENERATION-N counts TensorCores (2 per chip, 4 chips per worker), so N is a multiple of 8"
      CHIPS=$((count / 2))
      WORKERS=$((count / 8))
      if [[ $GENERATION == v5p ]]; then DEFAULT_RUNTIME=v2-alpha-tpuv5; else DEFAULT_RUNTIME=tpu-ubuntu2204-base; fi
      ;;
  esac
}

is_git_url() {
  [[ $1 =~ ^(https?|ssh|git|file)://|^git@|\.git$ ]]
}

validate() {
  case $SUBCOMMAND in
    create | setup | launch | all | status | stop | delete | worker-run | worker-stop) ;;
    "") die "no subcommand: use create, setup, launch, all, status, stop or delete (see ./$PROG --help)" ;;
    *) die "unknown subcommand '$SUBCOMMAND': use create, setup, launch, all, status, stop or delete" ;;
  esac
  if [[ ! $PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((PORT > 65535)); then die "--port $PORT is not a port number (1-65535)"; fi
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $kv: expected NAME=VALUE"
  done
  if [[ $SUBCOMMAND == worker-run ]]; then
    ((${#EXTRA[@]})) || die "worker-run needs the fxjax arguments after --"
    return
  fi
  [[ $SUBCOMMAND == worker-stop ]] && return
  [[ -n $ZONE ]] || die "no zone: pass --zone (e.g. us-east5-a) or set FXJAX_TPU_ZONE"
  [[ -n $PROJECT ]] || die "no project: pass --project or set FXJAX_TPU_PROJECT"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name $NAME: lower-case letters, digits and hyphens, starting with a letter"
  if [[ $SUBCOMMAND == create || $SUBCOMMAND == all || -n $TYPE ]]; then
    parse_type "$TYPE"
    RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}
  fi
  if ((SPOT && PREEMPTIBLE)); then die "--spot and --preemptible exclude each other"; fi
  if ((QUEUED && PREEMPTIBLE)); then die "--preemptible is for TPU VMs; a queued resource takes --spot"; fi
  [[ $QUEUE_TIMEOUT =~ ^[0-9]+$ ]] || die "--queue-timeout $QUEUE_TIMEOUT is not a number of seconds"
  if [[ $SUBCOMMAND == setup || $SUBCOMMAND == all ]]; then
    if [[ -d $SOURCE ]]; then
      [[ -f $SOURCE/pyproject.toml ]] || die "--source $SOURCE has no pyproject.toml: give the fxjax checkout"
    elif ! is_git_url "$SOURCE"; then
      die "--source $SOURCE is neither a directory nor a git URL"
    fi
  fi
  if [[ $SUBCOMMAND == launch || $SUBCOMMAND == all ]]; then
    [[ $STAGE == sft || $STAGE == grpo ]] || die "--stage $STAGE: use sft or grpo"
    [[ -n $CONFIG ]] ||
      die "$SUBCOMMAND needs --config (an fxjax $STAGE YAML, e.g. configs/$STAGE.yaml) or FXJAX_TPU_CONFIG"
    if [[ -d $SOURCE && $CONFIG != /* && ! -f $SOURCE/$CONFIG ]]; then
      die "--config $CONFIG: no such file in $SOURCE (the path is relative to the project directory)"
    fi
    # setup ships a checkout's tracked and not-ignored files only (pack_local_source): an ignored config
    # (out/, runs/, fxjax-demo/) would be found here and missing on every worker
    if [[ -d $SOURCE && -e $SOURCE/.git && $CONFIG != /* ]] && git -C "$SOURCE" check-ignore -q -- "$CONFIG"; then
      die "--config $CONFIG: git ignores it in $SOURCE, so setup does not ship it to the workers; move it out of the ignored folder (e.g. under configs/)"
    fi
  fi
  for kv in ${SETS[@]+"${SETS[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_.-]*= ]] || die "--set $kv: expected KEY=VALUE with a dotted config KEY"
  done
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud (the Google Cloud CLI) is not on PATH: install it (https://cloud.google.com/sdk/docs/install), run 'gcloud auth login', or pass --dry-run to print the commands"
  fi
}

q() {  # one shell word: as it is when it holds no special character, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {  # show CMD ARGS...: one line '+ CMD ARGS' that a shell reads back as the same words
  local word
  printf '+'
  for word in "$@"; do
    if [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      printf ' %s%s' "${BASH_REMATCH[1]}" "$(q "${BASH_REMATCH[2]}")"
    else
      printf ' %s' "$(q "$word")"
    fi
  done
  printf '\n'
}

run() {  # run CMD ARGS...: show it and, unless --dry-run, run it
  show "$@"
  if ((!DRY_RUN)); then
    "$@"
  fi
}

remote_path() {  # a worker path: absolute as given, else relative to the home directory (ssh starts there)
  if [[ $1 == /* ]]; then q "$1"; else printf './%s' "$(q "$1")"; fi
}

gc_where() {
  WHERE=(--zone="$ZONE" --project="$PROJECT")
}

on_all_workers() {  # on_all_workers COMMAND-LINE: run a shell command line on every worker at once
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

describe_slice() {
  local chips="$CHIPS chip(s)"
  # v2 and v3 show JAX one device per TensorCore (v4 and v5p one per chip: megacore), which sizes mesh.*
  if [[ $GENERATION == v2 || $GENERATION == v3 ]]; then chips+=" ($((CHIPS * 2)) JAX devices, one per TensorCore)"; fi
  if ((WORKERS == 1)); then
    note "$GCLOUD_TYPE: $chips on 1 worker (single host); runtime $RUNTIME"
  elif ((WORKERS > 1)); then
    note "$GCLOUD_TYPE: $chips on $WORKERS workers (multi-host); runtime $RUNTIME"
  else
    note "$GCLOUD_TYPE: $chips on several workers (launch reads the count from the TPU metadata); runtime $RUNTIME"
  fi
}

do_create() {
  describe_slice
  local capacity=() state out
  ((SPOT)) && capacity+=(--spot)
  ((PREEMPTIBLE)) && capacity+=(--preemptible)
  if ((QUEUED)); then
    local describe=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format='value(state.state)')
    local create=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${WHERE[@]}"
      --accelerator-type="$GCLOUD_TYPE" --runtime-version="$RUNTIME" ${capacity[@]+"${capacity[@]}"})
  else
    local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" --format='value(state,acceleratorType)')
    local create=(gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}"
      --accelerator-type="$GCLOUD_TYPE" --version="$RUNTIME" ${capacity[@]+"${capacity[@]}"})
  fi
  if ((DRY_RUN)); then
    run "${describe[@]}"
    note "the create below runs only when the describe above finds no $NAME (an existing one is reused)"
    run "${create[@]}"
  else
    show "${describe[@]}"
    if out=$("${describe[@]}" 2>/dev/null); then
      if ((!QUEUED)); then
        local existing_type existing_state
        # state first: it is always set, while acceleratorType is empty for a TPU made with --type/--topology
        read -r existing_state existing_type <<<"$out"
        existing_type=${existing_type##*/}
        if [[ -n $existing_type && $existing_type != "$GCLOUD_TYPE" ]]; then
          die "TPU $NAME exists with accelerator type $existing_type, not $GCLOUD_TYPE: delete it or pick another --name"
        fi
        case ${existing_state:-READY} in
          READY) ;;
          *) die "TPU $NAME exists but is ${existing_state}: delete it (./$PROG delete) and create it again" ;;
        esac
      fi
      note "reusing the existing $NAME ($out)"
    else
      run "${create[@]}"
    fi
  fi
  if ((QUEUED)); then
    if ((DRY_RUN)); then
      run "${describe[@]}"
      note "(repeated every 30 s until the state is ACTIVE, for at most $QUEUE_TIMEOUT s)"
      return
    fi
    local start=$SECONDS failures=0 err errors
    # (made by mktemp, kept through the loop and removed at each way out: not a name another user could
    # plant a link at in a shared TMPDIR)
    errors=$(mktemp "${TMPDIR:-/tmp}/fxjax-tpu-describe.XXXXXX")
    while :; do
      # a passing API error must not end an hours-long wait: retried, up to 5 failures in a row
      if ! state=$("${describe[@]}" 2>"$errors"); then
        err=$(tail -n 1 "$errors")
        ((++failures < 5)) || { rm -f "$errors"; die "describing queued resource $NAME failed 5 times in a row: $err"; }
        state="unknown (describe failed: $err)"
      else
        failures=0
      fi
      [[ $state == ACTIVE || $state == FAILED || $state == SUSPENDED || $state == SUSPENDING ]] && rm -f "$errors"
      case $state in
        ACTIVE) note "queued resource $NAME is ACTIVE"; break ;;
        FAILED | SUSPENDED | SUSPENDING) die "queued resource $NAME is $state: see gcloud compute tpus" \
          "queued-resources describe $NAME (a Spot one preempted is SUSPENDED: './$PROG delete' it, then" \
          "'./$PROG all' again; a run resumes from the checkpoints in its shared train.output_dir)" ;;
      esac
      ((SECONDS - start < QUEUE_TIMEOUT)) || { rm -f "$errors"
        die "queued resource $NAME is still $state after $QUEUE_TIMEOUT s (it stays queued; rerun create to wait again)"; }
      note "queued resource $NAME: $state; waiting"
      sleep 30
    done
  fi
}

pack_local_source() {  # pack_local_source TARBALL: the checkout's files, without ignored ones (.venv, runs/)
  local tarball=$1
  if [[ -e $SOURCE/.git ]]; then
    printf '+ git -C %s ls-files -z --cached --others --exclude-standard | (existing files) | tar -C %s --null -T - -czf %s\n' \
      "$(q "$SOURCE")" "$(q "$SOURCE")" "$(q "$tarball")"
    ((DRY_RUN)) && return
    local file
    git -C "$SOURCE" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        # Tracked files deleted in the working tree are skipped: the workers get what is on disk.
        if [[ -e $SOURCE/$file ]]; then printf '%s\0' "$file"; fi
      done |
      tar -C "$SOURCE" --null -T - -czf "$tarball"
  else
    run tar -C "$SOURCE" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' -czf "$tarball" .
  fi
}

do_setup() {
  local dir venv pins="" check=""
  dir=$(remote_path "$REMOTE_DIR")
  venv=$(remote_path "$VENV")
  if [[ $CONSTRAINTS != none ]]; then
    local file
    if [[ $CONSTRAINTS == /* ]]; then file=$(q "$CONSTRAINTS"); else file=$dir/$(q "$CONSTRAINTS"); fi
    # (a checkout from before constraints.txt has none: said, not a bare uv error)
    pins=" -c $file"
    # ($file is one quoted shell word: outside the message's double quotes, where its quoting holds)
    check="{ test -f $file || { echo \"tpu_setup.sh: no constraints file \"$file\" on this worker (a checkout older than constraints.txt?): give --constraints none or a file\" >&2; false; }; } && "
  fi
  if [[ -d $SOURCE ]]; then
    local tmp
    if ((DRY_RUN)); then tmp=${TMPDIR:-/tmp}/fxjax-src.XXXXXX; else tmp=$(mktemp -d); fi
    pack_local_source "$tmp/fxjax-src.tgz"
    run gcloud compute tpus tpu-vm scp "$tmp/fxjax-src.tgz" "$NAME:fxjax-src.tgz" "${WHERE[@]}" --worker=all
    ((DRY_RUN)) || rm -rf "$tmp"
    # Unpacked over what is there, so outputs under the project directory (runs/) survive a new setup; the
    # files an earlier setup shipped that this one does not (a module deleted or renamed here) are removed
    # first, by the list each setup leaves in .fxjax-files, or the workers would import stale code (a copy
    # made before that list existed has none: nothing is removed from it).
    on_all_workers "mkdir -p $dir && tar -tzf fxjax-src.tgz | LC_ALL=C sort >$dir/.fxjax-files.new && { test ! -f $dir/.fxjax-files || LC_ALL=C comm -23 $dir/.fxjax-files $dir/.fxjax-files.new | while IFS= read -r f; do test -d $dir/\"\$f\" || rm -f -- $dir/\"\$f\"; done; } && tar -xzf fxjax-src.tgz -C $dir && mv $dir/.fxjax-files.new $dir/.fxjax-files && rm -f fxjax-src.tgz"
  else
    on_all_workers "{ test -d $dir/.git || git clone $(q "$SOURCE") $dir; } && git -C $dir fetch origin $(q "$REF") && git -C $dir checkout --detach FETCH_HEAD"
  fi
  # uv into the user's site; a system Python that marks itself externally managed (PEP 668, Ubuntu 24.04
  # and later) refuses even --user installs until told, and ~/.local is the user's, not the system's.
  on_all_workers "{ python3 -m pip install --user --upgrade uv || python3 -m pip install --user --break-system-packages --upgrade uv; } && { test -x $venv/bin/python || python3 -m uv venv --python $(q "$PYTHON_VERSION") $venv; } && ${check}python3 -m uv pip install --python $venv/bin/python -e $dir $(q "$JAX_SPEC") gcsfs$pins && $venv/bin/python -c 'import jax, flax, fxjax.train.step; print(jax.__version__, flax.__version__)'"
}

do_launch() {
  local cmd kv
  cmd="cd $(remote_path "$REMOTE_DIR") && bash tpu_setup.sh worker-run --venv $(q "$VENV") --log-dir $(q "$LOG_DIR") --port $PORT"
  ((DETACH)) && cmd+=" --detach"
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do cmd+=" --env $(q "$kv")"; done
  cmd+=" -- $STAGE --config $(q "$CONFIG")"
  for kv in ${SETS[@]+"${SETS[@]}"}; do cmd+=" --set $(q "$kv")"; done
  for kv in ${EXTRA[@]+"${EXTRA[@]}"}; do cmd+=" $(q "$kv")"; done
  on_all_workers "$cmd"
}

do_status() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}"
  fi
  run gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}"
  on_all_workers "tail -n 20 $(remote_path "$LOG_DIR")/worker-*.log 2>/dev/null || echo 'no fxjax log on this worker yet'"
}

do_stop() {
  on_all_workers "cd $(remote_path "$REMOTE_DIR") && bash tpu_setup.sh worker-stop --log-dir $(q "$LOG_DIR")"
}

do_delete() {
  local quiet=()
  ((YES)) && quiet=(--quiet)
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force ${quiet[@]+"${quiet[@]}"}
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" ${quiet[@]+"${quiet[@]}"}
  fi
}

tpu_metadata() {  # tpu_metadata KEY: an attribute of this TPU VM from the metadata server
  curl -sSf -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" ||
    die "could not read '$1' from the TPU VM metadata server (is this a Cloud TPU worker?)"
}

LOG_SHOWN=0  # bytes of the worker's log shown so far (show_new_log)
show_new_log() {  # show_new_log FILE: print FILE's bytes after LOG_SHOWN, and move LOG_SHOWN to its end
  local size
  size=$(stat -c %s -- "$1" 2>/dev/null) || return 0
  if ((size > LOG_SHOWN)); then
    tail -c +"$((LOG_SHOWN + 1))" -- "$1" | head -c "$((size - LOG_SHOWN))"
    LOG_SHOWN=$size
  fi
}

coordinator_of() {  # coordinator_of ENDPOINTS: worker 0's address and PORT, from worker-network-endpoints
  local first=${1%%,*}  # (worker 0 comes first; an entry is a hostname, newer images, or name:id:ip, older)
  printf '%s:%s\n' "${first##*:}" "$PORT"
}

running_fxjax() {  # running_fxjax PIDFILE: print the pid it holds and succeed if that process is an fxjax
  local pid
  [[ -r $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # (the pid of a run long gone may belong to another process by now)
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q fxjax || return 1
  printf '%s\n' "$pid"
}

do_worker_stop() {
  [[ $LOG_DIR == /* ]] || LOG_DIR=$HOME/$LOG_DIR
  local pidfile pid found=0
  for pidfile in "$LOG_DIR"/worker-*.pid; do
    [[ -e $pidfile ]] || continue
    if pid=$(running_fxjax "$pidfile"); then
      kill -TERM "$pid"
      found=1
      printf '%s: sent SIGTERM to fxjax (pid %s): it saves a checkpoint and exits (its log: %s)\n' \
        "${pidfile##*/}" "$pid" "${pidfile%.pid}.log"
    fi
  done
  ((found)) || printf 'no fxjax running from %s on this worker\n' "$LOG_DIR"
}

do_worker_run() {
  [[ $VENV == /* ]] || VENV=$HOME/$VENV
  [[ $LOG_DIR == /* ]] || LOG_DIR=$HOME/$LOG_DIR
  [[ -x $VENV/bin/fxjax ]] || die "$VENV/bin/fxjax not found: run './$PROG setup' first"
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do export "${kv?}"; done
  local worker_id=${FXJAX_PROCESS_ID:-0}
  if [[ -z ${FXJAX_NUM_PROCESSES:-} ]]; then
    local endpoints hosts=()
    worker_id=$(tpu_metadata agent-worker-number)
    endpoints=$(tpu_metadata worker-network-endpoints)
    IFS=, read -r -a hosts <<<"$endpoints"
    if ((${#hosts[@]} > 1)); then
      FXJAX_COORDINATOR=$(coordinator_of "$endpoints")
      export FXJAX_COORDINATOR
      export FXJAX_NUM_PROCESSES=${#hosts[@]}
      export FXJAX_PROCESS_ID=$worker_id
    fi
  elif [[ -z ${FXJAX_PROCESS_ID:-} ]]; then
    # the process count given (--env) without an id: fxjax needs both (a count alone is an error there), so
    # the id is this worker's number; the log is named after it (not worker-0 on every host)
    worker_id=$(tpu_metadata agent-worker-number 2>/dev/null) ||
      die "--env FXJAX_NUM_PROCESSES=$FXJAX_NUM_PROCESSES without FXJAX_PROCESS_ID, and no TPU VM metadata" \
        "server to read this worker's number from: pass --env FXJAX_PROCESS_ID=N too"
    export FXJAX_PROCESS_ID=$worker_id
  fi
  if [[ -n ${FXJAX_NUM_PROCESSES:-} && $FXJAX_NUM_PROCESSES != 1 && -z ${FXJAX_COORDINATOR:-} &&
    -z ${JAX_COORDINATOR_ADDRESS:-} ]]; then
    # a count given without a coordinator (fxjax stopped with "need coordinator_address"): worker 0's, as above
    local endpoints
    endpoints=$(tpu_metadata worker-network-endpoints 2>/dev/null) ||
      die "--env FXJAX_NUM_PROCESSES=$FXJAX_NUM_PROCESSES without FXJAX_COORDINATOR, and no TPU VM metadata" \
        "server to read worker 0's address from: pass --env FXJAX_COORDINATOR=HOST:PORT too"
    FXJAX_COORDINATOR=$(coordinator_of "$endpoints")
    export FXJAX_COORDINATOR
  fi
  mkdir -p "$LOG_DIR"
  local log=$LOG_DIR/worker-$worker_id.log pidfile=$LOG_DIR/worker-$worker_id.pid running
  if running=$(running_fxjax "$pidfile"); then
    # a second fxjax would rename the live log and meet the first at the coordinator's port
    die "worker $worker_id: the fxjax launched before (pid $running, log $log) is still running: stop it" \
      "first (./$PROG stop: it saves a checkpoint and exits) or wait for it to end"
  fi
  if [[ -e $log ]]; then
    # a relaunch keeps the earlier run's log, named after its last write (status tails worker-*.log only)
    local stamp kept k=1
    stamp=$log.$(date -u -r "$log" +%Y%m%dT%H%M%SZ)
    kept=$stamp
    while [[ -e $kept ]]; do k=$((k + 1)) && kept=$stamp.$k; done
    mv -- "$log" "$kept"
    printf 'worker %s: the earlier log is kept as %s\n' "$worker_id" "$kept"
  fi
  printf 'worker %s: %s process(es), coordinator %s; fxjax %s; log %s\n' "$worker_id" \
    "${FXJAX_NUM_PROCESSES:-1}" "${FXJAX_COORDINATOR:-none}" "${EXTRA[*]}" "$log"
  if ((DETACH)); then
    nohup "$VENV/bin/fxjax" "${EXTRA[@]}" >"$log" 2>&1 </dev/null &
    printf '%s\n' "$!" >"$pidfile"
    printf 'worker %s: started, pid %s\n' "$worker_id" "$!"
  else
    # fxjax writes the log itself, not through a pipe to tee: when the connection dropped, tee went with it
    # and fxjax's next line (a broken pipe) ended the run without a checkpoint. The log is shown while the
    # run lasts; a hang-up, interrupt or termination of this script asks fxjax to save and stop (SIGTERM),
    # and a connection gone without a signal leaves the run going (its log stays in LOG_DIR).
    "$VENV/bin/fxjax" "${EXTRA[@]}" >"$log" 2>&1 </dev/null &
    local pid=$! rc=0
    printf '%s\n' "$pid" >"$pidfile"  # (stop finds it; a launch beside it is refused)
    LOG_SHOWN=0
    trap 'kill -TERM "$pid" 2>/dev/null || true' HUP INT TERM PIPE
    # The log as it grows, by byte offset, in short steps (a trap runs between them); then what is left
    # once fxjax has exited. (`tail -f --pid` lost the last lines of a run that ended within its first poll.)
    while kill -0 "$pid" 2>/dev/null; do
      show_new_log "$log"
      sleep 0.5
    done
    while :; do
      rc=0
      wait "$pid" || rc=$?
      kill -0 "$pid" 2>/dev/null || break  # (a trapped signal ends a wait early: wait again until it exits)
    done
    show_new_log "$log"
    trap - HUP INT TERM PIPE
    rm -f -- "$pidfile"
    return "$rc"
  fi
}

main() {
  parse_args "$@"
  if ((HELP)) || [[ $SUBCOMMAND == help ]]; then
    usage
    return 0
  fi
  validate
  if [[ $SUBCOMMAND == worker-run ]]; then
    do_worker_run
    return
  fi
  if [[ $SUBCOMMAND == worker-stop ]]; then
    do_worker_stop
    return
  fi
  gc_where
  case $SUBCOMMAND in
    create) do_create ;;
    setup) do_setup ;;
    launch) do_launch ;;
    all)
      # Separate statements, not a && chain: inside one, set -e would not stop at a failing command.
      do_create
      do_setup
      do_launch
      ;;
    status) do_status ;;
    stop) do_stop ;;
    delete) do_delete ;;
  esac
}

main "$@"
