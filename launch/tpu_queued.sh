#!/usr/bin/env bash
# Train on a Cloud TPU slice (or K slices: multislice) made through queued resources, then
# delete it. Thin: it sets up machines and runs the same `python -m tfx_jax train` a laptop runs.
set -euo pipefail

REMOTE_DIR=tfx_jax # under the worker's home
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
Train on a Cloud TPU slice made through queued resources, then delete it.

  launch/tpu_queued.sh --project P --zone Z --type TYPE --config FILE[:arg] --workdir gs://B/RUN
                       [--command train|data|vae] [--name NAME] [--slices K] [--spot]
                       [--runtime-version V] [--skip-dryrun] [--keep] [--set key=value ...]
                       [--dry-run] [--help]

  --type     v4-N, v5p-N (N TensorCores: v5p-128 = 64 chips), v5litepod-N or v5e-N, v6e-N
             (N chips)
  --slices   K > 1: multislice, K identical slices joined over the data-centre network
             (set mesh.data to a multiple of K, e.g. --set mesh.data=2, so only the
             gradient all-reduce crosses slices)
  --workdir  a gs:// path: every worker writes checkpoints and logs there, and a re-run
             resumes from it
  --command  train (default); data: `python -m tfx_jax data all` (the encode shards are
             shared out over the workers); vae: `python -m tfx_jax vae` (on the mesh). Both
             write under data.data_dir, which must then be gs:// (--set data.data_dir=gs://...);
             they take no --workdir and skip the dry run
  --dry-run  print every command instead of running it (needs no gcloud)

In order:
  1. python -m tfx_jax dryrun --config FILE --topology [Kx]TYPE here (unless --skip-dryrun):
     the step must compile for the slice and fit its HBM (pip install '.[tpu]' here);
  2. git archive HEAD: the committed project, without virtualenvs or data caches;
  3. gcloud compute tpus queued-resources create (--node-id, or --node-count K), wait for ACTIVE;
  4. copy the archive to every worker; each makes a Python 3.12 venv with the pinned
     jax[tpu] and '.[tpu,gcs]';
  5. start `python -m tfx_jax train --config FILE --workdir W --distributed auto` (or the
     --command) on every worker (detached: a dropped ssh does not stop it) and stream worker
     0's log here;
  6. delete the queued resource and its slices on exit, however it exits (--keep: leave them).
Preempted (Spot) or interrupted: run the same command again; training resumes from the newest
checkpoint in --workdir. Step by step: docs/TPU_POD.md.
EOF
}

PROJECT="" ZONE="" TYPE="" CONFIG="" WORKDIR="" NAME="" SLICES=1 SPOT=0 RUNTIME="" COMMAND=train
SKIP_DRYRUN=0 KEEP=0
SETS=()
while (($#)); do
  case $1 in
    --project | --zone | --type | --config | --workdir | --command | --name | --slices | --runtime-version | --set)
      need_value "$1" $#
      case $1 in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --type) TYPE=$2 ;;
        --config) CONFIG=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --command) COMMAND=$2 ;;
        --name) NAME=$2 ;;
        --slices) SLICES=$2 ;;
        --runtime-version) RUNTIME=$2 ;;
        --set) SETS+=(--set "$2") ;;
      esac
      shift 2
      ;;
    --spot) SPOT=1 && shift ;;
    --skip-dryrun) SKIP_DRYRUN=1 && shift ;;
    --keep) KEEP=1 && shift ;;
    --dry-run) DRY_RUN=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die 2 "unknown argument $1 (see --help)." ;;
  esac
done

[[ -n $PROJECT ]] || die 2 "--project is missing: the Google Cloud project to create the TPU in."
[[ -n $ZONE ]] || die 2 "--zone is missing: a zone with capacity for --type, e.g. us-east5-a for v5p."
[[ -n $TYPE ]] || die 2 "--type is missing: the slice, e.g. v5p-128 (v4-N, v5p-N, v5litepod-N, v6e-N)."
[[ -n $CONFIG ]] || die 2 "--config is missing, e.g. experiments/transfusion.py:0.76b."
case $COMMAND in
  train)
    [[ -n $WORKDIR ]] || die 2 "--workdir is missing: a gs:// path every worker can write, e.g. gs://BUCKET/runs/x."
    [[ $WORKDIR == gs://* ]] || die 2 "--workdir $WORKDIR: use a gs:// path (every worker writes there; a local path is per worker and lost with the slice)."
    TFX=(train --config "$CONFIG" --workdir "$WORKDIR")
    ;;
  data | vae)
    [[ -z $WORKDIR ]] || die 2 "--command $COMMAND takes no --workdir: it writes under data.data_dir (--set data.data_dir=gs://...)."
    [[ " ${SETS[*]} " == *" data.data_dir=gs://"* ]] ||
      echo "# note: --command $COMMAND writes under data.data_dir; unless the config's is gs://, pass --set data.data_dir=gs://..." >&2
    TFX=(data all --config "$CONFIG")
    [[ $COMMAND == vae ]] && TFX=(vae --config "$CONFIG")
    SKIP_DRYRUN=1 # nothing to compile ahead: the dry run is of the train step
    ;;
  *) die 2 "--command $COMMAND: use train, data or vae." ;;
