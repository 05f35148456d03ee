#!/usr/bin/env bash
# SH-PEFT on a Cloud TPU VM or pod slice: create it, install, run on every worker, fetch results.
#
# Usage:
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup                       # copy this repo to every worker, pip install
#   launch/tpu_vm.sh mount-bucket BUCKET MOUNT   # gcsfuse-mount gs://BUCKET at MOUNT on every worker
#   launch/tpu_vm.sh push-data LOCAL_DIR REMOTE_DIR   # copy a prepared tfds dir to every worker
#   launch/tpu_vm.sh run CONFIG WORKDIR [--config.field=value ...]
#   launch/tpu_vm.sh fetch WORKDIR LOCAL_DEST    # copy the workdir back from worker 0
#   launch/tpu_vm.sh delete
#   launch/tpu_vm.sh all CONFIG WORKDIR LOCAL_DEST [--config.field=value ...]
#                                                # create + setup + run + fetch (no delete)
# Example (one v4-8 host, local workdir):
#   TPU_NAME=shpeft ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 \
#     launch/tpu_vm.sh all configs/busi.py /tmp/runs/busi ./runs/busi \
#     --config.data.data_dir=gs://my-bucket/tfds --config.model.init_checkpoint=/tmp/clip_b16
#
# Settings (environment): TPU_NAME, ZONE (required); PROJECT; ACCELERATOR_TYPE (default v4-8;
#   v4-32, v5litepod-16, ... are pod slices with several workers); RUNTIME_VERSION (default
#   tpu-ubuntu2204-base); SPOT=1 for spot capacity; REMOTE_DIR (default shpeft_jax, under each
#   worker's home); JAX_VERSION (default 0.10.2, the version the code is tested with);
#   GCLOUD (default gcloud).
#
# How it runs: `run` starts `python -m shpeft_jax.main` on all workers at once (ssh --worker=all).
#   Each worker is one JAX process; shpeft_jax.distributed detects the TPU and calls
#   jax.distributed.initialize(), which finds the other workers through the TPU metadata.
#   train.batch_size is global (all chips of all workers) and must divide by the chip count.
# Data: each worker reads its own slice of every batch from data.data_dir. Either a gs:// path
#   (tfds reads GCS directly; prepare it once with `python -m shpeft_jax.data.prepare` and
#   `gsutil -m cp -r`), or local copies on every worker (`push-data`, same path everywhere).
# Checkpoints: on a single-host VM a local WORKDIR is fine (`fetch` copies it back). On a pod
#   slice WORKDIR MUST be one directory shared by all workers (orbax writes one checkpoint from
#   all of them; process 0 writes metrics, best/, export/): mount a bucket on every worker with
#   `mount-bucket` (gcsfuse) or use a Filestore NFS share, and pass the mounted path.
#   Metrics, results.json and export/ are then also in the bucket.
set -euo pipefail

GCLOUD="${GCLOUD:-gcloud}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-shpeft_jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

need_settings() {
  if [[ -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
    echo "error: set TPU_NAME and ZONE (e.g. TPU_NAME=shpeft ZONE=us-central2-b)" >&2
    exit 2
  fi
}

tpu() {  # tpu SUBCOMMAND ARGS...: gcloud compute tpus tpu-vm with name, zone and project.
  local sub="$1"
  shift
  local project=()
  [[ -n "${PROJECT:-}" ]] && project=(--project="$PROJECT")
  "$GCLOUD" compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" "${project[@]+"${project[@]}"}"
}

on_all_workers() {  # on_all_workers 'COMMAND': runs COMMAND on every worker, in parallel.
  tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

cmd_create() {
  local extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    "${extra[@]+"${extra[@]}"}"
}

cmd_setup() {
  local archive
  archive="$(mktemp -t shpeft_src.XXXXXX).tar.gz"
  # The working tree as it is (tracked + untracked files git does not ignore).
  (cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | tar --null -czf "$archive" -T -)
  tpu scp "$archive" "$TPU_NAME:shpeft_src.tar.gz" --worker=all
  rm -f "$archive"
  on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf shpeft_src.tar.gz -C $REMOTE_DIR \
    && python3 -m venv ~/shpeft_venv && ~/shpeft_venv/bin/pip install -q -U pip \
    && ~/shpeft_venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' \
         -f https://storage.googleapis.com/jax-releases/libtpu_releases.html \
    && ~/shpeft_venv/bin/pip install -q -e $REMOTE_DIR \
    && ~/shpeft_venv/bin/python -c 'import jax, shpeft_jax; print(\"jax\", jax.__version__)'"
}

cmd_mount_bucket() {
  local bucket="${1:?mount-bucket BUCKET MOUNT}" mount="${2:?mount-bucket BUCKET MOUNT}"
  bucket="${bucket#gs://}"
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then \
      export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s); \
      echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" \
        | sudo tee /etc/apt/sources.list.d/gcsfuse.list; \
      curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -; \
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; \
    sudo mkdir -p $mount && sudo chown \$USER $mount; \
    mountpoint -q $mount || gcsfuse --implicit-dirs $bucket $mount"
}

cmd_push_data() {
  local src="${1:?push-data LOCAL_DIR REMOTE_DIR}" dest="${2:?push-data LOCAL_DIR REMOTE_DIR}"
  on_all_workers "mkdir -p $(dirname "$dest")"
  tpu scp --recurse "$src" "$TPU_NAME:$dest" --worker=all
}

cmd_run() {
  local config="${1:?run CONFIG WORKDIR [overrides]}" workdir="${2:?run CONFIG WORKDIR [overrides]}"
  shift 2
  if [[ ! -f "$config" ]]; then
    echo "error: config file $config not found" >&2
    exit 2
  fi
  # The config goes next to the repo's configs (it may `from configs import common`).
  local name
  name="launch_$(basename "$config")"
  tpu scp "$config" "$TPU_NAME:$REMOTE_DIR/configs/$name" --worker=all
  local args
  args="$(printf ' %q' "$@")"
  [[ $# -eq 0 ]] && args=""
  local main="\$HOME/shpeft_venv/bin/python -m shpeft_jax.main --config configs/$name"
  on_all_workers "set -o pipefail; cd $REMOTE_DIR && $main --workdir $(printf '%q' "$workdir")$args \
2>&1 | tee ~/shpeft_run.log"
}

cmd_fetch() {
  local workdir="${1:?fetch WORKDIR LOCAL_DEST}" dest="${2:?fetch WORKDIR LOCAL_DEST}"
  mkdir -p "$(dirname "$dest")"
  tpu scp --recurse "$TPU_NAME:$workdir" "$dest" --worker=0
}

cmd_delete() {
  tpu delete "$TPU_NAME" --quiet
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    ""|-h|--help|help) usage; [[ -z "$cmd" ]] && exit 2; exit 0 ;;
  esac
  need_settings
  case "$cmd" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    mount-bucket) cmd_mount_bucket "$@" ;;
    push-data) cmd_push_data "$@" ;;
    run) cmd_run "$@" ;;
    fetch) cmd_fetch "$@" ;;
    delete) cmd_delete ;;
    all)
      local config="${1:?all CONFIG WORKDIR LOCAL_DEST [overrides]}"
      local workdir="${2:?all CONFIG WORKDIR LOCAL_DEST [overrides]}"
      local dest="${3:?all CONFIG WORKDIR LOCAL_DEST [overrides]}"
      shift 3
      cmd_create
      cmd_setup
      cmd_run "$config" "$workdir" "$@"
      cmd_fetch "$workdir" "$dest"
      ;;
    *) echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
