#!/usr/bin/env bash
# Image classification (Flowers/Pets/VOC07 single-label): Swin-L with Mona (100 epochs, 16 per step).
#
# Defaults: 1 node x 4 GPUs = 4 ranks x 4 images: the official 16 images per step (swin-large_4xb8_*: 4 GPUs x 4), one task (= one rank) per GPU.
# The recipe fixes the images per step (train.global_batch): on other world sizes each rank's share and
# the gradient accumulation follow; a world size that cannot split it is refused. Override, e.g.
#   sbatch slurm/cls_mona.sh
#   SET="optim.lr=2e-4" RUN_DIR=runs/try1 sbatch --nodes=2 slurm/cls_mona.sh
#   CONFIG=configs/cpu/cls.yaml sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-task=0 slurm/cls_mona.sh   # CPU-only nodes
# Submit from the checkout (or set MONA_DIST_ROOT). Knobs and the pre-emption/requeue protocol: slurm/common.sh.
#SBATCH --job-name=cls_mona
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${MONA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
mona_train configs/cls_mona_swin_l.yaml