esac
tpu_slice "$TYPE" "$SLICES"
RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}
NAME=${NAME:-tfx-$(date +%Y%m%d-%H%M%S)}
[[ $NAME =~ ^[a-z][-a-z0-9]{0,40}$ ]] || die 2 "--name $NAME: use lowercase letters, digits and '-', starting with a letter."

GCLOUD=(gcloud compute tpus queued-resources)
WHERE=(--project "$PROJECT" --zone "$ZONE")
EVERYWHERE=(--worker=all --node=all)

echo "# $TYPE: $CHIPS chips, $WORKERS worker(s) per slice x $SLICES slice(s) = $((WORKERS * SLICES)) workers; runtime $RUNTIME; queued resource $NAME"

# 1. Compile for the slice here first: a config that does not fit fails in minutes, not after
#    the queue.
dryrun_first "$SKIP_DRYRUN" "$TOPO" "$CONFIG" "${SETS[@]}"

# 2. The committed project only (no .venv, data_cache/ or runs/), and the command every
#    worker runs, as a script (no quoting through ssh).
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tfx_launch.XXXXXX")
ARCHIVE=$TMP/$REMOTE_DIR.tar.gz
archive "$ARCHIVE"
TRAIN=(.venv/bin/python -m tfx_jax "${TFX[@]}" --distributed auto "${SETS[@]}")
JOB=$TMP/tfx_train.sh
cat >"$JOB" <<EOF
#!/usr/bin/env bash
# Made by launch/tpu_queued.sh for $NAME: the same command on every worker.
cd ~/$REMOTE_DIR || exit 1
rm -f train.exit
echo \$\$ >train.pid
$(show "${TRAIN[@]}") >train.log 2>&1
echo \$? >train.exit
EOF
if ((DRY_RUN)); then
  echo "# $JOB (run on every worker):"
  sed 's/^/#   /' "$JOB"
fi
SETUP="set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/$REMOTE_DIR.tar.gz -C ~/$REMOTE_DIR; mv ~/tfx_train.sh ~/$REMOTE_DIR/; cd ~/$REMOTE_DIR"
SETUP+="; python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv"
SETUP+="; ~/.local/bin/uv venv -q --python $PYTHON_VERSION .venv"
SETUP+="; ~/.local/bin/uv pip install -q --python .venv/bin/python \"jax[tpu]==$JAX_VERSION\" \".[tpu,gcs]\""
START="cd ~/$REMOTE_DIR && setsid nohup bash tfx_train.sh >/dev/null 2>&1 </dev/null &"
FOLLOW="cd ~/$REMOTE_DIR; while [ ! -s train.pid ]; do sleep 1; done; tail -n +1 -F --pid=\"\$(cat train.pid)\" train.log; exit \"\$(cat train.exit 2>/dev/null || echo 1)\""

CREATED=0
cleanup() {
  local rc=$?
  if ((!CREATED)); then
    :
  elif ((KEEP)); then
    echo "# --keep: $NAME is still there; delete it with: $(show "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --force --quiet)"
  else
    run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --force --quiet || rc=1
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 3. Ask for the slice(s) and wait in the queue.
CREATE=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" --runtime-version "$RUNTIME")
if ((SLICES > 1)); then
  CREATE+=(--node-count "$SLICES" --node-prefix "$NAME")
else
  CREATE+=(--node-id "$NAME")
fi
if ((SPOT)); then CREATE+=(--spot); fi
run "${CREATE[@]}"
CREATED=1
STATE=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state.state)')
if ((DRY_RUN)); then
  echo "+ $(show "${STATE[@]}")  # every 30 s until ACTIVE"
else
  while :; do
    state=$("${STATE[@]}")
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDING | SUSPENDED) die 1 "queued resource $NAME is $state: see '$(show "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}")'." ;;
      *) echo "# $NAME: $state" && sleep 30 ;;
    esac
  done
fi

# 4. The project and a pinned environment on every worker of every slice.
run "${GCLOUD[@]}" scp "$ARCHIVE" "$JOB" "$NAME:" "${WHERE[@]}" "${EVERYWHERE[@]}"
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" "${EVERYWHERE[@]}" --command "$SETUP"

# 5. Start everywhere, follow worker 0 (process 0 logs the losses). A dropped connection (ssh
#    exit 255) reconnects while the slice is up; otherwise the exit status is the training's.
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" "${EVERYWHERE[@]}" --command "$START"
if ((DRY_RUN)); then
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --node=0 --command "$FOLLOW"
  exit 0
fi
while :; do
  rc=0
  "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --node=0 --command "$FOLLOW" || rc=$?
  ((rc == 255)) || exit "$rc"
  state=$("${STATE[@]}" || echo unknown)
  [[ $state == ACTIVE ]] ||
    die 3 "queued resource $NAME is $state (preempted?): run the same command again to resume from $WORKDIR."
  echo "# ssh to $NAME dropped; reconnecting" >&2
  FOLLOW=${FOLLOW/tail -n +1/tail -n 20}
done
