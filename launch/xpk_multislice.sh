#!/usr/bin/env bash
# Train on K TPU slices of a GKE cluster (multislice) as one xpk workload: a JobSet with one job
# per slice, one pod per TPU host. Thin: the pods run the same `python -m tfx_jax train`.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
Train on K TPU slices of a GKE cluster (multislice) as one xpk workload.

  launch/xpk_multislice.sh --project P --zone Z --cluster C --type TYPE --slices K
                           --config FILE[:arg] --workdir gs://B/RUN [--name NAME]
                           [--base-image IMAGE] [--skip-dryrun] [--set key=value ...]
                           [--dry-run] [--help]

  --cluster     a GKE cluster with K node pools of TYPE, e.g. made by
                xpk cluster create --cluster C --tpu-type v5p-128 --num-slices 2 --spot
  --type        v4-N, v5p-N, v5litepod-N (v5e-N) or v6e-N, as for launch/tpu_queued.sh
  --slices      K: the workload's --num-slices (set mesh.data to a multiple of K, e.g.
                --set mesh.data=2, so only the gradient all-reduce crosses slices)
  --base-image  the image xpk layers the project onto (default python:3.12)
  --dry-run     print the commands instead of running them (needs neither xpk nor docker)

In order: python -m tfx_jax dryrun --topology KxTYPE here (unless --skip-dryrun); the committed
project (git archive HEAD, no virtualenvs or data caches) unpacked into a clean directory that
xpk layers onto --base-image (`--script-dir`); `xpk workload create ... --num-slices K` whose
command installs the pinned jax[tpu] and '.[tpu,gcs]' and runs
`python -m tfx_jax train --config FILE --workdir W --distributed auto` in every pod (jax finds
the slices and hosts from the environment JobSet gives each pod). The commands to check on and
to delete the workload are printed at the end (the pods' logs are in Cloud Logging). A preempted workload is restarted by JobSet
and resumes from the newest checkpoint in --workdir. Step by step: docs/TPU_POD.md.
EOF
}

PROJECT="" ZONE="" CLUSTER="" TYPE="" SLICES="" CONFIG="" WORKDIR="" NAME="" IMAGE=python:3.12
SKIP_DRYRUN=0
SETS=()
while (($#)); do
  case $1 in
    --project | --zone | --cluster | --type | --slices | --config | --workdir | --name | --base-image | --set)
      need_value "$1" $#
      case $1 in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --cluster) CLUSTER=$2 ;;
        --type) TYPE=$2 ;;
        --slices) SLICES=$2 ;;
        --config) CONFIG=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --name) NAME=$2 ;;
        --base-image) IMAGE=$2 ;;
        --set) SETS+=(--set "$2") ;;
      esac
      shift 2
      ;;
    --skip-dryrun) SKIP_DRYRUN=1 && shift ;;
    --dry-run) DRY_RUN=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die 2 "unknown argument $1 (see --help)." ;;
  esac
done

[[ -n $PROJECT ]] || die 2 "--project is missing: the Google Cloud project of the GKE cluster."
[[ -n $ZONE ]] || die 2 "--zone is missing: the zone of the cluster's TPU node pools."
[[ -n $CLUSTER ]] || die 2 "--cluster is missing: a GKE cluster with TPU node pools (xpk cluster create)."
[[ -n $TYPE ]] || die 2 "--type is missing: the slice type of the node pools, e.g. v5p-128."
[[ -n $SLICES ]] || die 2 "--slices is missing: how many slices the workload spans, e.g. 2."
[[ -n $CONFIG ]] || die 2 "--config is missing, e.g. experiments/transfusion.py:0.76b."
[[ -n $WORKDIR ]] || die 2 "--workdir is missing: a gs:// path every pod can write, e.g. gs://BUCKET/runs/x."
[[ $WORKDIR == gs://* ]] || die 2 "--workdir $WORKDIR: use a gs:// path (pods have no shared disk; a re-run resumes from it)."
tpu_slice "$TYPE" "$SLICES"
NAME=${NAME:-tfx-$(date +%m%d-%H%M%S)}
[[ $NAME =~ ^[a-z][-a-z0-9]{0,38}$ ]] || die 2 "--name $NAME: use lowercase letters, digits and '-', starting with a letter."

XPK_AT=(--cluster "$CLUSTER" --project "$PROJECT" --zone "$ZONE")
echo "# $TYPE: $CHIPS chips, $WORKERS pod(s) per slice x $SLICES slice(s) = $((WORKERS * SLICES)) pods; workload $NAME on $CLUSTER"

dryrun_first "$SKIP_DRYRUN" "$TOPO" "$CONFIG" "${SETS[@]}"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tfx_xpk.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
archive "$TMP/project.tar.gz"
run mkdir -p "$TMP/project"
run tar -xzf "$TMP/project.tar.gz" -C "$TMP/project"

TRAIN=(python -m tfx_jax train --config "$CONFIG" --workdir "$WORKDIR" --distributed auto "${SETS[@]}")
COMMAND="pip install -q \"jax[tpu]==$JAX_VERSION\" \".[tpu,gcs]\" && $(show "${TRAIN[@]}")"
run xpk workload create "${XPK_AT[@]}" --workload "$NAME" --tpu-type "$TYPE" \
  --num-slices "$SLICES" --base-docker-image "$IMAGE" --script-dir "$TMP/project" \
  --command "$COMMAND"
echo "# status:  $(show xpk workload list "${XPK_AT[@]}")"
echo "# delete:  $(show xpk workload delete "${XPK_AT[@]}" --workload "$NAME")"
