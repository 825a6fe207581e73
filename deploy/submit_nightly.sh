#!/usr/bin/env bash
# Submit the nightly incremental reprocessing (jobs.reprocess) to a running Ray cluster.
#
#   RAY_ADDRESS=http://ray-head:8265 \
#   INPUT_URI=s3://my-bucket/images/ WAREHOUSE=s3://my-bucket/warehouse \
#   CATALOG_URI=sqlite:////var/lib/u2net/catalog.db WEIGHTS_URI=s3://my-bucket/models/u2net.pth \
#   deploy/submit_nightly.sh [extra jobs.reprocess flags, e.g. --full]
#
# The checkout is shipped as the job's working_dir, so the cluster runs this exact code; the
# cluster image must already hold the dependencies (deploy/Dockerfile builds one). Waits for the
# job and exits non-zero when it fails (`ray job submit` tails the logs until the job exits).
#
# Credentials: the job's driver and workers need S3 access. Prefer cluster-side credentials
# (IAM roles for service accounts, instance roles, a Secret in the pod spec). FORWARD_AWS_ENV=1
# copies this shell's AWS_* variables into runtime_env.env_vars instead; they are then visible
# to anyone who can read the job's info on the Ray dashboard.
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://ray-head:8265}"
: "${INPUT_URI:?set INPUT_URI to the images prefix (s3://bucket/images/)}"
: "${WAREHOUSE:?set WAREHOUSE to the Iceberg warehouse (s3://bucket/warehouse)}"
: "${CATALOG_URI:?set CATALOG_URI (sqlite:////path/on/the/head/catalog.db, a REST URL, ...)}"
: "${WEIGHTS_URI:?set WEIGHTS_URI to the U²-Net weights (.pth)}"
MODEL="${MODEL:-u2net}"
FORWARD_AWS_ENV="${FORWARD_AWS_ENV:-0}"

cd "$(dirname "$0")/.."
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
submission_id="u2net-nightly-${stamp}"

# runtime_env as JSON, built by Python so that every value is quoted correctly.
runtime_env_json() {
  python3 - <<'PY'
import json, os
env = {"PYTHONUNBUFFERED": "1"}
if os.environ.get("FORWARD_AWS_ENV") == "1":
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_") and v})
print(json.dumps({
    "working_dir": ".",
    # Only the code travels: no virtualenv, git history, tests, benchmarks or local outputs.
    "excludes": [".git", ".venv", ".pytest_cache", "tests", "bench", "docs", "demo_out",
                 "*.pth", "*.egg-info"],
    "env_vars": env,
}))
PY
}
runtime_env="$(FORWARD_AWS_ENV="$FORWARD_AWS_ENV" runtime_env_json)"

echo "submitting ${submission_id} to ${RAY_ADDRESS}"
exec ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "$submission_id" \
  --runtime-env-json "$runtime_env" \
  -- \
  python -m jobs.reprocess \
    --input "$INPUT_URI" \
    --warehouse "$WAREHOUSE" \
    --catalog-uri "$CATALOG_URI" \
    --model "$MODEL" \
    --weights "$WEIGHTS_URI" \
    --chunk-size 20000 \
    --prune \
    --summary "$WAREHOUSE/_runs/$submission_id.json" \
    "$@"
