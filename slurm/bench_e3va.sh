#!/usr/bin/env bash
# Training memory and time of E3VA, Mona and the baselines side by side (`mona-dist bench`), V-PETL style: same
# input size, batch and precision for every method; peak memory is the MAX over ranks.
#
# Defaults: 1 node x 8 GPUs, one rank per GPU. Pass bench options through BENCH_ARGS (replaces the defaults below):
#   sbatch slurm/bench_e3va.sh
#   BENCH_ARGS="--backbone swin_large_patch4_window7_224 --task seg --img-size 512" sbatch slurm/bench_e3va.sh
#   BENCH_ARGS="--task cls --img-size 64 --steps 2" sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-task=0 slurm/bench_e3va.sh
# Results go to RUN_DIR (default runs/bench_e3va-<job id>); other knobs: slurm/common.sh. No --signal here: the
# bench keeps no checkpoint, so an early USR1 would only cut it short.
#SBATCH --job-name=bench_e3va
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${MONA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
# V-PETL's COCO memory table compares these methods on Swin-B.
mona_bench "--backbone swin_base_patch4_window7_224 --task coco --batch-size 2 --img-size 512 --steps 20 --warmup 5 \
--methods full,fixed,e3va,mona,lora,adapter,adaptformer,lorand,bitfit"
