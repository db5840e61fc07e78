#!/usr/bin/env bash
# Checksums of every method's scores on a small run, to show that a refactor changed no score:
#   scripts/scores_checksums.sh OUT_ROOT [SOURCE_TREE]      (SOURCE_TREE: a checkout of the commit to measure)
# writes OUT_ROOT.sums (sha256 of every scores.npy and topk.json); run it on the commits before and after and diff
# the two files. Trains two tiny full models (seed 0 with snapshots, seed 1), then attributes 18 methods, pixel,
# journey_trak and a 2-seed ensemble at K = 2 (about 7 minutes on 2 cores, one thread).
set -e
ROOT=${1:?output root}
SRC=${2:-$(cd "$(dirname "$0")/.." && pwd)}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
cd "$SRC"
export PYTHONPATH=$SRC WANDB_MODE=disabled OMP_NUM_THREADS=1
COMMON="paths.root=$ROOT logger=none dataset.num_train=120 trainer.enable_progress_bar=false"
Q="queries.num_val=8 queries.num_generated=8"
K="method.features.num_timesteps=2"
GEN="generate.num_images=8 generate.sampler.num_inference_steps=5"
$PY train.py $COMMON train.max_steps=40 train.snapshot_every_n_steps=20 $GEN > "$ROOT.train.log" 2>&1
$PY train.py $COMMON train.max_steps=40 seed=1 $GEN >> "$ROOT.train.log" 2>&1
for m in das dtrak trak relatif renorm grad_cos tracin das_abs das_exact das_magnitude das_noleverage das_plain \
    trak_squared dtrak_squared relatif_squared ekfac ekfac_das; do
  $PY attribute.py $COMMON $Q method=$m $K > "$ROOT.$m.log" 2>&1 || echo "FAIL $m"
done
$PY attribute.py $COMMON $Q method=pixel > "$ROOT.pixel.log" 2>&1 || echo "FAIL pixel"
$PY attribute.py $COMMON $Q method=journey_trak queries.sets=[generated] method.journey_steps=2 $K \
  > "$ROOT.journey.log" 2>&1 || echo "FAIL journey_trak"
$PY attribute.py $COMMON $Q method=dtrak $K ensemble.seeds=[0,1] > "$ROOT.ensemble.log" 2>&1 || echo "FAIL ensemble"
find "$ROOT" -path '*scores*' \( -name scores.npy -o -name topk.json \) | sort | xargs sha256sum \
  | sed "s|$ROOT||" > "$ROOT.sums"
wc -l "$ROOT.sums"
