#!/usr/bin/env bash
# COCO instance segmentation: Cascade Mask R-CNN on Swin-L with Mona (36 epochs, 16 images per step).
#
# Defaults: 2 nodes x 8 GPUs = 16 ranks x 1 image: the official 16 images per step (bs_16, samples_per_gpu=1), one task (= one rank) per GPU.
# The recipe fixes the images per step (train.global_batch): on other world sizes each rank's share and
# the gradient accumulation follow; a world size that cannot split it is refused. Override, e.g.
#   sbatch slurm/coco_mona.sh
#   SET="optim.lr=2e-4" RUN_DIR=runs/try1 sbatch --nodes=2 slurm/coco_mona.sh
#   CONFIG=configs/cpu/coco.yaml sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-task=0 slurm/coco_mona.sh   # CPU-only nodes
# Submit from the checkout (or set MONA_DIST_ROOT). Knobs and the pre-emption/requeue protocol: slurm/common.sh.
#SBATCH --job-name=coco_mona
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${MONA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
mona_train configs/coco_mona_swin_l.yaml
